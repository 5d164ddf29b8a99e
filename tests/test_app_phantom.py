"""End to end on a tiny traveling phantom: participant, group --train, participant --target-site, group.

Two subjects scanned at two sites (T1w, T2w, DWI), 4 mm grids so that the whole cohort
workflow runs in a few minutes on two cores. The output tree is compared with an expected
list and validated with bids-validator-deno.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ihf_bids import __version__
from ihf_bids.cli.run import main

SPACE = "space-MNI152NLin2009aSym"
COMMON = ["--anat-resolution", "4", "--dwi-resolution", "4", "--nprocs", "2", "--omp-nthreads", "1"]


def expected_files(subjects, sites, *, harmonized: bool) -> set[str]:
    """The derivative files of a run on the phantom (one T1w, T2w and DWI run per session)."""
    files = {"dataset_description.json", ".bidsignore", "logs/CITATION.md"}
    for sub in subjects:
        for site in sites:
            pre = f"sub-{sub}/ses-{site}"
            stem = f"sub-{sub}_ses-{site}"
            descs = ["preproc", "harmonized"] if harmonized else ["preproc"]
            for desc in descs:
                for mod in ("T1w", "T2w"):
                    files |= {f"{pre}/anat/{stem}_{SPACE}_res-4_desc-{desc}_{mod}.{e}" for e in ("nii.gz", "json")}
                files |= {f"{pre}/dwi/{stem}_{SPACE}_res-4_desc-{desc}_dwi.{e}" for e in ("nii.gz", "json", "bval", "bvec")}
                files |= {f"{pre}/dwi/{stem}_{SPACE}_res-4_model-tensor_param-fa_desc-{desc}_dwimap.{e}"
                          for e in ("nii.gz", "json")}
            files |= {f"{pre}/anat/{stem}_{SPACE}_res-4_desc-brain_mask.{e}" for e in ("nii.gz", "json")}
            files |= {f"{pre}/dwi/{stem}_{SPACE}_res-4_desc-brain_mask.{e}" for e in ("nii.gz", "json")}
            files.add(f"{pre}/anat/{stem}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat")
            files.add(f"{pre}/anat/{stem}_from-T2w_to-T1w_mode-image_desc-coreg_xfm.mat")
            files.add(f"{pre}/dwi/{stem}_from-dwiref_to-T1w_mode-image_desc-coreg_xfm.mat")
    return files


def tree(root: Path) -> set[str]:
    """Derivative files under ``root`` (logs/config-*, models/, group outputs and reports listed apart)."""
    out = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if (path.is_file() and not rel.startswith(("models/", "logs/config-", "group_", "group/"))
                and not rel.endswith(".html") and "/figures/" not in rel):
            out.add(rel)
    return out


def snapshot(root) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Run the four steps of the cohort workflow once; return the paths."""
    from ihf_bids.phantom import generate_phantom

    base = tmp_path_factory.mktemp("app")
    dataset = generate_phantom(base / "bids", n_subjects=2, n_sites=2, size="tiny", seed=1)
    out, work = base / "out", base / "work"
    steps = {"bids_before": snapshot(dataset.root)}
    steps["participant"] = main([str(dataset.root), str(out), "participant", "-w", str(work), *COMMON])
    steps["preproc_tree"] = tree(out)
    steps["group_train"] = main([str(dataset.root), str(out), "group", "--train", "--train-steps", "6",
                                 "-w", str(work), "--nprocs", "1"])
    steps["harmonize"] = main([str(dataset.root), str(out), "participant", "--target-site", "siemens",
                               "-w", str(work), *COMMON])
    steps["group"] = main([str(dataset.root), str(out), "group", "-w", str(work)])
    steps["bids_after"] = snapshot(dataset.root)
    return dataset, out, work, steps


def test_cohort_steps_succeed(cohort):
    _, _, _, steps = cohort
    assert [steps[k] for k in ("participant", "group_train", "harmonize", "group")] == [0, 0, 0, 0]


def test_preprocessing_only_tree(cohort):
    dataset, _, _, steps = cohort
    assert steps["preproc_tree"] == expected_files(dataset.subjects, dataset.sites, harmonized=False)


