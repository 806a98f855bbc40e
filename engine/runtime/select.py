"""Backend selection: ``torch``, ``onnxruntime``, ``tensorrt`` or ``auto``.

``auto`` tries TensorRT -> ONNX Runtime -> torch and logs each step down once with its reason.
The accelerated backends run exported graphs (``refseg export``) found in ``config``'s engine
folder; the torch backend loads the official checkpoints directly.
"""
from __future__ import annotations

import logging
import os

from refseg.config import SegmenterConfig
from refseg.runtime.torch_backend import TorchBackend, resolve_device, resolve_precision

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


def load_models(config: SegmenterConfig, sam_checkpoint=None, dinov2_checkpoint=None, with_sam: bool = True):
    """Build DINOv2 and SAM for ``config``; explicit checkpoints decide the model size. ``with_sam=False``:
    DINOv2 alone (the SAM module returned is None).

    Returns:
        (dinov2 module, sam module, config) where config's ``dinov2``/``sam`` names are those of
        the checkpoints actually loaded (a ``medsam*`` file is MedSAM; ``sam="medsam"`` keeps MedSAM
        for any ViT-B-layout file).

    Raises:
        CheckpointError: every missing file in one message (nothing is loaded then), or a file that
            does not fit the model.
    """
    from refseg.models import DINOV2_SPECS, SAM_SPECS, build_dinov2, build_sam
    from refseg.models.build import resolve_model_checkpoints

    if not with_sam:
        dinov2 = build_dinov2(None if dinov2_checkpoint else config.dinov2, dinov2_checkpoint)
        named = dinov2.spec.name != config.dinov2 and dinov2.spec.name in DINOV2_SPECS
        return dinov2, None, config.replace(dinov2=dinov2.spec.name) if named else config
    # Both files are located first: every missing one is reported in one message, before any load.
    dinov2_path, sam_path = resolve_model_checkpoints(config.dinov2, config.sam, dinov2_checkpoint,
                                                      sam_checkpoint)
    dinov2 = build_dinov2(None if dinov2_checkpoint else config.dinov2, dinov2_path)
    # "medsam" is a ViT-B fine-tune: the name (and so MedSAM's pre-processing) is kept for any ViT-B file.
    sam_name = None if sam_checkpoint and config.sam != "medsam" else config.sam
    sam = build_sam(sam_name, sam_path)
    changes = {}
    # Reduced-depth test models have no official name: the config keeps the one it has.
    if dinov2.spec.name != config.dinov2 and dinov2.spec.name in DINOV2_SPECS:
        log.debug("DINOv2 %s from %s (config named %s)", dinov2.spec.name, dinov2_checkpoint, config.dinov2)
        changes["dinov2"] = dinov2.spec.name
    if sam.spec.name != config.sam and sam.spec.name in SAM_SPECS:
        log.debug("SAM %s from %s (config named %s)", sam.spec.name, sam_checkpoint, config.sam)
        changes["sam"] = sam.spec.name
    return dinov2, sam, config.replace(**changes) if changes else config


def create_backend(name: str, config: SegmenterConfig, sam_checkpoint=None, dinov2_checkpoint=None,
                   device: str = "auto", engine_dir: str | os.PathLike | None = None,
                   compile: bool = False, exporter=None, with_sam: bool = True):
    """Create the runtime backend ``name`` for ``config`` on ``device`` (``with_sam=False``: the torch
    backend with DINOv2 alone, for matching without decoding).

    ``compile`` applies to the torch backend (``torch.compile`` of both encoders); the exported
    backends are compiled graphs already and ignore it. ``exporter`` fills the exported backends'
    cache folder on first use when ``engine_dir`` is None (:data:`refseg.runtime.exported.Exporter`;
    the Segmenter passes :func:`refseg.export.cache_fill.fill_export_folder`).

    Raises:
        ValueError: unknown backend name, or an explicitly requested backend that cannot run here
            (the message says why).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not with_sam and name != "torch":
        raise ValueError(f"backend {name!r}: a matching-only backend (no SAM) is torch only")
    dev = resolve_device(device)
    if config.precision == "auto":  # resolved once for this device; the config says what ran
        config = config.replace(precision=resolve_precision("auto", dev))
    candidates = ["tensorrt", "onnxruntime", "torch"] if name == "auto" else [name]
    for candidate in candidates:
        if candidate == "torch":
            dinov2, sam, config = load_models(config, sam_checkpoint, dinov2_checkpoint, with_sam)
            backend = TorchBackend(dinov2, sam, dev, config.precision, config.feature_key,
                                   compile=compile)
            backend.config = config
            backend.fixed_batch = config.batch_size  # compiled encoders: one shape, one graph
            return backend
        try:
            from refseg.runtime.exported import create_exported_backend
            return create_exported_backend(candidate, config, dev, sam_checkpoint=sam_checkpoint,
                                           dinov2_checkpoint=dinov2_checkpoint, engine_dir=engine_dir,
                                           exporter=exporter)
        except (ImportError, RuntimeError, ValueError, OSError) as exc:
            if name != "auto":
                raise ValueError(f"backend {candidate!r} is not usable: {exc}") from exc
            log.warning("backend %s unavailable (%s); trying the next one", candidate, exc)
    raise AssertionError("unreachable: torch is always the last candidate")
