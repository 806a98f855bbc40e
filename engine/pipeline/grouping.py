"""Physical-space primitives on padded point sets: de-duplication, greedy radius grouping, exclusion.

All functions take P point sets at once, padded to N points: ``points`` (P, N, 2) (x, y) pixels and
``valid`` (P, N) bool. Distances are dense (P, N, M) tensors of exact squared distances (int64 for
integer tensors, else float64); radius tests compare squared distances, and only mean
distances take a float64 square root.

Greedy radius grouping (the GBMSeg "sparse sampling"): walk the list in order; each unassigned point
opens a group of every still-unassigned point within ``radius`` (inclusive, ``d <= r``); the group is
represented by the member with the largest score (ties, up to 1e-9 relative: earliest). Equivalently, point i leads a group
iff no earlier leader lies within r of it, and every point joins the earliest leader within r. Only
the leaders are found sequentially (:func:`greedy_leaders`: vectorised steps or rounds, all sets in
parallel); membership and representatives are then computed in one pass.

On the accelerator path (:mod:`.accelerator`) nothing here reads a tensor to the host except the
leader search's convergence test, once every :data:`ROUNDS_PER_CHECK` rounds: widths stay the padded
input widths instead of being cut to the largest group count.
"""
from __future__ import annotations

import numpy as np
import torch

from .accelerator import accelerator_path

ROUNDS_PER_CHECK = 8
"""Leader rounds between two convergence reads on the accelerator path."""


def trimmed_width(counts: torch.Tensor, full: int) -> int:
    """Width to cut padded sets to: the largest of ``counts`` on the CPU path (a host read, free
    there); ``full`` on the accelerator path (no read: tensors keep their padded width)."""
    if accelerator_path(counts.device):
        return full
    return int(counts.max()) if counts.numel() else 0


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P, N, 2), (P, M, 2) -> (P, N, M) squared Euclidean distances, exact.

    Integer inputs use int64 arithmetic, float inputs float64 (exact for the integer pixel lattice,
    whose squared distances stay far below 2**53); explicit differences rather than ``torch.cdist``,
    whose matrix-product path loses precision and could flip radius tests. The dtype follows from the
    input dtypes alone, so nothing is read back to the host.
    """
    dtype = torch.float64 if a.is_floating_point() or b.is_floating_point() else torch.int64
    a, b = a.to(dtype), b.to(dtype)
    dx = a[:, :, None, 0] - b[:, None, :, 0]
    dy = a[:, :, None, 1] - b[:, None, :, 1]
    return dx.mul_(dx).add_(dy.mul_(dy))


def mean_distance(points: torch.Tensor, valid: torch.Tensor, other: torch.Tensor,
                  other_valid: torch.Tensor, sq_dist: torch.Tensor | None = None) -> torch.Tensor:
    """(P, N) float64 mean Euclidean distance from each point to the valid points of ``other``.

    Sets whose ``other`` is empty get 0 everywhere (then the earliest member represents a group).
    ``sq_dist``: optional precomputed ``pairwise_sq_dist(points, other)``.
    """
    d2 = pairwise_sq_dist(points, other) if sq_dist is None else sq_dist
    d = d2.sqrt() if d2.dtype == torch.float64 else d2.to(torch.float64).sqrt_()  # never modify sq_dist
    d.mul_(other_valid[:, None, :])
    n = other_valid.sum(-1, keepdim=True).clamp(min=1).to(torch.float64)
    return (d.sum(-1) / n) * valid


def min_sq_distance(points: torch.Tensor, other: torch.Tensor, other_valid: torch.Tensor,
                    sq_dist: torch.Tensor | None = None) -> torch.Tensor:
    """(P, N) float64 squared distance from each point to its nearest valid point of ``other``
    (+inf when ``other`` is empty). ``sq_dist``: optional precomputed ``pairwise_sq_dist(points, other)``."""
    if other.shape[1] == 0:
        return torch.full(points.shape[:2], float("inf"), dtype=torch.float64, device=points.device)
    d2 = pairwise_sq_dist(points, other) if sq_dist is None else sq_dist
    return d2.to(torch.float64).masked_fill(~other_valid[:, None, :], float("inf")).amin(-1)


def deduplicate(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(P, N) bool: ``valid`` with later exact repeats of a point within the same set cleared.

    Sort-based (O(N log N)): stable sorts by y then x bring equal points together in list order.
    """
    n = points.shape[1]
    if n < 2:
        return valid
    big = torch.finfo(torch.float64).max
    pts = points.to(torch.float64)
    pts = torch.where(valid[..., None], pts, torch.full_like(pts, big))
    order = torch.sort(pts[..., 1], dim=1, stable=True).indices
    order = order.gather(1, torch.sort(pts[..., 0].gather(1, order), dim=1, stable=True).indices)
    s = pts.gather(1, order[..., None].expand(-1, -1, 2))
    same_as_prev = torch.zeros_like(valid)
    same_as_prev[:, 1:] = (s[:, 1:] == s[:, :-1]).all(-1)
    repeat = torch.zeros_like(valid).scatter_(1, order, same_as_prev)
    return valid & ~repeat


