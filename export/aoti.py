"""``refseg export --format aoti``: AOTInductor packages of the three graphs for the C++ core.

Each graph of :mod:`refseg.export.wrappers` (the same modules the ONNX export traces) goes through
``torch.export.export`` and ``torch._inductor.aoti_compile_and_package`` into ``DIR/<graph>.pt2``,
which C++ loads with ``torch::inductor::AOTIModelPackageLoader`` (csrc/pipeline). Inputs and outputs
keep the positional order and names of :mod:`refseg.runtime.io_names`; the manifest (written last,
:mod:`refseg.export.manifest`) records them with their shapes plus ``"format": "aoti"`` and the
device the packages were compiled for (``cpu`` here; ``cuda`` when exported on a GPU).

The matching encoder is DINOv2 or DINOv3 (``Dinov2Export`` / ``Dinov3Export``: position table or RoPE
tables constant in the graph), always in ``dinov2.pt2``; for DINOv3 (``feature_debias`` ``project``) the folder
also holds the positional basis the C++ pipeline projects the tokens with (:mod:`refseg.export.debias_basis`).

Shapes: encoder ``images`` (1, 3, S, S); SAM encoder ``images`` (1, 3, 1024, 1024); decoder
``point_coords`` (P, N, 2) / ``point_labels`` (P, N) with P and N dynamic, ``mask_input``
(1, 1, 256, 256) shared. The C++ pipeline runs one image at a time, so encoder batches are 1.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from refseg.config import ENCODER_PATCH_SIZE
from refseg.export.debias_basis import debias_record, resolve_debias
from refseg.export.manifest import build_manifest, checkpoint_record, write_manifest
from refseg.export.wrappers import Dinov2Export, Dinov3Export, SamDecoderExport, SamEncoderExport
from refseg.models.dinov3 import Dinov3VisionTransformer
from refseg.runtime.io_names import MANIFEST_NAME, POSITIONAL_BASIS_FILE, pack_prompts

log = logging.getLogger(__name__)

AOTI_FILES = {"dinov2": "dinov2.pt2", "sam_encoder": "sam_encoder.pt2", "sam_decoder": "sam_decoder.pt2"}
AOTI_FORMAT = "aoti"


class ContiguousOutputs(nn.Module):
    """The memory contract of every package: outputs are contiguous (row-major) tensors.

    An AOTInductor package keeps the strides its graph produced (SAM's encoder ends in a channels-last
    convolution: strides (1048576, 1, 16384, 256)) and reads its inputs as the contiguous example tensors
    it was traced with, without checking. Returning contiguous outputs makes the embedding that goes from
    the encoder package to the decoder package what the decoder expects; callers still make every input
    contiguous (:class:`AotiPackages`, csrc/pipeline), so the contract holds for tensors from elsewhere.
    """

    def __init__(self, wrapper: nn.Module) -> None:
        super().__init__()
        self.wrapper = wrapper  # not "graph": an exported GraphModule has an attribute of that name
        self.io = wrapper.io

    def forward(self, *inputs):
        out = self.wrapper(*inputs)
        if isinstance(out, torch.Tensor):
            return out.contiguous()
        return tuple(o.contiguous() for o in out)


def compile_graph(wrapper: nn.Module, args: tuple, path: Path, dynamic_shapes=None) -> dict:
    """torch.export + AOTInductor package of ``wrapper`` (outputs made contiguous) at ``path``; returns
    its manifest record (``memory_format``: inputs must be, and outputs are, contiguous)."""
    t0 = time.perf_counter()
    wrapper = ContiguousOutputs(wrapper).eval()
    if dynamic_shapes is not None:  # one spec per positional input of the wrapped forward (*inputs)
        dynamic_shapes = {"inputs": tuple(dynamic_shapes)}
    with torch.no_grad():
        program = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    shapes = {name: list(dims) for name, dims in wrapper.io.shapes.items()}
    log.info("AOTInductor package %s written in %.1f s", path.name, time.perf_counter() - t0)
    return {"files": [path.name], "inputs": list(wrapper.io.inputs), "outputs": list(wrapper.io.outputs),
            "shapes": shapes, "precision": "fp32", "dtypes": {n: "float32" for n in shapes},
            "memory_format": "contiguous"}


def export_aoti(out_dir: str | os.PathLike, dinov2_model: nn.Module, sam_model: nn.Module, *, image_size: int,
                dinov2_checkpoint=None, sam_checkpoint=None, device: str = "cpu", feature_debias: str = "auto",
                debias_rank: int | None = None) -> dict:
    """Write ``dinov2.pt2``, ``sam_encoder.pt2``, ``sam_decoder.pt2`` and the manifest into ``out_dir``.

    Args:
        dinov2_model, sam_model: built models (:func:`refseg.models.build.build_dinov2` or ``build_dinov3``,
            ``build_sam``); the matching encoder's package is ``dinov2.pt2`` whichever it is.
        image_size: encoder input side S (a multiple of its patch size: 14 DINOv2, 16 DINOv3), fixed in the package.
        dinov2_checkpoint, sam_checkpoint: their files, recorded in the manifest (None: not recorded).
        device: ``cpu`` or ``cuda``: the packages run on that device only.
        feature_debias, debias_rank: ``SegmenterConfig``'s fields (``auto``: project for DINOv3; None: the
            config's rank); with ``project`` the folder gets the positional basis the C++ pipeline applies
            (:mod:`refseg.export.debias_basis`).
    """
    encoder = "dinov3" if isinstance(dinov2_model, Dinov3VisionTransformer) else "dinov2"
    patch = ENCODER_PATCH_SIZE[encoder]
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size {image_size} is not a positive multiple of the {encoder} patch size {patch}")
    mode, rank = resolve_debias(encoder, feature_debias, debias_rank)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted export leaves no manifest
    (out_dir / POSITIONAL_BASIS_FILE).unlink(missing_ok=True)  # nor a basis of an earlier export
    dev = torch.device(device)
    wrapper = Dinov3Export if encoder == "dinov3" else Dinov2Export
    dino = wrapper(dinov2_model.float().eval().to(dev), image_size).eval()
    debias = debias_record(out_dir, dino, image_size, mode, rank)  # before the slow compiles: a bad rank fails here
    enc = SamEncoderExport(sam_model.float().eval().to(dev)).eval()
    dec = SamDecoderExport(sam_model, "all").eval()
    to = lambda args: tuple(a.to(dev) for a in args)  # noqa: E731
    dec_args = list(to(dec.example_inputs(prompt_sets=2, points=4)))
    sets, points = torch.export.Dim("prompt_sets", min=1, max=256), torch.export.Dim("points", min=2, max=512)
    graphs = {
        "dinov2": compile_graph(dino, to(dino.example_inputs(batch=1)), out_dir / AOTI_FILES["dinov2"]),
        "sam_encoder": compile_graph(enc, to(enc.example_inputs(batch=1)), out_dir / AOTI_FILES["sam_encoder"]),
        "sam_decoder": compile_graph(dec, tuple(dec_args), out_dir / AOTI_FILES["sam_decoder"],
                                     dynamic_shapes=(None, {0: sets, 1: points}, {0: sets, 1: points}, None, None)),
    }
    graphs["sam_decoder"]["mask_outputs"] = "all"
    for key in ("dinov2", "sam_encoder"):
        graphs[key]["shapes"][graphs[key]["inputs"][0]][0] = 1
    manifest = build_manifest(out_dir, graphs, precision="fp32", image_size=image_size,
                              models={encoder: dinov2_model.spec.name, "sam": sam_model.spec.name},
                              checkpoints={encoder: checkpoint_record(dinov2_checkpoint),
                                           "sam": checkpoint_record(sam_checkpoint)},
                              opset=0, max_batch=1, encoder=encoder, feature_debias=debias)
    manifest["export_format"] = AOTI_FORMAT
    manifest["device"] = dev.type
    write_manifest(out_dir, manifest)
    log.info("AOTInductor export written to %s (%s %s @%d, feature_debias %s, SAM %s, %s)", out_dir, encoder,
             dinov2_model.spec.name, image_size, mode, sam_model.spec.name, dev.type)
    return manifest


class AotiPackages:
    """The three packages of an AOTInductor export loaded back in Python, with the Segmenter's backend
    methods (``encode_dinov2``, ``encode_sam``, ``decode``): used to check an export against the C++
    core, which runs the same files (tests/test_cpp_pipeline.py, bench/bench_cpp.py).

    Implements :class:`refseg.runtime.backend.Backend` (``decode_batch``: the decoder package image by image).

    Args:
        folder: the export folder. like: the backend whose ``config``, ``device``, ``precision`` and
            ``sam_size`` to report.
    """

    name = "aoti"

    def __init__(self, folder: str | os.PathLike, like) -> None:
        folder = Path(folder)
        load = torch._inductor.aoti_load_package
        self._dinov2, self._encoder, self._decoder = (load(str(folder / AOTI_FILES[k]))
                                                      for k in ("dinov2", "sam_encoder", "sam_decoder"))
        self._pack = pack_prompts
        self.config, self.device = like.config, like.device
        self.precision, self.sam_size = like.precision, like.sam_size

    @staticmethod
    def _run(package, *inputs: torch.Tensor):
        """One package call; every input made contiguous float32 first (the packages read their inputs as
        the contiguous tensors they were traced with, whatever the strides: the manifest's
        ``memory_format``)."""
        return package(*(t.float().contiguous() for t in inputs))

    def encode_dinov2(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, T, D) patch tokens (the packages take batch 1)."""
        return torch.cat([self._run(self._dinov2, images[i:i + 1])[0] for i in range(len(images))]).float()

    def encode_sam(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1024, 1024) -> (B, 256, 64, 64)."""
        return torch.cat([self._run(self._encoder, images[i:i + 1]) for i in range(len(images))])

    def decode(self, embedding, coords, labels, boxes=None, multimask: bool = False):
        """As the torch backend's ``decode``: (P, C, 256, 256) logits and (P, C) IoU, C = 3 or 1.
        ``embedding`` (256, 64, 64) may have any strides (the torch encoder's is channels-last)."""
        c, lab = self._pack(coords, labels, boxes)
        masks, iou = self._run(self._decoder, embedding[None], c, lab, torch.zeros(1, 1, 256, 256), torch.zeros(1))
        return (masks[:, 1:], iou[:, 1:]) if multimask else (masks[:, :1], iou[:, :1])

    def decode_batch(self, *args, **kwargs):
        """Sets of several images, one decoder-package call per image."""
        from refseg.pipeline.decode import decode_image_by_image

        return decode_image_by_image(self, *args, **kwargs)


def run_from_args(args) -> int:
    """``refseg export --format aoti`` (arguments of :mod:`refseg.export.cli`); returns the exit code."""
    import sys

    from refseg.models.build import build_dinov2, build_dinov3, build_sam

    dinov3 = args.dinov3_checkpoint is not None or args.dinov3 is not None  # image size checked by the caller
    if args.precision != "fp32":
        log.error("--format aoti exports fp32 packages only (got --precision %s)", args.precision)
        return 2
    device = "cuda" if str(args.device).startswith("cuda") else "cpu"
    if dinov3:
        encoder, checkpoint = build_dinov3(args.dinov3, args.dinov3_checkpoint), args.dinov3_checkpoint
    else:
        encoder, checkpoint = build_dinov2(args.dinov2, args.dinov2_checkpoint), args.dinov2_checkpoint
    sam = build_sam(args.sam, args.sam_checkpoint)
    manifest = export_aoti(args.output, encoder, sam, image_size=args.image_size,
                           dinov2_checkpoint=checkpoint, sam_checkpoint=args.sam_checkpoint,
                           device=device, feature_debias=args.feature_debias, debias_rank=args.debias_rank)
    for key, graph in manifest["graphs"].items():
        sys.stdout.write(f"{key}: {', '.join(graph['files'])} (aoti, {device})\n")
    return 0
