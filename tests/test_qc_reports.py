"""Participant and group HTML reports: files, links, offline-ness, and rendering in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

SPACE = "MNI152NLin2009aSym"


def _write_json(path: Path, fields: dict) -> None:
    path.write_text(json.dumps(fields, indent=1))


#: The one flagged registration of the fixture: session ge, T2w -> T1w.
FLAG_REASON = "the moved brain mask overlaps the reference's by Dice 0.62 (below 0.8)"
REJECTED = "moves the brain by 34.0 mm (more than 20 mm)"


def _registration(ses: str, modality: str) -> dict | None:
    """The sidecar's Registration field: ses-ge's T2w -> T1w step is flagged (with a rejected start),
    everything else passes, and ses-philips' DWI has no field (written by an older version)."""
    if ses == "philips" and modality == "dwi":
        return None
    template = {"Flagged": False, "Start": "centre of mass", "MaskDice": 0.9868, "Correlation": 0.7526,
                "DisplacementMm": 7.03, "RotationDeg": 2.36, "MutualInformation": 0.321,
                "StartsTried": [{"Start": "centre of mass", "MutualInformation": 0.321, "DisplacementMm": 7.03,
                                 "RotationDeg": 2.36}]}
    record = {f"T1wTo{SPACE}": template}
    if modality == "T2w" and ses == "ge":
        record["T2wToT1w"] = {
            "Flagged": True, "Flags": [FLAG_REASON], "Start": "centre of mass", "MaskDice": 0.62,
            "DisplacementMm": 4.1, "RotationDeg": 1.2, "MutualInformation": 0.21,
            "StartsTried": [{"Start": "scanner geometry", "MutualInformation": 0.1, "DisplacementMm": 34.0,
                             "RotationDeg": 0.5, "Implausible": REJECTED},
                            {"Start": "centre of mass", "MutualInformation": 0.21, "DisplacementMm": 4.1,
                             "RotationDeg": 1.2}]}
    elif modality == "T2w":
        record["T2wToT1w"] = {"Flagged": False, "Start": "scanner geometry", "MaskDice": 0.9845,
                              "DisplacementMm": 0.27, "RotationDeg": 0.29, "MutualInformation": 0.4656,
                              "StartsTried": []}
    elif modality == "dwi":
        record["DwiToT1w"] = {"Flagged": False, "Start": "scanner geometry", "MaskDice": 0.95,
                              "DisplacementMm": 1.5, "RotationDeg": 0.8, "MutualInformation": 0.3, "StartsTried": []}
    return {"Registration": record}