def test_harmonized_tree_and_model(cohort):
    dataset, out, _, _ = cohort
    assert tree(out) == expected_files(dataset.subjects, dataset.sites, harmonized=True)
    model = out / "models" / "ihf-harmony"
    for group in ("anat", "dwi"):
        assert (model / group / "model.pt").is_file()
        meta = json.loads((model / group / "model.json").read_text())
        assert len(meta["sha256"]) == 64
        profiles = {p.name for p in (model / group / "profiles").glob("*.npz")}
        mods = ("T1w", "T2w") if group == "anat" else ("dwi-b0", "dwi-b1000")
        assert {f"site-{s}_modality-{m}_profile.npz" for s in dataset.sites for m in mods} <= profiles
    assert {p.name for p in out.glob("group_*.tsv")} == {"group_T1w.tsv", "group_T2w.tsv", "group_dwi.tsv"}


def test_sidecars_record_provenance(cohort):
    dataset, out, _, _ = cohort
    sub, site = dataset.subjects[0], dataset.sites[1]
    stem = out / f"sub-{sub}/ses-{site}/anat/sub-{sub}_ses-{site}_{SPACE}_res-4_desc-harmonized_T1w"
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["Sources"] == [f"bids:raw:sub-{sub}/ses-{site}/anat/sub-{sub}_ses-{site}_T1w.nii.gz"]
    assert meta["SkullStripped"] is True
    assert meta["HarmonizationTarget"]["Site"] == "siemens"
    assert meta["HarmonizationModel"]["Name"] == "ihf-harmony"
    assert len(meta["HarmonizationModel"]["Sha256"]) == 64
    assert meta["HarmonizationModel"]["Version"] == __version__  # the version that trained it
    assert meta["Device"] == "cpu"
    assert meta["Site"] == site
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "ihf-bids"


def test_outputs_are_sane_images(cohort):
    dataset, out, _, _ = cohort
    sub, site = dataset.subjects[0], dataset.sites[1]
    folder = out / f"sub-{sub}/ses-{site}"
    stem = f"sub-{sub}_ses-{site}_{SPACE}_res-4"
    t1 = nib.load(folder / "anat" / f"{stem}_desc-preproc_T1w.nii.gz")
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
    mask = np.asarray(nib.load(folder / "anat" / f"{stem}_desc-brain_mask.nii.gz").dataobj) > 0
    assert 0.8e6 < mask.sum() * 64 < 2.2e6  # brain volume in mm^3 (4 mm voxels)
    dwi = nib.load(folder / "dwi" / f"{stem}_desc-harmonized_dwi.nii.gz")
    bvals = np.loadtxt(folder / "dwi" / f"{stem}_desc-harmonized_dwi.bval")
    assert dwi.shape[3] == bvals.size
    fa = json.loads((folder / "dwi" / f"{stem}_model-tensor_param-fa_desc-harmonized_dwimap.json").read_text())
    assert 0.25 < fa["WhiteMatterMedianFA"] < 0.9


def test_same_brain_lands_in_the_same_place(cohort):
    """Every session has its own head position; every image of a subject lands within a voxel of the others.

    For each pair of a subject's images (T1w, T2w, DWI at both sites) the anatomical points the
    two put at the same template voxel, from the written transforms and the phantom's known head
    positions, are on average less than one voxel (4 mm) apart over the template's brain
    (measured 0.3-0.5 mm; the code before the millimetre schedules and scanner-geometry starts
    put T2w and DWI sessions up to 39 mm off: docs/benchmark-registration.md).
    """
    from ihf_bids.phantom import read_head_motion
    from ihf_bids.phantom.alignment import misalignment_table, placements_from_derivatives

    dataset, out, _, _ = cohort
    motions = [read_head_motion(dataset.root, s, site) for s in dataset.subjects for site in dataset.sites]
    assert all(np.abs(m - np.eye(4)).max() > 0.01 for m in motions)  # registration has work to do
    found = [p for s in dataset.subjects for p in placements_from_derivatives(
        out, dataset.root, s, dataset.sites, anat_voxel_size=4.0, dwi_voxel_size=4.0)]
    rows = misalignment_table(found, dataset.root, voxel_size=4.0)
    assert len(rows) == 2 * 15  # 6 images per subject
    bad = [r for r in rows if not (r["mean_mm"] < r["voxel_mm"] and r["coverage"] > 0.95)]
    assert not bad, bad


