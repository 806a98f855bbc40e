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


def select_encoder(config: SegmenterConfig, dinov2_checkpoint=None, dinov3_checkpoint=None) -> SegmenterConfig:
    """An explicit checkpoint decides the matching encoder: a DINOv3 checkpoint (file or Hugging Face folder)
    selects ``encoder="dinov3"``, a DINOv2 one ``"dinov2"``, the input side rounded to the encoder's patch
    (:meth:`SegmenterConfig.with_encoder`, logged); no checkpoint keeps the config's.

    Raises:
        ValueError: both checkpoints given.
    """
    if dinov2_checkpoint is not None and dinov3_checkpoint is not None:
        raise ValueError(f"both a DINOv2 ({dinov2_checkpoint}) and a DINOv3 ({dinov3_checkpoint}) checkpoint were "
                         "given: the matching encoder is one of them")
    want = "dinov3" if dinov3_checkpoint is not None else "dinov2" if dinov2_checkpoint is not None else None
    if want is None or want == config.encoder:
        return config
    switched = config.with_encoder(want)
    log.info("matching encoder %s (from the %s checkpoint); image_size %d -> %d", want, want, config.image_size,
             switched.image_size)
    return switched


def load_models(config: SegmenterConfig, sam_checkpoint=None, dinov2_checkpoint=None, dinov3_checkpoint=None,
                with_sam: bool = True):
    """Build the matching encoder (DINOv2 or DINOv3, ``config.encoder``) and SAM or SAM 2 for ``config``;
    explicit checkpoints decide the model and its size (and the encoder: :func:`select_encoder`).
    ``with_sam=False``: the encoder alone (the SAM module returned is None).

    Returns:
        (encoder module, sam module, config) where config's ``encoder`` / ``dinov2`` or ``dinov3`` / ``sam``
        names are those of the checkpoints actually loaded (a ``medsam*`` file is MedSAM, a ``MedSAM2*`` file
        MedSAM2; ``sam="medsam"`` keeps MedSAM for any ViT-B-layout file, ``sam="medsam2"`` MedSAM2 for any
        SAM 2.1 tiny one; a SAM 2 file is SAM 2 whatever ``sam`` says). ``config.sam_image_size`` sets SAM 2's
        input.

    Raises:
        CheckpointError: every missing file in one message (nothing is loaded then; DINOv3 weights are gated
            and never downloaded), or a file that does not fit the model.
    """
    from refseg.models import DINOV2_SPECS, DINOV3_SPECS, build_dinov2, build_dinov3
    from refseg.models.build import SAM_FAMILY_SPECS, build_sam_family, resolve_model_checkpoints

    config = select_encoder(config, dinov2_checkpoint, dinov3_checkpoint)
    explicit = dinov3_checkpoint if config.encoder == "dinov3" else dinov2_checkpoint
    if with_sam:  # both files are located first: every missing one is reported in one message, before any load
        encoder_path, sam_path = resolve_model_checkpoints(config.encoder_model, config.sam, explicit,
                                                           sam_checkpoint, encoder=config.encoder)
    else:  # matching only: the encoder's file alone (located by its build)
        encoder_path = explicit
    if config.encoder == "dinov3":
        encoder, specs = build_dinov3(None if explicit else config.dinov3, encoder_path), DINOV3_SPECS
    else:
        encoder, specs = build_dinov2(None if explicit else config.dinov2, encoder_path), DINOV2_SPECS
    if encoder.patch_size != config.patch_size:
        raise ValueError(f"{encoder_path}: {config.encoder} model with {encoder.patch_size}-px patches; refseg reads "
                         f"{config.patch_size}-px patches for {config.encoder}")
    # An explicit file decides the model (SAM or SAM 2, from its keys). "medsam" / "medsam2" are fine-tunes of
    # ViT-B / SAM 2.1 tiny: the name (MedSAM's pre-processing, MedSAM2's 512 input) is kept for such files.
    sam_name = None if sam_checkpoint and config.sam not in ("medsam", "medsam2") else config.sam
    sam = build_sam_family(sam_name, sam_path, image_size=config.sam_image_size) if with_sam else None
    changes = {}
    # Reduced-depth test models have no official name: the config keeps the one it has.
    if encoder.spec.name != config.encoder_model and encoder.spec.name in specs:
        log.debug("%s %s from %s (config named %s)", config.encoder, encoder.spec.name, explicit,
                  config.encoder_model)
        changes[config.encoder] = encoder.spec.name
    if sam is not None and sam.spec.name != config.sam and sam.spec.name in SAM_FAMILY_SPECS:
        log.debug("SAM %s from %s (config named %s)", sam.spec.name, sam_checkpoint, config.sam)
        changes["sam"] = sam.spec.name
    return encoder, sam, config.replace(**changes) if changes else config


def create_backend(name: str, config: SegmenterConfig, sam_checkpoint=None, dinov2_checkpoint=None,
                   device: str = "auto", engine_dir: str | os.PathLike | None = None,
                   compile: bool = False, exporter=None, dinov3_checkpoint=None, with_sam: bool = True):
    """Create the runtime backend ``name`` for ``config`` on ``device`` (``with_sam=False``: the torch
    backend with the matching encoder alone, for matching without decoding).

    The matching encoder is ``config.encoder``'s, or the one an explicit ``dinov2_checkpoint`` /
    ``dinov3_checkpoint`` (file or Hugging Face folder) holds (:func:`select_encoder`).

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
    config = select_encoder(config, dinov2_checkpoint, dinov3_checkpoint)
    if config.precision == "auto":  # resolved once for this device; the config says what ran
        config = config.replace(precision=resolve_precision("auto", dev))
    candidates = ["tensorrt", "onnxruntime", "torch"] if name == "auto" else [name]
    for candidate in candidates:
        if candidate == "torch":
            encoder, sam, config = load_models(config, sam_checkpoint, dinov2_checkpoint, dinov3_checkpoint,
                                               with_sam)
            backend = TorchBackend(encoder, sam, dev, config.precision, config.feature_key,
                                   compile=compile, drop_absent=config.drop_absent)
            backend.config = config
            backend.fixed_batch = config.batch_size  # compiled encoders: one shape, one graph
            return backend
        try:
            from refseg.runtime.exported import create_exported_backend
            return create_exported_backend(candidate, config, dev, sam_checkpoint=sam_checkpoint,
                                           dinov2_checkpoint=dinov2_checkpoint, engine_dir=engine_dir,
                                           exporter=exporter, dinov3_checkpoint=dinov3_checkpoint)
        except (ImportError, RuntimeError, ValueError, OSError) as exc:
            if name != "auto":
                raise ValueError(f"backend {candidate!r} is not usable: {exc}") from exc
            log.warning("backend %s unavailable (%s); trying the next one", candidate, exc)
    raise AssertionError("unreachable: torch is always the last candidate")