def _make_derivatives(root: Path, *, harmonize_second: bool = False) -> Path:
    """sub-01 with sessions 'ge' (harmonized) and 'philips' (T1w and DWI harmonized only when asked)."""
    from ihf_bids.imageio import save_image
    from ihf_bids.templates import load_template

    tpl = load_template(4.0)
    mask = tpl.brain_mask > 0.5
    base = np.where(mask, tpl.t1, 0).astype(np.float32)
    rng = np.random.default_rng(1)
    model = {"Name": "phantom-model", "Version": "0.1.0", "Sha256": "0123456789abcdef" * 4}
    for ses, site, scale, harmonized in (("ge", "ge", 1.3, True), ("philips", "philips", 0.8, harmonize_second)):
        anat = root / "sub-01" / f"ses-{ses}" / "anat"
        dwi = root / "sub-01" / f"ses-{ses}" / "dwi"
        anat.mkdir(parents=True)
        dwi.mkdir(parents=True)
        stem = f"sub-01_ses-{ses}_space-{SPACE}_res-4"
        save_image(mask, tpl.affine, anat / f"{stem}_desc-brain_mask.nii.gz", np.uint8)
        for suffix in ("T1w", "T2w"):
            image = base * scale + 0.05 * rng.standard_normal(base.shape).astype(np.float32) * mask
            if suffix == "T2w":
                image = np.where(mask, 1.2 - image, 0)
            save_image(image, tpl.affine, anat / f"{stem}_desc-preproc_{suffix}.nii.gz")
            registration = _registration(ses, suffix) or {}
            _write_json(anat / f"{stem}_desc-preproc_{suffix}.json",
                        {"Site": site, "SkullStripped": True, **registration})
            if harmonized or suffix == "T2w":
                save_image(np.where(mask, image / scale * 1.1 + 0.02, 0), tpl.affine,
                           anat / f"{stem}_desc-harmonized_{suffix}.nii.gz")
                _write_json(anat / f"{stem}_desc-harmonized_{suffix}.json", {
                    "Site": site, "SourceSite": site, "HarmonizationTarget": {"Site": "siemens", "Modality": suffix},
                    "HarmonizationModel": model, "Device": "cpu", **registration})
        bvals = np.array([0, 0, 1000, 1000, 1000, 1000])
        volumes = [base * 2.0 * scale] * 2 + [base * (0.6 + 0.05 * k) * scale for k in range(4)]
        data = np.stack(volumes, axis=-1).astype(np.float32)
        save_image(mask, tpl.affine, dwi / f"{stem}_desc-brain_mask.nii.gz", np.uint8)
        fa = np.clip(tpl.wm * 0.6 + 0.1, 0, 1) * mask
        runs = [("preproc", data, fa, 0.41)] + ([("harmonized", data / scale, fa * 0.95, 0.39)] if harmonized else [])
        for desc, image, fa_map, wm_fa in runs:
            save_image(image, tpl.affine, dwi / f"{stem}_desc-{desc}_dwi.nii.gz")
            (dwi / f"{stem}_desc-{desc}_dwi.bval").write_text(" ".join(str(b) for b in bvals) + "\n")
            vectors = np.zeros((3, bvals.size))
            vectors[:, 2:] = np.eye(3)[:, [0, 1, 2, 0]]
            np.savetxt(dwi / f"{stem}_desc-{desc}_dwi.bvec", vectors, fmt="%.6f")
            meta = {"Site": site}
            if desc == "harmonized":
                meta.update({"HarmonizationTarget": {"Site": "siemens", "Modality": "dwi"},
                             "HarmonizationModel": model, "Device": "cpu"})
            elif not harmonized:
                meta["HarmonizationSkipped"] = "the target site siemens has no profile for b=2000"
            _write_json(dwi / f"{stem}_desc-{desc}_dwi.json", {**meta, **(_registration(ses, "dwi") or {})})
            fa_stem = f"{stem}_model-tensor_param-fa_desc-{desc}_dwimap"
            save_image(fa_map, tpl.affine, dwi / f"{fa_stem}.nii.gz")
            _write_json(dwi / f"{fa_stem}.json", {**meta, "WhiteMatterMedianFA": wm_fa, "MedianFA": wm_fa - 0.1})
    return root


