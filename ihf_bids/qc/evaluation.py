"""Group-level evaluation of harmonization on a cohort's derivatives.

For every modality the participant level wrote (T1w, T2w, DWI), the evaluation compares up
to four methods on the same images:

``unharmonized``
    the preprocessed images (``desc-preproc``);
``ihf-harmony``
    the network's output (``desc-harmonized``);
``histogram-matching``
    each preprocessed image mapped onto the target site's intensity quantiles (averaged over
    the cohort's target-site images; DWI per b-shell, then a tensor refit for FA);
``combat``
    ComBat (neuroHarmonize) on the derived features of the preprocessed images, with the
    numeric covariates of participants.tsv preserved. It acts on features only, so it has no
    images, distributions or image similarity.

and measures what harmonization should remove (site effects: per-site intensity
distributions, Kruskal-Wallis and ANOVA across sites, the site's share of variance in a
mixed model, a cross-validated site classifier) and what it must keep (subject variance in
the mixed model, associations with covariates such as age, and for traveling subjects the
similarity to the same person's own target-site scan and the cross-site spread of FA).
Sections that the data cannot support (one image per site, no traveling subjects, no
target site...) are reported as not applicable, with the reason, rather than failing.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..imageio import load_float32, read_sidecar
from ..templates import TEMPLATE_SPACE

__all__ = ["BASELINES", "METHODS", "EvaluatedImage", "collect_images", "evaluate_cohort", "preproc_paths",
           "read_covariates"]

LOGGER = logging.getLogger("ihf_bids.qc")

#: Every method the evaluation knows, in report order.
METHODS = ("unharmonized", "ihf-harmony", "histogram-matching", "combat")
#: The baselines that can be switched off from the command line.
BASELINES = ("histogram-matching", "combat")
MODALITIES = ("T1w", "T2w", "dwi")

#: Template white matter (probability above this) for the white-matter FA, as in the tensor step.
WM_PROBABILITY = 0.9
#: Template tissue probability above which a voxel counts as that tissue for regional means.
TISSUE_PROBABILITY = 0.5
#: Brain voxels per image and method kept for the per-site intensity distributions.
KDE_SAMPLES_PER_IMAGE = 3000
DECILES = tuple(range(10, 100, 10))
#: Slices per volume in the LPIPS comparison (evenly spaced through the brain).
LPIPS_SLICES = 16


@dataclass
class EvaluatedImage:
    """One preprocessed image of a participant run and what belongs with it."""

    subject: str
    session: str | None
    site: str
    modality: str
    preproc: Path
    mask: Path | None
    harmonized: Path | None = None
    bval: Path | None = None
    bvec: Path | None = None
    fa: dict[str, Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file name without the space and description (for tables)."""
        return self.preproc.name.split("_space-")[0]


def _sibling(path: Path, old: str, new: str) -> Path | None:
    candidate = path.with_name(path.name.replace(old, new))
    return candidate if candidate.is_file() else None


def preproc_paths(output_dir: Path, modality: str) -> list[Path]:
    """The template-space preprocessed images (``desc-preproc``) of ``modality`` in an output tree.

    How the group level finds the participant level's derivatives: the evaluation and the
    registration summary (:mod:`ihf_bids.qc.registrations`) both start from this list.
    """
    suffix = f"desc-preproc_{modality}.nii.gz"
    return sorted(Path(output_dir).glob(f"sub-*/**/*_space-{TEMPLATE_SPACE}*_{suffix}"))


