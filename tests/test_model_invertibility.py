"""Round-trip tests of the flow (select them with ``pytest -k invertib``)."""

from __future__ import annotations

import pytest
import torch

from ihf_bids.model import FlowConfig, IHFBlock, IHFHarmony, LevelConfig, squeeze, unsqueeze


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (the AAN heads and alphas included) non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


def test_squeeze_invertibility():
    x = torch.randn(2, 3, 8, 12)
    assert squeeze(x).shape == (2, 12, 4, 6)
    assert torch.equal(unsqueeze(squeeze(x)), x)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_block_invertibility_any_alpha(alpha):
    block = IHFBlock(channels=12, hidden=16, components=3).double()
    _randomise(block)
    with torch.no_grad():
        block.alpha_logit.fill_(torch.logit(torch.tensor(alpha, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)))
    x = torch.randn(2, 12, 10, 10, dtype=torch.float64)
    z, a = block(x)
    assert z.shape == (2, 36, 10, 10)
    assert (a >= 0).all(), "affine-net components must be non-negative"
    assert (block.reverse(z, a) - x).abs().max() < 1e-10


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_network_invertibility_default_architecture(dtype, tolerance):
    torch.manual_seed(0)
    net = IHFHarmony().to(dtype)
    _randomise(net, seed=1)
    x = torch.rand(3, 3, 48, 56, dtype=dtype) * 2 - 1
    z, cache = net.encode(x)
    assert (net.decode(z, cache) - x).abs().max().item() < tolerance


def test_network_invertibility_deeper_architecture():
    config = FlowConfig(levels=(LevelConfig(3, 16), LevelConfig(2, 16), LevelConfig(2, 8)))
    net = IHFHarmony(config).double()
    _randomise(net, seed=2)
    x = torch.rand(1, 3, 32, 40, dtype=torch.float64) * 2 - 1
    z, cache = net.encode(x)
    assert (net.decode(z, cache) - x).abs().max().item() < 1e-10


def test_untrained_aan_is_identity_invertibility():
    """Zero-initialised AAN heads: a fresh network reproduces its input for any target."""
    net = IHFHarmony().double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    target = torch.rand(2, 1920, dtype=torch.float64) * 100
    assert (net(x, target) - x).abs().max().item() < 1e-10


def test_trained_aan_changes_output():
    net = IHFHarmony()
    _randomise(net, seed=3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    target = torch.rand(2, 1920) * 100
    assert (net(x, target) - x).abs().max().item() > 1e-3
    other = net(x, target * 0.5)
    assert (net(x, target) - other).abs().max().item() > 1e-4, "output must depend on the target"


def test_size_multiple_is_checked():
    net = IHFHarmony()
    with pytest.raises(ValueError, match="multiples of 4"):
        net.encode(torch.zeros(1, 3, 30, 32))


def test_config_round_trip():
    config = FlowConfig(levels=(LevelConfig(3, 8),), embedding_hidden=32)
    assert FlowConfig.from_dict(config.to_dict()) == config
