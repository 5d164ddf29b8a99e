"""Losses: zero on identical inputs, per-sample channel selection, sensitivity."""

from __future__ import annotations

import pytest
import torch

from ihf_bids.model import HarmonyLoss, artefact_consistency_loss, channel_statistics, spatial_correlative_loss


def test_spatial_correlative_loss_zero_on_identical():
    f = torch.randn(2, 16, 20, 24)
    assert spatial_correlative_loss(f, f.clone()).item() < 1e-6


def test_spatial_correlative_loss_invariant_to_channel_scaling_but_not_structure():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 16, 20, 24, generator=gen)
    # Self-similarity is unchanged by a global affine change of the features...
    same = spatial_correlative_loss(f, 3.0 * f + 1.0, generator=torch.Generator().manual_seed(1))
    # ...but not by moving the structure around.
    moved = spatial_correlative_loss(f, torch.roll(f, shifts=5, dims=-1), generator=torch.Generator().manual_seed(1))
    assert same.item() < 1e-5
    assert moved.item() > 0.1


def test_spatial_correlative_loss_local_window():
    f = torch.randn(1, 8, 80, 80)
    g = f + 0.5 * torch.randn(1, 8, 80, 80)
    windowed = spatial_correlative_loss(f, g, window=16, generator=torch.Generator().manual_seed(0))
    assert 0 < windowed.item() < 2
    assert spatial_correlative_loss(f, f, window=16).item() < 1e-6


def test_spatial_correlative_loss_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        spatial_correlative_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9))


def test_artefact_loss_zero_on_identical():
    f = torch.randn(3, 32, 10, 10)
    stats = channel_statistics(f)
    assert artefact_consistency_loss(stats, stats).item() == 0.0


def test_artefact_loss_ignores_the_most_different_channels_per_sample():
    mean = torch.zeros(2, 10)
    std = torch.ones(2, 10)
    out_mean = mean.clone()
    out_mean[0, 3] = 100.0  # sample 0: one wildly different channel
    out_mean[1, 7] = 100.0  # sample 1: a different one
    # k = 0.9 keeps 9 of 10 channels per sample: each sample drops its own outlier.
    assert artefact_consistency_loss((out_mean, std), (mean, std), keep_fraction=0.9).item() == 0.0
    # A selection across the batch would have to keep one of the two outliers.
    assert artefact_consistency_loss((out_mean, std), (mean, std), keep_fraction=1.0).item() == pytest.approx(10.0)


def test_artefact_loss_counts_mean_and_std():
    mean, std = torch.zeros(1, 4), torch.ones(1, 4)
    loss = artefact_consistency_loss((mean + 0.5, std * 2), (mean, std), keep_fraction=1.0)
    assert loss.item() == pytest.approx(0.5 + 1.0)
    with pytest.raises(ValueError):
        artefact_consistency_loss((mean, std), (mean, std), keep_fraction=0.0)


def test_total_loss_weights_and_gradient():
    layers = ("relu1_1", "relu2_1", "relu3_1")
    feats = {name: torch.randn(2, 8, 16 // (i + 1), 16 // (i + 1)) for i, name in enumerate(layers)}
    target = {k: channel_statistics(v * 2 + 1) for k, v in feats.items()}
    out = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    criterion = HarmonyLoss()
    total, parts = criterion(feats, out, target)
    assert parts["anatomy"] < 1e-6
    assert parts["artefact"] > 0
    assert total.item() == pytest.approx(criterion.lambda_ac * parts["anatomy"] + criterion.lambda_art * parts["artefact"])
    total.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in out.values())
    zero, _ = criterion(feats, {k: v.clone() for k, v in feats.items()}, {k: channel_statistics(v) for k, v in feats.items()})
    assert zero.item() < 1e-6