def collect_images(output_dir: Path, modality: str) -> list[EvaluatedImage]:
    """The template-space preprocessed images of ``modality`` in an output tree.

    Raises
    ------
    ihf_bids.errors.InputDataError
        For an image whose sidecar has no ``Site`` (re-run the participant level for it), or
        images on different grids (participant runs at different resolutions); exit code 65.
    """
    from ..bids.derivatives import parse_entities
    from ..preproc.inputs import check_same_grid, derivative_site

    images = []
    suffix = f"desc-preproc_{modality}.nii.gz"
    paths = preproc_paths(output_dir, modality)
    sites = {path: derivative_site(path) for path in paths}
    check_same_grid(paths, what=f"preprocessed {modality} images")
    for path in paths:
        site = sites[path]
        entities = parse_entities(path)
        mask = _sibling(path, suffix, "desc-brain_mask.nii.gz")
        if mask is None:
            masks = sorted(path.parent.glob("*_desc-brain_mask.nii.gz"))
            mask = masks[0] if masks else None
        image = EvaluatedImage(subject=entities["sub"], session=entities.get("ses"), site=str(site),
                               modality=modality, preproc=path, mask=mask,
                               harmonized=_sibling(path, "desc-preproc_", "desc-harmonized_"))
        if modality == "dwi":
            image.bval = _sibling(path, ".nii.gz", ".bval")
            image.bvec = _sibling(path, ".nii.gz", ".bvec")
            for desc in ("preproc", "harmonized"):
                fa = _sibling(path, suffix, f"model-tensor_param-fa_desc-{desc}_dwimap.nii.gz")
                if fa is not None:
                    image.fa["unharmonized" if desc == "preproc" else "ihf-harmony"] = fa
        images.append(image)
    return images


def read_covariates(bids_dir: Path | None, *, exclude: tuple[str, ...] = ("site",)) -> dict[str, dict[str, float]]:
    """Numeric columns of participants.tsv: column -> {subject label: value} (n/a -> NaN).

    A column counts as numeric when every value that is not ``n/a`` parses as a number; the
    site column (and ``exclude``) is left out. Returns ``{}`` without participants.tsv.
    """
    path = Path(bids_dir) / "participants.tsv" if bids_dir else None
    if path is None or not path.is_file():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    columns: dict[str, dict[str, float]] = {}
    for column in (rows[0].keys() if rows else []):
        if column in ("participant_id", *exclude):
            continue
        values: dict[str, float] = {}
        for row in rows:
            text = (row.get(column) or "").strip()
            subject = row["participant_id"].removeprefix("sub-")
            if text in ("", "n/a"):
                values[subject] = math.nan
                continue
            try:
                values[subject] = float(text)
            except ValueError:
                break
        else:
            if any(math.isfinite(v) for v in values.values()):
                columns[column] = values
    return columns


# --------------------------------------------------------------------------------------------
# images and features


def _load(path: Path) -> np.ndarray:
    return load_float32(path)[0]


