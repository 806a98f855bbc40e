"""Build TensorRT engines from the exported ONNX graphs, with a timing cache and an engine cache.

The runtime builds them: an engine is specific to the GPU and TensorRT version at hand, so
:class:`refseg.runtime.exported.TensorRTBackend` builds each one on first use (``refseg export
--format tensorrt`` only warms this cache through that backend).

    builder = EngineBuilder(export_dir / "sam_encoder.onnx", profiles, precision="fp16")
    plan = builder.build()                                  # serialized engine (bytes)

    cache = EngineCache()                                   # ~/.cache/refseg/engines
    fields = cache.key_fields(graph_sha256, trt.__version__, gpu_name, "9.0", builder.cache_fields())
    path = cache.get_or_build("sam_encoder", fields, builder.build)   # built only on a miss

Typing. Networks are built strongly typed: the precision is the one baked into the graph
(``refseg export --precision fp16`` writes fp16 encoders with LayerNorm and Softmax in fp32), as
TensorRT 11 requires (it has no FP16 builder flag); no builder precision flag is ever set. TF32 is
switched off, so an fp32 graph computes in fp32.

Profiles. ``profiles`` maps each input name to a list of ``(min, opt, max)`` shapes, one entry
per optimisation profile (all inputs must list the same number). :func:`default_profiles` gives
one profile for batch 1 (latency) and one for batch 2..max_batch (throughput) for the encoders,
and one for the decoder's prompt sets and points.

Engine cache. An engine is valid only for one ONNX file, TensorRT version, GPU model, compute
capability, precision/typing and set of profiles: those fields are hashed into the file name
(``<graph>-<key>.engine``) and written beside it (``.json``, with the engine's own sha256). A
sidecar whose fields or checksum do not match is refused, the entry deleted and rebuilt.

Nothing here runs without the ``tensorrt`` package and a CUDA GPU, except :class:`EngineCache`'s
bookkeeping and :func:`default_profiles`, which are plain Python.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from refseg.io.writers import atomic_write_bytes

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profiles = dict[str, list[tuple[Shape, Shape, Shape]]]
WORKSPACE_BYTES = 8 << 30


def import_tensorrt():
    """``import tensorrt`` with refseg's message when it is missing."""
    from refseg.optional import require

    return require("tensorrt", "gpu", "the TensorRT backend")


def default_profiles(graph: str, manifest: dict, max_prompt_sets: int = 64,
                     max_points: int = 256) -> Profiles:
    """Optimisation profiles for one graph of an export (see module docstring).

    Args:
        graph: ``dinov2``, ``sam_encoder`` or ``sam_decoder``.
        manifest: the export's manifest (input shapes, ``max_batch``).
        max_prompt_sets, max_points: decoder limits (points include the padding/box points).
    """
    if graph not in ("dinov2", "sam_encoder", "sam_decoder") or graph not in manifest["graphs"]:
        raise ValueError(f"unknown graph {graph!r}; the export holds {sorted(manifest['graphs'])}")
    inputs = manifest["graphs"][graph]["inputs"]
    max_batch = int(manifest.get("max_batch", 16))
    if graph in ("dinov2", "sam_encoder"):
        (name, spec), = inputs.items()
        rest = tuple(int(d) for d in spec["shape"][1:])
        profiles = [((1,) + rest, (1,) + rest, (1,) + rest)]
        if max_batch > 1:
            profiles.append(((2,) + rest, (max_batch,) + rest, (max_batch,) + rest))
        return {name: profiles}
    sizes = {"prompt_sets": (1, min(8, max_prompt_sets), max_prompt_sets),
             "points": (1, min(16, max_points), max_points), "mask_sets": (1, 1, max_prompt_sets)}
    out: Profiles = {}
    for name, spec in inputs.items():
        dims = [[sizes[d][k] if isinstance(d, str) else int(d) for d in spec["shape"]]
                for k in range(3)]
        out[name] = [tuple(tuple(d) for d in dims)]
    return out


