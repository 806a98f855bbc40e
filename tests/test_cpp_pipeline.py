"""The C++ pipeline (refseg-cli over the C API, AOTInductor packages of `refseg export --format aoti`) and
the Python AOTInductor runner (``refseg.export.aoti.AotiPackages``) against the EAGER torch path.

Reference: ``refseg.Segmenter`` with ``backend="torch"`` on the same random checkpoints the export was made
from (tests/cpp_model.py), with the pure-torch prompt engine (``REFSEG_DISABLE_NATIVE=1``: the C++ prompt
engine of ``refseg._C`` shares code with the C++ pipeline) and the torch match / k-means references. The
compiled graphs round differently from eager torch (~1e-6 relative), so masks are compared by pixel
agreement (>= 0.999 per Kvasir pair) and logits with tolerances, not bit for bit.

Needs the CMake build (``cmake -S . -B build && cmake --build build``; ``REFSEG_CPP_BUILD`` names another
folder); the C++ tests skip when ``build/refseg-cli`` is absent. The model comes from ctest's fixture
(``build/csrc/tests/model``) when current, else is exported here once per session.
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
def eager(model):
    """The eager torch Segmenter (``sat`` preset at the export's S) with the pure-torch prompt engine."""
    from refseg.segmenter import Segmenter

    with pytest.MonkeyPatch.context() as mp:
        for switch in ("REFSEG_DISABLE_NATIVE", "REFSEG_DISABLE_MATCH", "REFSEG_DISABLE_KMEANS"):
            mp.setenv(switch, "1")
        cfg = SegmenterConfig.from_preset("sat", image_size=cpp_model.IMAGE_SIZE, device="cpu")
        seg = Segmenter(cfg, sam_checkpoint=model["sam"], dinov2_checkpoint=model["dinov2"], device="cpu",
                        backend="torch")
        assert seg.backend.name == "torch"
        yield seg, mp


def kvasir_pair(kvasir_dir: Path, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(reference RGB, reference mask 0/255 (the JPEG binarised at 128 as refseg.read_mask does),
    target RGB, target name) of pair k."""
    from refseg.io.raster import read_mask

    names = sorted(p.name for p in (kvasir_dir / "images").iterdir())
    ref, tgt = names[k], names[(k + 1) % len(names)]
    image = np.asarray(Image.open(kvasir_dir / "images" / ref).convert("RGB"))
    mask = np.where(read_mask(kvasir_dir / "masks" / ref) > 0, 255, 0).astype(np.uint8)
    target = np.asarray(Image.open(kvasir_dir / "images" / tgt).convert("RGB"))
    return image, mask, target, tgt


def run_cli(export: Path, ref: Path, mask: Path, out: Path, *targets: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(CLI), str(export), str(ref), str(mask), str(out), *map(str, targets)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@needs_cli
@pytest.mark.parametrize("k", range(PAIRS))
def test_cpp_mask_agrees_with_eager_python(k, model, eager, kvasir_dir, tmp_path):
    """Kvasir pair k through refseg-cli (PNG files of the decoded pixels) and through the eager Segmenter."""
    seg, _ = eager
    image, mask, target, name = kvasir_pair(kvasir_dir, k)
    seg.set_reference(image, mask)
    py = seg.segment(target).mask > 0
    for file, arr in (("ref.png", image), ("mask.png", mask), ("target.png", target)):
        Image.fromarray(arr).save(tmp_path / file)
    (tmp_path / "out").mkdir()
    run_cli(model["export"], tmp_path / "ref.png", tmp_path / "mask.png", tmp_path / "out", tmp_path / "target.png")
    cpp = np.asarray(Image.open(tmp_path / "out" / "target.png")) > 0
    assert cpp.shape == py.shape == target.shape[:2]
    agreement = float((cpp == py).mean())
    log.info("pair %d (target %s): pixel agreement %.5f, foreground python %.4f C++ %.4f", k, name, agreement,
             py.mean(), cpp.mean())
    assert 0 < py.sum() < py.size, "a trivial mask would not test the decoder"
    assert agreement >= MIN_AGREEMENT


def test_aoti_packages_equal_eager(model, eager, kvasir_dir):
    """AotiPackages (the .pt2 files run from Python) against the eager backend, stage by stage; the decoder
    gets the eager encoder's own embedding, which is channels-last (the layout the packages once misread)."""
    from refseg.export.aoti import AotiPackages
    from refseg.pipeline.features import dinov2_batch
    from refseg.models.sam_transforms import normalize_pad, resize_image

    seg, _ = eager
    backend = seg.backend
    packages = AotiPackages(model["export"], backend)
    _, _, target, _ = kvasir_pair(kvasir_dir, 0)
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
