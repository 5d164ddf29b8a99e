"""Diffusion preprocessing steps: gradients, reference, mask, b-vector rotation, tensor fit."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from ihf_bids.errors import InputDataError
from ihf_bids.preproc.dwi import (
    dwi_brain_mask,
    dwi_reference,
    load_dwi,
    read_gradients,
    resample_dwi,
    rotate_bvec_file,
    rotate_bvecs,
)
from ihf_bids.preproc.tensor import fit_tensor

nib = pytest.importorskip("nibabel")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _save(data, affine, path):
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _rotation(axis, degrees):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _sphere_directions(n):
    """Roughly uniform unit vectors (Fibonacci half-sphere)."""
    i = np.arange(n) + 0.5
    z = 1 - i / n
    phi = np.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _world_to_fsl(vectors, affine):
    """World (RAS) unit vectors -> FSL b-vectors of an image with this affine."""
    u, _, vt = np.linalg.svd(affine[:3, :3])
    voxel = vectors @ (u @ vt)
    return voxel * ([-1.0, 1.0, 1.0] if np.linalg.det(affine[:3, :3]) > 0 else 1.0)


def _fsl_to_world(vectors, affine):
    u, _, vt = np.linalg.svd(affine[:3, :3])
    voxel = vectors * ([-1.0, 1.0, 1.0] if np.linalg.det(affine[:3, :3]) > 0 else 1.0)
    return voxel @ (u @ vt).T


def _grid_affine(rotation, voxel, shape, centre):
    """Affine with columns ``rotation * voxel`` whose grid centre lies at ``centre`` (RAS)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(rotation) * voxel
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def _synthetic_dwi(tmp_path, affine, fibre_ras, shape=(14, 14, 14), name="dwi"):
    """Single-tensor DWI (FA ~0.8, fibre along ``fibre_ras``) in a ball; FSL gradients.

    The signal also grows along the fibre in space (S0 = 1000 + 30 per mm along it), so
    the image's geometry can be followed through a resampling independently of the tensor.
    """
    directions = _sphere_directions(30)
    bvals = np.r_[0.0, 0.0, np.full(len(directions), 1000.0)]
    gradients = np.vstack([np.zeros((2, 3)), directions])  # RAS world
    e = np.asarray(fibre_ras, dtype=float) / np.linalg.norm(fibre_ras)
    tensor = 0.3e-3 * np.eye(3) + (1.7e-3 - 0.3e-3) * np.outer(e, e)
    attenuation = np.exp(-bvals * np.einsum("ni,ij,nj->n", gradients, tensor, gradients))
    ijk = np.indices(shape).reshape(3, -1).T
    centre = (np.asarray(shape) - 1) / 2.0
    inside = np.linalg.norm(ijk - centre, axis=1) <= min(shape) / 2.0 - 1
    s0 = 1000.0 + 30.0 * ((ijk[inside] - centre) @ affine[:3, :3].T @ e)
    data = np.zeros((*shape, bvals.size), dtype=np.float32)
    data.reshape(-1, bvals.size)[inside] = s0[:, None] * attenuation[None, :]
    dwi = _save(data, affine, tmp_path / f"{name}.nii.gz")
    _write(tmp_path / f"{name}.bval", " ".join(f"{b:g}" for b in bvals) + "\n")
    fsl = _world_to_fsl(gradients, affine)
    _write(tmp_path / f"{name}.bvec", "\n".join(" ".join(f"{v:.8f}" for v in fsl[:, k]) for k in range(3)) + "\n")
    return dwi, tmp_path / f"{name}.bval", tmp_path / f"{name}.bvec"