def test_registration_quality_in_sidecars(cohort):
    """Every preprocessed image's sidecar says how each registration that placed it went."""
    from ihf_bids.preproc.registration import WITHIN_SESSION_BOUNDS

    dataset, out, _, _ = cohort
    steps = {"T1w": {f"T1wTo{SPACE[6:]}"}, "T2w": {f"T1wTo{SPACE[6:]}", "T2wToT1w"},
             "dwi": {f"T1wTo{SPACE[6:]}", "DwiToT1w"}}
    for sub in dataset.subjects:
        for site in dataset.sites:
            for modality, folder in (("T1w", "anat"), ("T2w", "anat"), ("dwi", "dwi")):
                path = out / f"sub-{sub}/ses-{site}/{folder}/sub-{sub}_ses-{site}_{SPACE}_res-4_desc-preproc_{modality}.json"
                record = json.loads(path.read_text())["Registration"]
                assert set(record) == steps[modality], path.name
                assert not any(step["Flagged"] for step in record.values()), (path.name, record)
                template = record[f"T1wTo{SPACE[6:]}"]
                assert template["MaskDice"] > 0.9 and template["Correlation"] > 0.5  # measured 0.75-0.87
                for name, step in record.items():
                    if name.startswith(("T2w", "Dwi")):
                        assert step["Start"] == "scanner geometry"
                        assert step["DisplacementMm"] < 2.0 < WITHIN_SESSION_BOUNDS.displacement_mm
                        assert step["MirrorMutualInformation"] < step["MutualInformation"]


def test_nothing_written_inside_bids_dir(cohort):
    _, _, _, steps = cohort
    assert steps["bids_after"] == steps["bids_before"]


def test_rerun_reuses_work(cohort, caplog):
    """Re-running the harmonization with the same work dir does no work again."""
    dataset, out, work, _ = cohort
    before = {p: p.stat().st_mtime_ns for p in (work / "ihf_bids_wf").rglob("result_*.pklz")}
    assert main([str(dataset.root), str(out), "participant", "--target-site", "siemens", "-w", str(work),
                 "--skip-bids-validation", *COMMON]) == 0
    after = {p: p.stat().st_mtime_ns for p in (work / "ihf_bids_wf").rglob("result_*.pklz")}
    compute = [p for p in before if "ds_" not in str(p) and after.get(p) != before[p]]
    assert compute == []


def test_missing_model_names_the_command(tmp_path, cohort, caplog):
    dataset, _, _, _ = cohort
    code = main([str(dataset.root), str(tmp_path / "empty_out"), "participant", "--target-site", "siemens",
                 "-w", str(tmp_path / "w"), "--skip-bids-validation", *COMMON])
    assert code == 70
    assert "group --train" in caplog.text


def test_unknown_target_site(tmp_path, cohort, caplog):
    dataset, out, _, _ = cohort
    code = main([str(dataset.root), str(out), "participant", "--target-site", "nowhere",
                 "-w", str(tmp_path / "w"), "--skip-bids-validation", *COMMON])
    assert code == 70
    assert "nowhere" in caplog.text and "siemens" in caplog.text


def test_native_space_outputs(cohort):
    """--native-outputs: harmonized T1w/T2w back on the T1w's native grid (harmonization reused)."""
    dataset, out, work, _ = cohort
    sub, site = dataset.subjects[1], dataset.sites[1]
    assert main([str(dataset.root), str(out), "participant", "--target-site", "siemens", "--native-outputs",
                 "--participant-label", sub, "--session-label", site, "-w", str(work), "--skip-bids-validation",
                 *COMMON]) == 0
    folder = out / f"sub-{sub}/ses-{site}/anat"
    raw = nib.load(dataset.image_path(sub, site, "T1w"))
    t1w = nib.load(folder / f"sub-{sub}_ses-{site}_desc-harmonized_T1w.nii.gz")
    t2w = nib.load(folder / f"sub-{sub}_ses-{site}_space-T1w_desc-harmonized_T2w.nii.gz")
    assert t1w.shape == t2w.shape == raw.shape
    assert np.allclose(t1w.affine, raw.affine, atol=1e-3)
    brain = np.asarray(raw.dataobj) > 0
    assert np.corrcoef(np.asarray(t1w.dataobj)[brain], np.asarray(raw.dataobj)[brain])[0, 1] > 0.8


