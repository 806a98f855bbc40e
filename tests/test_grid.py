"""Reference mask -> patch-grid labels: rules, skip-last quirk, resizing, multi-class masks, geometry, at
DINOv2's 14-px and DINOv3's 16-px patches, on the torch path and the C++ prompt engine (refseg._C).

Reference: a per-cell numpy loop that states each rule literally (exact comparison); cell centres written
out by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.config import SegmenterConfig
from refseg.pipeline.grid import (BG, FG, IGNORE, binary_to_grid, cell_centres, cells_to_pixels,
                                  grids_from_config, label_mask_to_grids, mask_to_grid)

P = 14


@pytest.fixture(params=["native", "torch"])
def engine(request, monkeypatch):
    """Both implementations of binary_to_grid: the C++ prompt engine (when built) and the torch path."""
    if request.param == "torch":
        monkeypatch.setenv("REFSEG_DISABLE_NATIVE", "1")
    else:
        pytest.importorskip("refseg._C", reason="refseg._C is not built")
        monkeypatch.delenv("REFSEG_DISABLE_NATIVE", raising=False)
    return request.param


def loop_reference(mask: np.ndarray, rule: str, fraction: float = 0.95, skip_last: bool = False,
                   P: int = P) -> np.ndarray:
    g = mask.shape[0] // P
    out = np.full((g, g), IGNORE, np.int8)
    for r in range(g - 1 if skip_last else g):
        for c in range(g - 1 if skip_last else g):
            cell = mask[r * P:(r + 1) * P, c * P:(c + 1) * P]
            share = cell.mean()
            if rule == "all":
                out[r, c] = FG if cell.all() else BG if not cell.any() else IGNORE
            elif rule == "any":
                out[r, c] = FG if cell.any() else BG
            else:
                out[r, c] = FG if share >= fraction else BG if 1 - share >= fraction else IGNORE
    return out


def random_mask(g: int, seed: int, P: int = P) -> np.ndarray:
    """Mask with full, empty and mixed cells (blocky blobs plus pixel noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((g * 2, g * 2)) < 0.5
    mask = np.kron(coarse, np.ones((P // 2, P // 2), bool))
    flip = rng.random(mask.shape) < 0.01
    return mask ^ flip


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("rule,fraction", [("all", 0.95), ("any", 0.95), ("fraction", 0.5), ("fraction", 0.8)])
@pytest.mark.parametrize("skip_last", [False, True])
def test_rules_match_loop_reference(rule, fraction, skip_last, patch, engine):
    for seed in range(3):
        mask = random_mask(6, seed, patch)
        got = binary_to_grid(torch.from_numpy(mask), patch_size=patch, rule=rule, fraction=fraction,
                             skip_last=skip_last)
        assert got.dtype == torch.int8 and got.shape == (6, 6)
        np.testing.assert_array_equal(got.numpy(), loop_reference(mask, rule, fraction, skip_last, patch))


def test_patch_16_planted_cells(engine):
    """64 x 64 at 16-px patches: a 4 x 4 grid whose cells are exactly the 16 x 16 blocks (a 14-px reading of the
    same mask would be refused: 64 is no multiple of 14)."""
    mask = np.zeros((64, 64), bool)
    mask[16:32, 32:48] = True         # cell (1, 2) full
    mask[48:64, 0:15] = True          # cell (3, 0) one column short: mixed
    mask[0:16, 48:64] = True          # cell (0, 3) full
    got = binary_to_grid(torch.from_numpy(mask), patch_size=16, rule="all").numpy()
    want = np.zeros((4, 4), np.int8)
    want[1, 2] = want[0, 3] = FG
    want[3, 0] = IGNORE
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        binary_to_grid(torch.from_numpy(mask), patch_size=14, rule="all")


def test_all_rule_planted_cells_and_skip_last():
    mask = np.zeros((56, 56), bool)
    mask[0:14, 0:14] = True           # cell (0, 0) full
    mask[14:28, 14:20] = True         # cell (1, 1) mixed
    mask[42:56, 42:56] = True         # cell (3, 3) full, but in the skipped last row/col
    mask[42:56, 0:14] = True          # cell (3, 0) full, last row
    grid = mask_to_grid(mask, 56, patch_size=14, rule="all").numpy()
    assert grid[0, 0] == FG and grid[1, 1] == IGNORE and grid[3, 3] == FG and grid[3, 0] == FG
    assert grid[0, 1] == BG and (grid == FG).sum() == 3
    quirk = mask_to_grid(mask, 56, patch_size=14, rule="all", skip_last=True).numpy()
    assert (quirk[3, :] == IGNORE).all() and (quirk[:, 3] == IGNORE).all()
    np.testing.assert_array_equal(quirk[:3, :3], grid[:3, :3])


def test_batched_leading_dims():
    masks = np.stack([random_mask(4, s) for s in range(3)])
    got = binary_to_grid(torch.from_numpy(masks), patch_size=14, rule="all")
    for m, g in zip(masks, got):
        np.testing.assert_array_equal(g.numpy(), loop_reference(m, "all"))


def test_resize_nearest_exact_and_bicubic_like_pil():
    # 28x28 mask, nearest x2 -> each source pixel a 2x2 block: cells are 7x7 source blocks
    src = np.zeros((28, 28), np.uint8)
    src[0:7, 0:7] = 255
    src[7:14, 7:10] = 255
    grid = mask_to_grid(src, 56, patch_size=14, rule="all", resample="nearest").numpy()
    assert grid[0, 0] == FG and grid[1, 1] == IGNORE and grid[2, 2] == BG
    # bicubic (PIL default): the grid equals the loop rule applied to PIL's own resize thresholded > 0
    rng = np.random.default_rng(0)
    src = (np.kron(rng.random((8, 8)) < 0.4, np.ones((32, 32))) * 255).astype(np.uint8)  # 256x256
    pil = np.asarray(Image.fromarray(src).resize((112, 112))) > 0
    got = mask_to_grid(src, 112, patch_size=14, rule="all").numpy()
    np.testing.assert_array_equal(got, loop_reference(pil, "all"))
    got16 = mask_to_grid(src, 112, patch_size=16, rule="all").numpy()  # the same resize read at 16 px
    np.testing.assert_array_equal(got16, loop_reference(pil, "all", P=16))
    # bicubic overshoot only grows the non-zero support compared with nearest
    near = mask_to_grid(src, 112, patch_size=14, rule="any", resample="nearest").numpy()
    bic = mask_to_grid(src, 112, patch_size=14, rule="any").numpy()
    assert ((near == FG) <= (bic == FG)).all()


def test_input_types_agree():
    mask = (random_mask(4, 1) * 255).astype(np.uint8)
    ref = mask_to_grid(mask, 56, patch_size=14).numpy()
    for variant in (torch.from_numpy(mask), Image.fromarray(mask), np.repeat(mask[..., None], 3, 2), mask > 0):
        np.testing.assert_array_equal(mask_to_grid(variant, 56, patch_size=14).numpy(), ref)


def test_multiclass_one_grid_per_class():
    lab = np.zeros((56, 56), np.uint8)
    lab[0:28, 0:28] = 1
    lab[28:56, 28:56] = 3
    lab[0:14, 42:56] = 2
    lab[14:16, 42:56] = 3  # class 3 pixels inside an otherwise empty cell
    classes, grids = label_mask_to_grids(lab, 56, patch_size=14, rule="all")
    assert classes == [1, 2, 3] and grids.shape == (3, 4, 4) and grids.dtype == torch.int8
    for c, g in zip(classes, grids):
        np.testing.assert_array_equal(g.numpy(), loop_reference(lab == c, "all"))
    assert grids[0, 3, 3] == BG  # another class's area is background for class 1
    assert grids[2, 1, 3] == IGNORE
    sel, one = label_mask_to_grids(lab, 56, patch_size=14, classes=[3])
    assert sel == [3] and torch.equal(one[0], grids[2])
    with pytest.raises(ValueError, match="no foreground class"):
        label_mask_to_grids(np.zeros((56, 56), np.uint8), 56, patch_size=14)


def test_grids_from_config_uses_preset():
    cfg = SegmenterConfig.from_preset("gbmseg", image_size=56)
    mask = np.full((56, 56), 255, np.uint8)
    classes, grids = grids_from_config(mask, cfg)
    assert classes == [255] and (grids[0, :3, :3] == FG).all() and (grids[0, 3] == IGNORE).all()


def test_grids_from_config_reads_the_encoders_patch():
    """sat-v3 (DINOv3, 16-px patches) at S = 64: a 4 x 4 grid, the mask read in 16-px cells."""
    cfg = SegmenterConfig.from_preset("sat-v3", image_size=64)
    assert cfg.patch_size == 16 and cfg.grid_size == 4
    mask = np.zeros((64, 64), np.uint8)
    mask[:32, :16] = 1
    classes, grids = grids_from_config(mask, cfg)
    want = np.zeros((4, 4), np.int8)
    want[:2, 0] = FG
    assert classes == [1]
    np.testing.assert_array_equal(grids[0].numpy(), want)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        binary_to_grid(torch.zeros(50, 50, dtype=torch.bool), patch_size=14)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        binary_to_grid(torch.zeros(56, 56, dtype=torch.bool), patch_size=16)
    with pytest.raises(ValueError, match="identical channels"):
        mask_to_grid(np.stack([np.zeros((28, 28)), np.ones((28, 28))], -1), 28, patch_size=14)
    with pytest.raises(ValueError, match="rule"):
        binary_to_grid(torch.zeros(28, 28, dtype=torch.bool), patch_size=14, rule="most")


def test_cell_geometry():
    # index i = row*G + col -> (14 col + 7, 14 row + 7); -1 -> row -1, col G-1 (release quirk)
    idx = torch.tensor([0, 1, 40, 1599, -1])
    np.testing.assert_array_equal(cell_centres(idx, 40, 14).numpy(),
                                  [[7, 7], [21, 7], [7, 21], [553, 553], [553, -7]])
    px = cells_to_pixels(idx, 40, 560, (512, 512)).tolist()
    assert px == [[round(7 * 512 / 560), 6], [round(21 * 512 / 560), 6], [6, 19], [506, 506], [506, -6]]
    # non-square target: x scales with W, y with H; per-row sizes
    rect = cells_to_pixels(torch.tensor([[41]]), 40, 560, torch.tensor([[300, 1000]])).tolist()
    assert rect == [[[round(21 * 1000 / 560), round(21 * 300 / 560)]]]


def test_cell_geometry_at_16_px_patches():
    # DINOv3 at S = 512: G = 32, index i -> (16 col + 8, 16 row + 8); -1 -> row -1, col 31
    idx = torch.tensor([0, 1, 32, 1023, -1])
    np.testing.assert_array_equal(cell_centres(idx, 32, 16).numpy(),
                                  [[8, 8], [24, 8], [8, 24], [504, 504], [504, -8]])
    # cells_to_pixels reads the patch as S / G: 512 / 32 = 16, on a (300, 1000) (H, W) target
    px = cells_to_pixels(idx, 32, 512, (300, 1000)).tolist()
    want = [[round(x * 1000 / 512), round(y * 300 / 512)] for x, y in
            [[8, 8], [24, 8], [8, 24], [504, 504], [504, -8]]]
    assert px == want
    with pytest.raises(ValueError, match="multiple of the grid size"):
        cells_to_pixels(idx, 32, 500, (300, 1000))
