"""Command-line checks that need no processing: usage errors, exit codes, start-up cost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ihf_bids.cli.run import main
from ihf_bids.errors import EXIT_DATA_ERROR, EXIT_USAGE


@pytest.fixture(scope="module")
def small_bids(tmp_path_factory):
    from ihf_bids.phantom import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("cli") / "bids", n_subjects=1, n_sites=2, size="tiny", seed=3,
                            modalities=("T1w",))


def run(small_bids, tmp_path, *extra):
    return main([str(small_bids.root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
                 "--skip-bids-validation", *extra])


def test_help_is_instant_and_light():
    code = ("import sys; from ihf_bids.cli.parser import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'nipype', 'ants', 'dipy', 'bids', 'nibabel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("ihf-bids ")


def test_missing_bids_dir_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"])
    assert exc.value.code == EXIT_USAGE
    assert "mounted" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--participant-label", "99"], "99"),
    (["--participant-label", "../01"], "../01"),
    (["--session-label", "mars"], "mars"),
    (["--target-site", "siemens", "--target-reference", "README"], "not both"),
    (["--train"], "group"),
])
def test_usage_errors_name_the_problem(small_bids, tmp_path, caplog, args, message):
    if "README" in args:
        (tmp_path / "README").write_text("x")
        args = [a if a != "README" else str(tmp_path / "README") for a in args]
    assert run(small_bids, tmp_path, *args) == EXIT_USAGE
    assert message in caplog.text


def test_output_inside_bids_dir_is_refused(small_bids, tmp_path, caplog):
    code = main([str(small_bids.root), str(small_bids.root / "sub-01" / "out"), "participant",
                 "-w", str(tmp_path / "work"), "--skip-bids-validation"])
    assert code == EXIT_USAGE
    assert "inside" in caplog.text


def test_work_dir_inside_bids_dir_is_refused(small_bids, tmp_path):
    code = main([str(small_bids.root), str(tmp_path / "out"), "participant",
                 "-w", str(small_bids.root / "work"), "--skip-bids-validation"])
    assert code == EXIT_USAGE
    assert not (small_bids.root / "work").exists()


def test_invalid_dataset_is_a_data_error(tmp_path, caplog):
    bids = tmp_path / "bad"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    (bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"not a nifti")
    (bids / "sub-01" / "anat" / "sub-01_bogus.txt").write_text("x")
    code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")])
    assert code == EXIT_DATA_ERROR
    assert "--skip-bids-validation" in caplog.text
    assert not (tmp_path / "out").exists()


def test_no_dataset_description(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    code = main([str(tmp_path / "empty"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")])
    assert code in (EXIT_USAGE, EXIT_DATA_ERROR)
    assert "dataset_description.json" in caplog.text


def test_bad_gradients_fail_the_run_and_name_the_file(tmp_path, caplog):
    """A bval with fewer entries than volumes: refused before any work (exit 65), naming the file."""
    from ihf_bids.phantom import generate_phantom

    dataset = generate_phantom(tmp_path / "bids", n_subjects=1, n_sites=1, size="tiny", seed=4, modalities=("dwi",))
    bval = next(dataset.root.rglob("*_dwi.bval"))
    bval.write_text(" ".join(bval.read_text().split()[:-2]) + "\n")
    out = tmp_path / "out"
    code = main([str(dataset.root), str(out), "participant", "-w", str(tmp_path / "work"), "--skip-bids-validation",
                 "--dwi-resolution", "4", "--nprocs", "1"])
    assert code == 65
    assert bval.name in caplog.text and "nothing was processed" in caplog.text
    assert not list(out.rglob("*_dwi.nii.gz"))
    assert not list(out.rglob("*.tmp"))


def test_qc_baseline_choices_match_the_evaluation():
    """The parser keeps its own copy (no heavy import at --help); it must equal the evaluation's."""
    from ihf_bids.cli.parser import QC_BASELINES
    from ihf_bids.qc.evaluation import BASELINES

    assert QC_BASELINES == BASELINES


def test_processing_failure_lists_only_this_runs_crash_reports(tmp_path, caplog):
    """An image that passes the pre-flight but breaks a step: exit 1, the crash is this run's own."""
    import nibabel as nib
    import numpy as np

    from ihf_bids.phantom import generate_phantom

    dataset = generate_phantom(tmp_path / "bids", n_subjects=1, n_sites=1, size="tiny", seed=4,
                               modalities=("T1w",))
    t1w = next(dataset.root.rglob("*_T1w.nii.gz"))
    img = nib.load(t1w)
    data = np.zeros(img.shape, dtype=np.float32)
    data[0, 0, 0] = 100.0  # not constant (passes the checks), but nothing for N4 to work on
    nib.save(nib.Nifti1Image(data, img.affine, img.header), t1w)
    argv = [str(dataset.root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
            "--skip-bids-validation", "--anat-resolution", "4", "--nprocs", "1"]
    assert main(argv) == 1
    first = sorted((tmp_path / "work" / "crash").glob("crash-*.txt"))
    assert first and t1w.name in caplog.text
    caplog.clear()
    assert main(argv) == 1
    crashes = sorted((tmp_path / "work" / "crash").glob("crash-*.txt"))
    listed = next(r.getMessage() for r in caplog.records if "Crash reports:" in r.getMessage())
    new = [c for c in crashes if c not in first]
    assert new and all(str(c) in listed for c in new)
    assert not any(str(c) in listed for c in first)
    assert not list((tmp_path / "out").rglob("*_T1w.nii.gz"))


def test_main_gives_the_callers_environment_back(tmp_path):
    """A run sends scratch files into its work dir; a caller in the same process keeps its own TMPDIR."""
    import os
    import tempfile

    from ihf_bids.phantom import generate_phantom

    dataset = generate_phantom(tmp_path / "bids", n_subjects=1, n_sites=1, size="tiny", seed=4, modalities=("T1w",))
    before = dict(os.environ)
    tempdir = tempfile.gettempdir()
    main([str(dataset.root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
          "--skip-bids-validation", "--participant-label", "nobody"])  # refused (exit 2) after the set-up
    assert dict(os.environ) == before
    assert tempfile.gettempdir() == tempdir
