"""Site-effect statistics for the group quality-control report.

Each statistic takes plain arrays (one value per scan, plus the scan's site, subject or
covariate) and returns a plain ``dict`` of JSON-serialisable numbers and strings, ready to
be written into the report:

* :func:`site_effect_test` -- Kruskal-Wallis and one-way ANOVA across sites,
* :func:`mixed_model_r2` -- variance explained by site in a linear mixed model with a
  random intercept per subject (traveling-subject designs),
* :func:`site_classifier_scores` -- how well derived features predict the site,
* :func:`covariate_association` -- Pearson/Spearman association with a covariate (age),
* :func:`cross_site_cov` -- per-subject coefficient of variation across sites,
* :func:`distribution_distance` -- Wasserstein distances between per-site intensities.

When a statistic cannot be computed on the data it is given (too few sites, too few values
per site, no subject scanned at two sites, constant values...) the functions do not raise;
they return ``{"applicable": False, "reason": "<one sentence>"}``. Otherwise the dict holds
``"applicable": True`` and the numbers; ``NaN`` marks a number that is undefined. Invalid
arguments (mismatched lengths, non-finite values) raise :class:`ValueError`.

Two helpers produce the per-site intensity density curves of the report
(:func:`kde_grid`, :func:`intensity_kde`), and :func:`combat_features` applies ComBat
(through neuroHarmonize) to derived features, a baseline to compare harmonization against.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import warnings
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "combat_features",
    "covariate_association",
    "cross_site_cov",
    "distribution_distance",
    "intensity_kde",
    "kde_grid",
    "mixed_model_r2",
    "site_classifier_scores",
    "site_effect_test",
]

#: Largest number of samples fed to the kernel density estimate (a random subsample beyond).
_KDE_MAX_SAMPLES = 20000
#: Relative tolerance under which a spread counts as zero (constant data).
_CONSTANT_RTOL = 1e-12


# --------------------------------------------------------------------------- helpers


def _not_applicable(reason: str) -> dict:
    return {"applicable": False, "reason": reason}


def _finite_vector(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """``values`` as a 1-D float array; raise ValueError if not 1-D or not finite."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
    return array


