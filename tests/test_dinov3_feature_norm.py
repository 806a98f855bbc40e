"""The positional-component mitigations of refseg.pipeline.feature_norm, checked numerically.

References: linear algebra (numpy / torch identities) on synthetic tokens with a known positional
component, and one real (random-weight) DINOv3 for the encoder-driven basis. Tolerances: 1e-5 for exact
identities in float32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refseg.models.dinov3 import DINOV3_SPECS
from refseg.pipeline.feature_norm import (DEBIAS_MODES, basis_from_encoder, blank_image, center_positions,
                                          debias, positional_basis, project_out)
from refseg.testing.random_checkpoints import random_dinov3_state_dict

TOL = 1e-5


def synthetic(seed: int = 0, n: int = 64, dim: int = 48, k: int = 6, strength: float = 3.0):
    """Tokens = content + a positional term A s(p) with A (D, k): (content (2, N, D), positional (N, D), A)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(dim, k, generator=gen))[0]  # (D, k) orthonormal
    codes = torch.randn(n, k, generator=gen) * strength  # s(p), one code per position
    content = torch.randn(2, n, dim, generator=gen)
    return content, codes @ directions.T, directions


def test_projection_is_idempotent_and_orthogonal_to_the_subspace():
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(32, 5, generator=gen))[0]
    x = torch.randn(3, 10, 32, generator=gen)
    for normalize in (False, True):
        once = project_out(x, basis, normalize=normalize)
        assert torch.allclose(project_out(once, basis, normalize=normalize), once, atol=TOL)
        assert (once @ basis).abs().max() <= TOL
    linear = project_out(x, basis, normalize=False)
    # numpy reference: (I - U Uᵀ) x
    expected = x.numpy() @ (np.eye(32) - basis.numpy() @ basis.numpy().T)
    assert np.abs(linear.numpy() - expected).max() <= TOL
    normed = project_out(x, basis)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(3, 10), atol=TOL)
    # the orthogonal complement is untouched (up to the L2 normalisation)
    inside = x - (x @ basis) @ basis.T
    assert torch.allclose(project_out(inside, basis), F.normalize(inside, dim=-1), atol=TOL)


def test_basis_from_a_content_free_image_spans_the_positional_term():
    content, positional, directions = synthetic()
    basis = positional_basis(positional, rank=6)  # a content-free image: the positional term alone
    assert basis.shape == (48, 6)
    assert torch.allclose(basis.T @ basis, torch.eye(6), atol=TOL)
    # same subspace as the true directions: the projector kills them
    assert (directions - basis @ (basis.T @ directions)).abs().max() <= 1e-4
    # projected tokens of an image no longer depend on the positional term
    with_pos = project_out(content + positional, basis, normalize=False)
    without = project_out(content, basis, normalize=False)
    assert torch.allclose(with_pos, without, atol=1e-4)


def test_projection_turns_position_driven_matches_into_content_matches():
    # Reference and target show the same contents at permuted positions; a strong positional term
    # makes raw nearest neighbours follow the position instead.
    content, positional, _ = synthetic(seed=2, strength=8.0)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    reference = content[0] + positional
    target = content[0][perm] + positional
    truth = torch.argsort(perm)  # reference patch i sits at target position truth[i]

    def nearest(a, b):
        return (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).argmax(dim=1)

    raw = (nearest(reference, target) == truth).float().mean().item()
    blank = positional + 0.7  # the blank image's tokens: a constant content plus the positional term
    basis = positional_basis(blank, rank=6)
    fixed = (nearest(project_out(reference, basis), project_out(target, basis)) == truth).float().mean().item()
    assert raw < 0.5 and fixed == 1.0, (raw, fixed)


def test_centring_removes_a_per_position_component_shared_by_the_images():
    content, positional, _ = synthetic(seed=4)
    centred = center_positions(content + positional)
    assert torch.allclose(centred, center_positions(content), atol=TOL)
    assert torch.allclose(centred.mean(dim=0), torch.zeros(64, 48), atol=TOL)
    with pytest.raises(ValueError, match="B >= 2"):
        center_positions(content[:1])


def test_debias_dispatch_and_errors():
    content, positional, _ = synthetic(seed=5)
    tokens = content + positional
    assert debias(tokens, "none") is tokens
    assert torch.equal(debias(tokens, "center"), center_positions(tokens))
    basis = positional_basis(positional + 0.7, rank=6)
    assert torch.equal(debias(tokens, "project", basis), project_out(tokens, basis))
    assert DEBIAS_MODES == ("none", "center", "project")
    with pytest.raises(ValueError, match="needs the positional basis"):
        debias(tokens, "project")
    with pytest.raises(ValueError, match="mode must be one of"):
        debias(tokens, "pca")
    with pytest.raises(ValueError, match=r"rank must be in \[1, 47\]"):
        positional_basis(positional, rank=48)
    with pytest.raises(ValueError, match="does not fit tokens of width 48"):
        project_out(tokens, torch.zeros(47, 2))


@torch.no_grad()
def test_basis_from_a_dinov3_encoder():
    from refseg.models.dinov3 import dinov3_from_state_dict

    model = dinov3_from_state_dict(random_dinov3_state_dict("vits16", seed=0))
    seen = []

    def encode(images):
        seen.append(images)
        return model.forward_features(images)["x_norm_patchtokens"]

    basis = basis_from_encoder(encode, 64, 96, rank=8)
    assert basis.shape == (DINOV3_SPECS["vits16"].embed_dim, 8)
    assert torch.allclose(basis.T @ basis, torch.eye(8), atol=TOL)
    # the encoder saw the black image normalised with the ImageNet statistics
    expected = (torch.zeros(1, 3, 64, 96) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], expected, atol=1e-6) and torch.equal(seen[0], blank_image(64, 96))
    # projected tokens of a real image are orthogonal to the positional directions
    tokens = model.forward_features(torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)))
    debiased = project_out(tokens["x_norm_patchtokens"], basis)
    assert (debiased @ basis).abs().max() <= TOL
