"""The C++ pipeline (refseg-cli over the C API, AOTInductor packages of `refseg export --format aoti`)
against the Python pipeline on a Kvasir pair with small random checkpoints.

The Python side runs the same .pt2 packages (``torch._inductor.aoti_load_package``) behind the
Segmenter's backend interface, with the pure-torch prompt engine (``REFSEG_DISABLE_NATIVE=1``) and the
torch match / k-means references, so the masks must be identical: every pre- and post-processing
step (PIL resizes, normalisation, matching, prompts, SAM transforms, component cleaning) is compared.

Needs the CMake build (``cmake -S . -B build && cmake --build build``; ``REFSEG_CPP_BUILD`` names
another folder); skipped when ``build/refseg-cli`` is absent.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.config import SegmenterConfig
from refseg.export.aoti import AotiPackages

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("REFSEG_CPP_BUILD", ROOT / "build"))
CLI = BUILD / "refseg-cli"
IMAGE_SIZE = 112

pytestmark = pytest.mark.skipif(not CLI.is_file(), reason=f"{CLI} not built (cmake -S . -B build && cmake --build build)")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """AOTInductor export of tiny random models (DINOv2-S/14 with 1 block, SAM ViT-B with 1 block):
    the packages' compile time, not the models, is what this test pays for."""
    import dataclasses

    from refseg.export.aoti import export_aoti
    from refseg.models.dinov2 import DINOV2_SPECS, DinoVisionTransformer
    from refseg.models.dinov2 import init_random_ as init_dinov2
    from refseg.models.sam import SAM_SPECS, Sam
    from refseg.models.sam import init_random_ as init_sam

    dino = DinoVisionTransformer(dataclasses.replace(DINOV2_SPECS["vits14"], depth=1))
    init_dinov2(dino, seed=0)
    sam = Sam(SAM_SPECS["vit_b"].with_depth(1))
    init_sam(sam, seed=0)
    out = tmp_path_factory.mktemp("aoti")
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):  # compile time
        manifest = export_aoti(out, dino, sam, image_size=IMAGE_SIZE)
    assert manifest["export_format"] == "aoti" and manifest["image_size"] == IMAGE_SIZE
    assert sorted(manifest["graphs"]) == ["dinov2", "sam_decoder", "sam_encoder"]
    return out


def test_export_cli_refuses_bad_aoti_requests(capsys):
    from refseg.cli import main

    assert main(["export", "--format", "aoti", "--precision", "fp16", "-o", "unused"]) == 2
    with pytest.raises(SystemExit):
        main(["export", "--format", "aoti,onnx", "-o", "unused"])
    assert "writes a folder of its own" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pair(kvasir_dir, tmp_path_factory):
    """Reference and target (RGB, downscaled) plus a binary reference mask, also written as PNG."""
    names = sorted(p.name for p in (kvasir_dir / "images").iterdir())
    folder = tmp_path_factory.mktemp("pngs")
    size = (176, 144)
    ref = np.asarray(Image.open(kvasir_dir / "images" / names[0]).convert("RGB").resize(size))
    mask = np.asarray(Image.open(kvasir_dir / "masks" / names[0]).convert("L").resize(size))
    mask = np.where(mask > 127, 255, 0).astype(np.uint8)
    tgt = np.asarray(Image.open(kvasir_dir / "images" / names[1]).convert("RGB").resize((160, 150)))
    for name, arr in (("ref.png", ref), ("mask.png", mask), ("target.png", tgt)):
        Image.fromarray(arr).save(folder / name)
    return folder, ref, mask, tgt


def run_cli(export_dir, folder, out):
    out.mkdir(exist_ok=True)
    proc = subprocess.run([str(CLI), str(export_dir), str(folder / "ref.png"), str(folder / "mask.png"), str(out),
                           str(folder / "target.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.asarray(Image.open(out / "target.png"))


def test_cpp_mask_equals_python_mask(export_dir, pair, small_checkpoints, tmp_path, monkeypatch):
    """Same packages, same mask, pixel for pixel (the Segmenter's own checkpoints only satisfy its
    constructor: its backend is replaced by the packages)."""
    from refseg.segmenter import Segmenter

    folder, ref, mask, tgt = pair
    for switch in ("REFSEG_DISABLE_NATIVE", "REFSEG_DISABLE_MATCH", "REFSEG_DISABLE_KMEANS"):
        monkeypatch.setenv(switch, "1")
    sam, dino = small_checkpoints
    cfg = SegmenterConfig.from_preset("sat", image_size=IMAGE_SIZE, device="cpu")
    seg = Segmenter(cfg, sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu")
    seg.backend = AotiPackages(export_dir, seg.backend)
    seg.set_reference(ref, mask)
    result = seg.segment(tgt)
    py_mask = result.mask
    cpp_mask = run_cli(export_dir, folder, tmp_path / "out")
    assert cpp_mask.shape == py_mask.shape == tgt.shape[:2] and cpp_mask.dtype == np.uint8
    assert sum(len(p) for p in result.points.values()) > 0  # the decoder ran on real prompts
    assert 0 < int((py_mask > 0).sum()) < py_mask.size  # a non-trivial mask
    assert np.array_equal(cpp_mask > 0, py_mask > 0)


def test_resize_matches_pil():
    from refseg import _C

    if not hasattr(_C, "resize_like_pil"):
        pytest.skip("refseg._C without the resampler")
    gen = np.random.default_rng(0)
    for (w, h), (ow, oh), ch in (((53, 41), (112, 112), 3), ((300, 200), (112, 112), 3), ((97, 61), (40, 90), 1)):
        img = gen.integers(0, 256, (h, w, ch), dtype=np.uint8)
        pil = Image.fromarray(img[..., 0] if ch == 1 else img)
        for name, flt in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)):
            want = np.asarray(pil.resize((ow, oh), flt)).reshape(oh, ow, ch)
            assert np.array_equal(_C.resize_like_pil(img, ow, oh, name), want), (w, h, ow, oh, name)


def test_c_api_on_a_live_engine(export_dir, tmp_path):
    """csrc/tests/test_engine_api on a real export: segment before set_reference, bad buffers and
    sizes on a live engine, cancellation through the progress callback (codes + messages)."""
    exe = BUILD / "csrc" / "tests" / "test_engine_api"
    if not exe.is_file():
        pytest.skip(f"{exe} not built")
    proc = subprocess.run([str(exe), str(tmp_path), str(export_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
