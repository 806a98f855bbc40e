"""TensorRT engine building, the engine cache, and the TensorRT / ONNX Runtime GPU backends.

The engine-cache bookkeeping and the optimisation profiles are plain Python and run everywhere; the
builder's flags (strongly typed, no FP16 flag, TF32 off) and the backend's device placement (cuda:1)
run everywhere against a fake ``tensorrt`` module and a faked CUDA device. Everything that builds or runs an engine needs the
``tensorrt`` package and a CUDA GPU and is skipped otherwise (the reason is printed with -ra);
the ONNX Runtime io-binding test needs ``onnxruntime-gpu``'s CUDA provider.

GPU tolerances: fp32 engines (TF32 off) vs torch fp32, max abs diff <= 1e-3; fp16 engines vs
torch fp32, max abs diff <= 2 % of the reference's max abs value and mean cosine >= 0.999.
"""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from refseg.runtime.tensorrt_build import EngineBuilder, EngineCache, default_profiles
from refseg.runtime import io_names as io

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not (HAS_TRT and HAS_CUDA),
                               reason=f"needs tensorrt and a CUDA GPU (tensorrt installed: {HAS_TRT}, "
                                      f"CUDA available: {HAS_CUDA})")

FP32_ATOL = 1e-3
FP16_REL = 2e-2
FP16_MIN_COS = 0.999
SIZE = 224
SAM_SIZE = 256

MANIFEST = {
    "max_batch": 8,
    "graphs": {
        "dinov2": {"inputs": {io.DINOV2_INPUT: {"shape": ["batch", 3, 518, 518]}}},
        "sam_encoder": {"inputs": {io.SAM_ENCODER_INPUT: {"shape": ["batch", 3, 1024, 1024]}}},
        "sam_decoder": {"inputs": {
            io.SAM_DECODER_EMBEDDINGS: {"shape": [1, 256, 64, 64]},
            io.SAM_DECODER_COORDS: {"shape": ["prompt_sets", "points", 2]},
            io.SAM_DECODER_LABELS: {"shape": ["prompt_sets", "points"]},
            io.SAM_DECODER_MASK_INPUT: {"shape": ["mask_sets", 1, 256, 256]},
            io.SAM_DECODER_HAS_MASK: {"shape": [1]}}},
    },
}


# ----------------------------------------------------------------------------- plain Python
def test_default_profiles_cover_batches_and_prompts():
    enc = default_profiles("sam_encoder", MANIFEST)[io.SAM_ENCODER_INPUT]
    assert enc == [((1, 3, 1024, 1024),) * 3,
                   ((2, 3, 1024, 1024), (8, 3, 1024, 1024), (8, 3, 1024, 1024))]
    dec = default_profiles("sam_decoder", MANIFEST, max_prompt_sets=32, max_points=40)
    assert dec[io.SAM_DECODER_COORDS] == [((1, 1, 2), (8, 16, 2), (32, 40, 2))]
    assert dec[io.SAM_DECODER_EMBEDDINGS] == [((1, 256, 64, 64),) * 3]
    assert dec[io.SAM_DECODER_MASK_INPUT][0][2] == (32, 1, 256, 256)
    with pytest.raises(ValueError, match="unknown graph"):
        default_profiles("mask_head", MANIFEST)