class _Tissues:
    """Template tissue masks per grid (cached; several grids can meet in one tree)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[float, tuple[int, ...]], dict[str, np.ndarray] | None] = {}

    def get(self, voxel_size: float, shape: tuple[int, ...]) -> dict[str, np.ndarray] | None:
        from ..templates import load_template

        key = (round(voxel_size, 3), tuple(shape))
        if key not in self._cache:
            template = load_template(voxel_size)
            self._cache[key] = None if template.shape != tuple(shape) else {
                "gm": template.gm > TISSUE_PROBABILITY, "wm": template.wm > TISSUE_PROBABILITY,
                "csf": template.csf > TISSUE_PROBABILITY, "wm_core": template.wm > WM_PROBABILITY,
            }
        return self._cache[key]


def _tissue_fractions(values: np.ndarray, modality: str) -> dict[str, float]:
    """Shares of CSF, GM and WM from a three-class k-means on the brain's intensities.

    Deterministic (initialised at the 20th, 50th and 80th percentiles); classes are ordered
    by intensity, which is CSF < GM < WM on T1w and the reverse on T2w.
    """
    centres = np.percentile(values, [20, 50, 80]).astype(np.float64)
    for _ in range(30):
        labels = np.abs(values[:, None] - centres[None, :]).argmin(axis=1)
        new = np.array([values[labels == k].mean() if (labels == k).any() else centres[k] for k in range(3)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)
    names = ("csf", "gm", "wm") if modality == "T1w" else ("wm", "gm", "csf")
    return {f"{names[rank]}_fraction": float((labels == k).mean()) for rank, k in enumerate(order)}


def anatomical_features(volume: np.ndarray, mask: np.ndarray, tissues: dict | None, modality: str) -> dict[str, float]:
    """Derived features of a T1w/T2w image: tissue means, contrast, tissue fractions, deciles."""
    values = volume[mask].astype(np.float64)
    features: dict[str, float] = {}
    if tissues is not None:
        for tissue in ("gm", "wm", "csf"):
            region = tissues[tissue] & mask
            features[f"{tissue}_mean"] = float(volume[region].mean()) if region.any() else math.nan
        gm, wm = features["gm_mean"], features["wm_mean"]
        features["gm_wm_contrast"] = float((wm - gm) / (wm + gm)) if (wm + gm) else math.nan
    features.update(_tissue_fractions(values, modality))
    for q, value in zip(DECILES, np.percentile(values, DECILES)):
        features[f"p{q}"] = float(value)
    return features


def dwi_features(shells: dict[str, np.ndarray], fa: np.ndarray | None, mask: np.ndarray,
                 tissues: dict | None) -> dict[str, float]:
    """Derived features of a DWI run: FA medians, b=0 signal and each shell's attenuation in WM."""
    features: dict[str, float] = {}
    wm = (tissues["wm_core"] & mask) if tissues is not None else mask
    if fa is not None:
        features["wm_median_fa"] = float(np.median(fa[wm])) if wm.any() else math.nan
        features["brain_median_fa"] = float(np.median(fa[mask])) if mask.any() else math.nan
    b0 = shells.get("b0")
    if b0 is not None and wm.any():
        s0 = float(b0[wm].mean())
        features["wm_mean_b0"] = s0
        for label, image in sorted(shells.items()):
            if label != "b0" and s0 > 0:
                features[f"wm_attenuation_{label}"] = float(image[wm].mean() / s0)
        for q, value in zip(DECILES, np.percentile(b0[mask], DECILES)):
            features[f"p{q}"] = float(value)
    return features