def _principal_direction_world(dwi_file, bval_file, bvec_file, radius=2):
    """Principal eigenvector (RAS) of a tensor fit in the central voxels of an image."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    img = nib.load(str(dwi_file))
    data = np.asarray(img.dataobj, dtype=np.float64)
    c = np.asarray(data.shape[:3]) // 2
    block = data[c[0] - radius:c[0] + radius, c[1] - radius:c[1] + radius, c[2] - radius:c[2] + radius]
    bvals, bvecs = read_gradients(bval_file, bvec_file, data.shape[3])
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs, b0_threshold=50)).fit(block)
    evecs = fit.evecs[..., :, 0].reshape(-1, 3)  # principal eigenvectors, FSL frame
    assert np.all(fit.fa > 0.6)
    world = _fsl_to_world(evecs, img.affine)
    return world, fit.fa


def _write_ants_rotation(path, rotation_lps, centre_lps):
    """A hand-made ANTs affine (.mat): fixed point x -> moving point R (x - c) + c (LPS)."""
    import ants

    tx = ants.create_ants_transform(
        transform_type="AffineTransform", precision="double", dimension=3,
        matrix=np.asarray(rotation_lps, dtype=float), center=list(np.asarray(centre_lps, dtype=float)),
    )  # fmt: skip
    ants.write_transform(tx, str(path))
    return str(path)


LPS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- #
# gradients
# --------------------------------------------------------------------------- #
GOOD_BVEC = "0 1 0 0\n0 0 1 0\n0 0 0 1\n"


@pytest.mark.parametrize(
    "bval, bvec, fragment",
    [
        (None, GOOD_BVEC, "does not exist"),
        ("0 1000 1000 1000\n", None, "does not exist"),
        ("0 1000 abc 1000\n", GOOD_BVEC, "cannot be parsed"),
        ("0 1000 1000\n", GOOD_BVEC, "lists 3 b-values"),
        ("0 1000 1000 1000\n", "0 1 0 0\n0 0 1 0\n", "has 2 rows"),
        ("0 1000 1000 1000\n", "0 0 0\n1 0 0\n0 1 0\n0 0 1\n", "transposed"),
        ("0 1000 1000 1000\n", "0 1 0\n0 0 1\n0 0 0\n", r"rows of \[3\] values"),
        ("0 1000 1000 1000\n", "0 0 0 0\n0 0 1 0\n0 0 0 1\n", "norm 0"),
        ("0 1000 1000 1000\n", "0 1.5 0 0\n0 0 1 0\n0 0 0 1\n", "norm 1\\.5"),
        ("0 -1000 1000 1000\n", GOOD_BVEC, "negative or non-finite"),
        ("0 nan 1000 1000\n", GOOD_BVEC, "negative or non-finite"),
        ("1000 1000 1000 1000\n", "1 1 0 0\n0 0 1 0\n0 0 0 1\n", "no b=0"),
        ("", GOOD_BVEC, "is empty"),
    ],
)
def test_read_gradients_refuses_bad_files(tmp_path, bval, bvec, fragment):
    bval_file, bvec_file = tmp_path / "run.bval", tmp_path / "run.bvec"
    if bval is not None:
        _write(bval_file, bval)
    if bvec is not None:
        _write(bvec_file, bvec)
    with pytest.raises(InputDataError, match=fragment) as info:
        read_gradients(bval_file, bvec_file, 4)
    assert "run.bva" in str(info.value) or "run.bve" in str(info.value)  # names the file


def test_read_gradients_renormalizes_and_zeroes_b0(tmp_path):
    bval_file = _write(tmp_path / "run.bval", "5\n1000\n1000\n2000\n")  # a column is accepted
    bvec_file = _write(tmp_path / "run.bvec", "0.577 0.95 0 0\n0.577 0 1.05 0\n0.577 0 0 1\n")
    bvals, bvecs = read_gradients(bval_file, bvec_file, 4)
    assert bvals.tolist() == [5, 1000, 1000, 2000]
    assert bvecs.shape == (4, 3)
    np.testing.assert_allclose(bvecs[0], 0.0)  # a b=0 volume's vector is irrelevant
    np.testing.assert_allclose(np.linalg.norm(bvecs[1:], axis=1), 1.0)


# --------------------------------------------------------------------------- #
# images
# --------------------------------------------------------------------------- #
def test_load_dwi_refuses_bad_images(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    good = _save(np.random.default_rng(0).uniform(1, 2, (4, 4, 4, 3)), affine, tmp_path / "good.nii.gz")
    _, data = load_dwi(good)
    assert data.shape == (4, 4, 4, 3) and data.dtype == np.float32

    raw = gzip.decompress(good.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) - 100]))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti file at all")
    nan = np.ones((4, 4, 4, 3))
    nan[0, 0, 0, 0] = np.nan
    cases = {
        truncated: "cannot be read",
        corrupt: "cannot be read",
        tmp_path / "missing.nii.gz": "does not exist",
        _save(np.ones((4, 4, 4)), affine, tmp_path / "three_d.nii.gz"): "4-D",
        _save(nan, affine, tmp_path / "nan.nii.gz"): "NaN",
        _save(np.zeros((4, 4, 4, 3)), affine, tmp_path / "zero.nii.gz"): "all zero",
        _save(np.full((4, 4, 4, 3), 7.0), affine, tmp_path / "constant.nii.gz"): "every voxel equals 7",
    }
    for path, fragment in cases.items():
        with pytest.raises(InputDataError, match=fragment) as info:
            load_dwi(path)
        assert path.name in str(info.value)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from ihf_bids.phantom import generate_phantom

    root = tmp_path_factory.mktemp("dwi_phantom") / "bids"
    # No head motion: the truth maps serve as masks on the DWI grid.
    ds = generate_phantom(root, n_subjects=1, n_sites=1, size="tiny", seed=0, modalities=("T1w", "dwi"),
                          head_motion=False)
    subject, site = ds.subjects[0], ds.sites[0]
    dwi = ds.image_path(subject, site, "dwi")
    stem = str(dwi)[: -len(".nii.gz")]
    work = tmp_path_factory.mktemp("dwi_work")
    reference = dwi_reference(dwi, stem + ".bval", work / "ref.nii.gz")
    mask = dwi_brain_mask(reference, work / "mask.nii.gz")
    return ds, subject, dwi, stem, work, reference, mask


def test_reference_and_mask_on_phantom(phantom):
    ds, subject, dwi, stem, _, reference, mask = phantom
    ref = nib.load(str(reference))
    assert ref.shape == nib.load(str(dwi)).shape[:3]
    assert ref.get_data_dtype() == np.float32
    assert int(ref.header["qform_code"]) == 1 and int(ref.header["sform_code"]) == 1
    bvals = np.loadtxt(stem + ".bval")
    data = np.asarray(nib.load(str(dwi)).dataobj, dtype=np.float32)
    np.testing.assert_allclose(ref.get_fdata(), data[..., bvals <= 50].mean(axis=3), rtol=1e-5, atol=1e-3)

    estimate = np.asarray(nib.load(str(mask)).dataobj) > 0
    truth = np.asarray(nib.load(str(ds.truth_path(subject, "brain", grid="dwi"))).dataobj) > 0.5
    dice = 2 * (estimate & truth).sum() / (estimate.sum() + truth.sum())
    assert dice > 0.90  # measured 0.943 (seed 0, tiny)


def test_tensor_summary_that_cannot_be_computed_is_recorded_as_missing(phantom, tmp_path):
    """A run far off the template has no white matter inside its mask: the sidecar says so, the run goes on."""
    from ihf_bids.bids.derivatives import write_sidecar
    from ihf_bids.workflows.interfaces import TensorFit

    ds, subject, dwi, stem, work, _, mask = phantom
    grid = nib.load(str(mask))
    nowhere = _save(np.zeros(grid.shape, np.float32), grid.affine, tmp_path / "wm_nowhere.nii.gz")
    summary = fit_tensor(dwi, stem + ".bval", stem + ".bvec", mask, tmp_path / "fa.nii.gz", wm_mask_file=nowhere)
    assert "fa_median_wm" not in summary and "white matter" in summary["missing"]["fa_median_wm"]
    assert summary["n_voxels_wm"] == 0 and 0 < summary["fa_median"] < 1

    node = TensorFit(in_file=str(dwi), bval_file=stem + ".bval", bvec_file=stem + ".bvec", mask_file=str(mask),
                     wm_mask_file=str(nowhere))
    result = node.run(cwd=str(tmp_path))
    fields = result.outputs.summary
    assert fields["WhiteMatterMedianFA"] is None and "white matter" in fields["MissingSummaries"]["WhiteMatterMedianFA"]
    sidecar = write_sidecar(tmp_path / "fa.json", fields)  # the JSON writer refuses NaN: this must not raise
    assert json.loads(Path(sidecar).read_text())["WhiteMatterMedianFA"] is None


def test_fit_tensor_on_phantom(phantom):
    ds, subject, dwi, stem, work, _, mask = phantom
    wm_prob = nib.load(str(ds.truth_path(subject, "WM", grid="dwi")))
    gm_prob = nib.load(str(ds.truth_path(subject, "GM", grid="dwi")))
    wm = _save((wm_prob.get_fdata() > 0.9).astype(np.float32), wm_prob.affine, work / "wm.nii.gz")

    summary = fit_tensor(dwi, stem + ".bval", stem + ".bvec", mask, work / "fa.nii.gz", work / "md.nii.gz",
                         wm_mask_file=wm)  # fmt: skip
    axial, radial = (json.loads((ds.truth_root / "phantom.json").read_text())["subjects"][f"sub-{subject}"]
                     ["diffusivities_mm2_per_s"]["WM"][k] for k in ("axial", "radial"))  # fmt: skip
    ev = np.array([axial, radial, radial])
    true_fa = np.sqrt(1.5 * ((ev - ev.mean()) ** 2).sum() / (ev**2).sum())
    assert summary["n_voxels_wm"] > 500
    assert abs(summary["fa_median_wm"] - true_fa) < 0.1  # measured 0.613 vs 0.632

    fa_img = nib.load(str(work / "fa.nii.gz"))
    fa = fa_img.get_fdata()
    assert fa_img.get_data_dtype() == np.float32 and np.isfinite(fa).all()
    assert fa.min() >= 0 and fa.max() <= 1
    assert not fa[np.asarray(nib.load(str(mask)).dataobj) == 0].any()
    assert np.median(fa[gm_prob.get_fdata() > 0.9]) < 0.25
    md = nib.load(str(work / "md.nii.gz")).get_fdata()
    assert 0.6e-3 < summary["md_median"] < 1.5e-3 and md.max() < 5e-3

    low = fit_tensor(dwi, stem + ".bval", stem + ".bvec", mask, work / "fa_b.nii.gz", max_bval=1500)
    assert 0 < low["n_volumes"] <= summary["n_volumes"]


# --------------------------------------------------------------------------- #
# b-vector rotation
# --------------------------------------------------------------------------- #
def test_rotate_bvecs_uses_rotation_part_only(tmp_path):
    rotation = _rotation([1, 2, 3], 35)
    affine_lps = rotation @ np.diag([1.3, 0.8, 1.1])  # scaling is not a rotation
    import ants

    tx = ants.create_ants_transform(transform_type="AffineTransform", precision="double", dimension=3,
                                    matrix=affine_lps, center=[1.0, 2.0, 3.0])  # fmt: skip
    scaled = str(tmp_path / "scaled.mat")
    ants.write_transform(tx, scaled)
    pure = _write_ants_rotation(tmp_path / "rot.mat", rotation, [0.0, 0.0, 0.0])
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    vectors = _sphere_directions(10)
    a = rotate_bvecs(vectors, ras, ras, [scaled])
    b = rotate_bvecs(vectors, ras, ras, [pure])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-9)
    # inverting the transform undoes the rotation
    back = rotate_bvecs(b, ras, ras, [pure], invert=[True])
    np.testing.assert_allclose(back, vectors, atol=1e-6)  # .mat files hold float32
    with pytest.raises(ValueError, match="not a linear transform"):
        rotate_bvecs(vectors, ras, ras, ["warp.nii.gz", pure])
    np.testing.assert_allclose(rotate_bvecs(vectors, ras, ras, ["warp.nii.gz", pure], skip_nonlinear=True), b)


def test_rotated_dwi_keeps_its_fibre_direction(tmp_path):
    """Rotate a single-tensor DWI with a hand-made ANTs affine: the fit follows the fibre."""
    import ants

    shape, voxel = (14, 14, 14), 2.0
    centre_ras = np.array([3.0, -5.0, 8.0])
    # oblique LAS source grid
    source = _grid_affine(_rotation([0, 0, 1], 20) @ np.diag([-1.0, 1.0, 1.0]), voxel, shape, centre_ras)
    target = _grid_affine(np.eye(3), voxel, shape, centre_ras)
    fibre = np.array([1.0, 0.3, 0.2]) / np.linalg.norm([1.0, 0.3, 0.2])
    dwi, bval, bvec = _synthetic_dwi(tmp_path, source, fibre, shape)

    direction, _ = _principal_direction_world(dwi, bval, bvec)  # the source image itself
    assert np.all(np.abs(direction @ fibre) > 0.99)

    rotation_lps = _rotation([0.3, -0.5, 1.0], 40)
    mat = _write_ants_rotation(tmp_path / "rot.mat", rotation_lps, LPS @ centre_ras)
    ref = _save(np.zeros(shape), target, tmp_path / "target.nii.gz")
    out = resample_dwi(dwi, ref, [mat], tmp_path / "out.nii.gz")
    out_bvec = rotate_bvec_file(bvec, dwi, ref, [mat], tmp_path / "out.bvec")
    out_img = nib.load(str(out))
    assert out_img.shape == (*shape, 32) and out_img.get_data_dtype() == np.float32
    assert np.asarray(out_img.dataobj).min() >= 0

    # expected direction: map a segment along the fibre from moving to fixed space
    inverse = ants.read_transform(mat).invert()
    p0 = LPS @ centre_ras
    p1 = p0 + LPS @ fibre * 10.0
    expected = LPS @ (np.subtract(inverse.apply_to_point(tuple(p1)), inverse.apply_to_point(tuple(p0))))
    expected /= np.linalg.norm(expected)
    assert abs(expected @ fibre) < 0.9  # the rotation moves the fibre

    # the image itself: the S0 gradient (along the fibre in the input) now points along `expected`
    b0 = np.asarray(out_img.dataobj)[..., 0].astype(float)
    c = np.asarray(shape) // 2
    grad_voxel = np.array([g[c[0], c[1], c[2]] for g in np.gradient(b0)])
    grad_world = np.linalg.solve(target[:3, :3].T, grad_voxel)
    assert grad_world @ expected / np.linalg.norm(grad_world) > 0.99

    rotated, _ = _principal_direction_world(out, bval, out_bvec)
    assert np.all(np.abs(rotated @ expected) > 0.95)
    unrotated, _ = _principal_direction_world(out, bval, bvec)  # the original vectors fail
    assert np.median(np.abs(unrotated @ expected)) < 0.95


def test_las_to_ras_reorientation(tmp_path):
    shape, voxel = (12, 12, 12), 2.0
    las = _grid_affine(np.diag([-1.0, 1.0, 1.0]), voxel, shape, [0.0, 0.0, 0.0])
    ras = _grid_affine(np.eye(3), voxel, shape, [0.0, 0.0, 0.0])
    fibre = np.array([0.8, 0.6, 0.0])
    dwi, bval, bvec = _synthetic_dwi(tmp_path, las, fibre, shape)
    ident = _write_ants_rotation(tmp_path / "identity.mat", np.eye(3), [0.0, 0.0, 0.0])
    ref = _save(np.zeros(shape), ras, tmp_path / "ras.nii.gz")
    out = resample_dwi(dwi, ref, [ident], tmp_path / "ras_dwi.nii.gz")
    out_bvec = rotate_bvec_file(bvec, dwi, ref, [ident], tmp_path / "ras.bvec")

    src = np.asarray(nib.load(str(dwi)).dataobj)
    np.testing.assert_allclose(np.asarray(nib.load(str(out)).dataobj), src[::-1], atol=1e-2)  # x flipped
    np.testing.assert_allclose(np.loadtxt(out_bvec), np.loadtxt(bvec), atol=1e-6)  # FSL: unchanged
    direction, _ = _principal_direction_world(out, bval, out_bvec)
    assert np.all(np.abs(direction @ fibre) > 0.99)