class EngineBuilder:
    """Builds one serialized TensorRT engine from an ONNX file (logged, profiled, timing-cached).

    Args:
        onnx_path: the graph (external ``.data`` beside it is found by the parser).
        profiles: {input name: [(min, opt, max), ...]} (see module docstring).
        precision: ``fp32`` or ``fp16``, the precision baked into the graph (the manifest's
            record), which the strongly typed engine computes in.
        timing_cache: file of the serialized timing cache (read if present, written back).
        log_path: file receiving the builder log (TensorRT messages and refseg's summary).
        workspace_bytes: builder workspace limit.

    Raises (from :meth:`build`):
        ValueError: profiles that do not name the network's inputs.
        RuntimeError: the ONNX parser or the builder failed (the message lists the parser errors
            and names the log file).
    """

    def __init__(self, onnx_path: str | os.PathLike, profiles: Profiles, precision: str = "fp32",
                 timing_cache: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None,
                 workspace_bytes: int = WORKSPACE_BYTES) -> None:
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"EngineBuilder: precision must be fp32 or fp16, got {precision!r}")
        self.onnx_path = Path(onnx_path)
        self.profiles = profiles
        self.precision = precision
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.log_path = Path(log_path) if log_path else None
        self.workspace_bytes = workspace_bytes

    def cache_fields(self) -> dict:
        """The build settings that enter the engine-cache key (besides ONNX/GPU/TRT identity)."""
        return {"precision": self.precision, "typing": "strong",
                "profiles": {k: [list(map(list, p)) for p in v] for k, v in sorted(self.profiles.items())}}

    def build(self) -> bytes:
        """Parse, configure and build; returns the serialized engine."""
        trt = import_tensorrt()
        messages: list[str] = []
        logger = _make_logger(trt, messages)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # TensorRT >= 9
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            self._write_log(messages)
            raise RuntimeError(f"{self.onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errors))
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        names = {t.name for t in inputs}
        if set(self.profiles) != names:
            raise ValueError(f"{self.onnx_path}: profiles name {sorted(self.profiles)}, the network's "
                             f"inputs are {sorted(names)}")
        counts = {len(v) for v in self.profiles.values()}
        if len(counts) != 1:
            raise ValueError(f"{self.onnx_path}: every input needs the same number of profiles")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        for k in range(counts.pop()):
            profile = builder.create_optimization_profile()
            for name, shapes in self.profiles.items():
                profile.set_shape(name, *shapes[k])
            config.add_optimization_profile(profile)
        known = self.timing_cache is not None and self.timing_cache.is_file()
        timing = config.create_timing_cache(self.timing_cache.read_bytes() if known else b"")
        config.set_timing_cache(timing, False)
        log.info("building TensorRT %s engine for %s (strongly typed, %d inputs: %s, profiles %s)",
                 self.precision, self.onnx_path.name, len(inputs),
                 ", ".join(f"{t.name}{tuple(t.shape)}:{t.dtype}" for t in inputs), self.profiles)
        start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - start
        messages.append(f"refseg: build of {self.onnx_path.name} took {seconds:.1f} s")
        self._write_log(messages)
        if plan is None:
            raise RuntimeError(f"{self.onnx_path}: TensorRT engine build failed (log: {self.log_path})")
        if self.timing_cache is not None:
            self.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.timing_cache, bytes(config.get_timing_cache().serialize()))
        log.info("built %s in %.1f s", self.onnx_path.name, seconds)
        return bytes(plan)

    def _write_log(self, messages: list[str]) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("\n".join(messages) + "\n", encoding="utf-8")


def _make_logger(trt, sink: list[str]):
    """A TensorRT logger that keeps every message (for the builder log) and forwards warnings."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            sink.append(f"[{severity}] {msg}")
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EngineCache:
    """Serialized engines keyed by everything they depend on (see module docstring).

    Args:
        root: cache folder; default ``~/.cache/refseg/engines`` (``refseg info`` lists it).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        if root is None:
            from refseg.models.checkpoints import cache_dir

            root = cache_dir() / "engines"
        self.root = Path(root)

    @staticmethod
    def key_fields(onnx_sha256: str, trt_version: str, gpu_name: str, capability: str,
                   build_fields: dict) -> dict:
        """All fields an engine depends on, as stored in its sidecar."""
        return {"onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu_name,
                "compute_capability": capability, **build_fields}

    def paths(self, graph: str, fields: dict) -> tuple[Path, Path]:
        """(engine file, sidecar) for ``fields``; the name carries a digest of the fields."""
        digest = _sha256_bytes(json.dumps(fields, sort_keys=True).encode())[:20]
        engine = self.root / f"{graph}-{digest}.engine"
        return engine, engine.with_suffix(".json")

    def lookup(self, graph: str, fields: dict) -> Path | None:
        """The cached engine for ``fields``, or None; stale or corrupt entries are deleted."""
        engine, sidecar = self.paths(graph, fields)
        if not engine.is_file() or not sidecar.is_file():
            return None
        reason = None
        try:
            recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            recorded, reason = {}, f"unreadable sidecar ({exc})"
        if reason is None:
            changed = sorted(k for k in set(fields) | set(recorded.get("fields", {}))
                             if recorded.get("fields", {}).get(k) != fields.get(k))
            if changed:
                reason = f"fields differ: {', '.join(changed)}"
            elif recorded.get("engine_sha256") != _sha256_bytes(engine.read_bytes()):
                reason = "engine checksum differs"
        if reason:
            log.warning("engine cache: refusing stale entry %s (%s); it will be rebuilt", engine, reason)
            self.remove(engine)
            return None
        return engine

    def store(self, graph: str, fields: dict, plan: bytes) -> Path:
        """Write ``plan`` and its sidecar atomically; returns the engine path."""
        self.root.mkdir(parents=True, exist_ok=True)
        engine, sidecar = self.paths(graph, fields)
        atomic_write_bytes(engine, plan)
        record = {"fields": fields, "engine_sha256": _sha256_bytes(plan), "graph": graph,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_bytes(sidecar, json.dumps(record, indent=2, sort_keys=True).encode())
        return engine

    @staticmethod
    def remove(engine: Path) -> None:
        engine.unlink(missing_ok=True)
        engine.with_suffix(".json").unlink(missing_ok=True)

    def get_or_build(self, graph: str, fields: dict, build: Callable[[], bytes]) -> Path:
        """The cached engine for ``fields``, building and storing it with ``build()`` if needed."""
        found = self.lookup(graph, fields)
        if found is not None:
            log.info("engine cache hit: %s", found.name)
            return found
        return self.store(graph, fields, build())
