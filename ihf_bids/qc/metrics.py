"""Image similarity between 3D volumes, restricted to a (brain) mask.

All public functions share the signature ``(image, reference, mask=None,
data_range=None)`` and return a Python ``float``:

* :func:`rmse` -- root-mean-square error divided by ``data_range``
  (normalized, so values are comparable across scanners),
* :func:`psnr` -- peak signal-to-noise ratio in dB,
* :func:`ssim` -- 3D structural similarity averaged inside the mask,
* :func:`ms_ssim` -- 3D multi-scale structural similarity,
* :func:`similarity_report` -- all of the above in one dictionary.

``data_range`` defaults to the robust range of the *reference* inside the
mask, the 99.9th minus the 0.1th percentile (see :func:`robust_data_range`).
Comparisons between methods should pass one explicit ``data_range`` so that
every method is scored on the same scale.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

__all__ = [
    "ms_ssim",
    "psnr",
    "rmse",
    "robust_data_range",
    "similarity_report",
    "ssim",
]

# Per-scale exponents of MS-SSIM, finest scale first (Wang et al., 2003).
_MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # 11-tap Gaussian at sigma 1.5, as in Wang et al. (2004)
_SSIM_WINDOW = 2 * int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5) + 1  # = 11
_K1 = 0.01
_K2 = 0.03
_ROBUST_PERCENTILES = (0.1, 99.9)


def robust_data_range(reference: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Robust dynamic range of ``reference`` inside ``mask``.

    Parameters
    ----------
    reference : array_like
        3D reference volume.
    mask : array_like of bool, optional
        Voxels to consider; ``None`` means all voxels.

    Returns
    -------
    float
        99.9th minus 0.1th percentile of the masked intensities. If that is
        zero (e.g. a mostly constant volume), the full max - min range is used.

    Raises
    ------
    ValueError
        If the range is zero or not finite; pass ``data_range`` explicitly then.
    """
    ref = np.asarray(reference, dtype=np.float64)
    values = ref[_as_mask(mask, ref.shape)] if mask is not None else ref.ravel()
    if values.size == 0:
        raise ValueError("mask selects no voxels; cannot estimate data_range")
    low, high = np.percentile(values, _ROBUST_PERCENTILES)
    value = float(high - low)
    if value <= 0:
        value = float(values.max() - values.min())
    if not np.isfinite(value) or value <= 0:
        raise ValueError(
            "reference is constant inside the mask, so its data_range is zero; "
            "pass data_range explicitly"
        )
    return value


def rmse(
    image: ArrayLike,
    reference: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float | None = None,
) -> float:
    """Normalized root-mean-square error inside the mask.

    Parameters
    ----------
    image, reference : array_like
        3D volumes of the same shape.
    mask : array_like of bool, optional
        Voxels to compare; ``None`` means all voxels.
    data_range : float, optional
        Normalization constant; defaults to :func:`robust_data_range` of the
        reference inside the mask.

    Returns
    -------
    float
        ``sqrt(mean((image - reference)**2)) / data_range`` over masked voxels
        (0 for identical images).
    """
    img, ref, msk, data_range = _prepare(image, reference, mask, data_range)
    return _absolute_rmse(img, ref, msk) / data_range


def psnr(
    image: ArrayLike,
    reference: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float | None = None,
) -> float:
    """Peak signal-to-noise ratio inside the mask, in dB.

    Parameters
    ----------
    image, reference : array_like
        3D volumes of the same shape.
    mask : array_like of bool, optional
        Voxels to compare; ``None`` means all voxels.
    data_range : float, optional
        Peak value; defaults to :func:`robust_data_range` of the reference.

    Returns
    -------
    float
        ``20 * log10(data_range / RMSE)`` with the (absolute) RMSE over masked
        voxels; ``inf`` for identical images.
    """
    img, ref, msk, data_range = _prepare(image, reference, mask, data_range)
    error = _absolute_rmse(img, ref, msk)
    if error == 0:
        return float("inf")
    return float(20.0 * np.log10(data_range / error))


