"""Count the device -> host reads a piece of code makes (the syncs that stall a GPU pipeline).

A read is anything whose result the host must wait for: a tensor's value turned into a Python object
(``.item()``, ``.tolist()``, ``bool()/int()/float()`` of a tensor), a copy to host memory (``.cpu()``,
``.numpy()``; ``.to("cpu")`` of a tensor on another device), and the ops whose output shape depends on the data (``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, ``torch.equal``, ``repeat_interleave`` by a
tensor). They are counted where the program asks for them, whatever device the tensors are on, so a
CPU run of the accelerator path (``REFSEG_ACCELERATOR_PATH=1``) counts what a CUDA run would wait for;
a copy is counted once (``.numpy()`` of what ``.cpu()`` returned is the same read). ``.to(device)`` is
counted only from a non-CPU tensor to the CPU: on the CPU it cannot be told from a move to the device.

Two interposition layers do the counting: a ``TorchFunctionMode`` sees the Python-level calls
(``item``, ``bool()``/``int()``/``float()``/``__index__``, ``tolist``, ``numpy``, ``cpu``, ``to``) — counted
there because some never reach the dispatcher on the CPU and, under ``torch.inference_mode``, the
``_local_scalar_dense`` behind ``item`` is not shown to dispatch modes — and a ``TorchDispatchMode``
sees the data-dependent aten ops (``nonzero``, boolean-mask ``index``, ``masked_select``, ``unique``,
``equal``, ``repeat_interleave`` by a tensor). Work inside a custom op (the Triton kernels ``refseg::match`` / ``refseg::kmeans``)
is one launch on a GPU and is not looked into. Modes are thread-local: reader threads are not counted.

    with HostReadCounter() as reads:
        segmenter.segment_batch(images)
    print(reads.total, reads.by_kind)
"""
from __future__ import annotations

import traceback
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_FUNCTION_READS = {"tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__"}
_DISPATCH_READS = {
    "aten::nonzero", "aten::masked_select", "aten::equal",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive", "aten::argwhere",
}


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


class _Functions(TorchFunctionMode):
    def __init__(self, owner: "HostReadCounter"):
        super().__init__()
        self.owner = owner
        self.on_host: dict[int, weakref.ref] = {}  # tensors a counted copy put on the host (read once)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        copied = False
        if name in _FUNCTION_READS:
            copied = name == "cpu"
            if source is None or id(source) not in self.on_host:
                self.owner._hit(name)
        elif name == "to" and source is not None and source.device.type != "cpu":
            device = kwargs.get("device")
            if device is None and len(args) > 1 and isinstance(args[1], (str, torch.device)):
                device = args[1]
            if isinstance(device, (str, torch.device)) and _is_cpu(device):
                self.owner._hit("to(cpu)")
                copied = True
        out = func(*args, **kwargs)
        if copied and isinstance(out, torch.Tensor):
            key = id(out)
            self.on_host[key] = weakref.ref(out, lambda _, key=key: self.on_host.pop(key, None))
        return out


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "HostReadCounter"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _DISPATCH_READS:
            self.owner._hit(name.split("::")[1])
        elif name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None):
            self.owner._hit("boolean-mask index")
        elif name == "aten::repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):
            self.owner._hit("repeat_interleave")
        elif name == "aten::copy_" and isinstance(args[1], torch.Tensor) and args[1].device.type != "cpu" \
                and args[0].device.type == "cpu":
            self.owner._hit("copy to host")  # (.cpu() / .to("cpu") / .tolist() are counted by _Functions)
        return func(*args, **kwargs)


class HostReadCounter:
    """Context manager counting host reads in the current thread (see the module docstring).

    Attributes:
        total: number of reads.
        by_kind: read kind (``item``-like ``_local_scalar_dense``, ``tolist``, ``nonzero`` ...) -> count.
        sites: with ``trace=True``, "file:line" of the innermost refseg frame of each read -> count.
    """

    def __init__(self, trace: bool = False):
        self.by_kind: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.trace = trace
        self._modes = (_Functions(self), _Dispatch(self))

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def _hit(self, kind: str) -> None:
        self.by_kind[kind] += 1
        if self.trace:
            frames = [f for f in traceback.extract_stack()[:-2] if "refseg" in f.filename or "/engine/" in f.filename]
            frames = [f for f in frames if not f.filename.endswith("host_reads.py")]
            if frames:
                f = frames[-1]
                self.sites[f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"] += 1

    def __enter__(self) -> "HostReadCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
