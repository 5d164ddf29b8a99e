"""Tests for ihf_bids.qc.perceptual (lin-free LPIPS on the shipped VGG19)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ihf_bids.qc.perceptual import lpips_distance

SHAPE = (48, 56, 12)
DATA_RANGE = 100.0


def ellipsoid_mask(shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    center = (np.asarray(shape, dtype=np.float64) - 1) / 2
    radii = 0.42 * np.asarray(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    return ellipsoid_mask(SHAPE)


@pytest.fixture(scope="module")
def brain(mask: np.ndarray) -> np.ndarray:
    """Smooth structure in [0, 100] inside the mask, black background outside."""
    rng = np.random.default_rng(0)
    volume = gaussian_filter(rng.normal(size=SHAPE), sigma=2.0)
    volume -= volume.min()
    volume *= 100.0 / volume.max()
    volume[~mask] = 0.0
    return volume


def noisy(volume: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    return volume + np.random.default_rng(seed).normal(0.0, sigma, volume.shape)


def test_identical_inputs_give_exactly_zero(brain: np.ndarray, mask: np.ndarray) -> None:
    assert lpips_distance(brain, brain.copy(), mask) == 0.0
    assert lpips_distance(brain, brain.copy()) == 0.0


def test_distance_is_symmetric(brain: np.ndarray, mask: np.ndarray) -> None:
    other = noisy(brain, 8.0)
    forward = lpips_distance(other, brain, mask, DATA_RANGE)
    backward = lpips_distance(brain, other, mask, DATA_RANGE)
    assert forward > 0
    assert forward == pytest.approx(backward, rel=1e-5)


def test_distance_grows_with_noise_level(brain: np.ndarray, mask: np.ndarray) -> None:
    distances = [lpips_distance(noisy(brain, sigma), brain, mask, DATA_RANGE) for sigma in (2.0, 6.0, 15.0)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_mild_rescale_is_closer_than_strong_noise(brain: np.ndarray, mask: np.ndarray) -> None:
    rescaled = lpips_distance(1.05 * brain, brain, mask, DATA_RANGE)
    strong_noise = lpips_distance(noisy(brain, 15.0), brain, mask, DATA_RANGE)
    assert 0 < rescaled < strong_noise / 10


def test_mask_restricts_the_comparison(brain: np.ndarray, mask: np.ndarray) -> None:
    outside_only = brain.copy()
    outside_only[~mask] += np.random.default_rng(2).uniform(0.0, 40.0, int((~mask).sum()))
    assert lpips_distance(outside_only, brain, mask, DATA_RANGE) == pytest.approx(0.0, abs=1e-12)
    assert lpips_distance(outside_only, brain, None, DATA_RANGE) > 0.01


def test_two_dimensional_images(brain: np.ndarray, mask: np.ndarray) -> None:
    middle = SHAPE[2] // 2
    reference, slice_mask = brain[:, :, middle], mask[:, :, middle]
    assert lpips_distance(reference, reference.copy(), slice_mask) == 0.0
    weak = lpips_distance(noisy(reference, 3.0), reference, slice_mask, DATA_RANGE)
    strong = lpips_distance(noisy(reference, 15.0), reference, slice_mask, DATA_RANGE)
    assert 0 < weak < strong


def test_other_slicing_axis_and_small_batches(brain: np.ndarray, mask: np.ndarray) -> None:
    other = noisy(brain, 8.0)
    value = lpips_distance(other, brain, mask, DATA_RANGE, axis=0, batch_size=7)
    assert np.isfinite(value) and value > 0


def test_invalid_inputs_raise(brain: np.ndarray, mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shape"):
        lpips_distance(brain[:-1], brain)
    with pytest.raises(ValueError, match="mask shape"):
        lpips_distance(brain, brain, mask[:-1])
    with pytest.raises(ValueError, match="no voxels"):
        lpips_distance(brain, brain, np.zeros(SHAPE, dtype=bool))
    with pytest.raises(ValueError, match="finite"):
        lpips_distance(np.full(SHAPE, np.nan), brain)
