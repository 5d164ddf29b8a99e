"""Classic harmonization baseline: intensity histogram (quantile) matching.

A target site is described by intensity quantiles, either of one reference
volume (:func:`histogram_match`) or averaged over several reference volumes
of that site (:func:`intensity_quantiles` then
:func:`histogram_match_to_quantiles`), which is how a fair baseline
harmonizes to a site rather than to a single image::

    site_quantiles = np.mean(
        [intensity_quantiles(vol, msk) for vol, msk in site_volumes], axis=0
    )
    harmonized = histogram_match_to_quantiles(source, site_quantiles, source_mask=brain)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["histogram_match", "histogram_match_to_quantiles", "intensity_quantiles"]

_DEFAULT_N_QUANTILES = 1024


def intensity_quantiles(
    volume: ArrayLike,
    mask: ArrayLike | None = None,
    n_quantiles: int = _DEFAULT_N_QUANTILES,
) -> NDArray[np.float64]:
    """Evenly spaced intensity quantiles of a volume inside a mask.

    Parameters
    ----------
    volume : array_like
        Intensity volume (usually 3D).
    mask : array_like of bool, optional
        Voxels to use, same shape as ``volume``; ``None`` means all voxels.
    n_quantiles : int, default 1024
        Number of landmarks, at probabilities ``linspace(0, 1, n_quantiles)``
        (so the first and last are the masked minimum and maximum).

    Returns
    -------
    ndarray of float64, shape (n_quantiles,)
        Non-decreasing quantiles (linear interpolation between order
        statistics). Quantile vectors of several volumes of one site can be
        averaged to form a site-level reference.

    Raises
    ------
    ValueError
        If ``n_quantiles < 2``, the mask shape differs, the mask is empty or
        the selected intensities are not all finite.
    """
    if int(n_quantiles) != n_quantiles or n_quantiles < 2:
        raise ValueError(f"n_quantiles must be an integer >= 2, got {n_quantiles}")
    values = np.asarray(volume, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise ValueError(
                f"mask shape {mask.shape} does not match volume shape {values.shape}"
            )
        values = values[mask.astype(bool, copy=False)]
    else:
        values = values.ravel()
    if values.size == 0:
        raise ValueError("mask selects no voxels")
    if not np.all(np.isfinite(values)):
        raise ValueError("volume has non-finite intensities inside the mask")
    return np.quantile(values, np.linspace(0.0, 1.0, int(n_quantiles)))


def histogram_match_to_quantiles(
    source: ArrayLike,
    reference_quantiles: ArrayLike,
    *,
    source_mask: ArrayLike | None = None,
) -> NDArray[np.float32]:
    """Map source intensities so that their masked quantiles match given ones.

    The source quantiles inside ``source_mask`` (as many as
    ``reference_quantiles``, from :func:`intensity_quantiles`) are the
    landmarks of a monotone piecewise-linear map onto
    ``reference_quantiles``. Source landmarks that are tied (e.g. many
    identical background intensities) are merged and mapped to the mean of
    their reference quantiles. Intensities beyond the masked source minimum
    and maximum (only possible outside the mask) are extrapolated linearly
    with the overall slope ``(ref_max - ref_min) / (src_max - src_min)``,
    which keeps the map monotone without amplifying the noisy end
    segments. The map is applied to every voxel of ``source``, inside and
    outside the mask. A source that is constant inside the mask is mapped to
    the mean reference quantile everywhere.

    Parameters
    ----------
    source : array_like
        Volume to harmonize.
    reference_quantiles : array_like, shape (n_quantiles,)
        Non-decreasing target quantiles at probabilities
        ``linspace(0, 1, n_quantiles)``, e.g. averaged over a site's volumes.
    source_mask : array_like of bool, optional
        Voxels whose distribution is matched; ``None`` means all voxels.

    Returns
    -------
    ndarray of float32
        Mapped volume with the shape of ``source``.

    Raises
    ------
    ValueError
        If ``reference_quantiles`` is not a finite, non-decreasing 1D array of
        at least two values, or the source mask is invalid.
    """
    target = np.asarray(reference_quantiles, dtype=np.float64)
    if target.ndim != 1 or target.size < 2:
        raise ValueError("reference_quantiles must be a 1D array of at least 2 values")
    if not np.all(np.isfinite(target)) or np.any(np.diff(target) < 0):
        raise ValueError("reference_quantiles must be finite and non-decreasing")

    values = np.asarray(source, dtype=np.float64)
    landmarks = intensity_quantiles(values, source_mask, target.size)
    # Merge tied source landmarks: each distinct source value maps to the mean
    # of its reference quantiles, so the map stays a function and monotone.
    knots, group = np.unique(landmarks, return_inverse=True)
    targets = np.bincount(group, weights=target) / np.bincount(group)

    if knots.size == 1:
        return np.full(values.shape, targets[0], dtype=np.float32)
    mapped = np.interp(values, knots, targets)
    slope = (targets[-1] - targets[0]) / (knots[-1] - knots[0])
    below = values < knots[0]
    above = values > knots[-1]
    mapped[below] = targets[0] + slope * (values[below] - knots[0])
    mapped[above] = targets[-1] + slope * (values[above] - knots[-1])
    return mapped.astype(np.float32)


def histogram_match(
    source: ArrayLike,
    reference: ArrayLike,
    *,
    source_mask: ArrayLike | None = None,
    reference_mask: ArrayLike | None = None,
    n_quantiles: int = _DEFAULT_N_QUANTILES,
) -> NDArray[np.float32]:
    """Match the masked intensity distribution of ``source`` to ``reference``.

    Equivalent to ``histogram_match_to_quantiles(source,
    intensity_quantiles(reference, reference_mask, n_quantiles),
    source_mask=source_mask)``; see :func:`histogram_match_to_quantiles` for
    the mapping (monotone, piecewise linear, linear extrapolation, applied to
    all voxels).

    Parameters
    ----------
    source : array_like
        Volume to harmonize.
    reference : array_like
        Volume whose intensity distribution is the target (any shape).
    source_mask : array_like of bool, optional
        Source voxels whose distribution is matched; ``None`` means all.
    reference_mask : array_like of bool, optional
        Reference voxels defining the target distribution; ``None`` means all.
    n_quantiles : int, default 1024
        Number of quantile landmarks.

    Returns
    -------
    ndarray of float32
        Mapped volume with the shape of ``source``.
    """
    reference_quantiles = intensity_quantiles(reference, reference_mask, n_quantiles)
    return histogram_match_to_quantiles(
        source, reference_quantiles, source_mask=source_mask
    )
