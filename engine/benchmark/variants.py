"""Backend variants measured by the suite: torch eager / reduced precision / compiled / CUDA graphs,
the official (research) modules, ONNX Runtime and TensorRT.

A variant turns model modules into the three calls every backend offers (see
:mod:`refseg.runtime.torch_backend`): ``encode_dinov2(images) -> tokens``, ``encode_sam(images) ->
embeddings``, ``decode(embedding, coords, labels) -> (low_res_logits, iou)``. The torch variants
work on deep copies of fp32 modules (a variant never changes the modules another one uses); the
exported variants go through :func:`refseg.runtime.select.create_backend`, and are skipped with the
reason when :mod:`refseg.runtime.exported` is missing or cannot build the backend here.
"""
from __future__ import annotations

import copy
import importlib
import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Variant:
    """One way of running the models.

    kind: ``torch``, ``official`` (the official ``dinov2`` / ``segment_anything`` modules, fp32
    eager, unfused attention), ``onnxruntime`` or ``tensorrt``. precision: encoder precision (the
    torch decoder always runs fp32, as in the pipeline). compile_mode: ``None`` (eager) or a
    ``torch.compile`` mode (``reduce-overhead`` = CUDA graphs).
    """

    name: str
    kind: str
    precision: str = "fp32"
    compile_mode: str | None = None
    description: str = ""

    @property
    def is_reference(self) -> bool:
        """The fp32 eager torch path every other variant is compared with."""
        return self.kind == "torch" and self.precision == "fp32" and self.compile_mode is None

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "precision": self.precision,
                "compile_mode": self.compile_mode, "description": self.description}


REFERENCE = Variant("torch-fp32", "torch", "fp32", None, "PyTorch eager fp32, SDPA attention")
_ALL = [
    REFERENCE,
    Variant("torch-bf16", "torch", "bf16", None, "PyTorch eager bf16 encoders, SDPA, fp32 LayerNorm"),
    Variant("torch-fp16", "torch", "fp16", None, "PyTorch eager fp16 encoders, SDPA, fp32 LayerNorm"),
    Variant("torch-compile-fp32", "torch", "fp32", "default", "torch.compile (inductor) fp32"),
    Variant("torch-compile-bf16", "torch", "bf16", "default", "torch.compile (inductor) bf16"),
    Variant("torch-cudagraphs-bf16", "torch", "bf16", "reduce-overhead",
            "torch.compile mode=reduce-overhead (CUDA graphs) bf16"),
    Variant("official-fp32", "official", "fp32", None,
            "official dinov2 / segment_anything modules, fp32 eager (research code path)"),
    Variant("onnxruntime", "onnxruntime", "fp32", None, "ONNX Runtime, fp32 graphs (refseg.runtime.exported)"),
    Variant("onnxruntime-fp16", "onnxruntime", "fp16", None, "ONNX Runtime CUDA, fp16 graphs (fp32 LayerNorm)"),
    Variant("tensorrt", "tensorrt", "fp16", None, "TensorRT engines from fp16 graphs (refseg.runtime.exported)"),
]
VARIANTS = {v.name: v for v in _ALL}


def exported_unavailable(kind: str, device: torch.device) -> str | None:
    """Why the exported backend ``kind`` cannot run here, or None when it may: decided before anything is
    exported (imports tried; on a GPU, ONNX Runtime must offer its CUDA provider, else its rows would
    measure the CPU provider after minutes of export)."""
    if kind == "tensorrt" and device.type != "cuda":
        return "TensorRT needs a CUDA GPU"
    if kind == "onnxruntime" and device.type == "cuda":
        try:
            providers = importlib.import_module("onnxruntime").get_available_providers()
        except ImportError:
            providers = []
        if "CUDAExecutionProvider" not in providers:
            return f"ONNX Runtime has no CUDAExecutionProvider here (providers: {', '.join(providers) or 'none'})"
    try:
        importlib.import_module("refseg.runtime.exported")
    except ImportError as exc:
        return f"refseg.runtime.exported is not importable ({exc})"
    for module, extra in ((kind, "onnx" if kind == "onnxruntime" else "gpu"), ("onnx", "onnx"),
                          ("refseg.export.onnx_export", None)):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return (f"{module} is not installed (pip install 'refseg[{extra}]')" if extra
                    else f"{module} is not importable ({exc})")
    return None


def plan_variants(device: torch.device, quick: bool, only: list[str] | None = None
                  ) -> tuple[list[Variant], list[dict]]:
    """The variants to run on ``device`` and the skipped ones with their reasons.

    ``quick`` keeps the cheap CPU set (fp32, bf16, official for the pipeline only, ONNX Runtime);
    ``only`` restricts to the named variants (unknown names raise ValueError).
    """
    if only:
        unknown = sorted(set(only) - set(VARIANTS))
        if unknown:
            raise ValueError(f"--backends: unknown variant(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(VARIANTS)}")
    cuda = device.type == "cuda"
    run, skipped = [], []
    for v in _ALL:
        reason = None
        if only and v.name not in only and not v.is_reference:
            reason = "not selected (--backends)"
        elif v.precision == "fp16" and v.kind == "torch" and not cuda:
            reason = "fp16 on the CPU is emulated and slow; bf16 is measured instead"
        elif v.compile_mode == "reduce-overhead" and not cuda:
            reason = "CUDA graphs need a CUDA GPU"
        elif v.compile_mode and quick:
            reason = "--quick: torch.compile takes minutes to compile on a small CPU"
        elif v.compile_mode == "default" and cuda and v.precision == "fp32":
            reason = "compiled fp32 is not a deployment target on GPU (compiled bf16 is measured)"
        elif v.compile_mode == "default" and not cuda and v.precision == "bf16":
            reason = "on the CPU the compiled path is measured in fp32"
        elif v.kind == "onnxruntime" and v.precision == "fp16" and not cuda:
            reason = "fp16 graphs are for the CUDA provider; the CPU provider runs the fp32 graphs"
        elif v.kind == "official" and quick:
            reason = "--quick: the official modules are measured end to end by the research baseline only"
        elif v.kind in ("onnxruntime", "tensorrt"):
            reason = exported_unavailable(v.kind, device)
        if reason:
            skipped.append({"variant": v.name, "reason": reason})
        else:
            run.append(v)
    return run, skipped


