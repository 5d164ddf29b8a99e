"""Registration you can trust: schedules in mm, scanner-geometry starts, bounds, fallbacks and flags.

Unit tests on a 4 mm phantom (seconds), then one run of the app on a session whose T2w header
is flipped left-right and whose DWI header puts the head 40 mm away from the T1w's: the flip is
flagged in the sidecar and the report, the DWI is refused with a message naming it (exit 1).
"""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest

from ihf_bids.imageio import nifti_image, save_image
from ihf_bids.preproc.registration import (
    WITHIN_SESSION_BOUNDS,
    MotionBounds,
    RegistrationError,
    linear_transform_summary,
    register_images,
)


def _rigid(degrees: float, axis, shift) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    out[:3, 3] = shift
    return out


def _flip_header_lr(img) -> np.ndarray:
    """The affine of the same voxels mirrored left-right in the world (a header flip)."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, img.shape[0] - 1
    return img.affine @ flip


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One 4 mm session (T1w, T2w) with a head position of its own, as the scanner wrote it."""
    from ihf_bids.phantom import generate_phantom

    root = tmp_path_factory.mktemp("reg") / "bids"
    ds = generate_phantom(root, n_subjects=1, n_sites=1, size="tiny", seed=2, modalities=("T1w", "T2w"))
    sub, site = ds.subjects[0], ds.sites[0]
    return ds, ds.image_path(sub, site, "T1w"), ds.image_path(sub, site, "T2w")


def test_linear_transform_summary_reads_a_known_transform(tmp_path):
    import ants

    matrix = _rigid(10.0, (0, 0, 1), (3.0, -4.0, 0.0))
    # ITK works in LPS: the same transform with x and y negated.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix @ np.diag([-1.0, -1.0, 1.0, 1.0])
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=lps[:3, :3], translation=lps[:3, 3])
    path = str(tmp_path / "t.mat")
    ants.write_transform(tx, path)
    displacement, rotation, read = linear_transform_summary(path, np.zeros((1, 3)))
    np.testing.assert_allclose(read, matrix, atol=1e-5)
    assert rotation == pytest.approx(10.0, abs=1e-3)
    assert displacement == pytest.approx(5.0, abs=1e-4)  # the origin moves by the translation


def test_within_session_registration_starts_from_the_scanner_geometry(session, tmp_path):
    """T2w -> T1w of one session: the headers already align them; the result stays at identity."""
    _, t1w, t2w = session
    reg = register_images(t2w, t1w, tmp_path / "r_", mode="rigid", start="scanner geometry",
                          bounds=WITHIN_SESSION_BOUNDS)
    q = reg.quality
    assert q.start == "scanner geometry" and len(q.tried) == 1
    assert q.displacement_mm < 0.5 and q.rotation_deg < 0.5  # measured about 0.1 mm
    assert not q.flags and q.mask_dice > 0.95
    assert q.mirror_mutual_information < q.mutual_information


def test_implausible_motion_is_refused_after_every_start(session, tmp_path):
    """A header that puts the T2w 35 mm off: no start is plausible; the error names the image and the starts."""
    _, t1w, t2w = session
    img = nib.load(t2w)
    moved = save_image(np.asarray(img.dataobj), _rigid(0.0, (0, 0, 1), (35.0, 0.0, 0.0)) @ img.affine,
                       tmp_path / "far_T2w.nii.gz")
    with pytest.raises(RegistrationError) as error:
        register_images(moved, t1w, tmp_path / "r_", mode="rigid", start="scanner geometry",
                        bounds=WITHIN_SESSION_BOUNDS)
    message = str(error.value)
    assert str(moved) in message and "no start gave a plausible result" in message
    for start in ("scanner geometry", "centre of mass", "rotation search"):
        assert f"from the {start}" in message
    # Bounds are what refuse it: without them the same registration goes through.
    assert register_images(moved, t1w, tmp_path / "free_", mode="rigid", start="scanner geometry").quality


def test_a_start_beyond_the_bounds_falls_back_and_is_recorded(session, tmp_path):
    """Tight bounds make the first result implausible: the next starts are tried and recorded."""
    _, t1w, t2w = session
    img = nib.load(t2w)
    moved = save_image(np.asarray(img.dataobj), _rigid(3.0, (1, 0, 0), (4.0, 0.0, 0.0)) @ img.affine,
                       tmp_path / "moved_T2w.nii.gz")
    with pytest.raises(RegistrationError):
        register_images(moved, t1w, tmp_path / "tight_", mode="rigid", start="scanner geometry",
                        bounds=MotionBounds(displacement_mm=1.0, rotation_deg=15.0))
    reg = register_images(moved, t1w, tmp_path / "ok_", mode="rigid", start="scanner geometry",
                          bounds=WITHIN_SESSION_BOUNDS)
    assert 3.0 < reg.quality.displacement_mm < 6.0 and abs(reg.quality.rotation_deg - 3.0) < 0.5


def test_left_right_flip_is_flagged(session, tmp_path):
    _, t1w, t2w = session
    img = nib.load(t2w)
    flipped = save_image(np.asarray(img.dataobj), _flip_header_lr(img), tmp_path / "flipped_T2w.nii.gz")
    q = register_images(flipped, t1w, tmp_path / "f_", mode="rigid", start="scanner geometry",
                        bounds=WITHIN_SESSION_BOUNDS).quality
    assert any("flipped left-right" in flag for flag in q.flags), q
    assert q.to_sidecar()["Flagged"] is True


def test_app_flags_a_flip_and_refuses_a_displaced_dwi(tmp_path, caplog):
    """Through the app: the flipped T2w is written, flagged in its sidecar; the displaced DWI fails, named."""
    from ihf_bids.cli.run import main
    from ihf_bids.phantom import generate_phantom

    ds = generate_phantom(tmp_path / "bids", n_subjects=1, n_sites=1, size="tiny", seed=3)
    sub, site = ds.subjects[0], ds.sites[0]
    t2w, dwi = ds.image_path(sub, site, "T2w"), ds.image_path(sub, site, "dwi")
    img = nib.load(t2w)
    nib.save(nifti_image(np.asarray(img.dataobj), _flip_header_lr(img)), t2w)
    img = nib.load(dwi)
    nib.save(nifti_image(np.asarray(img.dataobj), _rigid(0.0, (0, 0, 1), (0.0, 40.0, 0.0)) @ img.affine), dwi)

    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main([str(ds.root), str(out), "participant", "-w", str(tmp_path / "work"), "--anat-resolution", "4",
                     "--dwi-resolution", "4", "--nprocs", "2", "--omp-nthreads", "1", "--skip-bids-validation"])
    assert code == 1
    assert str(dwi) in caplog.text and "no start gave a plausible result" in caplog.text
    sidecar = next(out.glob(f"sub-{sub}/ses-{site}/anat/*_desc-preproc_T2w.json"))
    step = json.loads(sidecar.read_text())["Registration"]["T2wToT1w"]
    assert step["Flagged"] is True and any("flipped left-right" in f for f in step["Flags"])
    assert not list(out.glob(f"sub-{sub}/ses-{site}/dwi/*_desc-preproc_dwi.nii.gz"))