def _labels(labels: ArrayLike, n: int, name: str) -> NDArray[np.str_]:
    """``labels`` (sites or subjects) as a 1-D array of strings of length ``n``."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.shape[0] != n:
        raise ValueError(f"{name} has {array.shape[0]} entries but there are {n} values")
    return array.astype(str)


def _is_constant(values: NDArray[np.float64]) -> bool:
    spread = float(np.ptp(values)) if values.size else 0.0
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    return spread <= _CONSTANT_RTOL * max(scale, 1e-300)


def _site_counts(sites: NDArray[np.str_]) -> dict[str, int]:
    names, counts = np.unique(sites, return_counts=True)
    return {str(name): int(count) for name, count in zip(names, counts)}


# --------------------------------------------------------------------------- site tests


def site_effect_test(values: ArrayLike, sites: ArrayLike) -> dict:
    """Test whether a per-scan value differs between sites.

    Parameters
    ----------
    values : array_like, shape (n,)
        One finite value per scan (e.g. mean white-matter intensity).
    sites : array_like, shape (n,)
        Site label of each scan.

    Returns
    -------
    dict
        ``applicable``; when applicable ``kruskal_h``, ``kruskal_p`` (Kruskal-Wallis H
        test), ``anova_f``, ``anova_p`` (one-way ANOVA), ``n`` and ``n_sites``; otherwise
        ``reason``. At least two sites need two or more values each; sites with a single
        value still take part. All-identical values are not testable.

    Raises
    ------
    ValueError
        If the lengths differ or a value is not finite.

    Examples
    --------
    >>> result = site_effect_test([1.0, 1.1, 0.9, 5.0, 5.2, 4.9], ["a", "a", "a", "b", "b", "b"])
    >>> result["applicable"], result["n_sites"]
    (True, 2)
    """
    from scipy import stats

    vals = _finite_vector(values, "values")
    labels = _labels(sites, vals.size, "sites")
    counts = _site_counts(labels)
    if len(counts) < 2:
        return _not_applicable(
            f"needs values from at least two sites; only {len(counts)} site(s) here"
        )
    if sum(count >= 2 for count in counts.values()) < 2:
        return _not_applicable(
            "needs at least two sites with two or more values each; "
            f"site counts here are {counts}"
        )
    if _is_constant(vals):
        return _not_applicable("all values are identical, so there is nothing to compare")
    groups = [vals[labels == site] for site in counts]
    kruskal = stats.kruskal(*groups)
    with warnings.catch_warnings():  # constant groups: F is inf, which is the right answer
        warnings.simplefilter("ignore")
        anova = stats.f_oneway(*groups)
    return {
        "applicable": True,
        "kruskal_h": float(kruskal.statistic),
        "kruskal_p": float(kruskal.pvalue),
        "anova_f": float(anova.statistic),
        "anova_p": float(anova.pvalue),
        "n": int(vals.size),
        "n_sites": len(counts),
    }


def mixed_model_r2(values: ArrayLike, sites: ArrayLike, subjects: ArrayLike) -> dict:
    """Variance explained by site in a mixed model with a random intercept per subject.

    Fits ``value ~ C(site) + (1 | subject)`` by REML (statsmodels ``MixedLM``) on the
    z-scored values and reports the R2 of Nakagawa & Schielzeth (2013)::

        marginal    = var_site / (var_site + var_subject + var_residual)
        conditional = (var_site + var_subject) / (var_site + var_subject + var_residual)

    where ``var_site`` is the variance, over the scans, of the fixed-effect predictions
    X·beta. A strong site effect gives a high marginal R2; a harmonized traveling-subject
    dataset should show a low marginal R2 and a conditional R2 driven by the subjects.

    Parameters
    ----------
    values : array_like, shape (n,)
        One finite value per scan.
    sites, subjects : array_like, shape (n,)
        Site and subject label of each scan.

    Returns
    -------
    dict
        ``applicable``; when applicable ``marginal_r2``, ``conditional_r2``,
        ``var_site``, ``var_subject``, ``var_residual`` (in units of the z-scored
        values), ``n``, ``n_subjects``, ``n_sites``, ``converged`` (whether an optimizer
        reported convergence) and ``optimizer``; otherwise ``reason``. Needs at least two
        sites and at least two subjects with values at two or more sites.

    Raises
    ------
    ValueError
        If the lengths differ or a value is not finite.

    Notes
    -----
    The optimizers of statsmodels are tried in turn (its default sequence bfgs, lbfgs,
    cg; then powell; then Nelder-Mead) until one converges; their warnings are silenced.
    If none converges, the fit with the highest likelihood is reported with
    ``converged=False``. A subject variance estimated at zero is legitimate (the subjects
    do not differ) and is reported as 0.
    """
    vals = _finite_vector(values, "values")
    site_labels = _labels(sites, vals.size, "sites")
    subject_labels = _labels(subjects, vals.size, "subjects")
    site_names = sorted(set(site_labels.tolist()))
    if len(site_names) < 2:
        return _not_applicable(
            f"needs values from at least two sites; only {len(site_names)} site(s) here"
        )
    sites_per_subject: dict[str, set[str]] = {}
    for subject, site in zip(subject_labels, site_labels):
        sites_per_subject.setdefault(str(subject), set()).add(str(site))
    n_crossing = sum(len(seen) >= 2 for seen in sites_per_subject.values())
    if n_crossing < 2:
        return _not_applicable(
            "needs at least two participants scanned at two or more sites; "
            f"{'none' if n_crossing == 0 else 'only one'} here"
        )
    if _is_constant(vals):
        return _not_applicable("all values are identical, so there is no variance to explain")

    z = (vals - vals.mean()) / vals.std()
    design = np.column_stack(
        [np.ones(vals.size)] + [(site_labels == site).astype(np.float64) for site in site_names[1:]]
    )
    if vals.size <= design.shape[1]:
        return _not_applicable(
            f"needs more scans than site parameters ({design.shape[1]}); only {vals.size} here"
        )
    fit = _fit_random_intercept(z, design, subject_labels)
    if fit is None:
        return _not_applicable("the mixed model could not be fitted by any optimizer")
    result, optimizer = fit

    fe_params = np.asarray(result.fe_params, dtype=np.float64)
    var_site = float(np.var(design @ fe_params))
    var_subject = float(np.asarray(result.cov_re, dtype=np.float64).reshape(-1)[0])
    var_residual = float(result.scale)
    # A boundary estimate can come out as a tiny negative number or NaN; clamp it to 0.
    var_subject = var_subject if np.isfinite(var_subject) and var_subject > 0 else 0.0
    var_residual = var_residual if np.isfinite(var_residual) and var_residual > 0 else 0.0
    total = var_site + var_subject + var_residual
    if not np.isfinite(total) or total <= 0:
        return _not_applicable("the mixed model fit gave no usable variance components")
    return {
        "applicable": True,
        "marginal_r2": var_site / total,
        "conditional_r2": (var_site + var_subject) / total,
        "var_site": var_site,
        "var_subject": var_subject,
        "var_residual": var_residual,
        "n": int(vals.size),
        "n_subjects": len(sites_per_subject),
        "n_sites": len(site_names),
        "converged": bool(result.converged),
        "optimizer": optimizer,
    }


def _fit_random_intercept(
    endog: NDArray[np.float64], design: NDArray[np.float64], groups: NDArray[np.str_]
) -> tuple[object, str] | None:
    """Fit a random-intercept MixedLM robustly; return (results, optimizer name) or None."""
    from statsmodels.regression.mixed_linear_model import MixedLM

    attempts: tuple[tuple[str, list[str] | str], ...] = (
        ("bfgs/lbfgs/cg", ["bfgs", "lbfgs", "cg"]),
        ("powell", "powell"),
        ("nm", "nm"),
    )
    best: tuple[float, object, str] | None = None
    for name, method in attempts:
        model = MixedLM(endog, design, groups=groups, exog_re=np.ones((endog.size, 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = model.fit(reml=True, method=method)
            except (np.linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError):
                continue
        usable = np.all(np.isfinite(np.asarray(result.fe_params))) and np.isfinite(result.scale)
        if not usable:
            continue
        if result.converged:
            return result, name
        llf = float(result.llf) if np.isfinite(result.llf) else -math.inf
        if best is None or llf > best[0]:
            best = (llf, result, name)
    if best is None:
        return None
    return best[1], best[2]


def site_classifier_scores(
    features: ArrayLike, sites: ArrayLike, *, seed: int = 0, max_splits: int = 5
) -> dict:
    """Cross-validated prediction of the site from derived features.

    A pipeline of ``StandardScaler`` and a class-balanced ``LogisticRegression`` is
    evaluated by stratified K-fold cross-validation (shuffled with ``seed``), with
    ``n_splits = min(max_splits, smallest site count)``. The scores are computed on the
    pooled out-of-fold predictions, so every scan is predicted exactly once by a model
    that did not see it. Accuracy near ``chance`` means the features carry no site
    information.

    Parameters
    ----------
    features : array_like, shape (n, k) or (n,)
        Finite features per scan (a 1-D array is one feature).
    sites : array_like, shape (n,)
        Site label of each scan.
    seed : int, default 0
        Seed of the fold shuffling; results are deterministic for a given seed.
    max_splits : int, default 5
        Largest number of folds (at least 2).

    Returns
    -------
    dict
        ``applicable``; when applicable ``accuracy``, ``f1_macro``, ``balanced_accuracy``,
        ``chance`` (fraction of the most frequent site, the accuracy of always guessing
        it), ``n``, ``n_sites``, ``n_splits`` and ``classifier`` (a description);
        otherwise ``reason``. Needs at least two sites, each with two or more scans.

    Raises
    ------
    ValueError
        If the shapes do not match, a feature is not finite or ``max_splits < 2``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2:
        raise ValueError(f"features must be an (n, k) matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("features contain non-finite values (NaN or inf)")
    if max_splits < 2:
        raise ValueError(f"max_splits must be at least 2, got {max_splits}")
    labels = _labels(sites, matrix.shape[0], "sites")
    counts = _site_counts(labels)
    if len(counts) < 2:
        return _not_applicable(
            f"needs scans from at least two sites; only {len(counts)} site(s) here"
        )
    smallest = min(counts.values())
    if smallest < 2:
        single = sorted(site for site, count in counts.items() if count < 2)
        return _not_applicable(
            f"needs at least two scans per site for cross-validation; site(s) {single} have one"
        )

    n_splits = min(int(max_splits), smallest)
    pipeline = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=5000),
    )
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny or separable folds
        predicted = cross_val_predict(pipeline, matrix, labels, cv=folds)
    return {
        "applicable": True,
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "chance": max(counts.values()) / labels.size,
        "n": int(labels.size),
        "n_sites": len(counts),
        "n_splits": int(n_splits),
        "classifier": "StandardScaler + LogisticRegression(class_weight='balanced'), "
        f"stratified {n_splits}-fold cross-validation",
    }


