"""The IHF-Harmony network: squeeze, invertible hierarchy-flow blocks and AAN.

Forward (encoding), per level: 2x2 squeeze, then an IHF block whose affine-net maps the block
input x to n non-negative components a_1..a_n and peels them off,
``h_1 = x - a_1, h_i = h_(i-1) - a_i, z = concat(h_1..h_n)``.

Reverse (decoding), per level in reverse order: ``b = AAN(z, z_s)`` re-normalizes z towards
the target, then the exactly invertible additive reverse coupling
``h'_n = a_n + b_n, h'_i = a_i + alpha b_i + (1 - alpha) h'_(i+1)`` gives ``h'_1``, which is
unsqueezed. With the AAN bypassed (b = z) decoding returns the input exactly for any alpha;
see docs/model.md for the proof and why this differs from the formula printed in the paper.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

__all__ = [
    "AAN",
    "FlowConfig",
    "IHFBlock",
    "IHFHarmony",
    "LevelConfig",
    "restore_background",
    "squeeze",
    "unsqueeze",
]

#: Normalized intensity of background (0 in physical units).
BACKGROUND = -1.0

#: Size of the target embedding z_s: mean and std of VGG19 relu1_1..relu4_1.
TARGET_EMBEDDING_SIZE = 2 * (64 + 128 + 256 + 512)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """2x2 space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2)."""
    return nn.functional.pixel_unshuffle(x, 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze`."""
    return nn.functional.pixel_shuffle(x, 2)


@dataclass(frozen=True)
class LevelConfig:
    """One level: a squeeze followed by one IHF block.

    Attributes
    ----------
    components : int
        n, the number of hierarchy components the block splits its input into; the block's
        output has n times the channels of its (squeezed) input.
    hidden : int
        Width of the affine-net's hidden convolutions.
    """

    components: int = 2
    hidden: int = 32


@dataclass(frozen=True)
class FlowConfig:
    """Architecture of :class:`IHFHarmony`; stored in every checkpoint's metadata.

    The default (two levels, n = 2 each, hidden widths 32 and 64) was chosen by measuring
    quality on the phantom and speed on a 2-core CPU; see docs/model.md.
    """

    in_channels: int = 3
    levels: tuple[LevelConfig, ...] = field(
        default_factory=lambda: (LevelConfig(2, 32), LevelConfig(2, 64))
    )
    embedding_hidden: int = 128
    alpha_init: float = 0.5

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FlowConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        data = dict(data)
        data["levels"] = tuple(LevelConfig(**lvl) for lvl in data.get("levels", ()))
        return cls(**data)

    @property
    def size_multiple(self) -> int:
        """Height and width of the input must be multiples of this number."""
        return 2 ** len(self.levels)


