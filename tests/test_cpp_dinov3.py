"""DINOv3 through `refseg export --format aoti` and the C++ pipeline, with the positional projection.

Model: a random DINOv3 ViT-S/16 (official ``.pth`` layout, seed 0) at S = 112 (7 x 7 patches) and the tiny SAM
of tests/cpp_model.py, exported once per module with ``export_aoti`` (feature_debias project: the folder carries
``positional_basis.f32``; ~45 CPU-seconds of AOTInductor compiles). Rank 48 (``debias_rank``, the largest below
the 49 tokens of the blank image), not the default 20: with random weights, rank 20 leaves every prompt point of
these pairs unchanged, so a C++ pipeline without the projection would pass; at 48 the eager prompts and masks
change (pixel agreement none vs project 0.989 and 0.950 on pairs 0 and 2), which the last test asserts.

References:
* the stored basis vs :func:`refseg.pipeline.feature_norm.positional_basis` of the EAGER encoder's
  ``forward_features`` tokens of the blank image (the model built from the checkpoint, not the exported
  wrapper): projectors ``B Bᵀ`` equal within 1e-4, columns orthonormal within 1e-5;
* refseg-cli (C API, AOTInductor packages) vs the EAGER ``refseg.Segmenter`` (torch backend, preset ``sat-v3``,
  feature_debias project, pure-torch prompt engine and match / k-means references) on Kvasir pairs: pixel
  agreement >= 0.999 per pair, as for DINOv2 (tests/test_cpp_pipeline.py); the C API returns masks, not
  prompts, so the prompts are compared through the masks they decode to;
* the same export with its ``feature_debias`` record removed (an export from before the basis): refseg-cli
  warns and agrees with the eager Segmenter at feature_debias none, and the two eager runs differ on some pair,
  so a C++ pipeline that dropped the projection fails the comparison above.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

import cpp_model
from refseg.config import SegmenterConfig
from test_cpp_pipeline import MIN_AGREEMENT, agreement, kvasir_files, needs_cli, rgb, run_cli
from test_cpp_pipeline import eager_env  # noqa: F401  (fixture: the pure-torch reference's switches)

PAIRS = (0, 1, 2)
RANK = 48  # the largest rank for 49 tokens: at 20 the random model's prompts do not change (see the docstring)

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """{"sam", "dinov3", "export"}: the checkpoints and their AOTInductor export with the positional basis."""
    return cpp_model.write_dinov3_model(tmp_path_factory.mktemp("cpp_dinov3"), debias_rank=RANK)


@pytest.fixture(scope="module")
def py_project(v3, eager_env, kvasir_dir):
    """{pair: eager mask} at feature_debias project (what the export's C++ run must give)."""
    return eager_masks(eager_segmenter(v3, "project"), kvasir_dir)


def eager_segmenter(v3, feature_debias: str):
    from refseg.segmenter import Segmenter

    cfg = SegmenterConfig.from_preset("sat-v3", image_size=cpp_model.DINOV3_IMAGE_SIZE, device="cpu",
                                      feature_debias=feature_debias, debias_rank=RANK)
    seg = Segmenter(cfg, sam_checkpoint=v3["sam"], dinov3_checkpoint=v3["dinov3"], device="cpu", backend="torch")
    assert seg.backend.name == "torch" and seg.config.debias == feature_debias
    return seg


def eager_masks(seg, kvasir_dir) -> dict[int, np.ndarray]:
    from refseg.io.raster import read_mask

    masks = {}
    for k in PAIRS:
        ref, mask, target = kvasir_files(kvasir_dir, k)
        seg.set_reference(rgb(ref), read_mask(mask))
        masks[k] = seg.segment(rgb(target)).mask > 0
    return masks


def cpp_masks(export, kvasir_dir, tmp_path) -> tuple[dict[int, np.ndarray], str]:
    from PIL import Image

    masks, stderr = {}, ""
    for k in PAIRS:
        ref, mask, target = kvasir_files(kvasir_dir, k)
        proc = run_cli(export, [(ref, mask)], tmp_path / f"out{k}", target, extra=["--preset", "sat-v3"])
        masks[k] = np.asarray(Image.open(tmp_path / f"out{k}" / f"{target.stem}.png")) > 0
        stderr += proc.stderr
    return masks, stderr


def test_stored_basis_is_positional_basis_of_the_eager_encoder(v3):
    from refseg.export.debias_basis import read_basis
    from refseg.models.build import build_dinov3
    from refseg.pipeline.feature_norm import blank_image, positional_basis

    manifest = json.loads((v3["export"] / "manifest.json").read_text())
    record = manifest["feature_debias"]
    assert manifest["encoder"] == "dinov3" and manifest["patch_size"] == 16 and manifest["export_format"] == "aoti"
    assert record["mode"] == "project" and record["rank"] == RANK and record["dtype"] == "float32"
    assert record["shape"] == [384, RANK] and record["image_size"] == cpp_model.DINOV3_IMAGE_SIZE
    assert record["file"] in manifest["files"]  # checksummed like the packages
    stored = read_basis(v3["export"], record)
    side = cpp_model.DINOV3_IMAGE_SIZE
    with torch.no_grad():
        tokens = build_dinov3(checkpoint=v3["dinov3"]).forward_features(blank_image(side, side))["x_norm_patchtokens"]
    want = positional_basis(tokens, RANK)
    torch.testing.assert_close(stored.T @ stored, torch.eye(RANK), rtol=0, atol=1e-5)
    torch.testing.assert_close(stored @ stored.T, want @ want.T, rtol=0, atol=1e-4)


@needs_cli
def test_cpp_dinov3_agrees_with_eager_python_projection(v3, py_project, kvasir_dir, tmp_path):
    py = py_project
    cpp, stderr = cpp_masks(v3["export"], kvasir_dir, tmp_path)
    assert "feature_debias" not in stderr  # no warning: the export carries the basis
    for k in PAIRS:
        share = agreement(cpp[k], py[k])
        log.info("DINOv3 pair %d: pixel agreement %.5f, foreground python %.4f C++ %.4f", k, share, py[k].mean(),
                 cpp[k].mean())
        assert share >= MIN_AGREEMENT
    assert any(0 < m.sum() < m.size for m in py.values()), "trivial masks would not test the decoder"


@needs_cli
def test_export_without_the_basis_warns_and_matches_unprojected(v3, py_project, eager_env, kvasir_dir, tmp_path):
    old = tmp_path / "old_export"  # the packages of the export, its manifest as written before the basis
    old.mkdir()
    for name in ("dinov2.pt2", "sam_encoder.pt2", "sam_decoder.pt2"):
        os.symlink(v3["export"] / name, old / name)
    manifest = json.loads((v3["export"] / "manifest.json").read_text())
    del manifest["feature_debias"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    cpp, stderr = cpp_masks(old, kvasir_dir, tmp_path)
    assert "carries no positional basis" in stderr
    py_none = eager_masks(eager_segmenter(v3, "none"), kvasir_dir)
    for k in PAIRS:
        share = agreement(cpp[k], py_none[k])
        log.info("DINOv3 pair %d without the basis: agreement %.5f with eager none, %.5f eager none vs project", k,
                 share, agreement(py_none[k], py_project[k]))
        assert share >= MIN_AGREEMENT
    assert min(agreement(py_none[k], py_project[k]) for k in PAIRS) < MIN_AGREEMENT, \
        "the projection changes no mask here: the comparison above could not catch a C++ pipeline without it"


@needs_cli
def test_bad_basis_file_is_refused_at_load(v3, kvasir_dir, tmp_path):
    bad = tmp_path / "bad_export"
    bad.mkdir()
    for name in ("dinov2.pt2", "sam_encoder.pt2", "sam_decoder.pt2", "manifest.json"):
        os.symlink(v3["export"] / name, bad / name)
    (bad / "positional_basis.f32").write_bytes((v3["export"] / "positional_basis.f32").read_bytes()[:-4])
    ref, mask, target = kvasir_files(kvasir_dir, 0)
    proc = run_cli(bad, [(ref, mask)], tmp_path / "out", target, extra=["--preset", "sat-v3"], expect=2)
    assert "positional_basis.f32" in proc.stderr and "bytes" in proc.stderr
    manifest = json.loads((v3["export"] / "manifest.json").read_text())
    (bad / "manifest.json").unlink()
    for change, message in (({"mode": "center"}, "this refseg applies 'project' or 'none'"),
                            ({"dtype": "float16"}, "this refseg reads float32"),
                            ({"rank": 7}, "do not describe a (D, rank) basis")):
        (bad / "manifest.json").write_text(json.dumps({**manifest, "feature_debias": {**manifest["feature_debias"],
                                                                                        **change}}))
        proc = run_cli(bad, [(ref, mask)], tmp_path / "out", target, extra=["--preset", "sat-v3"], expect=2)
        assert "feature_debias" in proc.stderr and message in proc.stderr, proc.stderr
    proc = run_cli(v3["export"], [(ref, mask)], tmp_path / "out", target, expect=2)  # sat's patch size is 14
    assert "has 16-px patches, params ask for 14" in proc.stderr