def covariate_association(values: ArrayLike, covariate: ArrayLike) -> dict:
    """Association between a per-scan value and a numeric covariate (e.g. age).

    Parameters
    ----------
    values : array_like, shape (n,)
        One finite value per scan.
    covariate : array_like, shape (n,)
        The covariate; non-finite entries (``NaN``/``None``, e.g. ``n/a`` in
        ``participants.tsv``) drop their pair.

    Returns
    -------
    dict
        ``applicable``; when applicable ``pearson_r``, ``pearson_p``, ``spearman_rho``,
        ``spearman_p``, ``slope`` (ordinary least squares, value units per covariate
        unit) and ``n`` (pairs used); otherwise ``reason``. Needs four pairs and neither
        column constant.

    Raises
    ------
    ValueError
        If the lengths differ, a value is not finite or the covariate is not numeric.
    """
    from scipy import stats

    vals = _finite_vector(values, "values")
    try:
        cov = np.asarray(covariate, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"covariate must be numeric (NaN for missing): {error}") from None
    if cov.ndim != 1 or cov.size != vals.size:
        raise ValueError(f"covariate has shape {cov.shape} but there are {vals.size} values")
    keep = np.isfinite(cov)
    x, y = cov[keep], vals[keep]
    if x.size < 4:
        return _not_applicable(
            f"needs at least four scans with a known covariate; only {x.size} here"
        )
    if _is_constant(x):
        return _not_applicable("the covariate is the same for every scan")
    if _is_constant(y):
        return _not_applicable("all values are identical, so there is nothing to correlate")
    pearson = stats.pearsonr(x, y)
    spearman = stats.spearmanr(x, y)
    slope = float(np.polyfit(x, y, 1)[0])
    return {
        "applicable": True,
        "pearson_r": float(pearson.statistic),
        "pearson_p": float(pearson.pvalue),
        "spearman_rho": float(spearman.statistic),
        "spearman_p": float(spearman.pvalue),
        "slope": slope,
        "n": int(x.size),
    }