class AffineNet(nn.Module):
    """conv3x3 C->W, IN, ReLU, conv3x3 W->W, IN, ReLU, conv3x3 W->nC, ReLU (non-negative a_i)."""

    def __init__(self, channels: int, hidden: int, components: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(hidden, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(hidden, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, components * channels, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class IHFBlock(nn.Module):
    """One invertible hierarchy-flow block with a learnable fusion weight alpha."""

    def __init__(self, channels: int, hidden: int, components: int, alpha_init: float = 0.5) -> None:
        super().__init__()
        self.channels = channels
        self.components = components
        self.affine_net = AffineNet(channels, hidden, components)
        alpha_init = min(max(alpha_init, 1e-4), 1 - 1e-4)
        # alpha = sigmoid(logit) stays in (0, 1): a convex fusion of b_i and h'_(i+1).
        self.alpha_logit = nn.Parameter(torch.tensor(math.log(alpha_init / (1 - alpha_init))))

    @property
    def alpha(self) -> torch.Tensor:
        """The fusion weight in (0, 1)."""
        return torch.sigmoid(self.alpha_logit)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode: return ``z = concat(h_1..h_n)`` and the components ``a`` (for decoding)."""
        a = self.affine_net(x)
        parts = a.split(self.channels, dim=1)
        h = x
        hs = []
        for a_i in parts:
            h = h - a_i
            hs.append(h)
        return torch.cat(hs, dim=1), a

    def reverse(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Decode ``b`` (z, or its AAN-normalized version) with the encoder's components ``a``."""
        a_parts = a.split(self.channels, dim=1)
        b_parts = b.split(self.channels, dim=1)
        alpha = self.alpha.to(b.dtype)
        h = a_parts[-1] + b_parts[-1]
        for a_i, b_i in zip(reversed(a_parts[:-1]), reversed(b_parts[:-1])):
            h = a_i + alpha * b_i + (1 - alpha) * h
        return h


class AAN(nn.Module):
    """Artefact-aware normalization.

    ``z_hat = (z - mean(z)) / std(z) * AGA_sigma + AGA_mu`` per channel. A projection module
    embeds the target conditioning (1920 numbers derived from VGG19 statistics: the site
    shift of :func:`~ihf_bids.model.vgg.site_shift`), a content head embeds the source z
    (its channel means and log standard deviations); two parallel linear heads on their
    concatenation predict AGA_sigma and AGA_mu. The heads are parameterised around the
    source's own statistics, ``AGA_sigma = std(z) * exp(s)`` (s softly bounded to +-4),
    ``AGA_mu = mean(z) + m``, and start at zero, so an untrained AAN is the identity and
    training starts from lossless reconstruction.
    """

    def __init__(self, channels: int, embedding_size: int = TARGET_EMBEDDING_SIZE, hidden: int = 128) -> None:
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(embedding_size, 2 * hidden), nn.ReLU(inplace=True), nn.Linear(2 * hidden, hidden), nn.ReLU(inplace=True)
        )
        self.content_head = nn.Sequential(nn.Linear(2 * channels, hidden), nn.ReLU(inplace=True))
        self.sigma_head = nn.Linear(2 * hidden, channels)
        self.mu_head = nn.Linear(2 * hidden, channels)
        for head in (self.sigma_head, self.mu_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, z: torch.Tensor, target_embedding: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
        mean = z.mean(dim=(2, 3), keepdim=True)
        std = (z.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
        content = self.content_head(torch.cat([mean.flatten(1), std.flatten(1).log()], dim=1))
        style = self.projection(target_embedding)
        joint = torch.cat([style, content], dim=1)
        # The log-scale is bounded softly to +-4 (a factor of ~55) so no target can overflow it.
        log_scale = 4.0 * torch.tanh(self.sigma_head(joint) / 4.0)
        sigma = std * torch.exp(log_scale)[..., None, None]
        mu = mean + self.mu_head(joint)[..., None, None]
        return (z - mean) / std * sigma + mu


class IHFHarmony(nn.Module):
    """The harmonization network: hierarchy-flow encoder, AAN, exact reverse decoder.

    Parameters
    ----------
    config : FlowConfig, optional
        The architecture; the default is documented in docs/model.md.

    Examples
    --------
    >>> import torch
    >>> net = IHFHarmony().double()
    >>> x = torch.rand(1, 3, 32, 32, dtype=torch.float64) * 2 - 1
    >>> z, cache = net.encode(x)
    >>> bool((net.decode(z, cache) - x).abs().max() < 1e-10)
    True
    """

    def __init__(self, config: FlowConfig | None = None) -> None:
        super().__init__()
        self.config = config or FlowConfig()
        blocks, norms = [], []
        channels = self.config.in_channels
        for level in self.config.levels:
            channels *= 4  # squeeze
            blocks.append(IHFBlock(channels, level.hidden, level.components, self.config.alpha_init))
            channels *= level.components
            norms.append(AAN(channels, hidden=self.config.embedding_hidden))
        self.blocks = nn.ModuleList(blocks)
        self.aans = nn.ModuleList(norms)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the forward flow; return z and the per-block components for decoding."""
        m = self.config.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input height and width must be multiples of {m}, got {tuple(x.shape[-2:])}")
        cache = []
        for block in self.blocks:
            x, a = block(squeeze(x))
            cache.append(a)
        return x, cache

    def decode(
        self, z: torch.Tensor, cache: list[torch.Tensor], target_embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the reverse flow. ``target_embedding=None`` bypasses the AAN (pure inverse)."""
        for block, aan, a in zip(reversed(self.blocks), reversed(self.aans), reversed(cache)):
            b = z if target_embedding is None else aan(z, target_embedding)
            z = unsqueeze(block.reverse(b, a))
        return z

    def forward(self, x: torch.Tensor, target_embedding: torch.Tensor) -> torch.Tensor:
        """Harmonize windows ``x`` (B, 3, H, W) in [-1, 1] given the target conditioning (B, 1920)."""
        z, cache = self.encode(x)
        return self.decode(z, cache, target_embedding)


def restore_background(x: torch.Tensor, x_hat: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """Keep the background of the (brain-extracted) input: harmonization acts on tissue only.

    Voxels at the background value (-1, i.e. 0 before normalization) stay exactly there, so
    the network cannot move statistics by painting the background.
    """
    background = x <= BACKGROUND + tolerance
    return torch.where(background, x, x_hat)