# ---------------------------------------------------------------------------- torch module runners
def _maybe_compile(fn, variant: Variant):
    return torch.compile(fn, mode=variant.compile_mode) if variant.compile_mode else fn


def dinov2_runner(module: torch.nn.Module, variant: Variant, device: torch.device,
                  feature_key: str = "x_norm_patchtokens"):
    """``fn(images (B, 3, S, S) float32) -> (B, T, D) float32`` for a refseg or official DINOv2 module."""
    dtype = DTYPES[variant.precision]
    model = copy.deepcopy(module).to(device=device, dtype=dtype).eval()

    def forward(images: torch.Tensor) -> torch.Tensor:
        return model.forward_features(images)[feature_key]

    forward = _maybe_compile(forward, variant)

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return forward(images.to(device, dtype)).float()

    return run


def sam_encoder_runner(image_encoder: torch.nn.Module, variant: Variant, device: torch.device):
    """``fn(images (B, 3, 1024, 1024) float32, normalised) -> (B, 256, 64, 64) float32``."""
    dtype = DTYPES[variant.precision]
    encoder = _maybe_compile(copy.deepcopy(image_encoder).to(device=device, dtype=dtype).eval(), variant)

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return encoder(images.to(device, dtype)).float()

    return run


def decoder_runner(sam: torch.nn.Module, variant: Variant, device: torch.device, official: bool = False):
    """``fn(embedding (256, 64, 64), coords (P, N, 2), labels (P, N)) -> (logits (P, 1, 256, 256), iou)``.

    Coordinates are in SAM's 1024 frame, (x, y); labels 1 / 0 / −1 (padding); single-mask output.
    The decoder runs fp32 in every torch variant (the pipeline's choice).
    """
    prompt_encoder = copy.deepcopy(sam.prompt_encoder).to(device).eval()
    mask_decoder = copy.deepcopy(sam.mask_decoder).to(device).eval()

    def forward(embedding, coords, labels):
        sparse, dense = prompt_encoder((coords, labels), None, None)
        masks, iou = mask_decoder(embedding[None], prompt_encoder.get_dense_pe(), sparse, dense, False)
        return masks, iou

    forward = _maybe_compile(forward, variant) if not official else forward

    @torch.inference_mode()
    def run(embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor):
        return forward(embedding.to(device, torch.float32), coords.to(device, torch.float32), labels.to(device))

    return run


def exported_backend(ctx, variant: Variant, dinov2: str, image_size: int, sam: str):
    """The ``onnxruntime`` / ``tensorrt`` backend for (dinov2 @ image_size, sam), exporting the graphs
    once into ``<out>/exports/<dinov2>-<sam>-<S>-<precision>/`` (reused by later runs into the same folder).

    Returns (backend, seconds spent exporting now). Raises whatever the export or the runtime raises.
    """
    from refseg.config import SegmenterConfig
    from refseg.runtime.manifest_reader import ManifestError, verify_manifest
    from refseg.runtime.select import create_backend

    ck = ctx.checkpoints
    dinov2_ckpt, sam_ckpt = ck.path("dinov2", dinov2), ck.path("sam", sam)
    folder = ctx.out_dir / "exports" / f"{dinov2}-{sam}-{image_size}-{variant.precision}"
    request = dict(precision=variant.precision, image_size=image_size, dinov2_checkpoint=dinov2_ckpt,
                   sam_checkpoint=sam_ckpt)
    export_s = 0.0
    try:
        verify_manifest(folder, **request)
    except ManifestError:
        from refseg.export.onnx_export import export_models

        plan = ctx.plan
        log.info("exporting %s@%d + %s (%s) to %s", dinov2, image_size, sam, variant.precision, folder)
        start = time.perf_counter()
        export_models(folder, dinov2_ckpt, sam_ckpt, dinov2=dinov2, sam=sam, precision=variant.precision,
                      image_size=image_size, max_batch=max(plan.model_batches + plan.e2e_batches),
                      device=ctx.device if ctx.device.type == "cuda" else "cpu")
        export_s = time.perf_counter() - start
    cfg = SegmenterConfig.from_preset("sat", dinov2=dinov2, sam=sam, image_size=image_size,
                                      precision=variant.precision)
    backend = create_backend(variant.kind, cfg, sam_checkpoint=sam_ckpt, dinov2_checkpoint=dinov2_ckpt,
                             device=str(ctx.device), engine_dir=folder)
    return backend, export_s


def apply_to_segmenter(segmenter, variant: Variant, compile_backend=None) -> None:
    """Compile a torch-backed Segmenter's encoders in place when ``variant`` asks for it.

    Goes through :meth:`refseg.runtime.torch_backend.TorchBackend.compile`, which re-wraps the very
    callables the backend calls (compiling ``backend.dinov2.forward_features`` or
    ``backend.sam.image_encoder`` from outside would leave the backend on its eager references).
    ``compile_backend``: torch.compile backend (default inductor; tests pass a counting one).
    Precision is set through the config (``precision=``) when the Segmenter is built.
    """
    if variant.kind != "torch" or not variant.compile_mode:
        return
    segmenter.backend.compile(mode=variant.compile_mode, backend=compile_backend)