def cross_site_cov(values: ArrayLike, subjects: ArrayLike) -> dict:
    """Per-subject coefficient of variation of a value measured at several sites.

    Pass one value per subject per site (traveling subjects). For each subject with two
    or more values, ``sd(ddof=1) / |mean|``; it is ``NaN`` when the mean is 0.

    Parameters
    ----------
    values : array_like, shape (n,)
        One finite value per scan.
    subjects : array_like, shape (n,)
        Subject label of each scan.

    Returns
    -------
    dict
        ``applicable``; when applicable ``cov_mean`` and ``cov_sd`` (mean and ``ddof=1``
        standard deviation over subjects, ignoring ``NaN``; ``cov_sd`` is ``NaN`` with
        one subject), ``n_subjects`` (subjects with two or more values) and
        ``per_subject`` (subject -> CoV); otherwise ``reason``.

    Raises
    ------
    ValueError
        If the lengths differ or a value is not finite.

    Examples
    --------
    >>> cross_site_cov([1.0, 3.0, 10.0], ["s1", "s1", "s2"])["per_subject"]
    {'s1': 0.7071067811865476}
    """
    vals = _finite_vector(values, "values")
    labels = _labels(subjects, vals.size, "subjects")
    per_subject: dict[str, float] = {}
    for subject in sorted(set(labels.tolist())):
        own = vals[labels == subject]
        if own.size < 2:
            continue
        mean = float(own.mean())
        per_subject[subject] = float(own.std(ddof=1) / abs(mean)) if mean != 0 else math.nan
    if not per_subject:
        return _not_applicable(
            "needs at least one participant with values from two or more sites; none here"
        )
    finite = np.array([cov for cov in per_subject.values() if np.isfinite(cov)])
    return {
        "applicable": True,
        "cov_mean": float(finite.mean()) if finite.size else math.nan,
        "cov_sd": float(finite.std(ddof=1)) if finite.size >= 2 else math.nan,
        "n_subjects": len(per_subject),
        "per_subject": per_subject,
    }


