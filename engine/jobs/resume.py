"""The resume store: the settings fingerprint of the run that wrote a job's outputs.

Every job (folder, volume, slide) writes ``run_config.json`` (``<OUT>.run_config.json`` beside a single
output file) before its first output: the settings that decide the masks (the configuration without
``batch_size``/``device``, the references' digests, the checkpoints' file names and sizes, the backend, and
the mode's own settings: window, labels, axis, slices ..., tile size, level ...). ``--resume`` reuses
finished outputs only when the stored settings equal the new ones; otherwise it is refused with the
settings that differ (exit 2), and ``--resume --force`` recomputes every input.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from refseg.io import writers

log = logging.getLogger(__name__)

NOT_IN_FINGERPRINT = ("name", "batch_size", "device")
"""Configuration fields that do not change the masks."""


def _checkpoint(path) -> str | None:
    if path is None:
        return None
    from refseg.models.checkpoints import file_identity

    try:
        record = file_identity(path)
    except OSError:
        return Path(path).name
    return f"{record['file']} ({record['size']} bytes)"


def run_settings(config, reference_digests: Sequence[str], sam_checkpoint=None, dinov2_checkpoint=None,
                 backend: str = "torch", mode: Mapping[str, Any] | None = None,
                 dinov3_checkpoint=None) -> dict[str, Any]:
    """What decides the masks of a run (the fingerprinted part of ``run_config.json``).

    Args:
        config: the :class:`refseg.SegmenterConfig` as the job will use it.
        reference_digests: :func:`refseg.segmenter.reference_digest` of each reference, in order (volumes:
            of the reference volume and its labels).
        sam_checkpoint, dinov2_checkpoint, dinov3_checkpoint: files (DINOv3: or Hugging Face folders) given
            explicitly (name and size are recorded; ``dinov3`` only when given).
        backend: the backend name requested.
        mode: the job's own settings (window, labels, slices, tile size ...).
    """
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_FINGERPRINT}
    checkpoints = {"sam": _checkpoint(sam_checkpoint), "dinov2": _checkpoint(dinov2_checkpoint)}
    if dinov3_checkpoint is not None:
        checkpoints["dinov3"] = _checkpoint(dinov3_checkpoint)
    return writers.jsonable({"config": values, "references": list(reference_digests), "backend": backend,
                             "checkpoints": checkpoints, "mode": dict(mode or {})})


def fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``settings``."""
    text = json.dumps(writers.jsonable(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """``"key.sub: old -> new"`` for every leaf that differs between two settings dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class ResumeStore:
    """``run_config.json`` of one job: checked before any model loads, written before the first output.

    Args:
        path: the store file.
        settings: :func:`run_settings` of this run.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(writers.jsonable(dict(settings))))  # as stored: string keys

    def reuse(self, resume: bool, force: bool, outputs_exist: bool) -> bool:
        """Whether finished outputs may be kept (``--resume``).

        Raises:
            ValueError: ``resume`` into outputs written under other settings (without ``force``), naming
                the settings that differ, or an unreadable store.
        """
        if not resume:
            return False
        if not self.path.is_file():
            if outputs_exist:
                log.warning("%s: missing; cannot check that the existing outputs used the same settings",
                            self.path)
            return True
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            if force:
                log.warning("--force: %s is unreadable (%s); recomputing every input", self.path, exc)
                return False
            raise ValueError(f"{self.path}: unreadable ({exc}); rerun with --resume --force to recompute") from exc
        if stored.get("fingerprint") == fingerprint(self.settings):
            return True
        changes = "; ".join(differences(stored.get("settings", {}), self.settings)) or "fingerprint differs"
        if not force:
            raise ValueError(f"{self.path.parent}: the existing outputs were written with other settings "
                             f"({changes}); rerun with --resume --force to recompute them, or choose another "
                             f"output")
        log.warning("--force: settings differ from the earlier run (%s); recomputing every input", changes)
        return False

    def write(self) -> None:
        """Record this run's settings (before its first output, so that a killed run leaves them too)."""
        writers.write_json(self.path, {"fingerprint": fingerprint(self.settings), "settings": self.settings})
