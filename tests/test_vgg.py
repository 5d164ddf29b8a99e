"""The VGG19 feature extractor carries the trained ImageNet filters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ihf_bids.model import VGG19Features, load_vgg19, target_embedding, to_vgg_input
from ihf_bids.model.vgg import shipped_vgg19_weights_path


@pytest.fixture(scope="module")
def vgg():
    return load_vgg19()


def _neighbour_correlation(weight: torch.Tensor) -> float:
    """Mean correlation between horizontally adjacent taps of 3x3 filters."""
    w = weight.detach().numpy()
    left, right = w[..., :, :2].ravel(), w[..., :, 1:].ravel()
    return float(np.corrcoef(left, right)[0, 1])


def test_shipped_weights_are_the_trained_filters(vgg):
    # The first layer of the Oxford VGG19 (Keras release) has smooth, colour-opponent
    # filters: neighbouring taps are strongly correlated. A random init is not.
    trained = _neighbour_correlation(vgg.conv1_1.weight)
    random = _neighbour_correlation(VGG19Features().conv1_1.weight)
    assert trained > 0.45
    assert abs(random) < 0.2
    # 8-bit quantisation: at most 256 distinct values per layer (a random init has thousands).
    assert torch.unique(vgg.conv3_1.weight).numel() <= 256
    # Known values of the first filter's centre taps and of the biases (Keras VGG19 release).
    assert torch.allclose(vgg.conv1_1.weight[0, :, 1, 1], torch.tensor([0.0894, 0.1049, 0.0995]), atol=2e-3)
    assert vgg.conv1_1.bias.abs().mean() > 0.05


def test_trained_filters_detect_edges(vgg):
    # Trained first-layer features respond to an edge far more than to a flat image.
    flat = torch.zeros(1, 3, 32, 32)
    edge = flat.clone()
    edge[..., 16:] = 0.8
    f_flat = vgg(to_vgg_input(flat), ("relu1_1",))["relu1_1"]
    f_edge = vgg(to_vgg_input(edge), ("relu1_1",))["relu1_1"]
    spatial_std_edge = f_edge[..., 8:24, 12:20].std(dim=(2, 3)).mean()
    spatial_std_flat = f_flat[..., 8:24, 12:20].std(dim=(2, 3)).mean()
    assert spatial_std_flat < 1e-3
    assert spatial_std_edge > 1.0


def test_vgg_is_frozen(vgg):
    assert all(not p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training


def test_target_embedding_size(vgg):
    emb = target_embedding(vgg, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert emb.shape == (2, 1920)
    assert torch.isfinite(emb).all()


def test_user_supplied_state_dict(vgg, tmp_path):
    path = tmp_path / "vgg.pt"
    torch.save(vgg.state_dict(), path)
    again = load_vgg19(path)
    assert torch.equal(again.conv4_1.weight, vgg.conv4_1.weight)
    bad = tmp_path / "bad.pt"
    torch.save({"conv1_1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a VGG19 state dict"):
        load_vgg19(bad)
    with pytest.raises(FileNotFoundError):
        load_vgg19(tmp_path / "missing.pt")


def test_shipped_weight_file_exists():
    assert shipped_vgg19_weights_path().stat().st_size > 10_000_000
