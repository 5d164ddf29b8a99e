"""Tests for ihf_bids.qc.metrics (masked 3D image similarity)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from ihf_bids.qc import ms_ssim, psnr, rmse, robust_data_range, similarity_report, ssim

DATA_RANGE = 100.0


def smooth_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Smooth random structure scaled to roughly [0, 100]."""
    rng = np.random.default_rng(seed)
    volume = gaussian_filter(rng.normal(size=shape), sigma=2.0)
    volume -= volume.min()
    return 100.0 * volume / volume.max()


def ball_mask(shape: tuple[int, int, int], radius_fraction: float = 0.35) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    center = (np.asarray(shape, dtype=np.float64) - 1) / 2
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center)))
    return distance <= radius_fraction * min(shape)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return smooth_volume((48, 48, 48))


def test_identical_images_are_perfect(reference: np.ndarray) -> None:
    mask = ball_mask(reference.shape)
    report = similarity_report(reference, reference.copy(), mask, DATA_RANGE)
    assert report["rmse"] == 0.0
    assert report["psnr"] == math.inf
    assert report["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert report["ms_ssim"] == pytest.approx(1.0, abs=1e-9)


def test_constant_offset_has_known_rmse_and_psnr(reference: np.ndarray) -> None:
    shifted = reference + 5.0
    assert rmse(shifted, reference, data_range=DATA_RANGE) == pytest.approx(0.05)
    assert psnr(shifted, reference, data_range=DATA_RANGE) == pytest.approx(
        20 * math.log10(100.0 / 5.0)
    )


def test_more_noise_lowers_every_similarity(reference: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    mask = ball_mask(reference.shape)
    noise = rng.normal(size=reference.shape)
    reports = [
        similarity_report(reference + level * noise, reference, mask, DATA_RANGE)
        for level in (1.0, 3.0, 10.0)
    ]
    for key in ("psnr", "ssim", "ms_ssim"):
        values = [report[key] for report in reports]
        assert values[0] > values[1] > values[2], (key, values)
    rmses = [report["rmse"] for report in reports]
    assert rmses[0] < rmses[1] < rmses[2]


def test_errors_outside_the_mask_are_ignored(reference: np.ndarray) -> None:
    shape = reference.shape
    mask = np.zeros(shape, dtype=bool)
    mask[:12, :12, :12] = True
    rng = np.random.default_rng(2)
    degraded = reference + rng.normal(scale=2.0, size=shape)
    # Far from the mask (beyond every Gaussian window, also at coarse scales).
    corrupted = degraded.copy()
    corrupted[32:, 32:, 32:] += rng.normal(scale=50.0, size=(16, 16, 16))

    original = similarity_report(degraded, reference, mask, DATA_RANGE)
    assert similarity_report(corrupted, reference, mask, DATA_RANGE) == pytest.approx(
        original, rel=1e-12
    )
    # Without the mask the corruption is seen.
    assert ssim(corrupted, reference, data_range=DATA_RANGE) < ssim(
        degraded, reference, data_range=DATA_RANGE
    )
    assert rmse(corrupted, reference, data_range=DATA_RANGE) > rmse(
        degraded, reference, data_range=DATA_RANGE
    )


def test_ssim_matches_skimage_without_mask(reference: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    image = reference + rng.normal(scale=3.0, size=reference.shape)
    _, full_map = structural_similarity(
        image,
        reference,
        data_range=DATA_RANGE,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )
    assert ssim(image, reference, data_range=DATA_RANGE) == pytest.approx(
        full_map.mean(), rel=1e-12
    )


def test_ms_ssim_equals_ssim_when_only_one_scale_fits() -> None:
    reference = smooth_volume((20, 24, 20), seed=4)
    image = reference + np.random.default_rng(4).normal(scale=3.0, size=reference.shape)
    assert ms_ssim(image, reference, data_range=DATA_RANGE) == pytest.approx(
        ssim(image, reference, data_range=DATA_RANGE), rel=1e-12
    )


@pytest.mark.parametrize("shape", [(20, 24, 20), (9, 10, 12), (50, 52, 50)])
def test_small_volumes_work(shape: tuple[int, int, int]) -> None:
    reference = smooth_volume(shape, seed=5)
    image = reference + np.random.default_rng(5).normal(scale=5.0, size=shape)
    report = similarity_report(image, reference, ball_mask(shape))
    assert set(report) == {"rmse", "psnr", "ssim", "ms_ssim"}
    assert all(math.isfinite(value) for value in report.values())
    assert 0.0 < report["ssim"] < 1.0
    assert 0.0 < report["ms_ssim"] < 1.0


def test_default_data_range_is_robust_range_of_reference_in_mask(
    reference: np.ndarray,
) -> None:
    mask = ball_mask(reference.shape)
    values = reference[mask]
    expected = np.percentile(values, 99.9) - np.percentile(values, 0.1)
    assert robust_data_range(reference, mask) == pytest.approx(expected)
    image = reference + 1.0
    assert rmse(image, reference, mask) == pytest.approx(1.0 / expected)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="does not match reference shape"):
        rmse(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)), data_range=1.0)
    with pytest.raises(ValueError, match="mask shape"):
        ssim(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), np.ones((8, 8, 7), bool), 1.0)
    with pytest.raises(ValueError, match="3D"):
        psnr(np.zeros((8, 8)), np.zeros((8, 8)), data_range=1.0)


def test_empty_mask_raises(reference: np.ndarray) -> None:
    empty = np.zeros(reference.shape, dtype=bool)
    for metric in (rmse, psnr, ssim, ms_ssim, similarity_report):
        with pytest.raises(ValueError, match="mask selects no voxels"):
            metric(reference, reference, empty, DATA_RANGE)


def test_invalid_data_range_raises(reference: np.ndarray) -> None:
    with pytest.raises(ValueError, match="data_range must be a positive"):
        rmse(reference, reference, data_range=0.0)
    constant = np.full((8, 8, 8), 3.0)
    with pytest.raises(ValueError, match="pass data_range explicitly"):
        psnr(constant, constant)
