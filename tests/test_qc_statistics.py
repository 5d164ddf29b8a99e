"""Tests for ihf_bids.qc.statistics (site-effect statistics of the group QC report)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from ihf_bids.qc.statistics import (
    combat_features,
    covariate_association,
    cross_site_cov,
    distribution_distance,
    intensity_kde,
    kde_grid,
    mixed_model_r2,
    site_classifier_scores,
    site_effect_test,
)

SITES = ("siteA", "siteB", "siteC")


def assert_not_applicable(result: dict) -> None:
    assert result["applicable"] is False
    assert isinstance(result["reason"], str) and len(result["reason"]) > 10
    json.dumps(result)


def traveling_subjects(
    n_subjects: int, site_shift: float, subject_sd: float, noise_sd: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every subject scanned once at each site: (values, sites, subjects)."""
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"sub-{i:02d}" for i in range(n_subjects)], len(SITES))
    sites = np.tile(SITES, n_subjects)
    site_effect = np.tile(site_shift * np.array([0.0, 1.0, -0.7]), n_subjects)
    subject_effect = np.repeat(rng.normal(0.0, subject_sd, n_subjects), len(SITES))
    values = 10.0 + site_effect + subject_effect + rng.normal(0.0, noise_sd, subjects.size)
    return values, sites, subjects