def _shell_means(data: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    """Direction average of every b-shell of a 4D run."""
    labels_array = np.asarray(labels)
    return {label: data[..., labels_array == label].mean(axis=3) for label in sorted(set(labels))}


@dataclass
class _MethodImage:
    """One image as one method left it: the volume(s) compared and the features."""

    summary: dict[str, np.ndarray]   # "T1w" -> volume, or "dwi-b0"/"dwi-b1000" -> shell average
    features: dict[str, float]


class _TargetQuantiles:
    """The target site's intensity quantiles per modality or b-shell (histogram matching)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[np.ndarray]] = defaultdict(list)

    def add(self, key: str, values: np.ndarray, mask: np.ndarray) -> None:
        from ..harmonize.baselines import intensity_quantiles

        self.sums[key].append(intensity_quantiles(values, mask))

    def get(self, key: str) -> np.ndarray | None:
        quantiles = self.sums.get(key)
        return np.mean(quantiles, axis=0) if quantiles else None


def _histogram_match_dwi(image: EvaluatedImage, data: np.ndarray, affine: np.ndarray, labels: list[str],
                         mask: np.ndarray, target: _TargetQuantiles,
                         scratch: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Histogram-match every shell of a run to the target's quantiles, then refit FA."""
    from ..harmonize.baselines import histogram_match_to_quantiles
    from ..imageio import save_image
    from ..preproc.tensor import fit_tensor

    matched = data.copy()
    labels_array = np.asarray(labels)
    for label in sorted(set(labels)):
        quantiles = target.get(f"dwi-{label}")
        if quantiles is None:
            continue  # a shell the target lacks stays as it was, as in IHF-Harmony
        for i in np.flatnonzero(labels_array == label):
            out = histogram_match_to_quantiles(data[..., i], quantiles, source_mask=mask)
            out[~mask] = 0
            matched[..., i] = out
    if image.bval is None or image.bvec is None:
        return matched, None
    scratch.mkdir(parents=True, exist_ok=True)
    dwi_file, mask_file, fa_file = (scratch / f"{image.name}_{n}.nii.gz" for n in ("dwi", "mask", "fa"))
    save_image(matched, affine, dwi_file)
    save_image(mask.astype(np.uint8), affine, mask_file, np.uint8)
    try:
        fit_tensor(dwi_file, image.bval, image.bvec, mask_file, fa_file)
        fa = _load(fa_file)
    finally:
        for path in (dwi_file, mask_file, fa_file):
            path.unlink(missing_ok=True)
    return matched, fa


def _method_images(image: EvaluatedImage, methods: tuple[str, ...], target: _TargetQuantiles,
                   tissues: _Tissues, scratch: Path) -> tuple[dict[str, _MethodImage], np.ndarray]:
    """The image under every image-level method, with its features, and the brain mask used."""
    from ..harmonize.baselines import histogram_match_to_quantiles

    pre, img = load_float32(image.preproc)
    mask = _load(image.mask) > 0.5 if image.mask is not None else (pre if pre.ndim == 3 else pre[..., 0]) != 0
    grid = tissues.get(float(img.header.get_zooms()[0]), mask.shape)
    out: dict[str, _MethodImage] = {}
    if image.modality != "dwi":
        volumes = {"unharmonized": pre}
        if "ihf-harmony" in methods and image.harmonized is not None:
            volumes["ihf-harmony"] = _load(image.harmonized)
        quantiles = target.get(image.modality)
        if "histogram-matching" in methods and quantiles is not None:
            matched = histogram_match_to_quantiles(pre, quantiles, source_mask=mask)
            matched[~mask] = 0
            volumes["histogram-matching"] = matched
        for method, volume in volumes.items():
            out[method] = _MethodImage({image.modality: volume},
                                       anatomical_features(volume, mask, grid, image.modality))
        return out, mask

    from ..preproc.dwi import shell_labels

    labels = shell_labels(np.loadtxt(image.bval, ndmin=1)) if image.bval else ["b0"] * pre.shape[3]
    runs: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "unharmonized": (pre, _load(image.fa["unharmonized"]) if "unharmonized" in image.fa else None)}
    if "ihf-harmony" in methods and image.harmonized is not None:
        runs["ihf-harmony"] = (_load(image.harmonized), _load(image.fa["ihf-harmony"]) if "ihf-harmony" in image.fa else None)
    if "histogram-matching" in methods and target.sums:
        runs["histogram-matching"] = _histogram_match_dwi(image, pre, img.affine, labels, mask, target, scratch)
    for method, (data, fa) in runs.items():
        shells = _shell_means(data, labels)
        out[method] = _MethodImage({f"dwi-{k}": v for k, v in shells.items()}, dwi_features(shells, fa, mask, grid))
    return out, mask


# --------------------------------------------------------------------------------------------
# the evaluation


def _not_applicable(result: dict) -> str | None:
    return None if result.get("applicable", True) else result.get("reason", "not applicable")


def _finite_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    return [r for r in rows if all(np.isfinite(r["features"].get(c, math.nan)) for c in columns)]