def ssim(
    image: ArrayLike,
    reference: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float | None = None,
) -> float:
    """Structural similarity computed in 3D, averaged over the mask.

    The full SSIM map comes from :func:`skimage.metrics.structural_similarity`
    on float64 volumes with Gaussian weights (sigma 1.5, 11 taps, reflected at
    the volume borders) and population covariances, as in Wang et al. (2004).
    The map is averaged over the masked voxels; the mask is not eroded, so
    voxels within about 5 voxels outside the mask contribute through the
    Gaussian window of boundary voxels. Volumes smaller than the 11-voxel
    window are supported (the Gaussian is unchanged, no border is cropped).

    Parameters
    ----------
    image, reference : array_like
        3D volumes of the same shape.
    mask : array_like of bool, optional
        Voxels to average over; ``None`` means all voxels.
    data_range : float, optional
        Sets the stabilizing constants; defaults to :func:`robust_data_range`.

    Returns
    -------
    float
        Mean SSIM inside the mask, at most 1 (1 for identical images).
    """
    img, ref, msk, data_range = _prepare(image, reference, mask, data_range)
    return float(_ssim_map(img, ref, data_range)[msk].mean())


def ms_ssim(
    image: ArrayLike,
    reference: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float | None = None,
) -> float:
    """Multi-scale structural similarity (Wang, Simoncelli & Bovik, 2003) in 3D.

    At each scale the contrast-structure term (the SSIM map without its
    luminance factor) is averaged over the mask; at the coarsest scale the
    full SSIM (:func:`ssim`) is used instead. Between scales image, reference
    and mask are average-pooled by 2 along each axis (a trailing odd voxel is
    dropped) and the pooled mask keeps voxels whose value is above 0.5. The
    result is ``prod(max(term_j, 0) ** w_j)`` with the weights
    (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), finest scale first; negative
    terms are clipped to 0 as in common implementations. The same
    ``data_range`` is used at every scale.

    Up to five scales are used, as many as the volume allows: a scale is
    used only if its smallest side is at least the 11-voxel SSIM window and
    its pooled mask is not empty. The weights of the scales used are
    renormalized to sum to 1, so a volume that fits a single scale (e.g.
    smaller than 22 voxels on a side) gets plain :func:`ssim`.

    Parameters
    ----------
    image, reference : array_like
        3D volumes of the same shape.
    mask : array_like of bool, optional
        Voxels to average over; ``None`` means all voxels.
    data_range : float, optional
        Sets the stabilizing constants; defaults to :func:`robust_data_range`.

    Returns
    -------
    float
        MS-SSIM in [0, 1] (1 for identical images).
    """
    img, ref, msk, data_range = _prepare(image, reference, mask, data_range)
    scales = [(img, ref, msk)]
    while len(scales) < len(_MS_SSIM_WEIGHTS):
        coarser = tuple(_average_pool(volume) for volume in scales[-1])
        coarse_mask = coarser[2] > 0.5
        if min(coarse_mask.shape) < _SSIM_WINDOW or not coarse_mask.any():
            break
        scales.append((coarser[0], coarser[1], coarse_mask))

    weights = np.asarray(_MS_SSIM_WEIGHTS[: len(scales)])
    weights = weights / weights.sum()
    terms = [
        _contrast_structure_map(img_s, ref_s, data_range)[msk_s].mean()
        for img_s, ref_s, msk_s in scales[:-1]
    ]
    img_s, ref_s, msk_s = scales[-1]
    terms.append(_ssim_map(img_s, ref_s, data_range)[msk_s].mean())
    return float(np.prod(np.maximum(np.asarray(terms), 0.0) ** weights))


def similarity_report(
    image: ArrayLike,
    reference: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float | None = None,
) -> dict[str, float]:
    """All similarity metrics for one image pair, on one shared data range.

    Parameters
    ----------
    image, reference : array_like
        3D volumes of the same shape.
    mask : array_like of bool, optional
        Voxels to compare; ``None`` means all voxels.
    data_range : float, optional
        Defaults to :func:`robust_data_range` of the reference inside the mask.

    Returns
    -------
    dict of str to float
        Keys ``"rmse"``, ``"psnr"``, ``"ssim"`` and ``"ms_ssim"``.
    """
    img, ref, msk, data_range = _prepare(image, reference, mask, data_range)
    return {
        "rmse": rmse(img, ref, msk, data_range),
        "psnr": psnr(img, ref, msk, data_range),
        "ssim": ssim(img, ref, msk, data_range),
        "ms_ssim": ms_ssim(img, ref, msk, data_range),
    }


