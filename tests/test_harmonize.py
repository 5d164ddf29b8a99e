"""Volumes to windows and back, intensity scales, target profiles, volume inference."""

from __future__ import annotations

import numpy as np
import pytest

from ihf_bids.harmonize import (
    IntensityScale,
    TargetProfile,
    build_target_profile,
    harmonize_volume,
    robust_intensity_scale,
    volume_to_windows,
    windows_to_volume,
)
from ihf_bids.model import IHFHarmony


def test_windows_round_trip_and_neighbours():
    vol = np.random.default_rng(0).random((13, 17, 6)).astype(np.float32)
    win = volume_to_windows(vol, multiple=4)
    assert win.shape == (6, 3, 16, 20)
    # Window k holds slices k-1, k, k+1 (edges repeat themselves); padding is background.
    assert np.array_equal(win[2, 0, 1:14, 1:18], vol[..., 1])
    assert np.array_equal(win[0, 0, 1:14, 1:18], vol[..., 0])
    assert (win[:, :, 0, :] == -1).all()
    assert np.abs(windows_to_volume(win, vol.shape) - vol).max() == 0


def test_windows_average_three_predictions():
    vol = np.zeros((4, 4, 5), np.float32)
    win = volume_to_windows(vol)
    win[2, 0] += 3.0  # slice 1 predicted 3 higher by one of its three windows
    out = windows_to_volume(win, vol.shape)
    assert out[..., 1] == pytest.approx(np.full((4, 4), 1.0))
    assert np.abs(out[..., [0, 2, 3, 4]]).max() == 0


def test_intensity_scale():
    vol = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    scale = robust_intensity_scale(vol)
    norm = scale.normalize(vol)
    assert norm.min() >= -1 and norm.max() <= 1
    assert np.allclose(scale.denormalize(norm)[vol < scale.scale], vol[vol < scale.scale], atol=1e-3)
    with pytest.raises(ValueError, match="no positive finite voxels"):
        robust_intensity_scale(np.zeros((4, 4, 4)))


def test_profile_build_save_load(tmp_path):
    rng = np.random.default_rng(0)
    vols = [(rng.random((16, 20, 7)).astype(np.float32) * s, None, None, f"sub-{i}") for i, s in enumerate((90, 110))]
    profile = build_target_profile(vols, site="ge", modality="T1w")
    assert profile.embeddings.shape == (7, 1920)
    assert profile.n_volumes == 2 and profile.sources == ["sub-0", "sub-1"]
    path = profile.save(tmp_path / "p.npz")
    again = TargetProfile.load(path)
    assert np.array_equal(again.embeddings, profile.embeddings)
    assert again.intensity_scale == pytest.approx(profile.intensity_scale)
    # Proportional mapping onto another slice count.
    assert again.embeddings_for(14).shape == (14, 1920)
    assert np.array_equal(again.embeddings_for(14)[0], profile.embeddings[0])
    (tmp_path / "bad.npz").write_bytes(b"not a profile")
    with pytest.raises(ValueError, match="not a readable"):
        TargetProfile.load(tmp_path / "bad.npz")


def test_profile_needs_one_grid():
    vols = [(np.ones((8, 8, 4), np.float32), None, None, "a"), (np.ones((8, 8, 5), np.float32), None, None, "b")]
    with pytest.raises(ValueError, match="one grid"):
        build_target_profile(vols, site="x", modality="T1w")


def test_untrained_network_only_rescales_to_target():
    """With identity AAN the harmonized volume is the source moved onto the target's scale."""
    rng = np.random.default_rng(1)
    vol = (rng.random((18, 22, 9)) * 100).astype(np.float32)
    source = robust_intensity_scale(vol)
    profile = TargetProfile("b", "T1w", np.zeros((9, 1920), np.float32), intensity_scale=2 * source.scale, n_volumes=1)
    out = harmonize_volume(vol, IHFHarmony(), profile, batch_size=4)
    expected = np.minimum(vol, source.scale) * 2
    assert out.shape == vol.shape and out.dtype == np.float32
    assert np.abs(out - expected).max() < 1e-3 * expected.max()


def test_harmonize_volume_rejects_bad_input():
    profile = TargetProfile("b", "T1w", np.zeros((4, 1920), np.float32), 1.0, 1)
    bad = np.ones((8, 8, 4), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        harmonize_volume(bad, IHFHarmony(), profile)
    with pytest.raises(ValueError, match="3D"):
        harmonize_volume(np.ones((8, 8, 4, 2), np.float32), IHFHarmony(), profile)
    assert IntensityScale(2.0).denormalize(np.array([-3.0]))[0] == 0.0


def test_single_reference_image_as_target():
    """A profile of one image; without a source-site profile the volume's own statistics stand in."""
    rng = np.random.default_rng(3)
    reference = np.zeros((20, 24, 6), np.float32)
    reference[3:17, 4:20] = rng.random((14, 16, 6)) * 500 + 100
    source = np.zeros_like(reference)
    source[3:17, 4:20] = rng.random((14, 16, 6)) * 50 + 10
    profile = build_target_profile([(reference, reference > 0, None, "ref")], site="reference", modality="T2w")
    assert profile.n_volumes == 1
    out = harmonize_volume(source, IHFHarmony(), profile, mask=source > 0)
    # The untrained network changes nothing but the scale, which becomes the reference's.
    assert np.percentile(out[source > 0], 99.5) == pytest.approx(profile.intensity_scale, rel=0.02)
    assert (out[source == 0] == 0).all()