# --------------------------------------------------------------------------- intensity distributions


def _finite_samples(samples: ArrayLike, name: str) -> NDArray[np.float64]:
    array = np.asarray(samples, dtype=np.float64).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contain non-finite values (NaN or inf)")
    return array


def kde_grid(sample_sets: list[ArrayLike] | tuple[ArrayLike, ...], n_points: int = 256) -> NDArray[np.float64]:
    """A common evaluation grid for the density curves of several sample sets.

    Parameters
    ----------
    sample_sets : sequence of array_like
        Intensity samples (any shape, flattened), e.g. one set per site.
    n_points : int, default 256
        Number of grid points (at least 2).

    Returns
    -------
    ndarray, shape (n_points,)
        Evenly spaced points from the 0.5th to the 99.5th percentile of all sets pooled,
        widened by 5 % of that span on each side.

    Raises
    ------
    ValueError
        If there are no samples, a sample is not finite, the pooled samples are constant
        or ``n_points < 2``.
    """
    if n_points < 2:
        raise ValueError(f"n_points must be at least 2, got {n_points}")
    arrays = [_finite_samples(samples, "samples") for samples in sample_sets]
    pooled = np.concatenate(arrays) if arrays else np.empty(0)
    if pooled.size == 0:
        raise ValueError("kde_grid needs at least one sample")
    low, high = np.percentile(pooled, [0.5, 99.5])
    if high <= low:
        low, high = float(pooled.min()), float(pooled.max())
    if high <= low:
        raise ValueError("all samples are identical; a density grid needs a spread of values")
    pad = 0.05 * (high - low)
    return np.linspace(low - pad, high + pad, int(n_points))


def intensity_kde(samples: ArrayLike, grid: ArrayLike, *, seed: int = 0) -> NDArray[np.float64]:
    """Gaussian kernel density estimate of intensity samples, evaluated on ``grid``.

    Parameters
    ----------
    samples : array_like
        Intensity samples (any shape, flattened). Beyond 20000 samples a random subsample
        of 20000 (drawn with ``seed``) is used.
    grid : array_like, shape (m,)
        Points to evaluate the density at (see :func:`kde_grid`).
    seed : int, default 0
        Seed of the subsample.

    Returns
    -------
    ndarray, shape (m,)
        The density (scipy ``gaussian_kde``, Scott's bandwidth).

    Raises
    ------
    ValueError
        If there are fewer than two samples, they are constant or not finite.
    """
    from scipy.stats import gaussian_kde

    data = _finite_samples(samples, "samples")
    points = _finite_samples(grid, "grid points")
    if data.size < 2:
        raise ValueError(f"a density estimate needs at least two samples, got {data.size}")
    if _is_constant(data):
        raise ValueError("samples are constant; their density has no width to estimate")
    if data.size > _KDE_MAX_SAMPLES:
        rng = np.random.default_rng(seed)
        data = rng.choice(data, size=_KDE_MAX_SAMPLES, replace=False)
    return gaussian_kde(data, bw_method="scott")(points)


