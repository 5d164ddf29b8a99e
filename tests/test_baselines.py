"""Tests for ihf_bids.harmonize.baselines (histogram matching)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ihf_bids.harmonize.baselines import (
    histogram_match,
    histogram_match_to_quantiles,
    intensity_quantiles,
)

SHAPE = (40, 44, 36)


@pytest.fixture(scope="module")
def brain_mask() -> np.ndarray:
    grid = np.indices(SHAPE, dtype=np.float64)
    center = (np.asarray(SHAPE, dtype=np.float64) - 1) / 2
    radii = np.asarray(SHAPE) * 0.4
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


@pytest.fixture(scope="module")
def volume(brain_mask: np.ndarray) -> np.ndarray:
    """Positive smooth 'brain' intensities with a zero background."""
    rng = np.random.default_rng(0)
    tissue = gaussian_filter(rng.normal(size=SHAPE), sigma=1.5)
    tissue = 60.0 + 15.0 * (tissue - tissue.mean()) / tissue.std()
    return np.where(brain_mask, np.clip(tissue, 1.0, None), 0.0)


def test_matching_to_itself_is_identity(
    volume: np.ndarray, brain_mask: np.ndarray
) -> None:
    matched = histogram_match(
        volume, volume, source_mask=brain_mask, reference_mask=brain_mask
    )
    assert matched.dtype == np.float32
    np.testing.assert_allclose(matched, volume, rtol=1e-6, atol=1e-4)
    unmasked = histogram_match(volume, volume)
    np.testing.assert_allclose(unmasked, volume, rtol=1e-6, atol=1e-4)


def test_monotone_transform_is_undone(
    volume: np.ndarray, brain_mask: np.ndarray
) -> None:
    transformed = 3.0 * volume**1.5 + 10.0
    recovered = histogram_match(
        transformed, volume, source_mask=brain_mask, reference_mask=brain_mask
    )
    error = np.abs(recovered[brain_mask] - volume[brain_mask])
    assert error.max() < 0.01 * np.ptp(volume[brain_mask])
    assert error.mean() < 1e-3 * np.ptp(volume[brain_mask])


def test_output_quantiles_match_reference(
    volume: np.ndarray, brain_mask: np.ndarray
) -> None:
    rng = np.random.default_rng(1)
    reference = np.where(brain_mask, 200.0 + 0.5 * rng.gamma(2.0, 30.0, SHAPE), 0.0)
    matched = histogram_match(
        volume,
        reference,
        source_mask=brain_mask,
        reference_mask=brain_mask,
        n_quantiles=256,
    )
    expected = intensity_quantiles(reference, brain_mask, 101)
    actual = intensity_quantiles(matched, brain_mask, 101)
    np.testing.assert_allclose(actual, expected, atol=0.01 * np.ptp(expected))


def test_masks_are_respected(volume: np.ndarray, brain_mask: np.ndarray) -> None:
    reference = 2.0 * volume + 7.0
    # Garbage outside the reference mask must not affect the target distribution.
    polluted_reference = np.where(brain_mask, reference, 1e6)
    # Garbage outside the source mask must not affect the mapping of brain voxels.
    polluted_source = np.where(brain_mask, volume, -1e6)
    matched = histogram_match(
        polluted_source,
        polluted_reference,
        source_mask=brain_mask,
        reference_mask=brain_mask,
    )
    np.testing.assert_allclose(matched[brain_mask], reference[brain_mask], rtol=1e-5)
    # Outside the mask the same monotone map applies (here, linear extrapolation).
    assert np.all(matched[~brain_mask] < matched[brain_mask].min())


def test_map_is_monotone_with_linear_extrapolation() -> None:
    source = np.linspace(0.0, 1.0, 1000).reshape(10, 10, 10)
    mask = (source >= 0.25) & (source <= 0.75)
    matched = histogram_match_to_quantiles(
        source, np.linspace(0.0, 10.0, 64), source_mask=mask
    ).ravel()
    assert np.all(np.diff(matched) >= 0)
    # In-mask range [0.25, 0.75] maps onto [0, 10]: slope 20 continues outside.
    np.testing.assert_allclose(matched[0], -5.0, atol=0.05)
    np.testing.assert_allclose(matched[-1], 15.0, atol=0.05)


def test_site_reference_from_averaged_quantiles(
    volume: np.ndarray, brain_mask: np.ndarray
) -> None:
    site_volumes = [volume, 3.0 * volume + 20.0]
    site_quantiles = np.mean(
        [intensity_quantiles(v, brain_mask, 512) for v in site_volumes], axis=0
    )
    matched = histogram_match_to_quantiles(
        volume, site_quantiles, source_mask=brain_mask
    )
    np.testing.assert_allclose(
        matched[brain_mask], 2.0 * volume[brain_mask] + 10.0, rtol=1e-4, atol=1e-3
    )


def test_tied_and_constant_sources() -> None:
    source = np.zeros((6, 6, 6))
    source[3:] = 5.0  # half the voxels tied at 0, half at 5
    matched = histogram_match_to_quantiles(source, np.linspace(0.0, 1.0, 101))
    # Each tied group maps to the mean of its reference quantiles.
    np.testing.assert_allclose(np.unique(matched), [0.25, 0.75], atol=0.01)
    constant = histogram_match_to_quantiles(np.ones((4, 4, 4)), np.array([1.0, 3.0]))
    np.testing.assert_array_equal(constant, np.full((4, 4, 4), 2.0, dtype=np.float32))


def test_invalid_inputs_raise(volume: np.ndarray, brain_mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        histogram_match_to_quantiles(volume, np.array([3.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="n_quantiles"):
        intensity_quantiles(volume, n_quantiles=1)
    with pytest.raises(ValueError, match="mask selects no voxels"):
        intensity_quantiles(volume, np.zeros(SHAPE, dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        histogram_match(volume, volume, source_mask=brain_mask[:-1])