def site_groups(n_per_site: int, shifts: tuple[float, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sites = np.repeat(SITES[: len(shifts)], n_per_site)
    values = np.concatenate([rng.normal(shift, 1.0, n_per_site) for shift in shifts])
    return values, sites


# --------------------------------------------------------------------------- site_effect_test


def test_site_effect_test_separates_strong_and_no_site_effect() -> None:
    shifted = site_effect_test(*site_groups(20, (0.0, 3.0, -2.0)))
    flat = site_effect_test(*site_groups(20, (0.0, 0.0, 0.0)))
    assert shifted["applicable"] and flat["applicable"]
    assert shifted["kruskal_p"] < 1e-6 and shifted["anova_p"] < 1e-6
    assert flat["kruskal_p"] > 0.05 and flat["anova_p"] > 0.05
    assert shifted["n"] == 60 and shifted["n_sites"] == 3
    json.dumps(shifted)


def test_site_effect_test_not_applicable_paths() -> None:
    assert_not_applicable(site_effect_test([1.0, 2.0, 3.0], ["a", "a", "a"]))
    assert_not_applicable(site_effect_test([1.0, 2.0, 3.0], ["a", "a", "b"]))
    assert_not_applicable(site_effect_test([2.0] * 4, ["a", "a", "b", "b"]))


def test_site_effect_test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="sites"):
        site_effect_test([1.0, 2.0, 3.0], ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        site_effect_test([1.0, np.nan, 3.0, 4.0], ["a", "a", "b", "b"])


# --------------------------------------------------------------------------- mixed_model_r2


def test_mixed_model_r2_site_effect_gives_high_marginal_r2() -> None:
    result = mixed_model_r2(*traveling_subjects(12, site_shift=3.0, subject_sd=0.3, noise_sd=0.3))
    assert result["applicable"] and result["converged"]
    assert result["marginal_r2"] > 0.8
    assert result["conditional_r2"] >= result["marginal_r2"]
    assert (result["n"], result["n_subjects"], result["n_sites"]) == (36, 12, 3)
    json.dumps(result)


def test_mixed_model_r2_subject_variance_gives_high_conditional_r2() -> None:
    result = mixed_model_r2(*traveling_subjects(12, site_shift=0.0, subject_sd=3.0, noise_sd=0.3))
    assert result["applicable"]
    assert result["marginal_r2"] < 0.1
    assert result["conditional_r2"] > 0.9
    assert result["var_subject"] > 10 * result["var_residual"]


def test_mixed_model_r2_no_site_effect_gives_marginal_r2_near_zero() -> None:
    result = mixed_model_r2(*traveling_subjects(30, site_shift=0.0, subject_sd=0.0, noise_sd=1.0, seed=3))
    assert result["applicable"]
    assert 0.0 <= result["marginal_r2"] < 0.05
    assert result["var_subject"] >= 0.0  # a zero estimate is legitimate


def test_mixed_model_r2_not_applicable_paths() -> None:
    # no subject at two sites
    assert_not_applicable(mixed_model_r2([1.0, 2.0, 3.0, 4.0], ["a", "b", "a", "b"], ["s1", "s2", "s3", "s4"]))
    # only one crossing subject
    assert_not_applicable(mixed_model_r2([1.0, 2.0, 3.0, 4.0], ["a", "b", "a", "b"], ["s1", "s1", "s2", "s3"]))
    # one site
    assert_not_applicable(mixed_model_r2([1.0, 2.0, 3.0], ["a", "a", "a"], ["s1", "s1", "s2"]))
    # constant values
    assert_not_applicable(mixed_model_r2([1.0] * 4, ["a", "b", "a", "b"], ["s1", "s1", "s2", "s2"]))


# --------------------------------------------------------------------------- site_classifier_scores


def site_features(n_per_site: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sites = np.repeat(SITES, n_per_site)
    features = rng.normal(size=(sites.size, 5))
    features[:, :2] += shift * np.repeat([[0.0, 0.0], [1.0, -1.0], [-1.0, 1.0]], n_per_site, axis=0)
    features = np.column_stack([features, np.full(sites.size, 7.0)])  # a constant column
    return features, sites


def test_site_classifier_detects_site_effect() -> None:
    result = site_classifier_scores(*site_features(20, shift=4.0))
    assert result["applicable"]
    assert result["accuracy"] > 0.95 and result["balanced_accuracy"] > 0.95 and result["f1_macro"] > 0.95
    assert result["chance"] == pytest.approx(1 / 3)
    assert (result["n"], result["n_sites"], result["n_splits"]) == (60, 3, 5)
    json.dumps(result)


def test_site_classifier_near_chance_without_site_effect() -> None:
    result = site_classifier_scores(*site_features(20, shift=0.0))
    assert result["applicable"]
    assert result["accuracy"] < 0.6


def test_site_classifier_is_deterministic_and_limits_splits() -> None:
    features, sites = site_features(3, shift=1.0)
    first = site_classifier_scores(features, sites, seed=4)
    assert first == site_classifier_scores(features, sites, seed=4)
    assert first["n_splits"] == 3


def test_site_classifier_not_applicable_paths() -> None:
    assert_not_applicable(site_classifier_scores(np.zeros((4, 2)), ["a"] * 4))
    assert_not_applicable(site_classifier_scores(np.arange(10.0).reshape(5, 2), ["a", "a", "b", "b", "c"]))
    with pytest.raises(ValueError, match="non-finite"):
        site_classifier_scores(np.full((4, 2), np.inf), ["a", "a", "b", "b"])


# --------------------------------------------------------------------------- covariate_association


def test_covariate_association_recovers_slope_and_drops_missing() -> None:
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 80, 50)
    values = 2.0 + 0.5 * age + rng.normal(0, 1.0, 50)
    covariate = age.astype(object)
    covariate[[3, 7]] = None
    covariate[10] = np.nan
    result = covariate_association(values, covariate)
    assert result["applicable"] and result["n"] == 47
    assert result["slope"] == pytest.approx(0.5, abs=0.03)
    assert result["pearson_r"] > 0.95 and result["spearman_rho"] > 0.9
    assert result["pearson_p"] < 1e-10
    json.dumps(result)


def test_covariate_association_not_applicable_paths() -> None:
    assert_not_applicable(covariate_association([1.0, 2.0, 3.0, 4.0], [1.0, np.nan, 2.0, 3.0]))
    assert_not_applicable(covariate_association([1.0, 2.0, 3.0, 4.0], [5.0] * 4))
    assert_not_applicable(covariate_association([1.0] * 4, [1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="covariate"):
        covariate_association([1.0, 2.0, 3.0], [1.0, 2.0])


# --------------------------------------------------------------------------- cross_site_cov


def test_cross_site_cov_hand_computed() -> None:
    # s1: mean 2, sd(ddof=1) sqrt(2) -> sqrt(2)/2; s2: mean 5, sd 1 -> 0.2; s3 has one value.
    result = cross_site_cov([1.0, 3.0, 4.0, 5.0, 6.0, 9.0], ["s1", "s1", "s2", "s2", "s2", "s3"])
    assert result["applicable"] and result["n_subjects"] == 2
    assert result["per_subject"] == pytest.approx({"s1": math.sqrt(2) / 2, "s2": 0.2})
    assert result["cov_mean"] == pytest.approx((math.sqrt(2) / 2 + 0.2) / 2)
    assert result["cov_sd"] == pytest.approx(np.std([math.sqrt(2) / 2, 0.2], ddof=1))
    json.dumps(result)


def test_cross_site_cov_not_applicable() -> None:
    assert_not_applicable(cross_site_cov([1.0, 2.0, 3.0], ["s1", "s2", "s3"]))


# --------------------------------------------------------------------------- densities and distances


def test_intensity_kde_integrates_to_one() -> None:
    samples = np.random.default_rng(0).normal(50.0, 10.0, 30000)  # exercises the subsample
    wide = np.linspace(0.0, 100.0, 2001)
    assert np.trapz(intensity_kde(samples, wide), wide) == pytest.approx(1.0, abs=1e-3)
    grid = kde_grid([samples, samples + 5.0], n_points=256)
    assert grid.shape == (256,)
    assert np.trapz(intensity_kde(samples, grid), grid) == pytest.approx(1.0, abs=0.02)
    np.testing.assert_array_equal(intensity_kde(samples, grid), intensity_kde(samples, grid))


def test_kde_grid_spans_pooled_percentiles() -> None:
    grid = kde_grid([np.arange(1001.0)], n_points=11)
    span = 995.0 - 5.0
    assert grid[0] == pytest.approx(5.0 - 0.05 * span)
    assert grid[-1] == pytest.approx(995.0 + 0.05 * span)


def test_intensity_kde_rejects_degenerate_samples() -> None:
    grid = np.linspace(0, 1, 5)
    with pytest.raises(ValueError, match="constant"):
        intensity_kde(np.full(10, 3.0), grid)
    with pytest.raises(ValueError, match="two samples"):
        intensity_kde([1.0], grid)


def test_distribution_distance() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.0, 2000)
    result = distribution_distance({"b": base.copy(), "a": base, "c": base + 2.0})
    assert result["applicable"] and result["n_sites"] == 3
    assert result["pairs"]["a|b"] == 0.0
    assert result["pairs"]["a|c"] == pytest.approx(2.0)
    assert result["wasserstein_max"] == pytest.approx(2.0)
    assert result["wasserstein_mean"] == pytest.approx(4.0 / 3.0)
    json.dumps(result)
    assert_not_applicable(distribution_distance({"a": base}))


# --------------------------------------------------------------------------- combat_features


def combat_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features with an age slope of 0.05 plus additive and multiplicative site effects."""
    rng = np.random.default_rng(seed)
    n_per_site = 40
    sites = np.repeat(SITES, n_per_site)
    age = rng.uniform(20.0, 80.0, sites.size)
    shift = np.repeat([0.0, 3.0, -2.0], n_per_site)[:, None]
    scale = np.repeat([1.0, 2.0, 0.6], n_per_site)[:, None]
    features = 0.05 * age[:, None] + shift + scale * rng.normal(0.0, 1.0, (sites.size, 4))
    features = np.column_stack([features, np.full(sites.size, 3.0)])  # a constant column
    return features, sites, age


def test_combat_removes_site_effect_and_keeps_age_slope() -> None:
    features, sites, age = combat_data()
    harmonized = combat_features(features, sites, {"age": age})
    assert harmonized.shape == features.shape
    np.testing.assert_array_equal(harmonized[:, -1], features[:, -1])
    for column in range(4):
        before = site_effect_test(features[:, column], sites)
        after = site_effect_test(harmonized[:, column], sites)
        assert before["kruskal_p"] < 1e-6
        assert after["kruskal_p"] > 0.05
        residual = harmonized[:, column] - 0.05 * age
        site_means = [residual[sites == site].mean() for site in SITES]
        site_sds = [residual[sites == site].std() for site in SITES]
        assert np.ptp(site_means) < 0.5
        assert max(site_sds) / min(site_sds) < 1.4
        slope = covariate_association(harmonized[:, column], age)["slope"]
        assert slope == pytest.approx(0.05, abs=0.015)


def test_combat_single_feature_and_dropped_covariate() -> None:
    features, sites, age = combat_data(seed=1)
    age_missing = age.copy()
    age_missing[5] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        harmonized = combat_features(features[:, 0], sites, {"age": age_missing})
    assert harmonized.shape == (features.shape[0], 1)
    assert any("age" in str(w.message) for w in caught)
    assert site_effect_test(harmonized[:, 0], sites)["kruskal_p"] > 0.05


def test_combat_invalid_arguments() -> None:
    features, sites, _age = combat_data()
    with pytest.raises(ValueError, match="two sites"):
        combat_features(features, np.full(sites.size, "a"))
    with pytest.raises(ValueError, match="two scans per site"):
        combat_features(features[:81], sites[:81])
    with pytest.raises(ValueError, match="confounded"):
        combat_features(features, sites, {"scanner": (sites == "siteB").astype(float)})
    with pytest.raises(ValueError, match="non-finite"):
        combat_features(np.full((6, 2), np.nan), ["a", "a", "b", "b", "c", "c"])