def distribution_distance(samples_by_site: Mapping[str, ArrayLike]) -> dict:
    """How far apart the per-site intensity distributions are (1-Wasserstein).

    Parameters
    ----------
    samples_by_site : mapping of site -> array_like
        Intensity samples of each site (any shape, flattened; e.g. masked voxels).

    Returns
    -------
    dict
        ``applicable``; when applicable ``wasserstein_mean`` and ``wasserstein_max`` over
        all site pairs, ``pairs`` ("siteA|siteB" -> distance, sites in sorted order) and
        ``n_sites``; otherwise ``reason``. The distance is in intensity units.

    Raises
    ------
    ValueError
        If a site has no samples or a sample is not finite.
    """
    from scipy.stats import wasserstein_distance

    arrays: dict[str, NDArray[np.float64]] = {}
    for site in sorted(samples_by_site, key=str):
        data = _finite_samples(samples_by_site[site], f"samples of site {site!r}")
        if data.size == 0:
            raise ValueError(f"site {site!r} has no samples")
        arrays[str(site)] = data
    if len(arrays) < 2:
        return _not_applicable(
            f"needs samples from at least two sites; only {len(arrays)} site(s) here"
        )
    pairs = {
        f"{a}|{b}": float(wasserstein_distance(arrays[a], arrays[b]))
        for a, b in itertools.combinations(arrays, 2)
    }
    distances = np.fromiter(pairs.values(), dtype=np.float64)
    return {
        "applicable": True,
        "wasserstein_mean": float(distances.mean()),
        "wasserstein_max": float(distances.max()),
        "pairs": pairs,
        "n_sites": len(arrays),
    }


# --------------------------------------------------------------------------- ComBat


