from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ihf_bids.phantom import (
    PHANTOM_SIZES,
    TISSUES,
    generate_phantom,
    read_head_motion,
    site_protocols,
)
from ihf_bids.phantom.motion import (
    HEAD_MOTION_CENTRE_MM,
    HEAD_ROTATION_RANGE_DEG,
    HEAD_TRANSLATION_MAX_MM,
    HEAD_TRANSLATION_RANGE_MM,
    HeadMotion,
)
from ihf_bids.phantom.tissues import mprage_signal, spgr_signal, spin_echo_signal
from ihf_bids.templates import TEMPLATE_SPACE, template_grid


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _console_script(name: str) -> str | None:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


# --------------------------------------------------------------------------- #
# layout and metadata
# --------------------------------------------------------------------------- #
def test_layout(tiny_phantom):
    ds = tiny_phantom
    assert ds.sites == ("siemens", "ge", "philips")
    assert ds.subjects == ("01", "02", "03")
    assert ds.modalities == ("T1w", "T2w", "dwi")
    for sub in ds.subjects:
        for site in ds.sites:
            for modality in ds.modalities:
                image = ds.image_path(sub, site, modality)
                assert image.is_file(), image
                assert image.with_name(image.name.replace(".nii.gz", ".json")).is_file()
            stem = str(ds.image_path(sub, site, "dwi"))[: -len(".nii.gz")]
            assert Path(stem + ".bval").is_file() and Path(stem + ".bvec").is_file()
        for label in ("GM", "WM", "CSF", "brain"):
            assert ds.truth_path(sub, label).is_file()
            assert ds.truth_path(sub, label, grid="dwi").is_file()
        assert ds.truth_path(sub, "fibre", grid="dwi").is_file()
    assert sorted(p.name for p in ds.root.iterdir() if p.name.startswith("sub-")) == ["sub-01", "sub-02", "sub-03"]
    # no staging directory left behind
    assert not [p for p in ds.root.parent.iterdir() if ".partial-" in p.name]


