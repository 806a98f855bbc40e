"""Execute a serialized TensorRT engine on torch tensors and torch's CUDA stream (no pycuda).

Inputs are bound in place (``set_tensor_address`` on torch storage), outputs are allocated with
torch's caching allocator from the shapes the context reports, and the engine is enqueued with
``execute_async_v3`` on ``torch.cuda.current_stream()``, so the work is ordered with the torch
code around it without host synchronisation. Engines with several optimisation profiles get one
execution context per profile, created when first needed; each call picks the profile with the
smallest range that holds its input shapes.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from refseg.runtime.tensorrt_build import import_tensorrt

log = logging.getLogger(__name__)


def _torch_dtypes(trt) -> dict:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for name, dtype in (("int64", torch.int64), ("bfloat16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = dtype
    return table


class EngineRunner:
    """One deserialized engine and its execution contexts on one CUDA device.

    Args:
        engine_path: a serialized engine (``.engine``) built for this GPU and TensorRT version.
        device: the CUDA device.

    Raises:
        RuntimeError: the engine cannot be deserialized (another TensorRT version or GPU).
    """

    def __init__(self, engine_path: str | os.PathLike, device: torch.device) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT {trt.__version__} cannot deserialize this "
                               "engine (built by another TensorRT version or for another GPU?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = _torch_dtypes(trt)
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.ranges = [{n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, k)]
                        for n in self.inputs} for k in range(self.engine.num_optimization_profiles)]
        self.contexts: dict[int, object] = {}
        log.debug("engine %s: inputs %s, outputs %s, %d profiles", Path(engine_path).name,
                  self.inputs, self.outputs, len(self.ranges))

    def profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Index of the tightest optimisation profile whose [min, max] holds every input shape.

        Raises:
            ValueError: no profile holds the shapes (the message lists the profiles' ranges).
        """
        best, best_volume = None, None
        for k, ranges in enumerate(self.ranges):
            fits = all(len(shapes[n]) == len(lo) and
                       all(a <= s <= b for s, a, b in zip(shapes[n], lo, hi))
                       for n, (lo, _, hi) in ranges.items())
            volume = sum(math.prod(hi) for _, _, hi in ranges.values())
            if fits and (best_volume is None or volume < best_volume):
                best, best_volume = k, volume
        if best is None:
            raise ValueError(f"input shapes {shapes} fit no optimisation profile of the engine "
                             f"(min/opt/max per profile: {self.ranges}); rebuild with larger limits")
        return best

    def _context(self, profile: int, stream: int):
        if profile not in self.contexts:
            with torch.cuda.device(self.device):  # the context's memory lives on the engine's device
                context = self.engine.create_execution_context()
            if not context.set_optimization_profile_async(profile, stream):
                raise RuntimeError(f"TensorRT refused optimisation profile {profile}")
            self.contexts[profile] = context
        return self.contexts[profile]

    def run(self, feeds: dict[str, torch.Tensor], wanted: tuple[str, ...]) -> list[torch.Tensor]:
        """Enqueue the engine on the current stream; returns ``wanted`` outputs as float32 tensors.

        Raises:
            ValueError: missing inputs, or shapes outside every optimisation profile.
            RuntimeError: TensorRT rejected a shape or the enqueue.
        """
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"engine inputs missing: {missing} (engine takes {self.inputs})")
        stream = torch.cuda.current_stream(self.device)
        tensors = {n: feeds[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        context = self._context(self.profile_for({n: tuple(t.shape) for n, t in tensors.items()}),
                                stream.cuda_stream)
        for name, tensor in tensors.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeError(f"TensorRT rejected shape {tuple(tensor.shape)} for input {name}")
            context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, results[name].data_ptr())
        with torch.cuda.device(self.device):  # cuda:1 works too: enqueue with the engine's device current
            ok = context.execute_async_v3(stream.cuda_stream)
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return [results[name].float() for name in wanted]
