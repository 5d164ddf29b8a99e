"""Whole DWI runs: shells, per-shell scales, missing shells reported."""

from __future__ import annotations

import numpy as np
import pytest

from ihf_bids.harmonize.dwi import MissingShellError, harmonize_dwi, shell_intensity_scales
from ihf_bids.harmonize.profile import TargetProfile
from ihf_bids.model import IHFHarmony
from ihf_bids.preproc.dwi import b0_mean, shell_labels


def _run(rng):
    b0 = np.zeros((16, 20, 6), np.float32)
    b0[3:13, 4:16] = rng.random((10, 12, 6)) * 100 + 400
    bvals = np.array([0, 1000, 1005, 995, 0, 2000])
    attenuation = np.where(bvals > 50, np.exp(-bvals * 0.8e-3), 1.0)
    return b0[..., None] * attenuation, bvals


def _profiles(site: str, scale: float, shells=("b0", "b1000", "b2000")):
    return {f"dwi-{s}": TargetProfile(site, f"dwi-{s}", np.ones((6, 1920), np.float32), scale, 2) for s in shells}


def test_shell_labels_and_b0():
    assert shell_labels([0, 995, 1005, 2000, 5]) == ["b0", "b1000", "b1000", "b2000", "b0"]
    with pytest.raises(ValueError, match="no b=0"):
        b0_mean(np.ones((2, 2, 2, 2)), np.array([1000, 1000]))
    with pytest.raises(ValueError, match="does not match"):
        b0_mean(np.ones((2, 2, 2, 3)), np.array([0, 1000]))


def test_shell_scales_are_shared_within_a_shell():
    dwi, bvals = _run(np.random.default_rng(0))
    scales = shell_intensity_scales(dwi, shell_labels(bvals), dwi[..., 0] > 0)
    assert set(scales) == {"b0", "b1000", "b2000"}
    assert scales["b1000"].scale < scales["b0"].scale


def test_untrained_network_keeps_directional_ratios_within_shells():
    dwi, bvals = _run(np.random.default_rng(1))
    mask = dwi[..., 0] > 0
    site = _profiles("a", 1.0)
    out = harmonize_dwi(dwi, bvals, IHFHarmony(), site, source_profiles=site, mask=mask)
    assert out.shape == dwi.shape
    # Same site, untrained (identity) network: the run comes back unchanged, except the
    # brightest 0.5 % of each shell, which the [-1, 1] normalization clips (docs/model.md).
    ratio_in = dwi[mask][:, 1] / dwi[mask][:, 2]
    ratio_out = out[mask][:, 1] / out[mask][:, 2]
    assert np.isclose(ratio_in, ratio_out, rtol=1e-3).mean() > 0.98
    assert np.isclose(out[mask], dwi[mask], rtol=1e-3).mean() > 0.98
    assert (out[~mask] == 0).all()


def test_missing_shell_is_reported():
    dwi, bvals = _run(np.random.default_rng(2))
    with pytest.raises(MissingShellError, match="dwi-b2000"):
        harmonize_dwi(dwi, bvals, IHFHarmony(), _profiles("t", 1.0, shells=("b0", "b1000")))
    with pytest.raises(ValueError, match="b-values"):
        harmonize_dwi(dwi, bvals[:3], IHFHarmony(), _profiles("t", 1.0))