def test_dataset_metadata(tiny_phantom):
    ds = tiny_phantom
    desc = json.loads((ds.root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "raw" and desc["License"] == "CC0"
    assert desc["GeneratedBy"][0]["Name"] == "ihf-bids-phantom" and desc["GeneratedBy"][0]["Version"]
    assert (ds.root / "README").read_text().strip()

    participants = _read_tsv(ds.root / "participants.tsv")
    assert [row["participant_id"] for row in participants] == ["sub-01", "sub-02", "sub-03"]
    columns = json.loads((ds.root / "participants.json").read_text())
    assert {"age", "sex", "site"} <= set(columns)
    for row in participants:
        assert 18 <= float(row["age"]) <= 90 and row["sex"] in ("F", "M")
        sessions = _read_tsv(ds.root / row["participant_id"] / f"{row['participant_id']}_sessions.tsv")
        assert [s["session_id"] for s in sessions] == [f"ses-{s['site']}" for s in sessions]
        assert sorted(s["site"] for s in sessions) == sorted(ds.sites)
        assert row["site"] == sessions[0]["site"]  # home site = first session
    # subjects' home sites rotate over the sites
    assert [row["site"] for row in participants] == list(ds.sites)

    sidecar = json.loads(ds.image_path("01", "siemens", "T1w").with_suffix("").with_suffix(".json").read_text())
    assert sidecar["Manufacturer"] == "Siemens" and sidecar["MagneticFieldStrength"] == 3
    assert sidecar["InversionTime"] == pytest.approx(0.9) and sidecar["RepetitionTime"] == pytest.approx(2.3)
    assert sidecar["SkullStripped"] is True
    ge = json.loads(ds.image_path("01", "ge", "T1w").with_suffix("").with_suffix(".json").read_text())
    assert ge["Manufacturer"] == "GE" and "InversionTime" not in ge and ge["RepetitionTime"] < 0.1
    dwi = json.loads(ds.image_path("01", "philips", "dwi").with_suffix("").with_suffix(".json").read_text())
    assert "PhaseEncodingDirection" not in dwi and "TotalReadoutTime" not in dwi

    truth_desc = json.loads((ds.truth_root / "dataset_description.json").read_text())
    assert truth_desc["DatasetType"] == "derivative"
    phantom = json.loads((ds.truth_root / "phantom.json").read_text())
    assert set(phantom["sites"]) == set(ds.sites)
    assert set(phantom["subjects"]) == {"sub-01", "sub-02", "sub-03"}
    for site in phantom["sites"].values():
        assert {"t1w", "t2w", "dwi", "bias_coefficients"} <= set(site)
        assert len(site["dwi"]["bvals"]) == site["dwi"]["n_volumes"]
    for sub in phantom["subjects"].values():
        assert {"age", "sex", "atrophy", "deformation_seed", "sessions"} <= set(sub)
        assert set(sub["sessions"]) == {f"ses-{s}" for s in ds.sites}


def test_nifti_headers(tiny_phantom):
    ds = tiny_phantom
    shape, affine = template_grid(PHANTOM_SIZES["tiny"])
    dwi_shape, dwi_affine = template_grid(max(2.0, PHANTOM_SIZES["tiny"]))
    for site in ds.sites:
        img = nib.load(ds.image_path("02", site, "T1w"))
        assert img.shape == shape
        motion = ds.head_motion("02", site)  # the session's head position moves the grid
        np.testing.assert_allclose(img.affine, motion @ affine, atol=1e-4)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
        assert img.header.get_xyzt_units() == ("mm", "sec")
        assert img.get_data_dtype() == np.int16
        dwi = nib.load(ds.image_path("02", site, "dwi"))
        assert dwi.shape[:3] == dwi_shape and dwi.ndim == 4
        np.testing.assert_allclose(dwi.affine, motion @ dwi_affine, atol=1e-4)
        assert dwi.header.get_zooms()[3] == pytest.approx(ds.protocols[site].dwi.repetition_time)
    truth = nib.load(ds.truth_path("02", "GM"))
    assert truth.shape == shape and truth.get_data_dtype() == np.float32
    assert TEMPLATE_SPACE in truth.get_filename()


# --------------------------------------------------------------------------- #
# BIDS validity
# --------------------------------------------------------------------------- #
def test_bids_validator(tiny_phantom):
    from ihf_bids.bids import find_validator, validate_dataset

    if find_validator() is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    report = validate_dataset(tiny_phantom.root, raise_on_error=False)
    assert report.ok, report.format_errors(5)
    assert sorted(report.summary["subjects"]) == ["01", "02", "03"]
    assert sorted(report.summary["sessions"]) == sorted(tiny_phantom.sites)


# --------------------------------------------------------------------------- #
# determinism
# --------------------------------------------------------------------------- #
def test_same_seed_same_data_different_seed_differs(tiny_phantom, tmp_path):
    # Subject 01 at site 1 does not depend on how many subjects or sites are generated.
    same = generate_phantom(tmp_path / "same", n_subjects=1, n_sites=1, seed=0)
    other = generate_phantom(tmp_path / "other", n_subjects=1, n_sites=1, seed=1)
    for modality in ("T1w", "T2w", "dwi"):
        reference = tiny_phantom.image_path("01", "siemens", modality)
        assert same.image_path("01", "siemens", modality).read_bytes() == reference.read_bytes()
        assert not np.array_equal(_data(other.image_path("01", "siemens", modality)), _data(reference))
    for label in ("GM", "WM", "CSF"):
        np.testing.assert_array_equal(_data(same.truth_path("01", label)), _data(tiny_phantom.truth_path("01", label)))
        assert not np.array_equal(_data(other.truth_path("01", label)), _data(tiny_phantom.truth_path("01", label)))
    # The head position is seeded too: same seed, same motion; another seed, another one.
    motion = tiny_phantom.head_motion("01", "siemens")
    np.testing.assert_array_equal(read_head_motion(same.root, "01", "siemens"), motion)
    assert not np.allclose(read_head_motion(other.root, "01", "siemens"), motion)


# --------------------------------------------------------------------------- #
# anatomy and site effects
# --------------------------------------------------------------------------- #
def _tissue_medians(ds, sub: str, site: str, modality: str) -> dict[str, float]:
    image = _data(ds.image_path(sub, site, modality)).astype(float)
    out = {}
    for label in ("GM", "WM", "CSF"):
        prob = _data(ds.truth_path(sub, label))
        voxels = image[(prob > 0.75) & (image > 0)]
        assert voxels.size > 20, (sub, site, modality, label)
        out[label] = float(np.median(voxels))
    return out


def test_tissue_contrast_is_physical(tiny_phantom):
    ds = tiny_phantom
    for sub in ds.subjects:
        for site in ds.sites:
            t1 = _tissue_medians(ds, sub, site, "T1w")
            assert t1["WM"] > t1["GM"] > t1["CSF"], (sub, site, t1)
            t2 = _tissue_medians(ds, sub, site, "T2w")
            assert t2["CSF"] > t2["GM"] > t2["WM"], (sub, site, t2)


def test_same_subject_same_anatomy_different_site_effects(tiny_phantom):
    ds = tiny_phantom
    masks = {sub: _data(ds.truth_path(sub, "brain")) > 0 for sub in ds.subjects}
    images = {
        (sub, site): _data(ds.image_path(sub, site, "T1w")).astype(float) for sub in ds.subjects for site in ds.sites
    }
    for sub in ds.subjects:
        for site in ds.sites:  # skull-stripped with the subject's own brain mask at every site
            np.testing.assert_array_equal(images[sub, site] > 0, masks[sub])
    # Tissue maps of different subjects differ (deformation, atrophy) but stay brain-like.
    wm = {sub: _data(ds.truth_path(sub, "WM")).ravel() for sub in ds.subjects}
    assert 0.8 < np.corrcoef(wm["01"], wm["02"])[0, 1] < 0.995

    def corr(a, b, mask):
        return float(np.corrcoef(a[mask], b[mask])[0, 1])

    common = masks["01"] & masks["02"]
    same_subject = corr(images["01", "siemens"], images["01", "philips"], common)
    other_subject = corr(images["01", "siemens"], images["02", "philips"], common)
    assert same_subject > 0.8
    assert same_subject > other_subject + 0.05
    # The sites' intensity units and contrasts differ.
    siemens, ge = _tissue_medians(ds, "01", "siemens", "T1w"), _tissue_medians(ds, "01", "ge", "T1w")
    assert ge["WM"] / siemens["WM"] > 2.0
    assert abs(ge["CSF"] / ge["WM"] - siemens["CSF"] / siemens["WM"]) > 0.05


def test_atrophy_grows_with_age(tiny_phantom):
    phantom = json.loads((tiny_phantom.truth_root / "phantom.json").read_text())
    subjects = sorted(phantom["subjects"].values(), key=lambda s: s["age"])
    assert subjects[0]["atrophy"] < subjects[-1]["atrophy"]
    ratio = [s["volumes_ml"]["CSF"] / (s["volumes_ml"]["GM"] + s["volumes_ml"]["WM"]) for s in subjects]
    assert ratio[0] < ratio[-1]


# --------------------------------------------------------------------------- #
# diffusion
# --------------------------------------------------------------------------- #
def test_gradient_files(tiny_phantom):
    ds = tiny_phantom
    n_volumes = set()
    for site in ds.sites:
        image = ds.image_path("01", site, "dwi")
        stem = str(image)[: -len(".nii.gz")]
        bvals = np.loadtxt(stem + ".bval", ndmin=1)
        bvecs = np.loadtxt(stem + ".bvec", ndmin=2)
        n = nib.load(image).shape[3]
        n_volumes.add(n)
        assert bvals.shape == (n,) and bvecs.shape == (3, n)
        weighted = bvals > 50
        np.testing.assert_allclose(np.linalg.norm(bvecs[:, weighted], axis=0), 1.0, atol=1e-5)
        np.testing.assert_allclose(bvecs[:, ~weighted], 0.0)
        assert 1 <= np.count_nonzero(~weighted) <= 3 and bvals[0] == 0
        assert np.any(np.abs(bvals - 1000) <= 20)  # every site has a b=1000 shell
        protocol = ds.protocols[site].dwi
        assert n == protocol.n_volumes
    assert len(n_volumes) == len(ds.sites)  # different tables at different sites


def test_tensor_fit_gives_plausible_fa(tiny_phantom):
    pytest.importorskip("dipy")
    from dipy.core.gradients import gradient_table
    from dipy.io.gradients import read_bvals_bvecs
    from dipy.reconst.dti import TensorModel

    ds = tiny_phantom
    prob = {label: _data(ds.truth_path("01", label, grid="dwi")) for label in ("GM", "WM", "CSF")}
    fibres = _data(ds.truth_path("01", "fibre", grid="dwi")).astype(float)
    for site in ("siemens", "ge"):
        image = ds.image_path("01", site, "dwi")
        stem = str(image)[: -len(".nii.gz")]
        bvals, bvecs = read_bvals_bvecs(stem + ".bval", stem + ".bvec")
        data = nib.load(image).get_fdata()
        mask = data[..., 0] > 0
        fit = TensorModel(gradient_table(bvals, bvecs=bvecs, b0_threshold=50)).fit(data, mask=mask)
        fa = np.nan_to_num(fit.fa)
        wm, gm, csf = ((prob[k] > t) & mask for k, t in (("WM", 0.8), ("GM", 0.7), ("CSF", 0.7)))
        assert 0.3 < float(np.median(fa[wm])) < 0.9, site
        assert float(np.median(fa[gm])) < 0.25, site
        assert float(np.median(fa[csf])) < 0.25, site
        md = np.nan_to_num(fit.md)
        assert float(np.median(md[csf])) > 2.0 * float(np.median(md[wm])), site
        # bvecs follow the FSL/BIDS convention: flip x back to compare with world-axes truth
        principal = fit.evecs[..., 0] * np.array([-1.0, 1.0, 1.0])
        agreement = np.abs((principal * fibres).sum(axis=-1))[wm]
        assert float(np.median(agreement)) > 0.9, site


# --------------------------------------------------------------------------- #
# head position (per-session rigid motion in the headers)
# --------------------------------------------------------------------------- #
def _rotation_angle_deg(matrix: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1.0) / 2.0, -1.0, 1.0))))


