"""Group evaluation on small synthetic derivative trees (template 4 mm grid)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ihf_bids.qc.evaluation import anatomical_features, collect_images, evaluate_cohort, read_covariates

SPACE = "space-MNI152NLin2009aSym_res-4"


def _write(path, data, affine, meta=None, dtype=np.float32):
    from ihf_bids.imageio import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(np.asarray(data), affine, path, dtype)
    if meta is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))


def make_tree(root, design, *, harmonize=None, target="a", registration=None):
    """T1w derivatives for ``design`` = [(subject, site, gain)]; ``harmonize`` maps the gain;
    ``registration(subject, site)`` gives the sidecars' Registration field (``None``: none)."""
    from ihf_bids.templates import load_template

    template = load_template(4.0)
    mask = template.brain_mask > 0.5
    rng = np.random.default_rng(0)
    for subject, site, gain in design:
        anat = root / f"sub-{subject}" / f"ses-{site}" / "anat"
        stem = f"sub-{subject}_ses-{site}_{SPACE}"
        # subject-specific anatomy (a per-subject smooth change) times the site's gain
        base = template.t1 * (1 + 0.05 * (int(subject) % 3)) + rng.normal(0, 0.01, template.shape)
        image = np.where(mask, base * gain, 0)
        record = registration(subject, site) if registration is not None else None
        extra = {"Registration": record} if record is not None else {}
        _write(anat / f"{stem}_desc-preproc_T1w.nii.gz", image, template.affine, {"Site": site, **extra})
        _write(anat / f"{stem}_desc-brain_mask.nii.gz", mask, template.affine, {}, np.uint8)
        if harmonize is not None:
            _write(anat / f"{stem}_desc-harmonized_T1w.nii.gz", np.where(mask, base * harmonize(gain), 0),
                   template.affine, {"Site": site, "HarmonizationTarget": {"Modality": "T1w", "Site": target},
                                     **extra})
    return root


def test_read_covariates_keeps_numeric_columns(tmp_path):
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tage\tsex\tsite\tscore\nsub-01\t61.5\tM\ta\tn/a\nsub-02\tn/a\tF\tb\t3\n")
    covariates = read_covariates(tmp_path)
    assert set(covariates) == {"age", "score"}
    assert covariates["age"]["01"] == 61.5 and math.isnan(covariates["age"]["02"])
    assert read_covariates(tmp_path / "missing") == {}


def test_anatomical_features_see_a_contrast_change():
    from ihf_bids.templates import load_template

    template = load_template(4.0)
    mask = template.brain_mask > 0.5
    tissues = {"gm": template.gm > 0.5, "wm": template.wm > 0.5, "csf": template.csf > 0.5,
               "wm_core": template.wm > 0.9}
    plain = anatomical_features(template.t1, mask, tissues, "T1w")
    brighter = anatomical_features(template.t1 * 1.5, mask, tissues, "T1w")
    assert plain["wm_mean"] > plain["gm_mean"] > plain["csf_mean"]
    assert brighter["wm_mean"] == pytest.approx(1.5 * plain["wm_mean"], rel=1e-5)
    assert brighter["gm_wm_contrast"] == pytest.approx(plain["gm_wm_contrast"], rel=1e-5)
    fractions = [plain[f"{t}_fraction"] for t in ("csf", "gm", "wm")]
    assert sum(fractions) == pytest.approx(1.0) and min(fractions) > 0.05


