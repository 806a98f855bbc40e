"""ONNX Runtime and TensorRT backends: the exported graphs behind the torch backend's interface.

Both implement :class:`refseg.runtime.backend.Backend` with the tensors of
:class:`refseg.runtime.torch_backend.TorchBackend` (float32 in and out, prompts in SAM's 1024
frame, (x, y) order): ``decode_batch`` runs the decoder graph image by image.

An export of a SAM 2 / 2.1 / MedSAM2 checkpoint holds SAM 2's graphs under the same keys (records marked
``"family": "sam2"``, names ``io_names.SAM2_*``): ``encode_sam`` then returns a
:class:`refseg.models.sam2.Sam2Embedding`, ``decode`` packs prompts as ``Sam2.pack_prompts`` does, picks the
outputs from the graph's four mask tokens with the model's own rule (multimask, or dynamic multimask for a
single mask), clamps mask prompts to [-32, 32] and applies the object score (``config.drop_absent``) as the
torch backend does.

Where the graphs come from (``engine_dir``):

* given: a folder written by ``refseg export``; its manifest must match the request (matching encoder
  and models, precision, encoder input side, and the checkpoints when given) and its checksums, else
  :class:`refseg.runtime.manifest_reader.ManifestError` (a ValueError) says what differs;
* None: ``~/.cache/refseg/exports/<encoder model>-<sam>-<S>-<precision>-<key>/``, the key hashing each
  checkpoint's resolved path, size and modification time plus the export settings. When that
  folder has no valid manifest and an ``exporter`` is given (the Segmenter passes
  :func:`refseg.export.cache_fill.fill_export_folder`), the models are exported there on first use
  (minutes for the large encoders; logged), written to a temporary sibling and renamed into place;
  without one the ManifestError names the ``refseg export`` command that fills the folder.

This module never imports :mod:`refseg.export`: it reads folders by the names of
:mod:`refseg.runtime.io_names`, and the exporter arrives as an argument.
TensorRT engines are built from those graphs on first use and cached in ``~/.cache/refseg/engines``
(see :mod:`refseg.runtime.tensorrt_build`). Unusable backends raise ImportError (package missing),
ValueError (request not supported: bf16, ``x_prenorm`` features, a CPU device for TensorRT) or
RuntimeError, which ``backend="auto"`` logs before falling back.
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.models.sam2 import LOW_RES_LIMIT, Sam2, Sam2Embedding, drop_absent
from refseg.models.sam2_heads import select_masks
from refseg.optional import require
from refseg.runtime import io_names as io
from refseg.runtime.backend import decode_image_by_image

log = logging.getLogger(__name__)

EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")
EXPORT_LAYOUT = 1  # bump when the exported graphs change meaning
# Writes a complete export (graphs + manifest) into an empty folder:
# exporter(folder, config, encoder_checkpoint, sam_checkpoint, max_batch), the encoder config.encoder's.
Exporter = Callable[[Path, SegmenterConfig, Path, Path, int], object]


class ExportedBackend(abc.ABC):
    """What both exported backends share: the manifest, input checks and prompt packing."""

    name = "exported"

    def __init__(self, export_dir: str | os.PathLike, config: SegmenterConfig,
                 device: torch.device, manifest: dict) -> None:
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.config = config
        self.device = torch.device(device)
        self.precision = manifest["precision"]
        self.image_size = int(manifest["image_size"])
        self.mask_outputs = manifest["graphs"]["sam_decoder"].get("mask_outputs", "all")
        encoder = manifest["graphs"]["sam_encoder"]
        self.is_sam2 = encoder.get(io.SAM_FAMILY_KEY) == io.SAM2_FAMILY
        shape = encoder["inputs"][io.SAM2_ENCODER_INPUT if self.is_sam2 else io.SAM_ENCODER_INPUT]["shape"]
        self.sam_size = int(shape[-1])
        if self.is_sam2 and config.sam_image_size not in (None, self.sam_size):
            raise ValueError(f"{self.export_dir}: the SAM 2 graphs take {self.sam_size}-px inputs, not "
                             f"sam_image_size={config.sam_image_size}; export again with that size")
        self._cap_logged: set[tuple[int, int]] = set()

    @abc.abstractmethod
    def _run(self, graph: str, inputs: dict[str, torch.Tensor],
             outputs: tuple[str, ...]) -> list[torch.Tensor]:
        """Run ``graph`` on named float32 inputs; return the named outputs, float32, in order."""

    @staticmethod
    def _check(images: torch.Tensor, side: int, what: str) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise ValueError(f"{what}: images must be (B, 3, {side}, {side}), got {tuple(images.shape)}")

    def encode_dinov2(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-normalised float -> patch tokens (B, (S/P)², D) float32 of the export's
        matching encoder (DINOv2 or DINOv3, P its patch size)."""
        self._check(images, self.image_size, f"{self.name} encode_dinov2")
        return self._run("dinov2", {io.DINOV2_INPUT: images}, (io.DINOV2_PATCH_TOKENS,))[0]

    def encode_sam(self, images: torch.Tensor) -> torch.Tensor | Sam2Embedding:
        """(B, 3, 1024, 1024) normalised, zero-padded float -> embeddings (B, 256, 64, 64) float32; SAM 2:
        (B, 3, S, S) stretched, normalised -> :class:`~refseg.models.sam2.Sam2Embedding` (float32)."""
        self._check(images, self.sam_size, f"{self.name} encode_sam")
        if self.is_sam2:
            return Sam2Embedding(*self._run("sam_encoder", {io.SAM2_ENCODER_INPUT: images}, io.SAM2_ENCODER_OUTPUTS))
        return self._run("sam_encoder", {io.SAM_ENCODER_INPUT: images}, (io.SAM_ENCODER_OUTPUT,))[0]

    max_points: int | None = None  # the decoder graph's largest point count (None: any)
    is_sam2: bool = False  # SAM 2's graphs (set from the manifest in __init__)

    def _fit_points(self, coords: torch.Tensor, labels: torch.Tensor, extra: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit (P, N) prompt sets plus ``extra`` packed columns into :attr:`max_points`, never failing.

        Trailing columns that are padding (label -1) in every set go first; if the sets still hold more
        points than the profile takes, each keeps its first points and the cut is logged (warning, once
        per size): rebuild the engines with a larger ``max_points`` to use them all.
        """
        limit = None if self.max_points is None else self.max_points - extra
        if limit is None or coords.shape[1] <= limit:
            return coords, labels
        used = (labels != -1).any(0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        if width > limit:
            key = (width, limit)
            if key not in self._cap_logged:
                self._cap_logged.add(key)
                log.warning("%s decoder: prompt sets of up to %d points exceed the engine profile's %d; "
                            "keeping the first %d points of each set (rebuild with a larger max_points to "
                            "use all)", self.name, width, self.max_points, limit)
            width = limit
        return coords[:, :width], labels[:, :width]

    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               boxes: torch.Tensor | None = None, multimask: bool = False,
               mask_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode P prompt sets against one embedding, as ``TorchBackend.decode``.

        Args:
            embedding: (256, 64, 64); coords: (P, N, 2) (x, y) 1024-frame pixels;
            labels: (P, N) 1 / 0 / -1 (padding); boxes: (P, 4) XYXY or None.
            multimask: 3 masks per set (True) or the single-mask output (False).
            mask_input: (P, 1, 256, 256) low-res logits used as mask prompts, or None.

        Returns:
            low-res logits (P, C, 256, 256) and predicted IoU (P, C), float32, C = 3 or 1.
        """
        if coords.ndim != 3 or coords.shape[-1] != 2 or tuple(labels.shape) != tuple(coords.shape[:2]):
            raise ValueError(f"{self.name} decode: coords must be (P, N, 2) and labels (P, N), got "
                             f"{tuple(coords.shape)} and {tuple(labels.shape)}")
        if boxes is not None and tuple(boxes.shape) != (coords.shape[0], 4):
            raise ValueError(f"{self.name} decode: boxes must be (P, 4), got {tuple(boxes.shape)}")
        if self.is_sam2:
            return self._decode_sam2(embedding, coords, labels, boxes, multimask, mask_input)
        coords, labels = self._fit_points(coords, labels, 1 if boxes is None else 2)
        points, point_labels = io.pack_prompts(coords, labels, boxes)
        low = 4 * embedding.shape[-1]
        if mask_input is not None and tuple(mask_input.shape) != (coords.shape[0], 1, low, low):
            raise ValueError(f"{self.name} decode: mask_input must be ({coords.shape[0]}, 1, {low}, {low}), "
                             f"got {tuple(mask_input.shape)}")
        feeds = {io.SAM_DECODER_EMBEDDINGS: embedding.float().reshape(1, *embedding.shape[-3:]),
                 io.SAM_DECODER_COORDS: points, io.SAM_DECODER_LABELS: point_labels,
                 io.SAM_DECODER_MASK_INPUT: (torch.zeros(1, 1, low, low) if mask_input is None
                                             else mask_input.float()),
                 io.SAM_DECODER_HAS_MASK: torch.zeros(1) if mask_input is None else torch.ones(1)}
        masks, iou = self._run("sam_decoder", feeds, io.SAM_DECODER_OUTPUTS)
        if self.mask_outputs == "all":
            pick = slice(1, 4) if multimask else slice(0, 1)
            return masks[:, pick], iou[:, pick]
        if (self.mask_outputs == "multi") != multimask:
            raise ValueError(f"{self.export_dir}: the decoder was exported with "
                             f"mask_outputs={self.mask_outputs!r}; multimask={multimask} needs a "
                             "re-export")
        return masks, iou

    def _decode_sam2(self, embedding: Sam2Embedding, coords: torch.Tensor, labels: torch.Tensor,
                     boxes: torch.Tensor | None, multimask: bool, mask_input: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` with SAM 2's graph: ``embedding`` one image's Sam2Embedding (no batch axis),
        coords in its S x S frame, mask_input (P, 1, S/4, S/4)."""
        coords, labels = self._fit_points(coords, labels, 1 if boxes is None else 3)
        points, point_labels = Sam2.pack_prompts(coords.float(), labels.float(), boxes)
        low = 4 * embedding.image_embed.shape[-1]
        if mask_input is not None and tuple(mask_input.shape) != (coords.shape[0], 1, low, low):
            raise ValueError(f"{self.name} decode: mask_input must be ({coords.shape[0]}, 1, {low}, {low}), "
                             f"got {tuple(mask_input.shape)}")
        feeds = dict(zip(io.SAM2_ENCODER_OUTPUTS, (t.float()[None] for t in embedding.parts())))
        feeds.update({io.SAM_DECODER_COORDS: points, io.SAM_DECODER_LABELS: point_labels,
                      io.SAM_DECODER_MASK_INPUT: (torch.zeros(1, 1, low, low) if mask_input is None
                                                  else mask_input.float().clamp(-LOW_RES_LIMIT, LOW_RES_LIMIT)),
                      io.SAM_DECODER_HAS_MASK: torch.zeros(1) if mask_input is None else torch.ones(1)})
        masks, iou, score = self._run("sam_decoder", feeds, io.SAM2_DECODER_OUTPUTS)
        masks, iou = select_masks(masks, iou, multimask, dynamic_multimask=True)
        return drop_absent(masks, iou, score) if self.config.drop_absent else (masks, iou)

    def decode_batch(self, embeddings: torch.Tensor, image_index: torch.Tensor, coords: torch.Tensor,
                     labels: torch.Tensor, point_mask: torch.Tensor | None = None,
                     boxes: torch.Tensor | None = None, multimask: bool = False,
                     mask_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sets of several images: one decoder-graph call per image (no batched decoder graph)."""
        return decode_image_by_image(self, embeddings, image_index, coords, labels, point_mask, boxes,
                                     multimask, mask_input)


def _symbols(shapes: dict, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, tensor in inputs.items():
        for dim, size in zip(shapes[name]["shape"], tensor.shape):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(size))
    return sizes


class OnnxRuntimeBackend(ExportedBackend):
    """Runs the exported graphs with ONNX Runtime.

    Providers: CPU on a CPU device; on CUDA the CUDA provider (``onnxruntime-gpu``) with
    io-binding, torch tensors bound in place. ``providers`` overrides the list, e.g.
    ``["TensorrtExecutionProvider", "CUDAExecutionProvider"]`` (not the default: the
    ``tensorrt`` backend is refseg's TensorRT path, with explicit profiles and its own cache).
    ``threads`` sets intra-op threads (default: ``torch.get_num_threads()``).
    """

    name = "onnxruntime"

    def __init__(self, export_dir, config, device, manifest, providers: list | None = None,
                 threads: int | None = None) -> None:
        super().__init__(export_dir, config, device, manifest)
        ort = require("onnxruntime", "onnx", "the onnxruntime backend")
        available = ort.get_available_providers()
        if providers is None:
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" not in available:
                    raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDA provider (has "
                                       f"{', '.join(available)}); pip install onnxruntime-gpu")
                providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                             "CPUExecutionProvider"]
            elif self.device.type == "cpu":
                providers = ["CPUExecutionProvider"]
            else:
                raise ValueError(f"onnxruntime backend: unsupported device {self.device}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # ORT warns about initialisers its optimiser folded away
        self.sessions = {}
        for graph, record in manifest["graphs"].items():
            path = self.export_dir / record["files"][0]
            self.sessions[graph] = ort.InferenceSession(str(path), options, providers=providers)
        self.providers = self.sessions["sam_encoder"].get_providers()
        log.info("onnxruntime %s backend on %s (%s), graphs from %s", ort.__version__, self.device,
                 ", ".join(self.providers), self.export_dir)

    def _run(self, graph, inputs, outputs):
        session = self.sessions[graph]
        if self.device.type != "cuda":
            feeds = {k: v.detach().to("cpu", torch.float32).contiguous().numpy() for k, v in inputs.items()}
            return [torch.from_numpy(o) for o in session.run(list(outputs), feeds)]
        record = self.manifest["graphs"][graph]
        index = self.device.index or 0
        feeds = {k: v.detach().to(self.device, torch.float32).contiguous() for k, v in inputs.items()}
        sizes = _symbols(record["inputs"], feeds)
        results = [torch.empty([sizes[d] if isinstance(d, str) else d for d in record["outputs"][n]["shape"]],
                               dtype=torch.float32, device=self.device) for n in outputs]
        binding = session.io_binding()
        for name, tensor in feeds.items():
            binding.bind_input(name, "cuda", index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        for name, tensor in zip(outputs, results):
            binding.bind_output(name, "cuda", index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        session.run_with_iobinding(binding)
        return results


class TensorRTBackend(ExportedBackend):
    """Runs TensorRT engines built from the exported graphs, on torch's current CUDA stream.

    Encoder batches above the export's ``max_batch`` and prompt sets above ``max_prompt_sets``
    are split into several engine calls; prompt sets of more than ``max_points`` points
    (padding and box corners included) are refused with a ValueError.
    """

    name = "tensorrt"

    def __init__(self, export_dir, config, device, manifest, engine_cache=None,
                 max_prompt_sets: int = 64, max_points: int = 256) -> None:
        super().__init__(export_dir, config, device, manifest)
        from refseg.runtime.tensorrt_build import (EngineBuilder, EngineCache, default_profiles,
                                                   import_tensorrt)
        from refseg.runtime.tensorrt_runner import EngineRunner

        trt = import_tensorrt()
        if self.device.type != "cuda":
            raise ValueError(f"the tensorrt backend needs a CUDA device, got {self.device}")
        cache = engine_cache or EngineCache()
        props = torch.cuda.get_device_properties(self.device)
        self.max_batch = int(manifest.get("max_batch", 16))
        self.max_prompt_sets = max_prompt_sets
        self.max_points = max_points
        self.runners = {}
        for graph, record in manifest["graphs"].items():
            onnx_file = self.export_dir / record["files"][0]
            precision = record.get("precision", "fp32")
            profiles = default_profiles(graph, manifest, max_prompt_sets, max_points)
            timing = cache.root / f"timing-trt{trt.__version__}-{props.name.replace(' ', '_')}.cache"
            builder = EngineBuilder(onnx_file, profiles, precision=precision, timing_cache=timing,
                                    log_path=cache.root / f"{graph}-build.log")
            fields = cache.key_fields(graph_digest(manifest, record), str(trt.__version__),
                                      props.name, f"{props.major}.{props.minor}", builder.cache_fields())
            with torch.cuda.device(self.device):  # built and timed on the backend's GPU (cuda:1 too)
                engine_path = cache.get_or_build(graph, fields, builder.build)
            self.runners[graph] = EngineRunner(engine_path, self.device)
        log.info("tensorrt %s backend on %s (%s), engines in %s", trt.__version__, props.name,
                 self.precision, cache.root)

    def _run(self, graph, inputs, outputs):
        runner = self.runners[graph]
        chunk = self.max_prompt_sets if graph == "sam_decoder" else self.max_batch
        lead = io.SAM_DECODER_COORDS if graph == "sam_decoder" else next(iter(inputs))
        total = inputs[lead].shape[0]
        parts = []
        for start in range(0, total, chunk):
            feeds = {}
            for name, tensor in inputs.items():
                split = (name in (io.SAM_DECODER_COORDS, io.SAM_DECODER_LABELS) or graph != "sam_decoder"
                         or (name == io.SAM_DECODER_MASK_INPUT and total > 1 and tensor.shape[0] == total))
                feeds[name] = tensor[start:start + chunk] if split else tensor
            parts.append(runner.run(feeds, outputs))
        if len(parts) == 1:
            return parts[0]
        return [torch.cat([p[k] for p in parts]) for k in range(len(outputs))]


def graph_digest(manifest: dict, record: dict) -> str:
    """One sha256 over every file a graph is built from, in the graph record's order.

    A graph over 2 GB keeps its weights in ``<name>.onnx.data`` beside ``<name>.onnx``; both are in
    ``record["files"]``, so a re-export with other weights (same ``.onnx`` bytes) gets another engine.
    """
    import hashlib

    parts = [f"{name}:{manifest['files'][name]['sha256']}" for name in record["files"]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def default_export_dir(config: SegmenterConfig, encoder_checkpoint: Path, sam_checkpoint: Path,
                       max_batch: int) -> Path:
    """``~/.cache/refseg/exports/<encoder model>-<sam>-<S>-<precision>-<key>`` (see module docstring)."""
    from refseg.models.checkpoints import cache_dir, file_identity

    fields = {"layout": EXPORT_LAYOUT, config.encoder: file_identity(encoder_checkpoint),
              "sam": file_identity(sam_checkpoint), "image_size": config.image_size,
              "precision": config.precision, "max_batch": max_batch}
    if config.sam_image_size is not None:  # SAM 2 at another input side: other graphs
        fields["sam_image_size"] = config.sam_image_size
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "exports" / (f"{config.encoder_model}-{config.sam}-{config.image_size}-"
                                      f"{config.precision}-{digest}")


def _checkpoint_request(config: SegmenterConfig, path) -> dict:
    """``verify_manifest``'s keyword for the encoder checkpoint ``path``."""
    return {f"{config.encoder}_checkpoint": path}


def _export_into(final: Path, config, dinov2_checkpoint, sam_checkpoint, max_batch: int,
                 exporter: Exporter) -> None:
    """Run ``exporter`` into a temporary sibling of ``final`` and rename it into place."""
    from refseg.runtime.manifest_reader import ManifestError, verify_manifest

    final.parent.mkdir(parents=True, exist_ok=True)
    log.warning("no usable export in %s: exporting %s %s and SAM %s (%s) now; this takes "
                "minutes once", final, config.encoder, config.encoder_model, config.sam, config.precision)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        exporter(tmp, config, dinov2_checkpoint, sam_checkpoint, max_batch)
        if final.exists():
            try:  # another process may have finished the same export meanwhile: keep that one
                verify_manifest(final, precision=config.precision, image_size=config.image_size, full_check=True,
                                encoder=config.encoder, sam_checkpoint=sam_checkpoint,
                                **_checkpoint_request(config, dinov2_checkpoint))
                return
            except ManifestError:
                shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def create_exported_backend(name: str, config: SegmenterConfig, device: torch.device,
                            sam_checkpoint=None, dinov2_checkpoint=None, engine_dir=None,
                            exporter: Exporter | None = None, dinov3_checkpoint=None, **options):
    """Create the ``onnxruntime`` or ``tensorrt`` backend for ``config`` (see module docstring).

    Args:
        name: ``onnxruntime`` or ``tensorrt``.
        config: matching encoder and models, ``precision`` (fp32 / fp16) and ``image_size`` to run.
        device: torch device (TensorRT: CUDA only).
        sam_checkpoint, dinov2_checkpoint, dinov3_checkpoint: checkpoint files (DINOv3: or a Hugging Face
            folder; either encoder checkpoint selects its encoder); None uses the official files.
        engine_dir: export folder, or None for the cached export.
        exporter: fills the cache folder on first use when ``engine_dir`` is None (see
            :data:`Exporter`); None: a missing cached export is a ManifestError naming the command.
        options: passed to the backend class (e.g. ``providers``, ``threads``, ``max_prompt_sets``).

    Raises:
        ImportError: onnxruntime / tensorrt / onnx not installed (names the extra to install).
        ValueError: unsupported request or an export folder that does not match it.
        RuntimeError: the runtime cannot use the device.
    """
    from refseg.runtime.manifest_reader import ManifestError, verify_manifest
    from refseg.runtime.select import select_encoder

    config = select_encoder(config, dinov2_checkpoint, dinov3_checkpoint)
    encoder_checkpoint = dinov3_checkpoint if config.encoder == "dinov3" else dinov2_checkpoint
    if name not in EXPORTED_BACKENDS:
        raise ValueError(f"unknown exported backend {name!r}; choose one of {EXPORTED_BACKENDS}")
    if config.precision not in ("fp32", "fp16"):
        raise ValueError(f"precision {config.precision!r} is not available in exported graphs "
                         "(fp32 or fp16)")
    if config.feature_key != "x_norm_patchtokens":
        raise ValueError(f"exported encoder graphs return x_norm_patchtokens, not {config.feature_key!r}")
    device = torch.device(device)
    if name == "tensorrt":
        require("tensorrt", "gpu", "the tensorrt backend")
        if device.type != "cuda":
            raise ValueError(f"the tensorrt backend needs a CUDA device, got {device}")
    else:
        require("onnxruntime", "onnx", "the onnxruntime backend")
    max_batch = max(16, config.batch_size)
    if engine_dir is not None:
        engine_dir = Path(engine_dir)
        names = {config.encoder: None if encoder_checkpoint else config.encoder_model,
                 "sam": None if sam_checkpoint else config.sam}
        manifest = verify_manifest(engine_dir, precision=config.precision, image_size=config.image_size,
                                   encoder=config.encoder, sam_checkpoint=sam_checkpoint,
                                   **_checkpoint_request(config, encoder_checkpoint), **names)
    else:
        from refseg.models.build import resolve_model_checkpoints

        encoder_path, sam_path = resolve_model_checkpoints(config.encoder_model, config.sam, encoder_checkpoint,
                                                           sam_checkpoint, encoder=config.encoder)
        engine_dir = default_export_dir(config, encoder_path, sam_path, max_batch)
        request = dict(precision=config.precision, image_size=config.image_size, encoder=config.encoder,
                       sam_checkpoint=sam_path, **_checkpoint_request(config, encoder_path))
        try:
            manifest = verify_manifest(engine_dir, **request)
        except ManifestError as exc:
            if exporter is None:
                raise ManifestError(
                    f"no usable cached export in {engine_dir} ({exc}); write it with `refseg export "
                    f"--{config.encoder}-checkpoint {encoder_path} --sam-checkpoint {sam_path} --precision "
                    f"{config.precision} --image-size {config.image_size} --max-batch {max_batch} "
                    f"-o {engine_dir}`, or pass engine_dir") from exc
            require("onnx", "onnx", "exporting models for the onnxruntime/tensorrt backends")
            if (engine_dir / io.MANIFEST_NAME).exists():
                log.warning("cached export unusable (%s)", exc)
            _export_into(engine_dir, config, encoder_path, sam_path, max_batch, exporter)
            manifest = verify_manifest(engine_dir, **request)
    if config.sam == "medsam" and manifest["models"].get("sam") != "medsam":
        # MedSAM's pre-processing is chosen from the model name; an export of another SAM cannot stand in.
        raise ValueError(f"{engine_dir}: the export holds SAM {manifest['models'].get('sam')!r}, not MedSAM; "
                         f"export from the MedSAM checkpoint (a file named medsam*.pth) to run MedSAM")
    for key in (config.encoder, "sam"):  # the config names the models actually exported
        exported = manifest["models"].get(key)
        if exported != getattr(config, key):
            try:
                config = config.replace(**{key: exported})
            except ValueError:
                log.info("exported %s model %r is not a named model; config keeps %r", key,
                         exported, getattr(config, key))
    cls = TensorRTBackend if name == "tensorrt" else OnnxRuntimeBackend
    return cls(engine_dir, config, device, manifest, **options)