def test_head_motion_recorded_and_shared_by_the_session(tiny_phantom):
    ds = tiny_phantom
    phantom = json.loads((ds.truth_root / "phantom.json").read_text())
    assert "head_motion" in phantom["conventions"]
    anat_shape, anat_grid = template_grid(ds.anat_voxel_size)
    dwi_shape, dwi_grid = template_grid(ds.dwi_voxel_size)
    matrices = {}
    for sub in ds.subjects:
        for site in ds.sites:
            record = phantom["subjects"][f"sub-{sub}"]["sessions"][f"ses-{site}"]["head_motion"]
            assert set(record) == {"world_to_scanner", "rotation_deg", "rotation_axis", "translation_mm", "centre_mm"}
            m = np.asarray(record["world_to_scanner"])
            assert m.shape == (4, 4)
            np.testing.assert_array_equal(m, ds.head_motion(sub, site))
            np.testing.assert_array_equal(m, read_head_motion(ds.root, sub, site))
            np.testing.assert_array_equal(m, read_head_motion(ds.root, f"sub-{sub}", f"ses-{site}"))
            # rigid, proper, and what the parameters say: R (x - c) + c + t
            np.testing.assert_array_equal(m[3], [0.0, 0.0, 0.0, 1.0])
            np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
            assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0)
            rebuilt = HeadMotion(record["rotation_deg"], tuple(record["rotation_axis"]),
                                 tuple(record["translation_mm"]), tuple(record["centre_mm"])).matrix  # fmt: skip
            np.testing.assert_allclose(m, rebuilt, atol=1e-12)
            centre = np.array([*record["centre_mm"], 1.0])
            np.testing.assert_allclose((m @ centre)[:3] - centre[:3], record["translation_mm"], atol=1e-9)
            np.testing.assert_allclose(m[:3, :3] @ record["rotation_axis"], record["rotation_axis"], atol=1e-12)
            # the documented ranges
            assert record["centre_mm"] == list(HEAD_MOTION_CENTRE_MM) == [0.0, -18.0, 18.0]
            assert HEAD_ROTATION_RANGE_DEG[0] <= record["rotation_deg"] <= HEAD_ROTATION_RANGE_DEG[1] == 6.0
            assert _rotation_angle_deg(m) == pytest.approx(record["rotation_deg"], abs=1e-6)
            assert np.linalg.norm(record["rotation_axis"]) == pytest.approx(1.0)
            assert np.all(np.abs(record["translation_mm"]) <= HEAD_TRANSLATION_RANGE_MM)
            assert np.linalg.norm(record["translation_mm"]) <= HEAD_TRANSLATION_MAX_MM + 1e-9
            # every image of the session: its own grid, moved by the session's one M
            for modality in ds.modalities:
                img = nib.load(ds.image_path(sub, site, modality))
                shape, grid = (dwi_shape, dwi_grid) if modality == "dwi" else (anat_shape, anat_grid)
                assert img.shape[:3] == shape
                np.testing.assert_allclose(img.affine, m @ grid, atol=1e-4)
            matrices[sub, site] = m
    # every session has its own head position (also each of one subject's sessions)
    keys = list(matrices)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not np.allclose(matrices[a], matrices[b], atol=1e-3), (a, b)


