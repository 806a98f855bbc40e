"""Mask post-processing: connected components, largest filled region, small-component removal, holes.

Everything is vectorised torch on the masks' device (no OpenCV/SciPy) and works on a whole batch of
masks at once, (M, H, W). Connected components use min-label propagation with hooking and pointer
jumping over one flat index space for all M masks: every pixel ends up pointing at its component's
root, the component's first pixel in raster order. A round (hook + two jumps) never increases a
label, so a round that changes nothing means the labelling is final; that test is the only host read,
made once every :data:`ROUNDS_PER_CHECK` rounds on the accelerator path (extra rounds after the fixed
point change nothing), every round on the CPU, and it does not grow with the number of masks.
Component sizes, the largest component and the holes touching no border are then found with
scatters over the root index, no data-dependent shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .accelerator import accelerator_path

ROUNDS_PER_CHECK = 8
"""Propagation rounds between two convergence reads on the accelerator path (most masks need 2–6)."""

_OFFSETS = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
}


def _neighbour_min(lab: torch.Tensor, connectivity: int, sentinel: int) -> torch.Tensor:
    """Minimum of ``lab`` (M, H, W) over each pixel and its 4/8 neighbours; outside = ``sentinel``."""
    h, w = lab.shape[-2:]
    padded = F.pad(lab[:, None], (1, 1, 1, 1), value=sentinel)[:, 0]
    out = lab.clone()
    for dy, dx in _OFFSETS[connectivity]:
        out = torch.minimum(out, padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
    return out


def component_roots(masks: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """Root of every pixel's connected component, for a batch of binary masks.

    Args:
        masks: (M, H, W) bool (or 0/1).
        connectivity: 4 or 8.

    Returns:
        (M, H, W) int64: for a foreground pixel, the flat index ``m·H·W + y·W + x`` of the first pixel
        (raster order) of its component in mask m; ``M·H·W`` for background.
    """
    if connectivity not in _OFFSETS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    fg = masks.bool()
    m, h, w = fg.shape
    n = m * h * w
    idx = torch.arange(n, device=fg.device)
    # lab[p] <= p always; roots satisfy lab[r] == r; index n is the background sentinel.
    lab = torch.cat([torch.where(fg.flatten(), idx, n), idx.new_full((1,), n)])
    check_every = ROUNDS_PER_CHECK if accelerator_path(fg.device) else 1
    while True:
        for _ in range(check_every):
            before = lab
            nb = _neighbour_min(lab[:n].view(m, h, w), connectivity, n).flatten()
            nb = torch.where(fg.flatten(), nb, n)
            # Hook: each pixel's current label takes the smallest label seen next to that pixel.
            lab = lab.scatter_reduce(0, lab[:n], nb, reduce="amin")
            lab = lab[lab]
            lab = lab[lab]  # two pointer jumps
        if not bool((lab != before).any()):  # the last round changed nothing: final
            return lab[:n].view(m, h, w)


def component_sizes(roots: torch.Tensor) -> torch.Tensor:
    """(M·H·W,) int64 pixel count of the component rooted at each flat index (0 where none)."""
    n = roots.numel()
    return torch.bincount(roots.flatten(), minlength=n + 1)[:n]


def label_components(mask: torch.Tensor, connectivity: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Label the connected components of one binary mask (numbered; reads the count to the host).

    Args:
        mask: (H, W) bool (or 0/1) tensor.
        connectivity: 4 or 8.

    Returns:
        labels: (H, W) int64, 0 for background and 1..K for components, numbered in raster order
            of each component's first pixel.
        sizes: (K,) int64 pixel counts of components 1..K.
    """
    fg = mask.bool()
    roots = component_roots(fg[None], connectivity)[0]
    if not bool(fg.any()):
        return torch.zeros_like(fg, dtype=torch.int64), torch.zeros(0, dtype=torch.int64, device=mask.device)
    uniq, inverse = torch.unique(roots[fg], return_inverse=True)  # sorted: raster order of first pixel
    labels = torch.zeros(fg.shape, dtype=torch.int64, device=mask.device)
    labels[fg] = inverse + 1
    return labels, torch.bincount(inverse, minlength=uniq.numel())


def fill_holes_batch(masks: torch.Tensor) -> torch.Tensor:
    """Fill background regions (4-connected) that touch no image border, for (M, H, W) bool masks."""
    masks = masks.bool()
    m, h, w = masks.shape
    n = m * h * w
    roots = component_roots(~masks, connectivity=4)
    border = torch.cat([roots[:, 0], roots[:, -1], roots[:, :, 0], roots[:, :, -1]], 1).flatten()
    outside = torch.zeros(n + 1, dtype=torch.bool, device=masks.device)
    outside[border] = True
    outside[n] = True  # the sentinel: foreground pixels
    return masks | ~outside[roots]


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Fill background regions (4-connected) that do not touch the image border. (H, W) bool."""
    return fill_holes_batch(mask[None])[0]


def clean_masks(masks: torch.Tensor, keep_largest: bool = False, min_component_fraction: float = 0.0,
                holes: bool = False) -> torch.Tensor:
    """Post-process a batch of binary masks, each on its own.

    Args:
        masks: (M, H, W) bool.
        keep_largest: keep only the largest 8-connected component with its holes filled (the
            "largest filled external contour" of the GBMSeg release); ties: the first in raster order.
        min_component_fraction: otherwise drop components smaller than this fraction of the
            largest one of the same mask (0 keeps all).
        holes: fill holes of what remains.

    Returns:
        (M, H, W) bool.
    """
    masks = masks.bool()
    if not (keep_largest or min_component_fraction > 0 or holes) or masks.numel() == 0:
        return masks
    if keep_largest or min_component_fraction > 0:
        m = masks.shape[0]
        roots = component_roots(masks, connectivity=8)
        sizes = component_sizes(roots).view(m, -1)  # (M, H·W): size by root position within its mask
        sizes = torch.cat([sizes, sizes.new_zeros(m, 1)], 1)  # a zero column for background pixels
        local = torch.where(masks, roots % (sizes.shape[1] - 1), sizes.shape[1] - 1).view(m, -1)
        size_of = sizes.gather(1, local).view_as(masks)
        if keep_largest:
            # argmax returns the first maximum: the component whose first pixel comes first
            keep_root = sizes.argmax(1).view(m, 1, 1)
            masks = masks & (local.view_as(masks) == keep_root) & (sizes.amax(1) > 0).view(m, 1, 1)
            holes = True
        else:
            masks = masks & (size_of >= min_component_fraction * sizes.amax(1).view(m, 1, 1))
    return fill_holes_batch(masks) if holes else masks


def clean_mask(mask: torch.Tensor, keep_largest: bool = False, min_component_fraction: float = 0.0,
               holes: bool = False) -> torch.Tensor:
    """:func:`clean_masks` of one (H, W) bool mask."""
    return clean_masks(mask[None], keep_largest, min_component_fraction, holes)[0]