def test_traveling_cohort_has_every_section(tmp_path):
    """Three subjects at three sites: IHF-Harmony here is ideal (gain removed), so it must win."""
    design = [(f"{s:02d}", site, gain) for s in (1, 2, 3) for site, gain in (("a", 1.0), ("b", 1.4), ("c", 0.7))]
    root = make_tree(tmp_path / "out", design, harmonize=lambda gain: 1.0)
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "participants.tsv").write_text(
        "participant_id\tage\nsub-01\t30\nsub-02\t50\nsub-03\t70\n")
    evaluation = evaluate_cohort(root, bids_dir=tmp_path / "bids", modalities=("T1w",))
    assert evaluation["target_site"] == "a"  # read from the harmonized sidecars
    section = evaluation["modalities"]["T1w"]
    assert section["methods"] == ["unharmonized", "ihf-harmony", "histogram-matching", "combat"]
    assert set(section["kdes"]) == {"unharmonized", "ihf-harmony", "histogram-matching"}
    effect = {(r["feature"], r["method"]): r for r in section["site_effect"]}
    assert effect[("wm_mean", "unharmonized")]["marginal_r2"] > 0.9
    assert effect[("wm_mean", "ihf-harmony")]["marginal_r2"] < 0.2
    assert effect[("wm_mean", "ihf-harmony")]["conditional_r2"] > 0.8  # subjects still differ
    travel = {(r["method"], r["image"]): r for r in section["traveling"]}
    assert travel[("ihf-harmony", "T1w")]["psnr"] > travel[("unharmonized", "T1w")]["psnr"]
    assert travel[("ihf-harmony", "T1w")]["lpips"] < travel[("unharmonized", "T1w")]["lpips"]
    assert {r["covariate"] for r in section["covariates"]} == {"age"}
    distance = {r["method"]: r["mean"] for r in section["distribution_distance"]}
    assert distance["ihf-harmony"] < distance["unharmonized"] / 5
    assert distance["histogram-matching"] < distance["unharmonized"] / 5


def test_one_image_per_site_says_what_does_not_apply(tmp_path):
    """Like the real data: one person per site, no traveling subjects, no harmonized images."""
    root = make_tree(tmp_path / "out", [("01", "a", 1.0), ("02", "b", 1.3), ("03", "c", 0.8)])
    evaluation = evaluate_cohort(root, modalities=("T1w",), target_site="a")
    section = evaluation["modalities"]["T1w"]
    reasons = section["not_applicable"]
    for key in ("site_effect", "classifier", "mixed_model", "traveling", "combat", "ihf-harmony", "covariates"):
        assert reasons.get(key), key
    assert section["kdes"]["unharmonized"]  # distributions still drawn
    assert not section["traveling"] and not section["classifier"]


def test_collect_images_requires_a_site(tmp_path):
    root = make_tree(tmp_path / "out", [("01", "a", 1.0)])
    sidecar = next(root.rglob("*desc-preproc_T1w.json"))
    sidecar.write_text("{}")
    with pytest.raises(ValueError, match="no Site"):
        collect_images(root, "T1w")


STEP = "T1wToMNI152NLin2009aSym"
FLAG_REASON = "the brain mask in template space overlaps the template's by Dice 0.71 (below 0.85)"


def _template_step(subject, site):
    """sub-02 at site b: flagged; sub-01 at site a: no Registration field (an older version's sidecar)."""
    if (subject, site) == ("01", "a"):
        return None
    flagged = (subject, site) == ("02", "b")
    dice = {"01": 0.98, "02": 0.97}[subject] if not flagged else 0.71
    return {STEP: {"Flagged": flagged, **({"Flags": [FLAG_REASON]} if flagged else {}), "Start": "centre of mass",
                   "MaskDice": dice, "Correlation": 0.75 if not flagged else 0.45,
                   "DisplacementMm": 7.0 if not flagged else 12.5, "RotationDeg": 2.0, "MutualInformation": 0.3,
                   "StartsTried": [{"Start": "centre of mass", "MutualInformation": 0.3, "DisplacementMm": 7.0,
                                    "RotationDeg": 2.0}]}}