class FakeTensorRT:
    """A stand-in for the ``tensorrt`` module and a GPU: records every builder flag, and the CUDA device
    that is current (``torch.cuda.device``, faked) when engines are built, deserialized, given contexts
    and enqueued. Deserialized engines map input ``x`` (B, 4) to output ``y`` (B, 4)."""

    __version__ = "10.9.0"
    float32, float16, int32, int8, bool = "f32", "f16", "i32", "i8", "b"
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
    BuilderFlag = SimpleNamespace(FP16="FP16", TF32="TF32", OBEY_PRECISION_CONSTRAINTS="OBEY")
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")

    def __init__(self) -> None:
        self.current = ["cuda:0"]          # the fake current device stack
        self.events: list[tuple[str, str]] = []  # (what, device current at the time)
        self.flags: list[tuple[str, object]] = []
        fake = self

        class ILogger:
            Severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2)

            def __init__(self) -> None:
                pass

        class Logger:
            WARNING = 2

            def __init__(self, severity) -> None:
                pass

        class Config:
            def set_memory_pool_limit(self, pool, size): pass
            def clear_flag(self, flag): fake.flags.append(("clear", flag))
            def set_flag(self, flag): fake.flags.append(("set", flag))
            def add_optimization_profile(self, profile): pass
            def create_timing_cache(self, data): return SimpleNamespace(serialize=lambda: b"timing")
            def set_timing_cache(self, cache, ignore_mismatch): pass
            def get_timing_cache(self): return SimpleNamespace(serialize=lambda: b"timing")

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags):
                fake.flags.append(("network", flags))
                return SimpleNamespace(num_inputs=len(fake.input_names), get_input=lambda i: SimpleNamespace(
                    name=fake.input_names[i], shape=(-1, 4), dtype="f32"))

            def create_builder_config(self): return Config()
            def create_optimization_profile(self): return SimpleNamespace(set_shape=lambda *a: None)

            def build_serialized_network(self, network, config):
                fake.events.append(("build", fake.current[-1]))
                return b"plan"

        class Engine:
            num_io_tensors, num_optimization_profiles = 2, 1

            def get_tensor_name(self, i): return ("x", "y")[i]
            def get_tensor_mode(self, name): return "in" if name == "x" else "out"
            def get_tensor_dtype(self, name): return "f32"
            def get_tensor_profile_shape(self, name, k): return [(1, 4), (2, 4), (8, 4)]

            def create_execution_context(self):
                fake.events.append(("context", fake.current[-1]))
                shapes = {}
                return SimpleNamespace(
                    set_optimization_profile_async=lambda k, stream: True,
                    set_input_shape=lambda name, shape: shapes.update(x=shape) or True,
                    set_tensor_address=lambda name, ptr: None,
                    get_tensor_shape=lambda name: shapes["x"],
                    execute_async_v3=lambda stream: fake.events.append(("enqueue", fake.current[-1])) or True)

        class Runtime:
            def __init__(self, logger) -> None:
                pass

            def deserialize_cuda_engine(self, data):
                fake.events.append(("deserialize", fake.current[-1]))
                return Engine()

        self.ILogger, self.Logger, self.Builder, self.Runtime = ILogger, Logger, Builder, Runtime
        self.OnnxParser = lambda network, logger: SimpleNamespace(parse_from_file=lambda path: True)
        self.input_names = ["x"]  # the network inputs the fake parser reports

    def device(self, device):
        """Replacement of ``torch.cuda.device``: a context manager making ``device`` current."""
        fake = self

        class _Device:
            def __enter__(self):
                fake.current.append(str(torch.device(device)))

            def __exit__(self, *exc):
                fake.current.pop()

        return _Device()


class FakeBuffer:
    """What the runner does with a tensor: ``to``/``contiguous``/``float``, ``shape``, ``data_ptr``."""

    def __init__(self, shape, device) -> None:
        self.shape, self.device = tuple(shape), str(device)

    def to(self, device, dtype=None):
        return FakeBuffer(self.shape, torch.device(device))

    def contiguous(self):
        return self

    float = contiguous

    def data_ptr(self) -> int:
        return 0


@pytest.fixture
def fake_gpu(monkeypatch):
    from refseg.runtime import tensorrt_build, tensorrt_runner

    fake = FakeTensorRT()
    for module in (tensorrt_build, tensorrt_runner):
        monkeypatch.setattr(module, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: fake.events.append(("stream", str(device)))
                        or SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: fake.events.append(("properties", str(device)))
                        or SimpleNamespace(name="Fake GPU", major=9, minor=0))
    monkeypatch.setattr(tensorrt_runner.torch, "empty",
                        lambda shape, dtype=None, device=None: FakeBuffer(shape, device))
    return fake