def _statistics(section: dict, rows_by_method: dict[str, list[dict]], feature_names: list[str],
                classifier_names: list[str], covariates: dict[str, dict[str, float]], seed: int) -> None:
    """Site effect, mixed model, classifier and covariate association per method and feature."""
    from . import statistics as st

    reasons: dict[str, dict[str, str]] = defaultdict(dict)   # section -> method -> reason
    for method, rows in rows_by_method.items():
        usable = _finite_rows(rows, feature_names)
        sites = [r["site"] for r in usable]
        subjects = [r["subject"] for r in usable]
        for feature in feature_names:
            values = np.array([r["features"][feature] for r in usable])
            test = st.site_effect_test(values, sites)
            lmm = st.mixed_model_r2(values, sites, subjects)
            if (reason := _not_applicable(test)):
                reasons["site_effect"].setdefault(method, reason)
            if (reason := _not_applicable(lmm)):
                reasons["mixed_model"].setdefault(method, reason)
            if not (_not_applicable(test) and _not_applicable(lmm)):  # else only the reasons are shown
                section["site_effect"].append({
                    "feature": feature, "method": method,
                    **{k: test.get(k) for k in ("kruskal_h", "kruskal_p", "anova_f", "anova_p")},
                    **{k: lmm.get(k) for k in ("marginal_r2", "conditional_r2")},
                    # the subject's share of the variance: what harmonization must keep
                    "subject_r2": (lmm["conditional_r2"] - lmm["marginal_r2"]) if lmm.get("applicable") else None,
                    "n": len(values),
                })
            for covariate, by_subject in covariates.items():
                assoc = st.covariate_association(values, np.array([by_subject.get(s, math.nan) for s in subjects]))
                if (reason := _not_applicable(assoc)):
                    reasons["covariates"].setdefault(method, f"{covariate}: {reason}")
                    continue
                section["covariates"].append({"covariate": covariate, "feature": feature, "method": method,
                                              **{k: assoc.get(k) for k in ("pearson_r", "pearson_p", "spearman_rho",
                                                                             "spearman_p", "slope", "n")}})
        usable = _finite_rows(rows, classifier_names)
        matrix = np.array([[r["features"][c] for c in classifier_names] for r in usable]).reshape(len(usable), -1)
        scores = st.site_classifier_scores(matrix, [r["site"] for r in usable], seed=seed)
        if (reason := _not_applicable(scores)):
            reasons["classifier"].setdefault(method, reason)
        else:
            section["classifier"].append({"method": method, **{k: scores.get(k) for k in (
                "accuracy", "f1_macro", "balanced_accuracy", "chance", "n", "n_splits", "classifier")}})
    if not covariates:
        reasons["covariates"] = {"": "participants.tsv has no numeric column (such as age) to test"}
    for key, by_method in reasons.items():
        section["not_applicable"].setdefault(key, _merge_reasons(by_method, list(rows_by_method)))


def _merge_reasons(by_method: dict[str, str], methods: list[str]) -> str:
    """One reason when every method has it, otherwise each method's own ("method: reason")."""
    if len(set(by_method.values())) == 1 and (set(by_method) == set(methods) or "" in by_method):
        return next(iter(by_method.values()))
    return "; ".join(f"{method}: {reason}" for method, reason in by_method.items())


def _combat_rows(rows: list[dict], names: list[str], covariates: dict[str, dict[str, float]]) -> tuple[list[dict], str | None]:
    """The unharmonized feature rows after ComBat (features only), or the reason it cannot run."""
    from .statistics import combat_features

    usable = _finite_rows(rows, names)
    matrix = np.array([[r["features"][c] for c in names] for r in usable]).reshape(len(usable), -1)
    kept = {}
    for name, by_subject in covariates.items():
        values = np.array([by_subject.get(r["subject"], math.nan) for r in usable])
        if np.isfinite(values).all() and np.ptp(values) > 0:
            kept[name] = values
    try:
        harmonized = combat_features(matrix, [r["site"] for r in usable], kept or None)
    except ValueError as err:
        return [], f"ComBat cannot run on these data: {err}"
    return [{**r, "features": dict(zip(names, map(float, row)))} for r, row in zip(usable, harmonized)], None


