"""Export the matching encoder (DINOv2 or DINOv3), the SAM image encoder and the SAM prompt decoder to ONNX.

Usage::

    manifest = export_models("exports/b_b", dinov2_checkpoint="dinov2_vitb14_pretrain.pth",
                             sam_checkpoint="sam_vit_b_01ec64.pth", precision="fp16")

writes ``dinov2.onnx``, ``sam_encoder.onnx``, ``sam_decoder.onnx`` (plus ``<name>.onnx.data``
for graphs over ~1.8 GB, e.g. DINOv2-g and SAM-H) and ``manifest.json``. With ``dinov3_checkpoint`` (a
``.pth`` or a Hugging Face folder) the encoder graph is DINOv3's (:mod:`refseg.export.dinov3_onnx`, same file
and tensor names), and the manifest records ``encoder: dinov3`` and ``patch_size: 16``.

Graphs are traced with the TorchScript-based ``torch.onnx.export`` (``dynamo=False``: the
dynamo exporter needs ``onnxscript``, not a refseg dependency) at opset >= 17, so LayerNorm is a
single ``LayerNormalization``. Dynamic dimensions: the batch of both encoders, the prompt sets and
points of the decoder. SAM's attention is traced in its ``fused`` form (rel-pos folded into q and k,
:mod:`refseg.models.sam_attention`), so the encoder graph holds plain MatMul-Softmax-MatMul attention
with no (N, N) bias, the pattern TensorRT fuses; ``REFSEG_SAM_ATTENTION=bias`` at export time writes the
bias form instead (~30 % faster under ONNX Runtime on a CPU, where nothing fuses attention; the
manifest records which: ``graphs.sam_encoder.attention``). Precision ``fp16`` bakes half precision into the encoders' graphs with
LayerNorm and Softmax kept in fp32 (:mod:`refseg.export.fp16`); the decoder (3.6 GFLOP per
prompt set) stays fp32, like the torch backend's. Every graph passes ``onnx.checker``.

A SAM 2 / 2.1 / MedSAM2 checkpoint gives SAM 2's encoder and decoder graphs instead
(:func:`refseg.export.sam2_onnx.export_sam2_graphs`: ``sam2_encoder.onnx``, ``sam2_decoder.onnx``, under the
same manifest keys, marked ``"family": "sam2"``), at the model's input side or ``sam_image_size``.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from refseg.export.fp16 import convert_float_to_float16, float16_report
from refseg.export.manifest import build_manifest, checkpoint_record, write_manifest
from refseg.export.debias_basis import debias_record, resolve_debias
from refseg.export.wrappers import Dinov2Export, Dinov3Export, SamDecoderExport, SamEncoderExport
from refseg.models.sam_attention import attention_form
from refseg.runtime.io_names import GRAPH_FILES, MANIFEST_NAME, POSITIONAL_BASIS_FILE

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PRECISIONS = ("fp32", "fp16")
EXTERNAL_DATA_BYTES = 1800 << 20  # protobuf caps a single file at 2 GiB


def _weights_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> list[str]:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when over ~1.8 GB.

    Returns:
        The names of the files written (relative to ``path``'s folder).
    """
    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if _weights_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path.name, data.name]
    onnx.save_model(model, str(path))
    return [path.name]


def _stamp_shapes(model: onnx.ModelProto, shapes: dict) -> None:
    """Write the declared I/O shapes (ints fixed, strings symbolic) over the tracer's guesses.

    The tracer leaves sizes it could not propagate symbolic (e.g. DINOv2's token count after a
    Slice); the wrappers know them.
    """
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        declared = shapes[value.name]
        if len(dims) != len(declared):
            raise RuntimeError(f"traced {value.name} has rank {len(dims)}, declared {declared}")
        for dim, size in zip(dims, declared):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = int(size)