def test_head_motion_changes_the_headers_only(tiny_phantom, tmp_path):
    """Without motion: template grid and identity; with it: the same voxels, bvecs and truth."""
    moving = tiny_phantom
    still = generate_phantom(tmp_path / "still", n_subjects=1, n_sites=2, seed=0, head_motion=False)
    assert still.with_head_motion is False and moving.with_head_motion is True
    phantom = json.loads((still.truth_root / "phantom.json").read_text())
    assert "head_motion" not in phantom["conventions"]
    assert "aligned to the MNI152NLin2009aSym template grid" in (still.root / "README").read_text()
    assert "aligned to the MNI152NLin2009aSym template grid" not in (moving.root / "README").read_text()
    for site in still.sites:
        assert "head_motion" not in phantom["subjects"]["sub-01"]["sessions"][f"ses-{site}"]
        np.testing.assert_array_equal(still.head_motion("01", site), np.eye(4))
        np.testing.assert_array_equal(read_head_motion(still.root, "01", site), np.eye(4))
        assert not np.allclose(moving.head_motion("01", site), np.eye(4))
        for modality in still.modalities:
            fixed = nib.load(still.image_path("01", site, modality))
            moved = nib.load(moving.image_path("01", site, modality))
            _, grid = template_grid(still.dwi_voxel_size if modality == "dwi" else still.anat_voxel_size)
            np.testing.assert_array_equal(fixed.affine, grid)
            np.testing.assert_array_equal(fixed.header.get_qform(), grid)
            assert fixed.get_data_dtype() == moved.get_data_dtype()
            np.testing.assert_array_equal(np.asanyarray(fixed.dataobj), np.asanyarray(moved.dataobj))
            np.testing.assert_allclose(moved.affine, moving.head_motion("01", site) @ fixed.affine, atol=1e-4)
        # gradients relative to the head, hence to the voxel axes, do not change
        stem = str(still.image_path("01", site, "dwi"))[: -len(".nii.gz")]
        moved_stem = str(moving.image_path("01", site, "dwi"))[: -len(".nii.gz")]
        for ext in (".bvec", ".bval"):
            assert Path(stem + ext).read_bytes() == Path(moved_stem + ext).read_bytes()
    for label, grid in (("GM", "anat"), ("brain", "anat"), ("WM", "dwi"), ("fibre", "dwi")):
        truth = still.truth_path("01", label, grid=grid)
        assert truth.read_bytes() == moving.truth_path("01", label, grid=grid).read_bytes()