def test_engine_builder_is_strongly_typed_without_precision_flags(fake_gpu, tmp_path):
    for precision in ("fp32", "fp16"):
        fake_gpu.flags.clear()
        builder = EngineBuilder(tmp_path / "g.onnx", {"x": [((1, 4), (2, 4), (8, 4))]}, precision,
                                timing_cache=tmp_path / "timing.cache", log_path=tmp_path / "build.log")
        assert builder.build() == b"plan"
        assert ("network", 1 << 5) in fake_gpu.flags                   # STRONGLY_TYPED
        assert [f for f in fake_gpu.flags if f[0] == "set"] == []      # no FP16 / OBEY flag path
        assert ("clear", "TF32") in fake_gpu.flags
        assert builder.cache_fields()["typing"] == "strong"
        assert builder.cache_fields()["precision"] == precision
    with pytest.raises(ValueError, match="profiles name"):
        EngineBuilder(tmp_path / "g.onnx", {"images": [((1, 4),) * 3]}).build()


def test_tensorrt_backend_builds_and_runs_on_its_own_device(fake_gpu, tmp_path):
    """cuda:1 (faked): engines are built, deserialized, given contexts and enqueued with cuda:1
    current, and inputs and outputs live on cuda:1 — never on the default cuda:0."""
    from refseg.config import SegmenterConfig
    from refseg.runtime.exported import TensorRTBackend

    manifest = {"precision": "fp32", "image_size": 518, "max_batch": 8, "files": {},
                "graphs": {k: dict(v, files=[f"{k}.onnx"], precision="fp32") for k, v in MANIFEST["graphs"].items()}}
    manifest["files"] = {f"{k}.onnx": {"sha256": k * 3} for k in manifest["graphs"]}
    builds = []
    original = EngineBuilder.build

    def build(self):  # the fake parser reports the graph's inputs
        fake_gpu.input_names = list(self.profiles)
        builds.append(self.onnx_path.name)
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EngineBuilder, "build", build)
        backend = TensorRTBackend(tmp_path, SegmenterConfig(), torch.device("cuda:1"), manifest,
                                  engine_cache=EngineCache(tmp_path / "engines"))
    assert sorted(builds) == ["dinov2.onnx", "sam_decoder.onnx", "sam_encoder.onnx"]
    runner = backend.runners["sam_encoder"]
    assert runner.device == torch.device("cuda:1")
    out, = runner.run({"x": FakeBuffer((3, 4), "cpu")}, ("y",))
    assert out.device == "cuda:1" and out.shape == (3, 4)
    seen = {what for what, _ in fake_gpu.events}
    assert {"build", "deserialize", "context", "enqueue", "stream", "properties"} <= seen
    wrong = [(what, dev) for what, dev in fake_gpu.events if dev != "cuda:1"]
    assert wrong == [], wrong
    assert fake_gpu.current == ["cuda:0"]  # every device context was left


def test_get_or_build_docstring_example_matches_its_signature():
    import ast
    import inspect

    from refseg.runtime import tensorrt_build

    calls = [ast.parse(line.strip().split("=", 1)[1].split("#")[0].strip()).body[0].value
             for line in tensorrt_build.__doc__.splitlines() if ".get_or_build(" in line]
    assert calls, "the module docstring shows get_or_build"
    signature = inspect.signature(EngineCache.get_or_build)
    for call in calls:
        signature.bind(None, *[ast.unparse(a) for a in call.args],
                       **{k.arg: ast.unparse(k.value) for k in call.keywords})
        assert ast.unparse(call.args[0]).strip("'\"") in ("dinov2", "sam_encoder", "sam_decoder")
        assert ast.unparse(call.args[-1]).endswith(".build")  # the callable, not its result


