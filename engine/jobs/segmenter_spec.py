"""How a job builds its Segmenter: one picklable spec from the command line, used in-process and on Ray actors.

:class:`SegmenterSpec` holds plain values (configuration, checkpoint files, device, backend, export folder,
``--compile``, intensity window, torch threads); :meth:`SegmenterSpec.check` locates both checkpoints (the
matching encoder's, DINOv2 or DINOv3, and SAM's) and checks the model names given with ``--dinov2`` /
``--dinov3`` / ``--sam`` without loading any model, and
:meth:`SegmenterSpec.build` loads the models. :class:`LocalRunner` is the in-process side of the job's
segmentation switch (:class:`refseg.jobs.ray_pool.RayPool` the Ray side): both take reference shots,
stream items and report the models they loaded.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

Shot = tuple[np.ndarray, np.ndarray, str]
"""One reference: (image as read, mask, source name for messages)."""


def config_from_args(args: argparse.Namespace):
    """The :class:`refseg.SegmenterConfig` of ``refseg segment``: ``--preset``; the matching encoder chosen by
    ``--dinov3`` / ``--dinov3-checkpoint`` (DINOv3) or ``--dinov2`` / ``--dinov2-checkpoint`` (DINOv2), the
    preset's input side rounded to its patch (:meth:`~refseg.SegmenterConfig.with_encoder`); the explicit
    model / size options; then every ``--set KEY=VALUE``.

    Raises:
        ValueError: options naming both encoders.
    """
    from refseg.config import SegmenterConfig

    v3 = [f for f, v in (("--dinov3", args.dinov3), ("--dinov3-checkpoint", args.dinov3_checkpoint)) if v]
    v2 = [f for f, v in (("--dinov2", args.dinov2), ("--dinov2-checkpoint", args.dinov2_checkpoint)) if v]
    if v3 and v2:
        raise ValueError(f"{' '.join(v2)} and {' '.join(v3)} name two matching encoders: give DINOv2 or DINOv3")
    config = SegmenterConfig.from_preset(args.preset)
    if v3 or v2:
        config = config.with_encoder("dinov3" if v3 else "dinov2")
    explicit = {k: v for k, v in {
        "sam": args.sam, "dinov2": args.dinov2, "dinov3": args.dinov3, "batch_size": args.batch_size,
        "image_size": args.image_size, "metric": args.metric, "precision": args.precision,
    }.items() if v is not None}
    config = config.replace(**explicit)
    return config.override_from_strings(args.overrides) if args.overrides else config


@dataclass(frozen=True)
class SegmenterSpec:
    """What it takes to build a :class:`refseg.Segmenter` (plain, picklable values).

    ``threads``: torch intra-op threads of the process that builds it (0 = leave torch's default);
    ``window``: :meth:`refseg.Segmenter.set_window` (``None`` = the reference's own window).
    ``names_given``: the ``--dinov2``, ``--dinov3`` and ``--sam`` names typed by the user, checked against the
    checkpoint files by :meth:`check` (the encoder's by ``config.encoder``). ``dinov3_checkpoint``: a DINOv3
    file or Hugging Face folder.
    """

    config: Any  # SegmenterConfig
    sam_checkpoint: str | None = None
    dinov2_checkpoint: str | None = None
    device: str = "auto"
    backend: str = "torch"
    engine_dir: str | None = None
    compile: bool = False
    threads: int = 0
    window: Any = None  # refseg.io.intensity.Window
    names_given: tuple[str | None, str | None, str | None] = (None, None, None)
    dinov3_checkpoint: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, config, window=None) -> "SegmenterSpec":
        """The spec of ``refseg segment`` for ``config`` (the job may have changed it, e.g. volumes
        decode with ``fallback=False``)."""
        return cls(config, sam_checkpoint=args.sam_checkpoint, dinov2_checkpoint=args.dinov2_checkpoint,
                   device=args.device, backend=args.backend, engine_dir=args.engine_dir,
                   compile=bool(args.compile), window=window, names_given=(args.dinov2, args.dinov3, args.sam),
                   dinov3_checkpoint=args.dinov3_checkpoint)

    @property
    def encoder_checkpoint(self) -> str | None:
        """The matching encoder's explicit checkpoint (``config.encoder``'s)."""
        return self.dinov3_checkpoint if self.config.encoder == "dinov3" else self.dinov2_checkpoint

    @property
    def encoder_name_given(self) -> str | None:
        """The ``--dinov2`` / ``--dinov3`` name the user typed for the matching encoder, if any."""
        dinov2, dinov3, _ = self.names_given
        return dinov3 if self.config.encoder == "dinov3" else dinov2

    def checkpoint_files(self, sam: str | None) -> tuple:
        """(encoder file or folder, SAM file) located for this spec and the SAM-family model ``sam``, every
        missing one in one :class:`~refseg.models.checkpoints.CheckpointError`; nothing is loaded."""
        from refseg.models.build import resolve_model_checkpoints

        return resolve_model_checkpoints(self.config.encoder_model, sam, self.encoder_checkpoint,
                                         self.sam_checkpoint, encoder=self.config.encoder)

    def check(self) -> None:
        """Locate both checkpoints (every missing one in one message; DINOv3's gated weights are looked up,
        never downloaded) and refuse ``--dinov2`` / ``--dinov3`` / ``--sam`` names that contradict them (or a
        checkpoint of another family); no model is loaded. Exported backends with an ``--engine-dir`` and no
        checkpoint need no file."""
        from refseg.models.build import check_model_names

        explicit = self.encoder_checkpoint
        if self.engine_dir is not None and not (explicit or self.sam_checkpoint):
            return
        encoder_path, sam_path = self.checkpoint_files(self.config.sam)
        sam = self.names_given[2]
        check_model_names(self.encoder_name_given if explicit else None, sam if self.sam_checkpoint else None,
                          encoder_path, sam_path, encoder=self.config.encoder)

    def build(self):
        """Load the models: a :class:`refseg.Segmenter` with this spec's window (no reference yet)."""
        import torch

        from refseg.segmenter import Segmenter

        if self.threads:
            torch.set_num_threads(self.threads)
        segmenter = Segmenter(self.config, sam_checkpoint=self.sam_checkpoint,
                              dinov2_checkpoint=self.dinov2_checkpoint, device=self.device,
                              backend=self.backend, engine_dir=self.engine_dir, compile=self.compile,
                              dinov3_checkpoint=self.dinov3_checkpoint)
        return segmenter.set_window(self.window)


def loaded_models(segmenter) -> dict[str, Any]:
    """The models a Segmenter actually runs: the matching encoder (DINOv2 or DINOv3) and SAM names as loaded,
    backend and device."""
    config = segmenter.config
    encoder = getattr(config, "encoder", "dinov2")
    sam = getattr(segmenter, "sam_name", None) or getattr(config, "sam", None)  # --propagate: the SAM 2 model
    return {encoder: getattr(config, encoder, None), "sam": sam,
            "backend": getattr(getattr(segmenter, "backend", None), "name", None),
            "device": str(getattr(segmenter, "device", "cpu"))}


def set_shots(segmenter, shots: Sequence[Shot]) -> None:
    """Replace the segmenter's references by ``shots`` (n-shot when several)."""
    if not shots:
        raise ValueError("no reference shot to set")
    segmenter.set_reference(*shots[0])
    for shot in shots[1:]:
        segmenter.add_reference(*shot)


class LocalRunner:
    """The in-process segmentation of a job: one Segmenter and its :meth:`refseg.Segmenter.stream`.

    Built from a ``spec`` (the models load here) or around a ``segmenter`` that is already built."""

    remote = False  # item loaders may close over in-memory data

    def __init__(self, spec: SegmenterSpec | None = None, segmenter=None):
        self.segmenter = segmenter if segmenter is not None else spec.build()
        self.config = self.segmenter.config  # model names as actually loaded
        self.models = loaded_models(self.segmenter)

    @property
    def classes(self) -> list[int]:
        """Class values of the current references, ascending."""
        return self.segmenter.classes

    def set_references(self, shots: Sequence[Shot]) -> None:
        set_shots(self.segmenter, shots)

    def stream(self, items: Iterable, batch_size: int | None = None) -> Iterator:
        return self.segmenter.stream(items, batch_size=batch_size)

    def close(self) -> None:
        pass


def default_threads(workers: int) -> int:
    """Torch threads for each of ``workers`` processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
