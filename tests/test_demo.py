"""The phantom experiment behind ``make demo`` and the core benchmark, end to end (tiny)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from ihf_bids.demo import ExperimentConfig, format_summary, run_phantom_experiment


def test_phantom_experiment_end_to_end(tmp_path):
    config = ExperimentConfig(size="tiny", n_subjects=2, n_test=1, n_sites=2, steps=3, modalities=("T1w", "dwi"),
                              dwi_volumes_per_run=2, eval_dwi_volumes_per_run=4)
    result = run_phantom_experiment(config, tmp_path, progress=False)
    assert result["target_site"] == "siemens" and result["test_subjects"] == ["02"]
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"unharmonized", "histogram-matching", "ihf-harmony"}
    cases = {(r["modality"], r["same_site"]) for r in result["rows"]}
    assert ("T1w", False) in cases and ("T1w", True) in cases and ("dwi-b1000", False) in cases
    for row in result["rows"]:
        assert np.isfinite([row["rmse"], row["ssim"], row["ms_ssim"]]).all()
    # The model directory holds the checkpoint and a profile for every site and modality.
    profiles = sorted(p.name for p in (tmp_path / "model" / "profiles").iterdir())
    assert "site-ge_modality-T1w_profile.npz" in profiles and "site-siemens_modality-dwi-b1000_profile.npz" in profiles
    assert "| T1w | other sites | ihf-harmony |" in format_summary(result["summary"])


def test_demo_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ihf_bids.demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "traveling phantom" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ihf_bids.demo", str(tmp_path), "--subjects", "2", "--test-subjects", "2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--test-subjects" in bad.stderr