def export_graph(wrapper: nn.Module, path: str | os.PathLike, precision: str = "fp32",
                 opset: int = DEFAULT_OPSET, device: str | torch.device = "cpu") -> dict:
    """Trace one export wrapper (:mod:`refseg.export.wrappers`) into an ONNX file and check it.

    Args:
        wrapper: a module with ``io`` (:class:`GraphIO`) and ``example_inputs()``.
        path: output ``.onnx`` file.
        precision: ``fp32``, or ``fp16`` to convert the traced graph (fp32 I/O kept).
        opset: ONNX opset, >= 17.
        device: where the trace runs (a GPU makes tracing the large encoders faster).

    Returns:
        The manifest record: ``{"files", "precision", "inputs", "outputs"}``, inputs/outputs
        ``{name: {"shape": dims, "dtype": "float32"}}``.

    Raises:
        ValueError: bad ``precision`` or ``opset``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if opset < 17:
        raise ValueError(f"opset {opset} < 17: LayerNormalization needs opset 17 or later")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = wrapper.eval().to(device)
    example = tuple(t.to(device) for t in wrapper.example_inputs())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=path.parent) as tmp:
        raw = Path(tmp) / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every shape it turns into a constant (all static by design)
            # and about the TorchScript exporter's deprecation.
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, example, str(raw), dynamo=False, opset_version=opset,
                              input_names=list(wrapper.io.inputs),
                              output_names=list(wrapper.io.outputs),
                              dynamic_axes=wrapper.io.dynamic_axes(), do_constant_folding=True)
        model = onnx.load(str(raw))  # pulls in external weight files, if the tracer wrote any
    traced = time.perf_counter() - start
    _stamp_shapes(model, wrapper.io.shapes)
    if precision == "fp16":
        model = convert_float_to_float16(model)
        log.info("%s fp16: %s", path.name, float16_report(model))
    model.producer_name = "refseg"
    model.doc_string = f"refseg export of {type(wrapper).__name__} ({precision})"
    files = save_onnx(model, path)
    onnx.checker.check_model(str(path))  # by path: handles external data over 2 GiB
    log.info("exported %s (%s) in %.1f s (trace %.1f s)", path.name, precision,
             time.perf_counter() - start, traced)
    shapes = wrapper.io.shapes
    return {
        "files": files,
        "precision": precision,
        "inputs": {n: {"shape": shapes[n], "dtype": "float32"} for n in wrapper.io.inputs},
        "outputs": {n: {"shape": shapes[n], "dtype": "float32"} for n in wrapper.io.outputs},
    }


def export_models(out_dir: str | os.PathLike, dinov2_checkpoint: str | os.PathLike | None = None,
                  sam_checkpoint: str | os.PathLike | None = None, *, dinov2: str | None = None,
                  sam: str | None = None, precision: str = "fp32", image_size: int = 518,
                  max_batch: int = 16, opset: int = DEFAULT_OPSET,
                  device: str | torch.device = "cpu", dinov2_model: nn.Module | None = None,
                  sam_model: nn.Module | None = None, encoder: str | None = None,
                  dinov3_checkpoint: str | os.PathLike | None = None, dinov3: str | None = None,
                  sam_image_size: int | None = None, feature_debias: str = "auto",
                  debias_rank: int | None = None) -> dict:
    """Export the three graphs of one (matching encoder, SAM or SAM 2) pair into ``out_dir`` with its manifest.

    Args:
        out_dir: output folder (created). An existing manifest is removed first, so a folder
            whose export is interrupted is never taken for a complete one.
        dinov2_checkpoint, sam_checkpoint: official checkpoint files; None looks up the official
            files of ``dinov2`` / ``sam`` (see :func:`refseg.models.build_dinov2`).
        dinov2, sam: model names (inferred from the checkpoints when None); ``sam`` may name a SAM 2 model,
            and a SAM 2 checkpoint gives SAM 2's graphs.
        precision: ``fp32`` or ``fp16`` (encoders; the decoder stays fp32).
        image_size: encoder input side S (a multiple of its patch size: 14 DINOv2, 16 DINOv3); fixed in
            the graph.
        max_batch: largest encoder batch the export is meant for (recorded; TensorRT profiles).
        dinov2_model, sam_model: already built modules to export instead of loading checkpoints
            (tests; ``dinov2_model`` may be a DINOv3 module); their checkpoints are recorded as None.
        encoder: ``dinov2`` or ``dinov3``; None: ``dinov3`` when ``dinov3_checkpoint`` / ``dinov3`` is given or
            ``dinov2_model`` is a DINOv3 module, else ``dinov2``.
        dinov3_checkpoint, dinov3: the DINOv3 ``.pth`` or Hugging Face folder / model name (gated weights:
            looked up, never downloaded; see :func:`refseg.models.build_dinov3`).
        sam_image_size: SAM 2's input side (multiple of 32; default the model's), fixed in its graphs.
        feature_debias, debias_rank: ``SegmenterConfig``'s fields (``auto``: project for DINOv3; None: the
            config's rank); ``project`` writes the positional basis of the fp32 encoder for the C++ pipeline
            (:mod:`refseg.export.debias_basis`; the Python backends recompute it from the graph).

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: bad precision/opset/image size/max_batch; CheckpointError for unusable files.
    """
    from refseg.config import ENCODER_PATCH_SIZE
    from refseg.models.build import SAM_FAMILY_SPECS, build_dinov2, build_dinov3, build_sam_family
    from refseg.models.dinov2 import DINOV2_SPECS
    from refseg.models.dinov3 import DINOV3_SPECS, Dinov3VisionTransformer
    from refseg.models.sam2 import Sam2

    if encoder is None:
        encoder = "dinov3" if (dinov3_checkpoint is not None or dinov3 is not None
                               or isinstance(dinov2_model, Dinov3VisionTransformer)) else "dinov2"
    if encoder not in ENCODER_PATCH_SIZE:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODER_PATCH_SIZE)}")
    if encoder == "dinov3" and (dinov2_checkpoint is not None or dinov2 is not None):
        raise ValueError("a DINOv2 checkpoint / name was given for a DINOv3 export: the encoder is one of them")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} for export, got {precision!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    patch = ENCODER_PATCH_SIZE[encoder]
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size {image_size} is not a positive multiple of the {encoder} patch "
                         f"size {patch} (e.g. {'518, 560' if patch == 14 else '512, 448'})")

    for kind, name, specs in (("DINOv2", dinov2, DINOV2_SPECS), ("DINOv3", dinov3, DINOV3_SPECS),
                              ("SAM", sam, SAM_FAMILY_SPECS)):
        if name is not None and name not in specs:
            raise ValueError(f"unsupported {kind} model {name!r} for export; choose one of "
                             f"{', '.join(specs)}")
    debias_mode, debias_rank = resolve_debias(encoder, feature_debias, debias_rank)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / POSITIONAL_BASIS_FILE).unlink(missing_ok=True)  # a basis of an earlier export
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    checkpoints = {}
    encoder_checkpoint = dinov3_checkpoint if encoder == "dinov3" else dinov2_checkpoint
    if dinov2_model is None:
        dinov2_model = (build_dinov3(dinov3, dinov3_checkpoint) if encoder == "dinov3"
                        else build_dinov2(dinov2, dinov2_checkpoint))
        encoder_checkpoint = encoder_checkpoint or _official_path(dinov2_model.spec.checkpoint)
    if dinov2_model.patch_size != patch:
        raise ValueError(f"the {encoder} model has {dinov2_model.patch_size}-px patches, not {patch}")
    if sam_model is None:
        sam_model = build_sam_family(sam, sam_checkpoint, image_size=sam_image_size)
        sam_checkpoint = sam_checkpoint or _official_path(sam_model.spec.checkpoint)
    checkpoints[encoder] = checkpoint_record(encoder_checkpoint)
    checkpoints["sam"] = checkpoint_record(sam_checkpoint)
    dinov2_model = dinov2_model.float().eval()
    sam_model = sam_model.float().eval()
    wrapper = Dinov3Export if encoder == "dinov3" else Dinov2Export
    encoder_graph = wrapper(dinov2_model, image_size)
    debias = debias_record(out_dir, encoder_graph, image_size, debias_mode, debias_rank)
    graphs = {"dinov2": export_graph(encoder_graph, out_dir / GRAPH_FILES["dinov2"], precision, opset, device)}
    if isinstance(sam_model, Sam2):
        from refseg.export.sam2_onnx import export_sam2_graphs

        graphs.update(export_sam2_graphs(sam_model, out_dir, precision, opset, device))
    else:
        graphs["sam_encoder"] = export_graph(SamEncoderExport(sam_model), out_dir / GRAPH_FILES["sam_encoder"],
                                             precision, opset, device)
        graphs["sam_decoder"] = export_graph(SamDecoderExport(sam_model, "all"),
                                             out_dir / GRAPH_FILES["sam_decoder"], "fp32", opset, device)
        graphs["sam_decoder"]["mask_outputs"] = "all"
        graphs["sam_encoder"]["attention"] = attention_form(torch.device(device), traced=True)
    manifest = build_manifest(out_dir, graphs, precision=precision, image_size=image_size,
                              models={encoder: dinov2_model.spec.name, "sam": sam_model.spec.name},
                              checkpoints=checkpoints, opset=opset, max_batch=max_batch, encoder=encoder,
                              feature_debias=debias)
    write_manifest(out_dir, manifest)
    log.info("export written to %s (%s, %s %s @%d, SAM %s)", out_dir, precision, encoder,
             dinov2_model.spec.name, image_size, sam_model.spec.name)
    return manifest


def _official_path(source) -> Path | None:
    """The local file an official checkpoint was loaded from (None when it has no source)."""
    if source is None:
        return None
    from refseg.models.checkpoints import find_checkpoint

    return find_checkpoint(source)