def test_qform_and_sform_agree_on_oblique_images(tiny_phantom):
    import itertools

    ds = tiny_phantom
    for sub in ds.subjects:
        for site in ds.sites:
            for modality in ds.modalities:
                header = nib.load(ds.image_path(sub, site, modality)).header
                qform, qcode = header.get_qform(coded=True)
                sform, scode = header.get_sform(coded=True)
                assert (int(qcode), int(scode)) == (1, 2)
                assert not np.allclose(sform[:3, :3], np.diag(np.diag(sform[:3, :3])))  # oblique
                ends = [(0, n - 1) for n in header.get_data_shape()[:3]]
                corners = np.array([[*c, 1.0] for c in itertools.product(*ends)])
                apart_mm = np.linalg.norm((corners @ (qform - sform).T)[:, :3], axis=1).max()
                voxel = float(header.get_zooms()[0])
                assert apart_mm < 1e-3 * voxel, (sub, site, modality, apart_mm)


def test_read_head_motion_errors(tiny_phantom, tmp_path):
    with pytest.raises(KeyError, match="sub-09"):
        read_head_motion(tiny_phantom.root, "09", "ge")
    with pytest.raises(KeyError, match="ses-nowhere"):
        read_head_motion(tiny_phantom.root, "01", "nowhere")
    with pytest.raises(FileNotFoundError):
        read_head_motion(tmp_path, "01", "ge")
    with pytest.raises(ValueError, match="unknown site"):
        tiny_phantom.head_motion("01", "nowhere")
    with pytest.raises(ValueError, match="unknown subject"):
        tiny_phantom.head_motion("09", "ge")


# --------------------------------------------------------------------------- #
# sites, signal equations and API checks
# --------------------------------------------------------------------------- #
def test_site_protocols_are_stable_and_extendable():
    five = site_protocols(5)
    assert [s.label for s in five] == ["siemens", "ge", "philips", "siemens2", "ge2"]
    assert five[:3] == site_protocols(3)
    assert site_protocols(5) == five
    for site in five:
        assert any(abs(b - 1000) < 1e-6 for b in site.dwi.shells)
        assert 1 <= site.dwi.n_b0 <= 3
    derived = five[3]
    assert derived.manufacturer == "Siemens" and derived.t1w != five[0].t1w