def cache_fields(**changes) -> dict:
    fields = EngineCache.key_fields("ab" * 32, "10.9.0", "NVIDIA H100", "9.0",
                                    {"precision": "fp16", "typing": "strong", "profiles": {}})
    fields.update(changes)
    return fields


def test_engine_cache_hit_stale_and_rebuild(tmp_path):
    cache = EngineCache(tmp_path)
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"plan-%d" % len(builds)

    fields = cache_fields()
    first = cache.get_or_build("sam_encoder", fields, build)
    assert first.read_bytes() == b"plan-1" and first.with_suffix(".json").is_file()
    assert cache.get_or_build("sam_encoder", fields, build) == first and len(builds) == 1

    # another GPU or TensorRT version is another key: a new engine, the old one untouched
    other = cache.get_or_build("sam_encoder", cache_fields(gpu="NVIDIA A100"), build)
    assert other != first and len(builds) == 2 and first.is_file()

    # a sidecar that no longer matches its key is refused, deleted and rebuilt
    sidecar = first.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["fields"]["tensorrt"] = "10.0.0"
    sidecar.write_text(json.dumps(record))
    assert cache.lookup("sam_encoder", fields) is None and not first.exists()
    rebuilt = cache.get_or_build("sam_encoder", fields, build)
    assert rebuilt == first and rebuilt.read_bytes() == b"plan-3"

    # a truncated engine fails its checksum
    rebuilt.write_bytes(b"plan")
    assert cache.lookup("sam_encoder", fields) is None


# ----------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def small_exports(tmp_path_factory):
    """fp32 and fp16 exports of DINOv2-S@224 and a 2-block SAM-B on a 256² input, and the models."""
    pytest.importorskip("onnx", reason="onnx not installed")
    from refseg.export.onnx_export import export_models
    from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model

    dinov2 = random_dinov2_model("vits14", seed=0)
    sam = random_sam_model("vit_b", seed=1, depth=2, img_size=SAM_SIZE)
    out = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path_factory.mktemp(f"export_{precision}")
        manifest = export_models(folder, precision=precision, image_size=SIZE, max_batch=4,
                                 dinov2_model=dinov2, sam_model=sam)
        out[precision] = (folder, manifest)
    return out, dinov2, sam


@pytest.fixture(scope="module")
def torch_gpu(small_exports):
    from refseg.runtime.torch_backend import TorchBackend

    _, dinov2, sam = small_exports
    return TorchBackend(dinov2, sam, torch.device("cuda"))


def trt_backend(small_exports, precision, engine_root, **options):
    from refseg.config import SegmenterConfig
    from refseg.runtime.exported import TensorRTBackend

    exports, _, _ = small_exports
    folder, manifest = exports[precision]
    config = SegmenterConfig(dinov2="vits14", image_size=SIZE, precision=precision)
    return TensorRTBackend(folder, config, torch.device("cuda"), manifest,
                           engine_cache=EngineCache(engine_root), **options)


def gpu_images(batch: int, side: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, side, side, generator=gen).cuda()


@needs_trt
@pytest.mark.parametrize("batch", [1, 3, 6])  # 6 > max_batch 4: two engine calls
def test_tensorrt_fp32_encoders_match_torch(small_exports, torch_gpu, tmp_path_factory, batch):
    backend = trt_backend(small_exports, "fp32", tmp_path_factory.mktemp("engines"))
    x = gpu_images(batch, SIZE, seed=batch)
    assert float((backend.encode_dinov2(x) - torch_gpu.encode_dinov2(x)).abs().max()) <= FP32_ATOL
    y = gpu_images(batch, SAM_SIZE, seed=10 + batch)
    assert float((backend.encode_sam(y) - torch_gpu.encode_sam(y)).abs().max()) <= FP32_ATOL