def test_single_reference_image_as_target(cohort, tmp_path):
    """--target-reference: T1w harmonized to one preprocessed image (a profile of one), preprocessing reused."""
    dataset, out, work, _ = cohort
    sub, site = dataset.subjects[0], dataset.sites[1]
    reference = next(out.glob(f"sub-{dataset.subjects[1]}/ses-siemens/anat/*_desc-preproc_T1w.nii.gz"))
    ref_out = tmp_path / "ref_out"
    assert main([str(dataset.root), str(ref_out), "participant", "--target-reference", str(reference),
                 "--model", str(out / "models" / "ihf-harmony"), "--modalities", "T1w", "--participant-label", sub,
                 "--session-label", site, "-w", str(work), "--skip-bids-validation", *COMMON]) == 0
    harmonized = next(ref_out.glob(f"sub-{sub}/ses-{site}/anat/*_desc-harmonized_T1w.nii.gz"))
    meta = json.loads(Path(str(harmonized).replace(".nii.gz", ".json")).read_text())
    assert meta["HarmonizationTarget"]["Reference"] == str(reference)
    assert meta["SiteShiftFrom"] == "the image's own statistics"
    assert np.isfinite(np.asarray(nib.load(harmonized).dataobj)).all()


def test_output_tree_validates(cohort):
    """Last: the tree with every output of the tests above (native-space ones too) validates."""
    from ihf_bids.bids.validation import validate_dataset

    _, out, _, _ = cohort
    report = validate_dataset(out, derivative=True)
    assert report.ok, report.format_errors()


def test_participant_reports(cohort):
    """sub-<label>.html for every participant, with its figures and no remote resources."""
    import re

    _, out, _, _ = cohort
    for sub in ("01", "02"):
        html = (out / f"sub-{sub}.html").read_text()
        figures = re.findall(r'src="([^"]+)"', html)
        assert figures and all((out / f).is_file() for f in figures)
        assert all(f.startswith(f"sub-{sub}/figures/") for f in figures)
        assert "http://" not in html and "https://" not in html
        assert any("desc-fa" in f for f in figures) and any("desc-kde" in f for f in figures)


def test_group_report_compares_methods(cohort):
    """Two traveling subjects at two sites: every section is computed for every method."""
    import re

    _, out, _, _ = cohort
    qc = json.loads((out / "group_qc.json").read_text())
    assert qc["target_site"] == "siemens"
    for modality in ("T1w", "T2w", "dwi"):
        section = qc["modalities"][modality]
        assert section["methods"] == ["unharmonized", "ihf-harmony", "histogram-matching", "combat"]
        assert {r["method"] for r in section["classifier"]} == set(section["methods"])
        assert {r["method"] for r in section["traveling"]} == {"unharmonized", "ihf-harmony", "histogram-matching"}
        assert all(r["marginal_r2"] is not None for r in section["site_effect"])
        assert {r["covariate"] for r in section["covariates"]} == {"age"}
    assert {r["method"] for r in qc["modalities"]["dwi"]["fa_cov"]} == set(qc["methods"])
    header = (out / "group_T1w.tsv").read_text().splitlines()[0].split("\t")
    assert "qc_wm_mean" in header
    html = (out / "group_report.html").read_text()
    figures = re.findall(r'src="([^"]+)"', html)
    assert figures and all((out / f).is_file() for f in figures)


def test_model_keeps_each_sites_intensity_reference(cohort):
    """group --train writes the target-site distributions the participant reports draw."""
    from ihf_bids.harmonize.model_dir import ModelDirectory

    _, out, _, _ = cohort
    references = ModelDirectory(out / "models" / "ihf-harmony").intensity_references("siemens")
    assert {"T1w", "T2w", "dwi-b0"} <= set(references)
    assert all(np.all(np.diff(q) >= 0) and q.size == 256 for q in references.values())