def test_signal_equations():
    wm, gm, csf = TISSUES["WM"], TISSUES["GM"], TISSUES["CSF"]
    assert 0.5 < wm.fractional_anisotropy < 0.8 and gm.fractional_anisotropy == 0.0
    # SPGR at the Ernst angle beats neighbouring flip angles.
    tr = 0.02
    ernst = np.degrees(np.arccos(np.exp(-tr / wm.t1)))
    signals = [float(spgr_signal(1.0, wm.t1, 1.0, repetition_time=tr, echo_time=0.0, flip_angle=a))
               for a in (ernst - 3, ernst, ernst + 3)]  # fmt: skip
    assert signals[1] > signals[0] and signals[1] > signals[2]
    # MPRAGE: CSF is nulled-to-negative at TI 0.9 s; T1 ordering of WM > GM.
    kw = dict(repetition_time=2.3, inversion_time=0.9, echo_spacing=0.0071, readout_pulses=176,
              flip_angle=9.0, echo_time=0.003)  # fmt: skip
    s = {t.name: float(mprage_signal(t.pd, t.t1, t.t2star, **kw)) for t in (wm, gm, csf)}
    assert s["WM"] > s["GM"] > abs(s["CSF"])
    with pytest.raises(ValueError):
        mprage_signal(1.0, 1.0, 0.05, **{**kw, "inversion_time": 0.3})
    # Spin echo: long TR and TE give T2 weighting.
    t2w = {t.name: float(spin_echo_signal(t.pd, t.t1, t.t2, repetition_time=5.0, echo_time=0.1)) for t in (wm, gm, csf)}
    assert t2w["CSF"] > t2w["GM"] > t2w["WM"]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_phantom(tmp_path / "a", size="huge")
    with pytest.raises(ValueError):
        generate_phantom(tmp_path / "b", n_subjects=0)
    with pytest.raises(ValueError):
        generate_phantom(tmp_path / "c", modalities=("FLAIR",))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_phantom(occupied, n_subjects=1, n_sites=1)
    assert (occupied / "keep.txt").read_text() == "x"


def test_modalities_subset_and_overwrite(tmp_path):
    root = tmp_path / "anat_only"
    ds = generate_phantom(root, n_subjects=1, n_sites=2, modalities=("T1w",))
    assert ds.modalities == ("T1w",)
    assert ds.image_path("01", "ge", "T1w").is_file()
    assert not ds.image_path("01", "ge", "T2w").exists() and not ds.image_path("01", "ge", "dwi").exists()
    again = generate_phantom(root, n_subjects=2, n_sites=1, modalities=("T2w",), overwrite=True)
    assert again.image_path("02", "siemens", "T2w").is_file()
    assert not (root / "sub-01" / "ses-ge").exists()


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def phantom_cli():
    exe = _console_script("ihf-bids-phantom")
    if exe is None:
        pytest.skip("the ihf-bids-phantom console script is not installed (pip install -e .)")
    return exe


def test_cli_help(phantom_cli):
    run = subprocess.run([phantom_cli, "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    assert "OUTPUT_DIR" in run.stdout and "--subjects" in run.stdout and "--overwrite" in run.stdout
    assert "--no-head-motion" in run.stdout


def test_cli_generates_and_refuses_non_empty_dir(phantom_cli, tmp_path):
    out = tmp_path / "cli_phantom"
    args = [phantom_cli, str(out), "--subjects", "1", "--sites", "2", "--size", "tiny", "--seed", "3"]
    args += ["--modalities", "T1w"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (out / "sub-01" / "ses-ge" / "anat" / "sub-01_ses-ge_T1w.nii.gz").is_file()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "not empty" in run.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    t1w = out / "sub-01" / "ses-ge" / "anat" / "sub-01_ses-ge_T1w.nii.gz"
    assert not np.allclose(nib.load(t1w).affine, template_grid(4.0)[1], atol=1e-3)  # head motion by default
    run = subprocess.run([*args, "--overwrite", "--no-head-motion"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(nib.load(t1w).affine, template_grid(4.0)[1])
    np.testing.assert_array_equal(read_head_motion(out, "01", "ge"), np.eye(4))


def test_cli_usage_errors(phantom_cli, tmp_path):
    for bad in (["--subjects", "0"], ["--size", "huge"], ["--seed", "x"], []):
        target = [str(tmp_path / "x")] if bad else []
        run = subprocess.run([phantom_cli, *target, *bad], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, bad
