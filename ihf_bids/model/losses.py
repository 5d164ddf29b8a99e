"""Training losses of IHF-Harmony, computed on frozen VGG19 features.

- Anatomical consistency: the spatially-correlative loss (FSeSim, Zheng et al., CVPR 2021)
  between the source x and the output x_hat. Per layer, features are centred per channel;
  for shared query positions, the cosine self-similarity of the query feature with every
  feature of a local key window forms a similarity vector; the loss is the mean of
  ``|1 - cos(S_source, S_output)|`` over queries.
- Artefact consistency (Hierarchy Flow's aligned style loss, as IHF-Harmony uses it): per
  layer and per sample, keep the fraction k of channels whose means differ least between
  x_hat and the target y, and penalise ``|d mean| + |d std|`` over those channels.

The total is ``lambda_ac * L_ac + lambda_art * L_art`` with the paper's weights 1 and 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .vgg import ARTEFACT_LAYERS, channel_statistics

__all__ = ["ANATOMY_LAYERS", "HarmonyLoss", "artefact_consistency_loss", "spatial_correlative_loss"]

#: VGG19 layers of the anatomical-consistency loss. The reference code uses VGG16 relu3_1,
#: relu4_1 and relu4_3 on 256x256 images; our slices are smaller, so relu2_1 and relu3_1 keep
#: enough positions for 256 queries (docs/model.md).
ANATOMY_LAYERS = ("relu2_1", "relu3_1")


def _window_mask(shape: tuple[int, int], index: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """(N, H*W) mask of the keys inside each query's ``window`` x ``window`` neighbourhood."""
    h, w = shape
    if window is None or window >= max(h, w):
        return None
    r = window // 2
    ys = torch.arange(h, device=index.device).repeat_interleave(w)
    xs = torch.arange(w, device=index.device).repeat(h)
    qy, qx = index // w, index % w
    inside = ((ys[None, :] - qy[:, None]).abs() <= r) & ((xs[None, :] - qx[:, None]).abs() <= r)
    return inside


def _self_similarity(features: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cosine similarity of each query's feature with its key features: (B, N, H*W).

    Keys outside the query's window are zeroed, which leaves the cosine between two such
    vectors equal to the cosine over the window alone.
    """
    f = features - features.mean(dim=(2, 3), keepdim=True)
    f = torch.nn.functional.normalize(f, dim=1, eps=1e-8).flatten(2)  # (B, C, HW)
    sim = torch.einsum("bcn,bck->bnk", f[:, :, index], f)
    return sim if mask is None else sim * mask.to(sim.dtype)


def spatial_correlative_loss(
    source: torch.Tensor,
    output: torch.Tensor,
    *,
    num_queries: int = 256,
    window: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FSeSim loss between two (B, C, H, W) feature maps of the same layer.

    Parameters
    ----------
    source, output : torch.Tensor
        Features of the source image (no gradient needed) and of the harmonized image.
    num_queries : int
        Query positions sampled once and shared by both maps (all positions when fewer).
    window : int
        Side of the local key window; the whole map is used when it is not larger.
    generator : torch.Generator, optional
        Source of randomness for the query positions (reproducibility).
    """
    if source.shape != output.shape:
        raise ValueError(f"feature shapes differ: {tuple(source.shape)} vs {tuple(output.shape)}")
    h, w = source.shape[-2:]
    n = h * w
    if n <= num_queries:
        index = torch.arange(n, device=source.device)
    else:
        index = torch.randperm(n, generator=generator, device="cpu")[:num_queries].to(source.device)
    mask = _window_mask((h, w), index, window)
    sim_source = _self_similarity(source, index, mask)
    sim_output = _self_similarity(output, index, mask)
    cos = torch.nn.functional.cosine_similarity(sim_source, sim_output, dim=-1, eps=1e-8)
    return (1 - cos).abs().mean()


def artefact_consistency_loss(
    output_stats: tuple[torch.Tensor, torch.Tensor],
    target_stats: tuple[torch.Tensor, torch.Tensor],
    keep_fraction: float = 0.9,
) -> torch.Tensor:
    """Aligned-statistics loss of one layer, with channel selection per sample.

    Parameters
    ----------
    output_stats, target_stats : (mean, std) pairs of shape (B, C)
        Channel statistics of the harmonized image and of the target image.
    keep_fraction : float
        k: the fraction of channels with the smallest squared mean difference kept per
        sample (the rest, channels where the two images legitimately differ, e.g. because
        their anatomy differs, are ignored).

    Returns
    -------
    torch.Tensor
        Mean over samples of the mean over kept channels of ``|d mean| + |d std|``.
    """
    mean_o, std_o = output_stats
    mean_t, std_t = target_stats
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    channels = mean_o.shape[1]
    keep = max(1, int(round(keep_fraction * channels)))
    with torch.no_grad():
        discrepancy = (mean_o - mean_t) ** 2
        kept = discrepancy.topk(keep, dim=1, largest=False).indices  # per sample, never across the batch
        mask = torch.zeros_like(discrepancy).scatter_(1, kept, 1.0)
    per_channel = (mean_o - mean_t).abs() + (std_o - std_t).abs()
    return ((per_channel * mask).sum(dim=1) / keep).mean()


@dataclass
class HarmonyLoss:
    """Total IHF-Harmony loss ``lambda_ac * L_ac + lambda_art * L_art``.

    Attributes
    ----------
    lambda_ac, lambda_art : float
        The paper's weights (1 and 2).
    keep_fraction : float
        k of the artefact loss (0.9).
    feature_scale : tuple of float
        Per artefact layer, the typical channel mean of VGG19 on brain windows (caffe-scaled
        input gives tens to hundreds, measured in docs/benchmark-target-statistics.md); statistics are divided by
        it so every layer counts alike and the paper's weights balance the two terms.
    """

    lambda_ac: float = 1.0
    lambda_art: float = 2.0
    keep_fraction: float = 0.9
    feature_scale: tuple[float, ...] = (30.0, 170.0, 200.0)
    num_queries: int = 256

    def __call__(
        self,
        source_features: dict[str, torch.Tensor],
        output_features: dict[str, torch.Tensor],
        target_statistics: dict[str, tuple[torch.Tensor, torch.Tensor]],
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the total loss and its parts (floats, for logging).

        Parameters
        ----------
        source_features, output_features : dict of layer name to (B, C, H, W) features
            VGG19 features of x (:data:`ANATOMY_LAYERS`) and of x_hat (those and
            :data:`~ihf_bids.model.vgg.ARTEFACT_LAYERS`).
        target_statistics : dict of layer name to (mean, std), (B, C) each
            The target's channel statistics per artefact layer: of one target image
            (:func:`~ihf_bids.model.vgg.channel_statistics`) or of a site profile
            (:func:`~ihf_bids.model.vgg.split_embedding`).
        """
        l_ac = sum(
            spatial_correlative_loss(
                source_features[layer], output_features[layer], num_queries=self.num_queries, generator=generator
            )
            for layer in ANATOMY_LAYERS
        ) / len(ANATOMY_LAYERS)
        l_art = sum(
            artefact_consistency_loss(
                tuple(s / scale for s in channel_statistics(output_features[layer])),
                tuple(s / scale for s in target_statistics[layer]),
                self.keep_fraction,
            )
            for layer, scale in zip(ARTEFACT_LAYERS, self.feature_scale)
        )
        total = self.lambda_ac * l_ac + self.lambda_art * l_art
        return total, {"loss": float(total.detach()), "anatomy": float(l_ac.detach()), "artefact": float(l_art.detach())}
