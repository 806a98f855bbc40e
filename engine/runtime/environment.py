"""What this machine offers refseg: torch/CUDA, GPU, triton, ONNX Runtime, TensorRT, caches.

Used by ``refseg info`` and by benchmark reports; every probe is lazy and never raises.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

from refseg.optional import versions


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect() -> dict:
    """A JSON-able dict describing the software and hardware refseg can use."""
    import torch

    found = versions(("refseg", "triton", "onnx", "onnxruntime", "tensorrt"))  # read, not imported
    info: dict = {
        "refseg": found["refseg"] or "dev",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "gpus": [],
        "triton": found["triton"],
        "onnx": found["onnx"],
        "onnxruntime": found["onnxruntime"],
        "onnxruntime_providers": [],
        "tensorrt": found["tensorrt"],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": prop.name, "capability": f"{prop.major}.{prop.minor}",
                                 "memory_gib": round(prop.total_memory / 2**30, 1)})
    if info["onnxruntime"]:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    from refseg.config import SAM2_MODELS, SAM_MODELS
    from refseg.models.checkpoints import cache_dir, search_dirs

    info["sam_models"] = f"SAM {', '.join(SAM_MODELS)}; SAM 2 {', '.join(SAM2_MODELS)} (--sam)"

    info["checkpoint_dirs"] = [str(d) for d in search_dirs()]
    info["checkpoints_found"] = sorted(
        {p.name for d in search_dirs() if d.is_dir() for p in d.iterdir()
         if p.suffix in (".pth", ".pt", ".safetensors")})
    engine_dir = cache_dir() / "engines"
    info["engine_cache"] = str(engine_dir)
    info["engines_cached"] = sorted(p.name for p in engine_dir.glob("*.engine")) if engine_dir.is_dir() else []
    return info


def describe() -> str:
    """Human-readable multi-line form of :func:`collect`."""
    info = collect()
    gpus = ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in info["gpus"])
    rows = [
        ("refseg", info["refseg"]),
        ("python", f"{info['python']} on {info['platform']}"),
        ("cpu", f"{info['cpu']} ({info['cpu_count']} logical cores, torch uses {info['torch_threads']})"),
        ("torch", info["torch"]),
        ("cuda", f"{info['cuda'] or 'not built'}; available: {info['cuda_available']}"),
        ("gpus", gpus or "none"),
        ("triton", info["triton"] or "not installed (pip install 'refseg[gpu]'); kernels fall back to torch"),
        ("onnx", info["onnx"] or "not installed (pip install 'refseg[onnx]')"),
        ("onnxruntime", (f"{info['onnxruntime']} providers: {', '.join(info['onnxruntime_providers'])}"
                         if info["onnxruntime"] else "not installed (pip install 'refseg[onnx]')")),
        ("tensorrt", info["tensorrt"] or "not installed (pip install 'refseg[gpu]')"),
        ("sam models", info["sam_models"]),
        ("checkpoint dirs", " > ".join(info["checkpoint_dirs"])),
        ("checkpoints", ", ".join(info["checkpoints_found"]) or "none found"),
        ("engine cache", f"{info['engine_cache']} ({len(info['engines_cached'])} engines)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
