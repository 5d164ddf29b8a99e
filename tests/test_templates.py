from __future__ import annotations

import numpy as np
import pytest

from ihf_bids.templates import TEMPLATE_SPACE, TemplateImages, load_template, resample_to_grid, template_grid


def test_space_label():
    assert TEMPLATE_SPACE == "MNI152NLin2009aSym"


def test_1mm_template_is_the_nilearn_template():
    tpl = load_template()
    assert isinstance(tpl, TemplateImages)
    assert tpl.shape == (197, 233, 189)
    assert tpl.voxel_size == 1.0
    np.testing.assert_allclose(tpl.affine[:3, 3], [-98.0, -134.0, -72.0])
    np.testing.assert_allclose(np.diag(tpl.affine)[:3], [1.0, 1.0, 1.0])
    for name in ("t1", "gm", "wm", "csf", "brain_mask"):
        arr = getattr(tpl, name)
        assert arr.dtype == np.float32 and arr.shape == tpl.shape
        assert not arr.flags.writeable
        assert arr.min() >= 0.0 and arr.max() <= 1.0
    assert set(np.unique(tpl.brain_mask)) == {0.0, 1.0}
    assert float((tpl.gm + tpl.wm + tpl.csf).max()) <= 1.0 + 1e-5
    # CSF sits inside the brain mask, and there is a plausible amount of it.
    assert float(tpl.csf[tpl.brain_mask == 0].max()) == 0.0
    assert 120 < tpl.csf.sum() / 1000 < 300  # ml


def test_matches_nilearn_loaders():
    datasets = pytest.importorskip("nilearn.datasets")
    tpl = load_template(1.0)
    gm = datasets.load_mni152_gm_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    np.testing.assert_allclose(gm.get_fdata(), tpl.gm, atol=1e-6)
    np.testing.assert_array_equal(mask.get_fdata() > 0, tpl.brain_mask > 0)
    np.testing.assert_allclose(mask.affine, tpl.affine)


def test_grid_shapes_and_centre():
    shape1, affine1 = template_grid(1.0)
    centre1 = affine1[:3, :3] @ ((np.array(shape1) - 1) / 2) + affine1[:3, 3]
    for voxel, expected in ((4.0, (49, 58, 47)), (2.0, (98, 116, 94)), (1.0, (197, 233, 189))):
        shape, affine = template_grid(voxel)
        assert shape == expected
        np.testing.assert_allclose(np.diag(affine)[:3], voxel)
        centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
        np.testing.assert_allclose(centre, centre1)


def test_resampled_template_preserves_volumes_and_is_cached():
    fine, coarse = load_template(1.0), load_template(4)
    assert coarse is load_template(4.0)
    assert coarse.shape == (49, 58, 47)
    np.testing.assert_array_equal(coarse.affine, template_grid(4.0)[1])
    for name in ("gm", "wm", "csf", "brain_mask"):
        v_fine = float(getattr(fine, name).sum())
        v_coarse = float(getattr(coarse, name).sum()) * 64.0
        assert v_coarse == pytest.approx(v_fine, rel=0.01), name
    assert float((coarse.gm + coarse.wm + coarse.csf).max()) <= 1.0 + 1e-5
    # Partial volume: the coarse brain mask is fractional at its edge.
    assert 0 < np.count_nonzero((coarse.brain_mask > 0.1) & (coarse.brain_mask < 0.9))


def test_template_contrast_is_t1_like():
    tpl = load_template(2.0)
    means = {k: float(tpl.t1[getattr(tpl, k) > 0.8].mean()) for k in ("wm", "gm", "csf")}
    assert means["wm"] > means["gm"] > means["csf"]


def test_resample_to_grid_general():
    shape, affine = template_grid(4.0)
    data = np.full(shape, 3.0, dtype=np.float32)
    # identity
    np.testing.assert_array_equal(resample_to_grid(data, affine, shape, affine), data)
    # to a finer grid: the inside of a constant image stays constant
    fine_shape, fine_affine = template_grid(2.0)
    out = resample_to_grid(data, affine, fine_shape, fine_affine, mode="nearest")
    assert out.shape == fine_shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.0, rtol=1e-6)
    with pytest.raises(ValueError):
        resample_to_grid(np.zeros((2, 2)), affine, shape, affine)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_invalid_voxel_size(bad):
    with pytest.raises(ValueError):
        load_template(bad)