def _evaluation() -> dict:
    x = np.linspace(0, 1, 50)
    curve = lambda mu: {"x": x.tolist(), "density": np.exp(-0.5 * ((x - mu) / 0.1) ** 2).tolist()}
    methods = ["unharmonized", "ihf-harmony", "histogram-matching", "combat"]
    modality = {
        "n_images": 12, "sites": {"ge": 4, "siemens": 4, "philips": 4}, "n_subjects": 4,
        "kdes": {m: {s: curve(mu + (0.1 * i if m == "unharmonized" else 0.01 * i))
                     for i, (s, mu) in enumerate((("ge", 0.4), ("siemens", 0.5), ("philips", 0.6)))}
                 for m in methods[:3]},
        "distribution_distance": [{"method": m, "mean": 0.1 / (i + 1), "max": 0.2 / (i + 1)}
                                  for i, m in enumerate(methods[:3])],
        "site_effect": [{"feature": "wm_mean", "method": m, "kruskal_h": 9.1 - i, "kruskal_p": 1e-4 * (i + 1),
                         "anova_f": 20.0 / (i + 1), "anova_p": 3.2e-6 * (i + 1), "marginal_r2": 0.8 / (i + 1),
                         "conditional_r2": 0.9, "extra_unknown": "shown"} for i, m in enumerate(methods)],
        "classifier": [{"method": m, "accuracy": 0.9 - 0.15 * i, "f1_macro": 0.85 - 0.1 * i,
                        "balanced_accuracy": 0.9 - 0.15 * i, "chance": 1 / 3, "n_splits": 5}
                       for i, m in enumerate(methods)] + [{"method": "broken", "accuracy": float("nan"),
                                                           "chance": None}],
        "covariates": [{"covariate": "age", "feature": "gm_volume", "method": "combat", "pearson_r": 0.5,
                        "pearson_p": 0.02, "spearman_rho": None}],
        "traveling": [],
        "not_applicable": {"traveling": "no participant was scanned at two or more sites",
                           "mixed_model": "needs traveling subjects", "histogram-matching": "no target images"},
        "features": ["wm_mean"], "tables": {"unharmonized": [{"subject": "01", "wm_mean": 1.0}]},
    }
    dwi = {"n_images": 6, "sites": {"ge": 3, "siemens": 3}, "n_subjects": 3, "kdes": {},
           "fa_cov": [{"feature": "wm_median_fa", "method": "unharmonized", "cov_mean": 0.05, "cov_sd": float("nan"),
                       "n_subjects": 3}],
           "not_applicable": {"kdes": "DWI densities are not computed", "classifier": "fewer than two sites"}}
    return {"target_site": "siemens", "generated": "2026-11-21T12:00:00", "command": "ihf-bids bids out group",
            "methods": methods, "modalities": {"T1w": modality, "dwi": dwi}, "unknown_extra": {"ignored": True}}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Both reports written once: (output_dir, participant HTML, group HTML)."""
    from ihf_bids.qc.reports import write_group_report, write_participant_report

    out = _make_derivatives(tmp_path_factory.mktemp("reports") / "out")
    target = {"T1w": np.linspace(0.3, 1.2, 100), "dwi-b0": np.linspace(0.5, 2.0, 100)}
    participant = write_participant_report(out, "sub-01", target_intensities=target)
    group = write_group_report(out, _evaluation())
    return out, participant, group


def _image_sources(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\bsrc="([^"]+)"', html)


def test_reports_are_written_with_resolving_links(reports):
    out, participant, group = reports
    assert participant == out / "sub-01.html" and group == out / "group_report.html"
    for page, count in ((participant, 16), (group, 2)):
        html = page.read_text()
        sources = _image_sources(html)
        assert len(sources) >= count, sources
        for src in sources:
            assert not src.startswith("/") and "://" not in src
            assert (page.parent / unquote(src)).is_file(), src
        assert not re.search(r"(?i)(https?|ftp|wss?)://", html), "remote URL in report"
        assert not re.search(r'(?i)(src|href)\s*=\s*"//|@import|url\(', html), "external resource in report"
        assert "<script" not in html.lower()
    figures = sorted(p.name for p in (out / "sub-01" / "figures").iterdir())
    for name in ("sub-01_ses-ge_desc-mosaic_T1w.png", "sub-01_ses-ge_desc-difference_T2w.png",
                 "sub-01_ses-ge_desc-registration_T1w.png", "sub-01_ses-ge_desc-kde_T1w.png",
                 "sub-01_ses-ge_desc-b0mosaic_dwi.png", "sub-01_ses-ge_desc-shellmosaic_dwi.png",
                 "sub-01_ses-ge_desc-fa_dwi.png", "sub-01_ses-philips_desc-mosaic_T1w.png"):
        assert name in figures
    per_session = sum(p.stat().st_size for p in (out / "sub-01" / "figures").glob("*ses-ge_*.png"))
    assert per_session < 600_000, per_session
    assert sorted(p.name for p in (out / "group" / "figures").iterdir()) == [
        "desc-classifier_T1w.png", "desc-sitekde_T1w.png"]


def test_participant_report_content(reports):
    _, participant, _ = reports
    html = participant.read_text()
    assert "Session ge" in html and "Session philips" in html
    assert "phantom-model" in html and "sha256 0123456789ab" in html and "site siemens" in html
    # session philips: T1w and DWI not harmonized -> a sentence, no difference map, and the skip reason
    assert "This T1w image was not harmonized" in html
    assert "This DWI run was not harmonized" in html
    assert "sub-01_ses-philips_desc-difference_T1w.png" not in html
    assert "sub-01_ses-philips_desc-difference_T2w.png" in html
    assert 'class="warning"' in html and "no profile for b=2000" in html
    assert "0.410" in html and "0.390" in html  # white-matter median FA before/after


def _section(html: str, anchor: str) -> str:
    start = html.index(f'<section class="series" id="{anchor}">')
    return html[start:html.index("</section>", start)]


def test_participant_report_flags_registrations(reports):
    """The flagged T2w -> T1w registration of session ge is in a warning box at the top and in a
    FLAGGED row; the passing ones are rows with 'ok'; the DWI without the field says 'not recorded'."""
    from markupsafe import escape

    _, participant, _ = reports
    html = participant.read_text()
    reason = str(escape(FLAG_REASON))
    box = re.search(r'<div class="flagged-box" id="flagged-registrations">(.*?)</div>', html, re.S)
    assert box is not None, "no warning box for the flagged registration"
    assert box.start() < html.index('<table class="summary">') < html.index('id="ses-ge"')
    text = box.group(1)
    assert "Session ge" in text and "T2w \u2192 T1w" in text and reason in text
    assert "MNI152" not in text and "DWI \u2192" not in text and "philips" not in text  # the passing ones
    rows = re.findall(r'<tr class="(flagged|passed)"><td>([^<]*)</td>(.*?)</tr>', html, re.S)
    flagged = [(label, rest) for kind, label, rest in rows if kind == "flagged"]
    assert [label for label, _ in flagged] == ["T2w \u2192 T1w"]
    assert f'class="status-flagged">FLAGGED: {reason}</td>' in flagged[0][1]
    assert '<td class="num beyond">0.620</td>' in flagged[0][1]  # the Dice below the threshold stands out
    passed = [(label, rest) for kind, label, rest in rows if kind == "passed"]
    # T1w, T2w (template step only in ses-ge's T2w), DWI of ses-ge; T1w, T2w (two steps) of ses-philips
    assert sorted(label for label, _ in passed) == sorted(
        [f"T1w \u2192 {SPACE}"] * 5 + ["DWI \u2192 T1w", "T2w \u2192 T1w"])
    for _, rest in passed:
        assert '<td class="status-ok">ok</td>' in rest and "FLAGGED" not in rest and FLAG_REASON[:20] not in rest
    ge_t2w = _section(html, "sub01_sesge_t2w")
    assert "FLAGGED" in ge_t2w and "<td>centre of mass</td>" in ge_t2w
    assert f"Starts rejected: T2w \u2192 T1w: scanner geometry ({REJECTED})" in ge_t2w
    assert "Starts rejected" not in _section(html, "sub01_sesge_t1w")
    assert "FLAGGED" not in _section(html, "sub01_sesphilips_t2w")
    assert "<tr><th>Registrations</th><td>5 recorded, 1 flagged; not recorded for 1 image</td></tr>" in html


def test_participant_report_registration_not_recorded(reports, tmp_path):
    """A sidecar without the Registration field (an older version's output) is 'not recorded'."""
    from ihf_bids.qc.reports import write_participant_report

    _, participant, _ = reports
    html = participant.read_text()
    dwi = _section(html, "sub01_sesphilips_dwi")
    assert "Registration quality: not recorded" in dwi and "<h4>Registration</h4>" not in dwi
    assert html.count("Registration quality: not recorded") == 1
    # a session with no flagged registration has no warning box
    out = tmp_path / "out"
    shutil.copytree(reports[0] / "sub-01" / "ses-philips", out / "sub-01" / "ses-philips")
    clean = write_participant_report(out, "01").read_text()
    assert 'id="flagged-registrations"' not in clean and "FLAGGED" not in clean
    assert "<tr><th>Registrations</th><td>2 recorded, 0 flagged; not recorded for 1 image</td></tr>" in clean


def test_group_report_content(reports):
    _, _, group = reports
    html = group.read_text()
    assert "Not applicable: no participant was scanned at two or more sites" in html
    assert "Not applicable: fewer than two sites" in html and "Not applicable: DWI densities" in html
    assert "1.00e-04" in html and "3.20e-06" in html  # p-values in scientific notation
    assert "0.800" in html  # marginal R2, 3 decimals
    assert "n/a" in html and "shown" in html and "unknown_extra" not in html
    assert "Not applicable (mixed-model R\u00b2): needs traveling subjects" in html
    assert "Not applicable (method histogram-matching): no target images" in html
    assert "FA coefficient of variation" in html and html.count("FA coefficient of variation") == 1


def test_missing_pieces_do_not_fail(tmp_path):
    from ihf_bids.qc.reports import find_derivatives, write_group_report, write_participant_report

    out = _make_derivatives(tmp_path / "out", harmonize_second=True)
    for path in (out / "sub-01" / "ses-ge").rglob("*"):
        if path.is_file() and ("desc-brain_mask" in path.name or path.name.endswith(".bval")):
            path.unlink()
    (out / "sub-01" / "ses-ge" / "anat" / f"sub-01_ses-ge_space-{SPACE}_res-4_desc-preproc_T1w.json").unlink()
    items = find_derivatives(out, "01")
    expected = {(s, m) for s in ("ge", "philips") for m in ("T1w", "T2w", "dwi")}
    assert {(i.session, i.modality) for i in items} == expected
    html = write_participant_report(out, "01").read_text()
    assert "No brain mask was found" in html and "No readable .bval file" in html
    for src in _image_sources(html):
        assert (out / unquote(src)).is_file()
    # no derivatives at all, and an empty evaluation
    empty = write_participant_report(tmp_path / "empty", "02").read_text()
    assert "No template-space derivatives" in empty
    assert "No data" in write_group_report(tmp_path / "empty", {}).read_text()
    bare = write_group_report(tmp_path / "bare", {"modalities": {"T1w": {"classifier": None}}}).read_text()
    assert "No data." in bare


def _chromium_or_skip() -> str:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("no chromium binary on PATH (install Debian's chromium and chromium-driver, "
                    "listed in .ci/system-packages)")
    return browser


def test_reports_render_in_headless_chromium(reports, tmp_path):
    browser = _chromium_or_skip()
    from matplotlib.image import imread
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromium is installed but chromedriver is not (Debian package chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1280,2000", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        for page in reports[1:]:
            driver.get(page.resolve().as_uri())
            images = driver.execute_script(
                "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
            assert images, f"{page.name} has no images"
            broken = [src for src, complete, width in images if not complete or width == 0]
            assert not broken, f"{page.name}: images did not load: {broken}"
            rect = driver.execute_script(
                "const i = document.images[0]; i.scrollIntoView(); const r = i.getBoundingClientRect();"
                "return [r.left, r.top, r.width, r.height, window.devicePixelRatio];")
            shot = tmp_path / f"{page.stem}.png"
            assert driver.save_screenshot(str(shot))
            pixels = imread(shot)[..., :3].astype(float)
            grey = pixels.mean(axis=2)
            assert (grey < 0.97).mean() > 0.05, f"{page.name}: screenshot is almost blank"
            left, top, width, height, ratio = (float(v) for v in rect)
            y0, x0 = int(max(top, 0) * ratio), int(max(left, 0) * ratio)
            region = grey[y0:int((top + height) * ratio), x0:int((left + width) * ratio)]
            assert region.size > 1000 and math.isfinite(region.var()) and region.var() > 1e-3, \
                f"{page.name}: first figure not visible in the screenshot"
    finally:
        driver.quit()


def test_screenshot_html(reports, tmp_path):
    _chromium_or_skip()
    from matplotlib.image import imread

    from ihf_bids.qc.reports import screenshot_html

    png = screenshot_html(reports[2], tmp_path / "docs" / "group.png", width=1000, height=900)
    pixels = imread(png)
    assert pixels.shape[:2] == (900, 1000)
    assert (pixels[..., :3].mean(axis=2) < 0.97).mean() > 0.02