@needs_trt
@pytest.mark.parametrize("points", [1, 37])
def test_tensorrt_decoder_matches_torch(small_exports, torch_gpu, tmp_path_factory, points):
    backend = trt_backend(small_exports, "fp32", tmp_path_factory.mktemp("engines"), max_prompt_sets=4)
    gen = torch.Generator().manual_seed(points)
    embedding = torch.randn(256, 16, 16, generator=gen).cuda()
    coords = (torch.rand(6, points, 2, generator=gen) * SAM_SIZE).cuda()  # 6 sets > 4: chunked
    labels = torch.randint(0, 2, (6, points), generator=gen).cuda()
    for multimask in (False, True):
        masks, iou = backend.decode(embedding, coords, labels, None, multimask)
        ref_masks, ref_iou = torch_gpu.decode(embedding, coords, labels, None, multimask)
        assert masks.shape == ref_masks.shape
        assert float((masks - ref_masks).abs().max()) <= FP32_ATOL
        assert float((iou - ref_iou).abs().max()) <= FP32_ATOL


@needs_trt
def test_tensorrt_fp16_strongly_typed_close_to_torch(small_exports, torch_gpu, tmp_path_factory):
    backend = trt_backend(small_exports, "fp16", tmp_path_factory.mktemp("engines"))
    x, y = gpu_images(2, SIZE, 5), gpu_images(2, SAM_SIZE, 6)
    for out, ref, dim in ((backend.encode_dinov2(x), torch_gpu.encode_dinov2(x), -1),
                          (backend.encode_sam(y), torch_gpu.encode_sam(y), 1)):
        scale = float(ref.abs().max())
        assert float((out - ref).abs().max()) <= FP16_REL * scale
        assert float(torch.nn.functional.cosine_similarity(out, ref, dim=dim).mean()) >= FP16_MIN_COS


@needs_trt
def test_tensorrt_engine_cache_reused_and_stale_rebuilt(small_exports, tmp_path):
    first = trt_backend(small_exports, "fp32", tmp_path)
    engines = sorted(tmp_path.glob("*.engine"))
    assert len(engines) == 3 and (tmp_path / "sam_encoder-build.log").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in engines}
    second = trt_backend(small_exports, "fp32", tmp_path)
    assert {p: p.stat().st_mtime_ns for p in engines} == stamps  # cache hits, nothing rebuilt
    sidecar = engines[0].with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["fields"]["onnx_sha256"] = "0" * 64
    sidecar.write_text(json.dumps(record))
    trt_backend(small_exports, "fp32", tmp_path)
    assert engines[0].stat().st_mtime_ns != stamps[engines[0]]  # refused and rebuilt
    assert first.runners.keys() == second.runners.keys()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_onnxruntime_cuda_io_binding_matches_torch(small_exports, torch_gpu):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    from refseg.config import SegmenterConfig
    from refseg.runtime.exported import OnnxRuntimeBackend

    exports, _, _ = small_exports
    folder, manifest = exports["fp32"]
    backend = OnnxRuntimeBackend(folder, SegmenterConfig(dinov2="vits14", image_size=SIZE),
                                 torch.device("cuda"), manifest)
    x = gpu_images(3, SIZE, seed=7)
    out = backend.encode_dinov2(x)
    assert out.is_cuda
    assert float((out - torch_gpu.encode_dinov2(x)).abs().max()) <= FP32_ATOL
    embedding = torch.randn(256, 16, 16, generator=torch.Generator().manual_seed(8)).cuda()
    coords = torch.rand(3, 5, 2, generator=torch.Generator().manual_seed(9)).cuda() * SAM_SIZE
    labels = torch.ones(3, 5, dtype=torch.int64, device="cuda")
    masks, _ = backend.decode(embedding, coords, labels, None, True)
    ref, _ = torch_gpu.decode(embedding, coords, labels, None, True)
    assert float((masks - ref).abs().max()) <= FP32_ATOL