def _prepare(
    image: ArrayLike,
    reference: ArrayLike,
    mask: ArrayLike | None,
    data_range: float | None,
    ndims: tuple[int, ...] = (3,),
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_], float]:
    """Validate inputs; return float64 arrays, a boolean mask and the range.

    ``ndims`` lists the accepted dimensionalities (3D volumes for the metrics here).
    """
    img = np.asarray(image, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if img.ndim not in ndims or ref.ndim not in ndims:
        wanted = " or ".join(f"{n}D" for n in ndims)
        raise ValueError(
            f"image and reference must be {wanted}, got {img.ndim}D and {ref.ndim}D"
        )
    if img.shape != ref.shape:
        raise ValueError(
            f"image shape {img.shape} does not match reference shape {ref.shape}"
        )
    msk = np.ones(ref.shape, dtype=bool) if mask is None else _as_mask(mask, ref.shape)
    if not msk.any():
        raise ValueError("mask selects no voxels")
    if data_range is None:
        data_range = robust_data_range(ref, msk)
    data_range = float(data_range)
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(
            f"data_range must be a positive finite number, got {data_range}"
        )
    return img, ref, msk, data_range


def _as_mask(mask: ArrayLike, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    """Return ``mask`` as a boolean array of ``shape`` (nonzero means inside)."""
    msk = np.asarray(mask)
    if msk.shape != shape:
        raise ValueError(f"mask shape {msk.shape} does not match image shape {shape}")
    return msk.astype(bool, copy=False)


def _absolute_rmse(
    image: NDArray[np.float64], reference: NDArray[np.float64], mask: NDArray[np.bool_]
) -> float:
    """Root-mean-square error over masked voxels, in intensity units."""
    difference = image[mask] - reference[mask]
    return float(np.sqrt(np.mean(difference * difference)))


def _ssim_map(
    image: NDArray[np.float64], reference: NDArray[np.float64], data_range: float
) -> NDArray[np.float64]:
    """Full 3D SSIM map (Gaussian weights, sigma 1.5, population covariance)."""
    # win_size only sets skimage's border crop and size check, not the Gaussian;
    # the full map is uncropped, so shrink it to fit small volumes.
    min_side = min(image.shape)
    win_size = max(1, min(_SSIM_WINDOW, min_side if min_side % 2 else min_side - 1))
    _, full_map = structural_similarity(
        image,
        reference,
        win_size=win_size,
        data_range=data_range,
        gaussian_weights=True,
        sigma=_SSIM_SIGMA,
        use_sample_covariance=False,
        K1=_K1,
        K2=_K2,
        full=True,
    )
    return full_map


def _contrast_structure_map(
    image: NDArray[np.float64], reference: NDArray[np.float64], data_range: float
) -> NDArray[np.float64]:
    """Contrast-structure term ``(2 cov + C2) / (var_x + var_y + C2)`` in 3D.

    Uses the same Gaussian window and constant as :func:`_ssim_map`.
    """

    def local_mean(volume: NDArray[np.float64]) -> NDArray[np.float64]:
        return gaussian_filter(
            volume, sigma=_SSIM_SIGMA, truncate=_SSIM_TRUNCATE, mode="reflect"
        )

    mean_x = local_mean(image)
    mean_y = local_mean(reference)
    var_x = local_mean(image * image) - mean_x * mean_x
    var_y = local_mean(reference * reference) - mean_y * mean_y
    cov_xy = local_mean(image * reference) - mean_x * mean_y
    c2 = (_K2 * data_range) ** 2
    return (2.0 * cov_xy + c2) / (var_x + var_y + c2)


def _average_pool(volume: NDArray) -> NDArray[np.float64]:
    """Average-pool by 2 along every axis, dropping a trailing odd voxel."""
    volume = np.asarray(volume, dtype=np.float64)
    nx, ny, nz = (side // 2 for side in volume.shape)
    blocks = volume[: 2 * nx, : 2 * ny, : 2 * nz].reshape(nx, 2, ny, 2, nz, 2)
    return blocks.mean(axis=(1, 3, 5))
