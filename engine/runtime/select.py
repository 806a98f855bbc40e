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


def load_models(config: SegmenterConfig, sam_checkpoint=None, dinov2_checkpoint=None):
    """Build DINOv2 and SAM (or SAM 2) for ``config``; explicit checkpoints decide the model and its size.

    Returns:
        (dinov2 module, sam module, config) where config's ``dinov2``/``sam`` names are those of
        the checkpoints actually loaded (a ``medsam*`` file is MedSAM, a ``MedSAM2*`` file MedSAM2;
        ``sam="medsam"`` keeps MedSAM for any ViT-B-layout file, ``sam="medsam2"`` MedSAM2 for any SAM 2.1
        tiny one; a SAM 2 file is SAM 2 whatever ``sam`` says). ``config.sam_image_size`` sets SAM 2's input.

    Raises:
        CheckpointError: every missing file in one message (nothing is loaded then), or a file that
            does not fit the model.
    """
    from refseg.models import DINOV2_SPECS, build_dinov2
    from refseg.models.build import SAM_FAMILY_SPECS, build_sam_family, resolve_model_checkpoints

    # Both files are located first: every missing one is reported in one message, before any load.
    dinov2_path, sam_path = resolve_model_checkpoints(config.dinov2, config.sam, dinov2_checkpoint,
                                                      sam_checkpoint)
    dinov2 = build_dinov2(None if dinov2_checkpoint else config.dinov2, dinov2_path)
    # An explicit file decides the model (SAM or SAM 2, from its keys). "medsam" / "medsam2" are fine-tunes of
    # ViT-B / SAM 2.1 tiny: the name (MedSAM's pre-processing, MedSAM2's 512 input) is kept for such files.
    sam_name = None if sam_checkpoint and config.sam not in ("medsam", "medsam2") else config.sam
    sam = build_sam_family(sam_name, sam_path, image_size=config.sam_image_size)
    changes = {}
    # Reduced-depth test models have no official name: the config keeps the one it has.
    if dinov2.spec.name != config.dinov2 and dinov2.spec.name in DINOV2_SPECS:
        log.debug("DINOv2 %s from %s (config named %s)", dinov2.spec.name, dinov2_checkpoint, config.dinov2)
        changes["dinov2"] = dinov2.spec.name
    if sam.spec.name != config.sam and sam.spec.name in SAM_FAMILY_SPECS:
        log.debug("SAM %s from %s (config named %s)", sam.spec.name, sam_checkpoint, config.sam)
        changes["sam"] = sam.spec.name
    return dinov2, sam, config.replace(**changes) if changes else config


def create_backend(name: str, config: SegmenterConfig, sam_checkpoint=None, dinov2_checkpoint=None,
                   device: str = "auto", engine_dir: str | os.PathLike | None = None,
                   compile: bool = False, exporter=None):
    """Create the runtime backend ``name`` for ``config`` on ``device``.

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
    dev = resolve_device(device)
    if config.precision == "auto":  # resolved once for this device; the config says what ran
        config = config.replace(precision=resolve_precision("auto", dev))
    candidates = ["tensorrt", "onnxruntime", "torch"] if name == "auto" else [name]
    for candidate in candidates:
        if candidate == "torch":
            dinov2, sam, config = load_models(config, sam_checkpoint, dinov2_checkpoint)
            backend = TorchBackend(dinov2, sam, dev, config.precision, config.feature_key,
                                   compile=compile, drop_absent=config.drop_absent)
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