def greedy_leaders(adj: torch.Tensor, valid: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """(P, N) bool leaders of the greedy walk for adjacency ``adj`` (P, N, N) (``adj[p, i, j]``: j is
    within the radius of i; symmetric, reflexive on valid points). Point i leads iff no earlier point
    within r leads. Three exact solvers, all sets at once:

    * ``"steps"``: one O(P·N) step per group — the first uncovered point leads and covers its
      neighbours. Cheap when groups are few (large radius); one host read per group.
    * ``"rounds"``: an undecided point none of whose earlier neighbours is still undecided must lead
      (a leading neighbour would already have covered it); then the new leaders' neighbours are
      covered. One O(P·N²) matrix-vector round decides many points. Rounds run in blocks of
      :data:`ROUNDS_PER_CHECK` between convergence reads on the accelerator path (a round after
      convergence changes nothing), one read per round on the CPU.
    * ``"walk"``: the definition itself, on the host: per set, jump to the first uncovered point and
      cover its neighbours (NumPy, one O(N) step per group, no per-step launches). The fastest on the
      CPU, where tensors already live on the host.

    ``"auto"`` picks ``"walk"`` on the CPU path and ``"rounds"`` on the accelerator path.
    """
    if method == "auto":
        method = "rounds" if accelerator_path(adj.device) else "walk"
    if method == "walk":
        return _walk_leaders(adj, valid)
    leaders = torch.zeros_like(valid)
    if method == "steps":
        p_idx = torch.arange(adj.shape[0], device=adj.device)
        covered = ~valid
        while True:
            free = ~covered
            has = free.any(-1)
            if not bool(has.any()):
                return leaders
            nxt = free.to(torch.uint8).argmax(-1)  # first uncovered point (argmax returns the first max)
            leaders[p_idx, nxt] |= has
            covered |= adj[p_idx, nxt] & has[:, None]
    if method != "rounds":
        raise ValueError(f"greedy_leaders: method must be 'auto', 'walk', 'steps' or 'rounds', got {method!r}")
    n = adj.shape[-1]
    earlier = (adj & torch.ones(n, n, dtype=torch.bool, device=adj.device).tril(-1)).to(torch.float32)
    adj_f = adj.to(torch.float32)
    decided = ~valid
    check_every = ROUNDS_PER_CHECK if accelerator_path(adj.device) else 1
    while True:
        for _ in range(check_every):
            undecided = ~decided
            # blocked[p, i] = any undecided j < i within r of i (a batched matrix-vector product)
            blocked = (earlier @ undecided.to(torch.float32)[..., None])[..., 0] > 0
            new = undecided & ~blocked
            leaders |= new
            covered = (new.to(torch.float32)[:, None, :] @ adj_f)[:, 0] > 0
            decided |= new | covered
        if not bool((~decided).any()):
            return leaders


def _walk_leaders(adj: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The greedy walk of :func:`greedy_leaders` on the host, set by set (``method="walk"``)."""
    a, v = adj.cpu().numpy(), valid.cpu().numpy()
    leaders = np.zeros_like(v)
    for p in range(v.shape[0]):
        covered = ~v[p]
        row = a[p]
        i = int(covered.argmin())  # first uncovered point (argmin returns the first False)
        while not covered[i]:
            leaders[p, i] = True
            covered |= row[i]
            covered[i] = True  # never revisit i, even if a caller's adjacency is not reflexive
            i = int(covered.argmin())
    return torch.from_numpy(leaders).to(valid.device)


def group_by_radius(points: torch.Tensor, valid: torch.Tensor, radius: torch.Tensor | float,
                    score: torch.Tensor | None = None, sq_dist: torch.Tensor | None = None,
                    method: str = "auto") -> torch.Tensor:
    """Greedy radius grouping of padded sets.

    Args:
        points: (P, N, 2) (x, y) pixels.
        valid: (P, N) bool.
        radius: float or (P,) tensor, pixels (inclusive). 0 merges exact duplicates only (a float 0
            takes a cheaper O(N log N) path).
        score: (P, N) representative score (larger wins; ties go to the earliest member); None =
            earliest member. Unused when every radius is 0 (groups are exact duplicates).
        sq_dist: optional precomputed ``pairwise_sq_dist(points, points)``.
        method: leader solver, see :func:`greedy_leaders` (all give the same result).

    Returns:
        (P, K) int64 ``order`` (K = the largest group count): for each set, the indices of the
        group representatives in walk (leader) order, padded with -1. Use :func:`take_points` to gather them.
    """
    pn, n = valid.shape
    device = points.device
    if n == 0 or pn == 0:
        return torch.empty(pn, n, dtype=torch.int64, device=device)
    r = torch.as_tensor(radius, dtype=torch.float64, device=device).reshape(-1)
    r2 = (r * r).expand(pn)
    idx = torch.arange(n, device=device).expand(pn, n)
    if not isinstance(radius, torch.Tensor) and radius <= 0:
        # r = 0: groups are exact duplicates, all with the same score. (A tensor radius takes the general
        # path, which gives the same result for r = 0, so that the choice needs no host read.)
        keep = deduplicate(points, valid)
        order = torch.sort(torch.where(keep, idx, idx + n), dim=1, stable=True).indices
        order = order[:, :trimmed_width(keep.sum(-1), n)]
        return torch.where(keep.gather(1, order), order, torch.full_like(order, -1))
    if score is None:
        score = torch.zeros(pn, n, dtype=torch.float64, device=device)
    if sq_dist is None:
        sq_dist = pairwise_sq_dist(points, points)
    if sq_dist.is_floating_point():
        adj = sq_dist <= r2[:, None, None].to(sq_dist.dtype)
    else:  # integer d2 <= r2  <=>  d2 <= floor(r2)
        thr = r2.floor().clamp(max=torch.iinfo(sq_dist.dtype).max).to(sq_dist.dtype)
        adj = sq_dist <= thr[:, None, None]
    adj &= valid[:, :, None] & valid[:, None, :]
    leaders = greedy_leaders(adj, valid, method)
    # group of j = earliest leader i with adj[i, j], searched over the K leader rows only
    width = trimmed_width(leaders.sum(-1), n)
    lead_idx = torch.sort(torch.where(leaders, idx, idx + n), dim=1, stable=True).indices[:, :width]
    lead_ok = leaders.gather(1, lead_idx)  # (P, K) real leaders, in walk order
    rows = adj.gather(1, lead_idx[..., None].expand(-1, -1, n)) & lead_ok[..., None]  # (P, K, N)
    group = lead_idx.gather(1, rows.to(torch.uint8).argmax(1))  # (P, N) leader index per point
    group = torch.where(valid, group, torch.full_like(group, n))  # padding -> dump bucket n
    s = torch.where(valid, score.to(torch.float64), torch.full_like(score, float("-inf"),
                                                                    dtype=torch.float64))
    best = torch.full((pn, n + 1), float("-inf"), dtype=torch.float64, device=device)
    best = best.scatter_reduce(1, group, s, reduce="amax", include_self=True)
    # Scores equal up to float summation order (1e-9 relative) count as ties: the earliest member wins.
    top = best.gather(1, group)
    is_best = valid & (s >= top - 1e-9 * top.abs().clamp(min=1.0))
    rep = torch.full((pn, n + 1), n, dtype=torch.int64, device=device)
    rep = rep.scatter_reduce(1, group, torch.where(is_best, idx, torch.full_like(idx, n)),
                             reduce="amin", include_self=True)[:, :n]
    # rep[p, i] is the representative of the group led by i (n when i leads no group)
    out = rep.gather(1, lead_idx)  # leaders in walk order -> their representatives
    return torch.where(lead_ok & (out < n), out, torch.full_like(out, -1))


def take_points(points: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``points`` (P, N, 2) at ``order`` (P, K) (-1 = padding) -> (P, K, 2), valid (P, K)."""
    valid = order >= 0
    idx = order.clamp(min=0)
    out = points.gather(1, idx[..., None].expand(*idx.shape, points.shape[-1]))
    return out, valid


def compact(points: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the valid entries of each set to the front, keeping their order -> (points, valid)."""
    n = valid.shape[1]
    idx = torch.arange(n, device=valid.device).expand_as(valid)
    order = torch.sort(torch.where(valid, idx, idx + n), dim=1, stable=True).indices
    return take_points(points, torch.where(valid.gather(1, order), order, torch.full_like(order, -1)))
