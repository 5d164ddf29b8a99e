"""The site shift that conditions the network, and the background rule."""

from __future__ import annotations

import numpy as np
import torch

from ihf_bids.harmonize import TargetProfile, harmonize_volume
from ihf_bids.model import IHFHarmony, restore_background, shifted_statistics, site_shift, split_embedding
from ihf_bids.model.vgg import ARTEFACT_LAYERS


def _embedding(seed: int) -> torch.Tensor:
    return torch.rand(3, 1920, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 200


def test_same_site_shift_is_zero_and_identity():
    p = _embedding(0)
    assert torch.equal(site_shift(p, p), torch.zeros_like(p))
    stats = {k: v for k, v in split_embedding(_embedding(1)).items() if k in ARTEFACT_LAYERS}
    moved = shifted_statistics(stats, site_shift(p, p))
    for layer in ARTEFACT_LAYERS:
        assert torch.allclose(moved[layer][0], stats[layer][0]) and torch.allclose(moved[layer][1], stats[layer][1])


def test_shift_moves_source_profile_onto_target_profile():
    source, target = _embedding(2), _embedding(3)
    moved = shifted_statistics(split_embedding(source), site_shift(target, source))
    for layer, (mean, std) in split_embedding(target).items():
        assert torch.allclose(moved[layer][0], mean) and torch.allclose(moved[layer][1], std)


def test_restore_background():
    x = torch.tensor([[-1.0, 0.2, -1.0, 0.9]])
    x_hat = torch.tensor([[-0.5, 0.3, -0.8, 1.0]])
    assert torch.equal(restore_background(x, x_hat), torch.tensor([[-1.0, 0.3, -1.0, 1.0]]))


def test_same_site_harmonization_with_untrained_network_is_identity():
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 24, 8), np.float32)
    vol[4:16, 4:20] = (rng.random((12, 16, 8)) * 80 + 20).astype(np.float32)
    site = TargetProfile("a", "T1w", rng.random((8, 1920)).astype(np.float32) * 50, intensity_scale=300.0, n_volumes=3)
    other = TargetProfile("b", "T1w", rng.random((8, 1920)).astype(np.float32) * 50, intensity_scale=600.0, n_volumes=3)
    mask = vol > 0
    same = harmonize_volume(vol, IHFHarmony(), site, source_profile=site, mask=mask)
    assert np.abs(same - np.minimum(vol, np.percentile(vol[mask], 99.5))).max() < 1e-3
    # Another site: the untrained network only moves the scale, by the sites' scale ratio.
    moved = harmonize_volume(vol, IHFHarmony(), other, source_profile=site, mask=mask)
    assert np.allclose(moved, same * 2, atol=1e-2)
    assert (moved[~mask] == 0).all(), "the background stays background"