def combat_features(
    features: ArrayLike,
    sites: ArrayLike,
    covariates: Mapping[str, ArrayLike] | None = None,
    *,
    eb: bool = True,
) -> NDArray[np.float64]:
    """Harmonize derived features across sites with ComBat (neuroHarmonize).

    ComBat removes an additive and a multiplicative site effect per feature while
    preserving the linear effect of ``covariates``.

    Parameters
    ----------
    features : array_like, shape (n, k) or (n,)
        Finite features per scan.
    sites : array_like, shape (n,)
        Site label of each scan; every site needs two or more scans.
    covariates : mapping of name -> array_like of shape (n,), optional
        Numeric covariates to preserve (e.g. ``{"age": ages}``). A covariate with a
        non-finite entry (a missing value) or a constant one cannot enter the model: it
        is dropped with a :class:`UserWarning` and the rest is harmonized without it.
    eb : bool, default True
        Use empirical Bayes estimates of the site effects (pooled across features).

    Returns
    -------
    ndarray, shape (n, k)
        The harmonized features (``(n, 1)`` for a 1-D input).

    Raises
    ------
    ValueError
        If ComBat cannot run: shapes do not match, a feature is not finite, fewer than
        two sites, a site with a single scan, a covariate named ``SITE``, or covariates
        confounded with site (a rank-deficient design).

    Notes
    -----
    Features ComBat cannot model are returned unchanged: columns with no variance
    inside some site (including constant columns, which would divide by zero) and
    columns fully explained by site and covariates. Those that are not simply constant
    are reported in a :class:`UserWarning`. If the empirical Bayes step gives non-finite
    results (it pools variances across features, which fails e.g. when all features
    have identical site effects), the location/scale estimates without it are used and
    a warning says so. neuroHarmonize's own prints and warnings are silenced.
    """
    import pandas as pd
    from neuroHarmonize import harmonizationLearn

    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2:
        raise ValueError(f"features must be an (n, k) matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("features contain non-finite values (NaN or inf)")
    n = matrix.shape[0]
    labels = _labels(sites, n, "sites")
    counts = _site_counts(labels)
    if len(counts) < 2:
        raise ValueError(f"ComBat needs scans from at least two sites; got {len(counts)}")
    single = sorted(site for site, count in counts.items() if count < 2)
    if single:
        raise ValueError(
            f"ComBat needs at least two scans per site to estimate a site variance; "
            f"site(s) {single} have one"
        )

    covars = pd.DataFrame({"SITE": labels})
    for name, column in (covariates or {}).items():
        if str(name) == "SITE":
            raise ValueError("'SITE' is reserved for the site column; rename that covariate")
        try:
            values = np.asarray(column, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"covariate {name!r} must be numeric: {error}") from None
        if values.ndim != 1 or values.size != n:
            raise ValueError(f"covariate {name!r} has shape {values.shape} but there are {n} scans")
        if not np.all(np.isfinite(values)):
            warnings.warn(
                f"covariate {name!r} has missing or non-finite values; ComBat runs without it",
                UserWarning,
                stacklevel=2,
            )
            continue
        if _is_constant(values):
            warnings.warn(
                f"covariate {name!r} is constant; ComBat runs without it",
                UserWarning,
                stacklevel=2,
            )
            continue
        covars[str(name)] = values

    site_names = list(counts)
    site_dummies = np.column_stack([(labels == site).astype(np.float64) for site in site_names])
    design = np.column_stack([site_dummies, covars.drop(columns="SITE").to_numpy(dtype=np.float64)])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(
            "the covariates are confounded with site (the design matrix is rank deficient), "
            "so ComBat cannot separate site effects from covariate effects"
        )

    usable = _combat_modelable_columns(matrix, labels, site_names, design)
    odd = [j for j in np.flatnonzero(~usable) if not _is_constant(matrix[:, j])]
    if odd:
        warnings.warn(
            f"feature column(s) {odd} have no variance left inside a site; "
            "they are returned unharmonized",
            UserWarning,
            stacklevel=2,
        )
    harmonized = matrix.copy()
    if not usable.any():
        return harmonized

    data = matrix[:, usable]
    output = _run_harmonization(harmonizationLearn, data, covars, eb)
    if eb and not np.all(np.isfinite(output)):
        warnings.warn(
            "ComBat's empirical Bayes step gave non-finite values; "
            "using the site estimates without empirical Bayes",
            UserWarning,
            stacklevel=2,
        )
        output = _run_harmonization(harmonizationLearn, data, covars, False)
    if not np.all(np.isfinite(output)):
        raise ValueError("ComBat produced non-finite values on these features")
    harmonized[:, usable] = output
    return harmonized


def _combat_modelable_columns(
    matrix: NDArray[np.float64],
    labels: NDArray[np.str_],
    site_names: list[str],
    design: NDArray[np.float64],
) -> NDArray[np.bool_]:
    """Columns with variance inside every site and left after regressing the design."""
    usable = np.ones(matrix.shape[1], dtype=bool)
    for site in site_names:
        block = matrix[labels == site]
        usable &= np.ptp(block, axis=0) > _CONSTANT_RTOL * np.maximum(np.abs(block).max(axis=0), 1e-300)
    coefficients, *_ = np.linalg.lstsq(design, matrix, rcond=None)
    residual = matrix - design @ coefficients
    centred = matrix - matrix.mean(axis=0)
    total = np.sum(centred**2, axis=0)
    usable &= np.sum(residual**2, axis=0) > 1e-20 * np.maximum(total, 1e-300)
    return usable


def _run_harmonization(harmonization_learn, data, covars, eb: bool) -> NDArray[np.float64]:
    """Call neuroHarmonize with its prints and warnings silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            _model, output = harmonization_learn(data, covars, eb=eb)
    return np.asarray(output, dtype=np.float64)