def _traveling_metrics(truth: tuple[dict, np.ndarray], sources: list[dict[str, _MethodImage]],
                       pairs: dict[tuple[str, str], list[dict]]) -> None:
    """Compare each method's version of ``sources`` with the subject's own target-site image."""
    from .metrics import similarity_report
    from .perceptual import lpips_distance

    summary, mask = truth
    for per_method in sources:
        for method, method_image in per_method.items():
            for key, volume in method_image.summary.items():
                if key in summary:
                    metrics = similarity_report(volume, summary[key], mask)
                    metrics["lpips"] = lpips_distance(volume, summary[key], mask, max_slices=LPIPS_SLICES)
                    pairs[(method, key)].append(metrics)


def _traveling(section: dict, pairs: dict[tuple[str, str], list[dict]], target_site: str | None) -> None:
    """Mean similarity per method and image to the same subject's own target-site image."""
    if target_site is None:
        section["not_applicable"].setdefault("traveling", "no target site: pass --target-site or harmonize "
                                             "with 'participant --target-site SITE' first")
        return
    if not pairs:
        section["not_applicable"].setdefault(
            "traveling", f"no participant was scanned both at the target site {target_site} and at another site")
        return
    for (method, key), metrics in sorted(pairs.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        row = {"method": method, "image": key, "n": len(metrics)}
        for name in ("rmse", "psnr", "ssim", "ms_ssim", "lpips"):
            values = np.array([m[name] for m in metrics], dtype=float)
            row[name] = float(values.mean())
            row[f"{name}_sd"] = float(values.std())
        section["traveling"].append(row)


def _fa_cov(section: dict, rows_by_method: dict[str, list[dict]]) -> None:
    from .statistics import cross_site_cov

    for method, rows in rows_by_method.items():
        usable = _finite_rows(rows, ["wm_median_fa"])
        result = cross_site_cov(np.array([r["features"]["wm_median_fa"] for r in usable]),
                                [r["subject"] for r in usable])
        if (reason := _not_applicable(result)):
            section["not_applicable"].setdefault("fa_cov", reason)
            continue
        section["fa_cov"].append({"feature": "wm_median_fa", "method": method,
                                  **{k: result.get(k) for k in ("cov_mean", "cov_sd", "n_subjects")}})


def _kdes(section: dict, samples: dict[str, dict[str, list[np.ndarray]]]) -> None:
    from .statistics import distribution_distance, intensity_kde, kde_grid

    pooled = {method: {site: np.concatenate(parts) for site, parts in by_site.items()}
              for method, by_site in samples.items()}
    all_sets = [values for by_site in pooled.values() for values in by_site.values() if values.size > 1]
    if not all_sets:
        return
    grid = kde_grid(all_sets)
    for method, by_site in pooled.items():
        curves = {}
        for site, values in sorted(by_site.items()):
            try:
                curves[site] = {"x": [round(float(x), 5) for x in grid],
                                "density": [round(float(y), 6) for y in intensity_kde(values, grid)]}
            except ValueError:
                continue
        section["kdes"][method] = curves
        distance = distribution_distance(by_site)
        if (reason := _not_applicable(distance)):
            section["not_applicable"].setdefault("distribution_distance", reason)
        else:
            section["distribution_distance"].append({"method": method, "mean": distance.get("wasserstein_mean"),
                                                     "max": distance.get("wasserstein_max")})


def _evaluate_modality(modality: str, images: list[EvaluatedImage], *, methods: tuple[str, ...],
                       target_site: str | None, covariates: dict, scratch: Path, seed: int) -> dict:
    from ..progress import progress

    section: dict = {
        "n_images": len(images), "sites": {},
        "n_subjects": len({i.subject for i in images}), "kdes": {}, "distribution_distance": [],
        "site_effect": [], "classifier": [], "covariates": [], "traveling": [], "fa_cov": [],
        "not_applicable": {}, "features": [], "methods": [],
    }
    counts: dict[str, int] = defaultdict(int)
    for image in images:
        counts[image.site] += 1
    section["sites"] = dict(sorted(counts.items()))

    image_methods = tuple(m for m in methods if m != "combat")
    if "ihf-harmony" in image_methods and not any(i.harmonized for i in images):
        section["not_applicable"]["ihf-harmony"] = (
            "no harmonized images: run 'ihf-bids BIDS_DIR OUTPUT_DIR participant --target-site SITE' first")
        image_methods = tuple(m for m in image_methods if m != "ihf-harmony")

    target = _TargetQuantiles()
    if "histogram-matching" in image_methods:
        target_images = [i for i in images if i.site == target_site]
        if not target_images:
            section["not_applicable"]["histogram-matching"] = (
                f"no {modality} images of the target site {target_site}" if target_site else
                "no target site: pass --target-site, or harmonize with 'participant --target-site' first")
            image_methods = tuple(m for m in image_methods if m != "histogram-matching")
        for image in progress(target_images, desc=f"{modality}: target-site intensities", unit="image",
                              logger=LOGGER):
            data = _load(image.preproc)
            mask = _load(image.mask) > 0.5 if image.mask is not None else data != 0
            if modality != "dwi":
                target.add(modality, data, mask)
                continue
            from ..preproc.dwi import shell_labels

            labels = np.asarray(shell_labels(np.loadtxt(image.bval, ndmin=1)))
            for label in sorted(set(labels)):
                volumes = data[..., labels == label]
                target.add(f"dwi-{label}", volumes, np.broadcast_to(mask[..., None], volumes.shape))

    rows_by_method: dict[str, list[dict]] = defaultdict(list)
    samples: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    pairs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    by_subject: dict[str, list[EvaluatedImage]] = defaultdict(list)
    for image in images:
        by_subject[image.subject].append(image)
    multi_site = {s for s, own in by_subject.items() if len({i.site for i in own}) > 1}
    rng = np.random.default_rng(seed)
    # One participant at a time: only its images are in memory, and its traveling-subject
    # comparisons are made before the next participant is loaded.
    for subject, own in progress(list(by_subject.items()), desc=f"evaluating {modality}", unit="participant",
                                 logger=LOGGER):
        truth, sources = None, []
        for image in own:
            per_method, mask = _method_images(image, image_methods, target, _TISSUES, scratch)
            for method, method_image in per_method.items():
                rows_by_method[method].append({"subject": image.subject, "site": image.site, "image": image.name,
                                               "features": method_image.features})
                volume = next(iter(method_image.summary.values()))
                values = volume[mask]
                if values.size:
                    take = rng.choice(values.size, min(KDE_SAMPLES_PER_IMAGE, values.size), replace=False)
                    samples[method][image.site].append(values[take].astype(np.float64))
            if subject not in multi_site or target_site is None:
                continue
            if image.site == target_site and truth is None:
                truth = (per_method["unharmonized"].summary, mask)
            elif image.site != target_site:
                sources.append(per_method)
        if truth is not None and sources:
            _traveling_metrics(truth, sources, pairs)

    feature_names = sorted({k for rows in rows_by_method.values() for r in rows for k in r["features"]
                            if not k.startswith("p")}, key=_feature_order)
    classifier_names = sorted({k for rows in rows_by_method.values() for r in rows for k in r["features"]},
                              key=_feature_order)
    # Features missing from some image (a shell only one site acquires) are left out of the
    # statistics: every method is compared on one set of features present everywhere.
    unharmonized = rows_by_method.get("unharmonized", [])
    feature_names = [f for f in feature_names if all(f in r["features"] for r in unharmonized)]
    classifier_names = [f for f in classifier_names if all(f in r["features"] for r in unharmonized)]
    if "combat" in methods:
        rows, reason = _combat_rows(unharmonized, classifier_names, covariates)
        if reason:
            section["not_applicable"]["combat"] = reason
        else:
            rows_by_method["combat"] = rows
    ordered = {m: rows_by_method[m] for m in METHODS if m in rows_by_method}
    section["methods"] = list(ordered)
    section["features"] = feature_names
    _kdes(section, samples)
    _statistics(section, ordered, feature_names, classifier_names, covariates, seed)
    if not multi_site:
        section["not_applicable"].setdefault(
            "mixed_model", "needs participants scanned at two or more sites (traveling subjects); none here")
        section["not_applicable"].setdefault(
            "traveling", "no participant was scanned at two or more sites (no traveling subjects)")
    else:
        _traveling(section, pairs, target_site)
    if modality == "dwi":
        if multi_site:
            _fa_cov(section, ordered)
        else:
            section["not_applicable"].setdefault(
                "fa_cov", "the cross-site spread of FA needs participants scanned at two or more sites; none here")
    section["tables"] = {m: [{"subject": r["subject"], "site": r["site"], "image": r["image"], **r["features"]}
                             for r in rows] for m, rows in ordered.items()}
    return section


_TISSUES = _Tissues()


def _feature_order(name: str) -> tuple:
    order = ["wm_median_fa", "brain_median_fa", "wm_mean_b0", "gm_mean", "wm_mean", "csf_mean", "gm_wm_contrast",
             "csf_fraction", "gm_fraction", "wm_fraction"]
    return (order.index(name) if name in order else len(order), name)


def _recorded_target(harmonized: Path) -> str | None:
    """The target site in a harmonized image's sidecar (``HarmonizationTarget.Site``)."""
    target = read_sidecar(harmonized).get("HarmonizationTarget")
    if isinstance(target, dict):
        target = target.get("Site")
    return str(target) if target else None


def evaluate_cohort(output_dir: Path, *, bids_dir: Path | None = None, target_site: str | None = None,
                    baselines: tuple[str, ...] = BASELINES, modalities: tuple[str, ...] = MODALITIES,
                    work_dir: Path | None = None, seed: int = 0) -> dict:
    """Evaluate every modality of an output tree; return the report's data (JSON-serialisable).

    Parameters
    ----------
    output_dir : path
        The derivatives (after ``participant``, ideally with ``--target-site``).
    bids_dir : path, optional
        The input dataset, for the covariates in participants.tsv.
    target_site : str, optional
        The harmonization target. Default: the ``HarmonizationTarget`` recorded in the
        harmonized sidecars (it must be one site).
    baselines : tuple of str
        Among :data:`BASELINES`; ``()`` evaluates the unharmonized and harmonized images only.
    work_dir : path, optional
        Scratch space for the histogram-matching tensor refits.
    """
    import tempfile
    import time

    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose among {', '.join(BASELINES)}")
    methods = tuple(m for m in METHODS if m in ("unharmonized", "ihf-harmony") or m in baselines)
    covariates = read_covariates(bids_dir)
    evaluation: dict = {"target_site": target_site, "methods": list(methods), "modalities": {},
                        "covariates": sorted(covariates), "generated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    collected = {m: collect_images(output_dir, m) for m in modalities}
    recorded = {_recorded_target(i.harmonized) for images in collected.values()
                for i in images if i.harmonized is not None} - {None}
    if target_site is None and len(recorded) == 1:
        target_site = str(recorded.pop())
    elif target_site is None and len(recorded) > 1:
        raise ValueError(f"the harmonized images of {output_dir} have several targets ({', '.join(sorted(recorded))}); "
                         "pass --target-site to choose the one to evaluate")
    evaluation["target_site"] = target_site
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ihf-bids-evaluation-") as scratch:
        for modality, images in collected.items():
            if not images:
                continue
            evaluation["modalities"][modality] = _evaluate_modality(
                modality, images, methods=methods, target_site=target_site, covariates=covariates,
                scratch=Path(scratch), seed=seed)
    return evaluation