def test_group_report_files(tmp_path):
    from markupsafe import escape

    from ihf_bids.qc.group import write_group_report

    design = [(f"{s:02d}", site, gain) for s in (1, 2) for site, gain in (("a", 1.0), ("b", 1.4))]
    root = make_tree(tmp_path / "out", design, harmonize=lambda gain: 1.0, registration=_template_step)
    written = write_group_report(root, modalities=("T1w",), baselines=("histogram-matching",), command="test")
    names = {p.name for p in written}
    assert {"group_T1w.tsv", "group_qc.json", "group_report.html"} <= names
    qc = json.loads((root / "group_qc.json").read_text())  # strict JSON: NaN written as null
    assert qc["methods"] == ["unharmonized", "ihf-harmony", "histogram-matching"]
    header = (root / "group_T1w.tsv").read_text().splitlines()[0].split("\t")
    assert "qc_wm_mean" in header
    # registration: 4 preprocessed T1w, one without the field, one flagged
    registration = qc["registration"]
    assert registration["n_images"] == 4 and registration["n_checked"] == 3 and registration["n_flagged"] == 1
    assert registration["not_recorded"] == [f"sub-01/ses-a/anat/sub-01_ses-a_{SPACE}_desc-preproc_T1w.nii.gz"]
    assert registration["flagged_sessions"] == ["sub-02_ses-b"]
    [flagged] = registration["flagged"]
    assert (flagged["subject"], flagged["session"], flagged["image"], flagged["step"], flagged["reasons"]) == (
        "02", "b", "T1w", STEP, [FLAG_REASON])
    step = registration["steps"][STEP]
    assert (step["n"], step["n_flagged"]) == (3, 1)
    assert step["mask_dice_median"] == pytest.approx(0.97) and step["mask_dice_min"] == pytest.approx(0.71)
    assert step["correlation_median"] == pytest.approx(0.75) and step["correlation_min"] == pytest.approx(0.45)
    assert step["displacement_mm_max"] == pytest.approx(12.5) and step["rotation_deg_max"] == pytest.approx(2.0)
    assert registration["thresholds"]["TemplateMaskDice"] == 0.85
    # the report lists the flagged session first, before the summary and every other section
    html = (root / "group_report.html").read_text()
    box = html.index('<div class="flagged-box" id="flagged-registrations">')
    assert box < html.index('<table class="summary">') < html.index('<h2 id="registration">') < html.index(
        '<h2 id="mod-T1w">')
    text = html[box:html.index("</div>", box)]
    assert "<td>sub-02</td><td>b</td><td>T1w</td><td>T1w \u2192 MNI152NLin2009aSym</td>" in text
    assert str(escape(FLAG_REASON)) in text and "1 of 3 registrations checked" in text
    assert "sub-01" not in text and "<td>a</td>" not in text
    assert "Registration quality not recorded for 1 image" in html
    assert f"sub-01/ses-a/anat/sub-01_ses-a_{SPACE}_desc-preproc_T1w.nii.gz" in html


def test_registration_summary_without_flags_or_records(tmp_path):
    """No flag: 'No registration was flagged (N registrations checked)'; no field at all: all
    images 'not recorded', never a crash; a registration repeated in several sidecars counts once."""
    from ihf_bids.qc.group import registration_summary
    from ihf_bids.qc.reports import write_group_report

    design = [("01", "a", 1.0), ("02", "b", 1.4)]
    passing = lambda subject, site: _template_step("02", "a")  # noqa: E731 - every image passes
    root = make_tree(tmp_path / "ok", design, registration=passing)
    anat = root / "sub-01" / "ses-a" / "anat"
    t1w = json.loads((anat / f"sub-01_ses-a_{SPACE}_desc-preproc_T1w.json").read_text())
    t2w = {**t1w, "Registration": {**t1w["Registration"], "T2wToT1w": {"Flagged": False, "Start": "scanner geometry",
                                                                       "MaskDice": 0.98, "DisplacementMm": 0.3,
                                                                       "RotationDeg": 0.2}}}
    _write(anat / f"sub-01_ses-a_{SPACE}_desc-preproc_T2w.nii.gz", np.zeros((2, 2, 2)), np.eye(4), t2w)
    summary = registration_summary(root)
    assert (summary["n_images"], summary["n_checked"], summary["n_flagged"]) == (3, 3, 0)
    assert summary["steps"][STEP]["n"] == 2 and summary["steps"]["T2wToT1w"]["mask_dice_min"] == 0.98
    assert summary["steps"]["T2wToT1w"]["correlation_median"] is None and summary["not_recorded"] == []
    html = write_group_report(root, {"registration": summary}).read_text()
    assert "No registration was flagged (3 registrations checked)." in html and 'class="flagged-box"' not in html
    assert "not recorded" not in html

    old = make_tree(tmp_path / "old", design)
    summary = registration_summary(old)
    assert (summary["n_images"], summary["n_checked"], summary["n_not_recorded"]) == (2, 0, 2)
    assert summary["flagged"] == [] and summary["steps"] == {}
    html = write_group_report(old, {"registration": summary}).read_text()
    assert "No registration was flagged (0 registrations checked)." in html
    assert "Registration quality not recorded for 2 images" in html
