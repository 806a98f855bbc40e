"""The C++ pipeline (refseg-cli over the C API, AOTInductor packages of `refseg export --format aoti`) and
the Python AOTInductor runner (``refseg.export.aoti.AotiPackages``) against the EAGER torch path.

Reference: ``refseg.Segmenter`` with ``backend="torch"`` on the same random checkpoints the export was made
from (tests/cpp_model.py), with the pure-torch prompt engine (``REFSEG_DISABLE_NATIVE=1``: the C++ prompt
engine of ``refseg._C`` shares code with the C++ pipeline) and the torch match / k-means references. Images and
masks are the Kvasir JPEG files as they are: refseg-cli decodes them with libjpeg, the Python side with Pillow
and ``refseg.read_mask`` (JPEG masks binarised at 128). The compiled graphs round differently from eager torch
(~1e-6 relative), so masks are compared by pixel agreement (>= 0.999 per Kvasir pair, each pair's figure logged)
and logits with tolerances, not bit for bit.

Needs the CMake build (``cmake -S . -B build && cmake --build build``; ``REFSEG_CPP_BUILD`` names another
folder); the C++ tests skip when ``build/refseg-cli`` is absent. The model comes from ctest's fixture
(``build/csrc/tests/model``) when current, else is exported here once per module.
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cpp_model
from refseg.config import SegmenterConfig

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("REFSEG_CPP_BUILD", ROOT / "build"))
CLI = BUILD / "refseg-cli"
MIN_AGREEMENT = 0.999
PAIRS = 5  # Kvasir pair k: reference k, target k + 1 (mod 5)

log = logging.getLogger(__name__)
needs_cli = pytest.mark.skipif(not CLI.is_file(), reason=f"{CLI} not built (cmake -S . -B build && "
                                                         "cmake --build build)")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """{"sam", "dinov2", "export"} paths of the tiny random model (ctest's when current)."""
    built = BUILD / "csrc" / "tests" / "model"
    if cpp_model.is_current(built):
        return cpp_model.model_paths(built)
    return cpp_model.write_model(tmp_path_factory.mktemp("cpp_model"))


@pytest.fixture(scope="module")
def eager_env():
    """The switches that keep the Python reference off the C++ prompt engine and the Triton kernels."""
    with pytest.MonkeyPatch.context() as mp:
        for switch in ("REFSEG_DISABLE_NATIVE", "REFSEG_DISABLE_MATCH", "REFSEG_DISABLE_KMEANS"):
            mp.setenv(switch, "1")
        yield


def segmenter(model, preset: str = "sat"):
    """The eager torch Segmenter of ``preset`` at the export's S on the model's checkpoints."""
    from refseg.segmenter import Segmenter

    cfg = SegmenterConfig.from_preset(preset, image_size=cpp_model.IMAGE_SIZE, device="cpu")
    seg = Segmenter(cfg, sam_checkpoint=model["sam"], dinov2_checkpoint=model["dinov2"], device="cpu",
                    backend="torch")
    assert seg.backend.name == "torch"
    return seg


@pytest.fixture(scope="module")
def eager(model, eager_env):
    return segmenter(model)


def kvasir_files(kvasir_dir: Path, k: int) -> tuple[Path, Path, Path]:
    """(reference image, reference mask, target image) JPEG files of pair k."""
    names = sorted(p.name for p in (kvasir_dir / "images").iterdir())
    ref, tgt = names[k], names[(k + 1) % len(names)]
    return kvasir_dir / "images" / ref, kvasir_dir / "masks" / ref, kvasir_dir / "images" / tgt


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def run_cli(export: Path, refs: list[tuple[Path, Path]], out: Path, *inputs: Path, extra=(),
            expect: int = 0) -> subprocess.CompletedProcess:
    args = [str(CLI), "-e", str(export), "-o", str(out), *extra]
    for image, mask in refs:
        args += ["-r", str(image), "-m", str(mask)]
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}  # OpenMP spinning is slow on a CPU shared with other jobs
    proc = subprocess.run(args + [str(p) for p in inputs], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == expect, proc.stderr
    return proc


def agreement(cpp: np.ndarray, py: np.ndarray) -> float:
    assert cpp.shape == py.shape
    return float((cpp == py).mean())


@needs_cli
@pytest.mark.parametrize("k", range(PAIRS))
def test_cpp_mask_agrees_with_eager_python(k, model, eager, kvasir_dir, tmp_path):
    """Kvasir pair k: refseg-cli on the JPEG files vs the eager Segmenter on Pillow's pixels and read_mask."""
    from refseg.io.raster import read_mask

    ref, mask, target = kvasir_files(kvasir_dir, k)
    eager.set_reference(rgb(ref), read_mask(mask))
    py = eager.segment(rgb(target)).mask > 0
    proc = run_cli(model["export"], [(ref, mask)], tmp_path / "out", target)
    cpp = np.asarray(Image.open(tmp_path / "out" / f"{target.stem}.png"))
    assert set(np.unique(cpp)) <= {0, 255}  # one class: 0 / 255, as the Python CLI writes it
    share = agreement(cpp > 0, py)
    log.info("pair %d (target %s): pixel agreement %.5f, foreground python %.4f C++ %.4f", k, target.name, share,
             py.mean(), (cpp > 0).mean())
    assert 0 < py.sum() < py.size, "a trivial mask would not test the decoder"
    assert share >= MIN_AGREEMENT
    assert proc.stdout.count("\n") == 1 and "\r" not in proc.stdout  # stdout is a pipe: one line per image


@needs_cli
def test_cpp_classes_and_n_shot_agree_with_eager_python(model, eager, kvasir_dir, tmp_path):
    """Two classes (pair 0's polyp split into left / right halves, values 1 and 2) plus a second shot (pair 1,
    class 1): label maps of a batch of two targets, C++ vs eager."""
    from refseg.io.raster import read_mask

    (ref0, mask0, _), (ref1, mask1, _) = kvasir_files(kvasir_dir, 0), kvasir_files(kvasir_dir, 1)
    labels0 = read_mask(mask0).astype(np.uint8)
    half = labels0.shape[1] // 2
    labels0[:, half:] *= 2
    labels1 = read_mask(mask1).astype(np.uint8)
    Image.fromarray(labels0).save(tmp_path / "labels0.png")
    Image.fromarray(labels1).save(tmp_path / "labels1.png")
    targets = [kvasir_files(kvasir_dir, k)[2] for k in (1, 2)]
    eager.set_reference(rgb(ref0), labels0).add_reference(rgb(ref1), labels1)
    assert eager.classes == [1, 2]
    run_cli(model["export"], [(ref0, tmp_path / "labels0.png"), (ref1, tmp_path / "labels1.png")],
            tmp_path / "out", *targets)
    for target in targets:
        py = eager.segment(rgb(target)).mask
        cpp = np.asarray(Image.open(tmp_path / "out" / f"{target.stem}.png"))
        share = agreement(cpp, py)
        log.info("two classes, two shots, target %s: label agreement %.5f, classes python %s C++ %s", target.name,
                 share, np.unique(py).tolist(), np.unique(cpp).tolist())
        assert set(np.unique(py)) == {0, 1, 2}, "both classes should appear"
        assert share >= MIN_AGREEMENT


@needs_cli
def test_cpp_gbmseg_preset_agrees_with_eager_python(model, eager_env, kvasir_dir, tmp_path):
    """The gbmseg preset (Euclidean matching, hard negatives, skip-last grid, pixel radii, single mask)."""
    from refseg.io.raster import read_mask

    seg = segmenter(model, "gbmseg")
    ref, mask, target = kvasir_files(kvasir_dir, 2)
    seg.set_reference(rgb(ref), read_mask(mask))
    py = seg.segment(rgb(target)).mask > 0
    run_cli(model["export"], [(ref, mask)], tmp_path / "out", target, extra=["--preset", "gbmseg"])
    cpp = np.asarray(Image.open(tmp_path / "out" / f"{target.stem}.png")) > 0
    share = agreement(cpp, py)
    log.info("gbmseg preset (target %s): pixel agreement %.5f, foreground %.4f", target.name, share, py.mean())
    assert share >= MIN_AGREEMENT


@needs_cli
def test_cli_checks_before_loading_and_creates_its_output_folder(model, kvasir_dir, tmp_path):
    ref, mask, target = kvasir_files(kvasir_dir, 0)
    no_model = tmp_path / "no_model"  # every refusal below comes before the model would load
    proc = run_cli(no_model, [(ref, tmp_path / "absent.png")], tmp_path / "o1", target, expect=2)
    assert "absent.png" in proc.stderr
    (tmp_path / "file").write_text("x")
    proc = run_cli(no_model, [(ref, mask)], tmp_path / "file", target, expect=2)
    assert "cannot create the output folder" in proc.stderr
    proc = run_cli(no_model, [(ref, mask)], tmp_path / "o2", tmp_path / "nothing_here", expect=2)
    assert "nothing_here: no such file or folder" in proc.stderr
    proc = run_cli(no_model, [(ref, mask)], tmp_path / "o3", target, extra=["--preset", "persam"], expect=2)
    assert "unknown preset 'persam'" in proc.stderr
    proc = run_cli(no_model, [(ref, mask)], tmp_path / "o4", target, expect=2)
    assert "no_model: not a directory" in proc.stderr
    # a folder input, a nested output folder that does not exist yet, a corrupt target among good ones
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.open(target).save(inputs / "a.png")
    (inputs / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "nested" / "out"
    proc = run_cli(model["export"], [(ref, mask)], out, inputs, expect=1)
    assert (out / "a.png").is_file() and not (out / "b.png").exists()
    assert "b.jpg" in proc.stderr and "1 of 2 target(s) failed" in proc.stderr
    assert proc.stdout.count("\n") == 1 and "a.png ->" in proc.stdout


def test_aoti_packages_equal_eager(model, eager, kvasir_dir):
    """AotiPackages (the .pt2 files run from Python) against the eager backend, stage by stage; the decoder
    gets the eager encoder's own embedding, which is channels-last (the layout the packages once misread)."""
    from refseg.export.aoti import AotiPackages
    from refseg.models.sam_transforms import normalize_pad, resize_image
    from refseg.pipeline.features import dinov2_batch

    backend = eager.backend
    packages = AotiPackages(model["export"], backend)
    target = rgb(kvasir_files(kvasir_dir, 0)[2])
    x = dinov2_batch([target], cpp_model.IMAGE_SIZE)
    torch.testing.assert_close(packages.encode_dinov2(x), backend.encode_dinov2(x).float(), rtol=1e-3, atol=1e-3)
    pixels = normalize_pad(torch.from_numpy(resize_image(target)).permute(2, 0, 1))
    eager_emb = backend.encode_sam(pixels)
    torch.testing.assert_close(packages.encode_sam(pixels), eager_emb, rtol=1e-3, atol=1e-3)
    emb = eager_emb[0]
    assert not emb.is_contiguous()  # the torch encoder's channels-last output
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand(3, 5, 2, generator=gen) * 1000
    labels = torch.tensor([[1, 1, 0, 0, -1], [1, 0, 0, 0, 0], [1, 1, 1, 0, -1]])
    boxes = torch.tensor([[100.0, 120.0, 600.0, 500.0]] * 3)
    for multimask in (False, True):
        for box in (None, boxes):
            got = packages.decode(emb, coords, labels, box, multimask)
            want = backend.decode(emb, coords, labels, box, multimask)
            for g, w in zip(got, want):
                assert g.shape == w.shape
                torch.testing.assert_close(g, w.float(), rtol=1e-3, atol=2e-3)


def test_export_cli_refuses_bad_aoti_requests(capsys):
    from refseg.cli import main

    assert main(["export", "--format", "aoti", "--precision", "fp16", "-o", "unused"]) == 2
    with pytest.raises(SystemExit):
        main(["export", "--format", "aoti,onnx", "-o", "unused"])
    assert "writes a folder of its own" in capsys.readouterr().err


def test_resize_matches_pil():
    _C = pytest.importorskip("refseg._C", reason="refseg._C is not built (pip install -e . builds it)")
    gen = np.random.default_rng(0)
    for (w, h), (ow, oh), ch in (((53, 41), (112, 112), 3), ((300, 200), (112, 112), 3), ((97, 61), (40, 90), 1),
                                 ((64, 48), (64, 48), 3)):
        img = gen.integers(0, 256, (h, w, ch), dtype=np.uint8)
        pil = Image.fromarray(img[..., 0] if ch == 1 else img)
        for name, flt in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)):
            want = np.asarray(pil.resize((ow, oh), flt)).reshape(oh, ow, ch)
            assert np.array_equal(_C.resize_like_pil(img, ow, oh, name), want), (w, h, ow, oh, name)
