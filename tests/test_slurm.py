"""The SLURM recipes (pipelines/slurm/) against a real one-node SLURM on this machine.

pipelines/slurm/local/start-local-slurm starts munged, slurmctld and slurmd (Debian's
slurm-wlm and munge; .ci/install-system-packages installs them); submit-cohort.sh then submits
the cohort workflow as four dependent jobs: preprocessing (a job array, one phantom participant a
task), group --train (two torchrun processes, DistributedDataParallel over gloo, started by srun
inside the job), harmonization (a job array) and the group QC, all into one output dir. The
jobs run the ihf-bids of this virtualenv (no Singularity/Apptainer runtime here). Skipped, with
the reason, where SLURM is not installed or cannot start. Also: the nipype plugin files of
pipelines/nipype/ and ``--use-plugin``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "pipelines" / "slurm"
SUBJECTS, SITES, TARGET = 3, 2, "siemens"
TIMEOUT_S = 1500


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node SLURM; yields the environment that reaches it."""
    missing = [exe for exe in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch") if not shutil.which(exe)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): run .ci/install-system-packages")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd (it runs jobs as their users) needs root")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_CTLD_PORT": str(_free_port()), "SLURM_LOCAL_SLURMD_PORT": str(_free_port())}
    start = subprocess.run([str(SLURM / "local" / "start-local-slurm"), str(state)], env=env,
                           capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        logs = "\n".join(f"{p.name}: {p.read_text()[-600:]}" for p in sorted((state / "log").glob("*.log")))
        subprocess.run([str(SLURM / "local" / "stop-local-slurm"), str(state)], timeout=60)
        pytest.skip(f"SLURM could not start here: {start.stderr.strip()[-400:]}\n{logs}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(SLURM / "local" / "stop-local-slurm"), str(state)], timeout=60)


def _jobs_in_queue(env, ids) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return [line for line in out.splitlines() if line.strip()]


def _job_records(env, job_id: str) -> list[dict]:
    """scontrol's record of a job (every task of an array): JobState, ExitCode..."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cohort(slurm, tmp_path_factory):
    """Submit the cohort workflow and wait for it; return the paths and job ids."""
    from ihf_bids.phantom import generate_phantom

    base = tmp_path_factory.mktemp("slurm_cohort")
    dataset = generate_phantom(base / "bids", n_subjects=SUBJECTS, n_sites=SITES, size="tiny", seed=3)
    out = base / "out"
    env = {
        **slurm,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{slurm['PATH']}",  # the jobs run this ihf-bids
        "OMP_NUM_THREADS": "1",
        "IHF_BIDS_WORK_ROOT": str(base / "work"),  # shared: the harmonization reuses the preprocessing
        "IHF_BIDS_ARRAY_LIMIT": "2",
        "IHF_BIDS_SBATCH_ARGS": "--cpus-per-task=1 --mem=3G --time=30",
        "IHF_BIDS_TRAIN_SBATCH_ARGS": "--gres=none",  # this cluster has no GPUs
        "IHF_BIDS_PARTICIPANT_ARGS": "--anat-resolution 4 --dwi-resolution 4 --omp-nthreads 1",
        "IHF_BIDS_TRAIN_ARGS": "--train-steps 6 --device cpu",
        # train.sbatch's multi-process path: srun starts torchrun, two CPU processes (gloo)
        "IHF_BIDS_PROCS_PER_NODE": "2",
        "IHF_BIDS_RDZV_PORT": str(_free_port()),
    }
    started = time.monotonic()
    submit = subprocess.run([str(SLURM / "submit-cohort.sh"), str(dataset.root), str(out), TARGET], env=env,
                            capture_output=True, text=True, timeout=120, cwd=base)
    assert submit.returncode == 0, submit.stderr
    ids = dict(re.findall(r"(\w+)=(\d+)", submit.stdout))
    assert set(ids) == {"preprocess", "train", "harmonize", "group"}, submit.stdout
    while True:
        queued = _jobs_in_queue(env, list(ids.values()))
        if not queued:
            break
        stuck = [line for line in queued if "DependencyNeverSatisfied" in line]
        if stuck or time.monotonic() - started > TIMEOUT_S:
            subprocess.run(["scancel", *ids.values()], env=env, timeout=30)
            logs = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted((out / "logs" / "slurm").glob("*.out")))
            pytest.fail(f"the cohort jobs did not finish ({'a dependency failed' if stuck else 'timeout'}): "
                        f"{queued}\n{logs}")
        time.sleep(5)
    records = {step: _job_records(env, job) for step, job in ids.items()}
    return dataset, out, ids, records, time.monotonic() - started


@pytest.mark.slow
def test_every_job_succeeded(cohort):
    _, out, ids, records, elapsed = cohort
    print(f"cohort workflow on SLURM: {elapsed:.0f} s")
    assert len(records["preprocess"]) == SUBJECTS and len(records["harmonize"]) == SUBJECTS  # one task each
    for step, tasks in records.items():
        for task in tasks:
            assert (task.get("JobState"), task.get("ExitCode")) == ("COMPLETED", "0:0"), (step, task)
    logs = out / "logs" / "slurm"
    for step in ("preprocess", "harmonize"):
        for task in range(1, SUBJECTS + 1):
            text = (logs / f"{step}-{ids[step]}_{task}.out").read_text()
            assert "finished with exit code 0" in text, text[-2000:]
    assert "group --train finished with exit code 0" in (logs / f"train-{ids['train']}.out").read_text()
    assert "group finished with exit code 0" in (logs / f"group-{ids['group']}.out").read_text()


@pytest.mark.slow
def test_one_output_dir_for_all_participants(cohort):
    dataset, out, _, _, _ = cohort
    space = "space-MNI152NLin2009aSym_res-4"
    for sub in dataset.subjects:
        for site in dataset.sites:
            anat = out / f"sub-{sub}" / f"ses-{site}" / "anat"
            stem = f"sub-{sub}_ses-{site}_{space}"
            assert (anat / f"{stem}_desc-preproc_T1w.nii.gz").is_file()
            sidecar = json.loads((anat / f"{stem}_desc-harmonized_T1w.json").read_text())
            assert sidecar["HarmonizationTarget"]["Site"] == TARGET and sidecar["Device"] == "cpu"
            assert (out / f"sub-{sub}" / f"ses-{site}" / "dwi" / f"{stem}_desc-harmonized_dwi.nii.gz").is_file()
    meta = json.loads((out / "models" / "ihf-harmony" / "anat" / "model.json").read_text())
    assert sorted(meta["participants"]) == sorted(dataset.subjects)
    assert meta["training"]["processes"] == 2  # trained by two torchrun processes inside the SLURM job
    assert list(out.glob("group_*.tsv")), "the group step wrote no QC table"
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"


@pytest.mark.slow
def test_nipype_slurm_plugin_submits_the_nodes(slurm, tmp_path):
    """--use-plugin pipelines/nipype/slurm.yml: the workflow's nodes run as SLURM jobs of this cluster."""
    from ihf_bids.phantom import generate_phantom

    dataset = generate_phantom(tmp_path / "bids", n_subjects=1, n_sites=1, size="tiny", seed=5, modalities=("T1w",))
    ctld_log = Path(slurm["SLURM_CONF"]).parent / "log" / "slurmctld.log"
    jobs_before = ctld_log.read_text().count("WEXITSTATUS 0")
    env = {**slurm, "OMP_NUM_THREADS": "1"}
    env.pop("LOGNAME", None)  # the app supplies it to nipype's plugin when missing
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ihf-bids"), str(dataset.root), str(tmp_path / "out"), "participant",
         "-w", str(tmp_path / "work"), "--use-plugin", str(ROOT / "pipelines" / "nipype" / "slurm.yml"),
         "--skip-bids-validation", "--modalities", "T1w", "--anat-resolution", "4", "--omp-nthreads", "1"],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "out" / "sub-01").glob("ses-*/anat/*_desc-preproc_T1w.nii.gz"))
    assert ctld_log.read_text().count("WEXITSTATUS 0") - jobs_before >= 5  # measured: 7 node jobs


# ------------------------------------------------------------------------------- nipype plugins


def test_plugin_files_are_valid():
    from ihf_bids.cli.plugin import read_plugin_file, run_settings

    files = sorted((ROOT / "pipelines" / "nipype").glob("*.yml"))
    assert {f.stem for f in files} >= {"multiproc", "slurm"}
    for path in files:
        settings, execution = run_settings(read_plugin_file(path), nprocs=3, mem_gb=5.0)
        if settings["plugin"] == "MultiProc":
            assert settings["plugin_args"]["n_procs"] == 3 and settings["plugin_args"]["memory_gb"] == 5.0
            assert execution == {}
        else:
            assert settings["plugin"].startswith("SLURM") and execution["poll_sleep_duration"] >= 1
            assert "sbatch_args" in settings["plugin_args"]


@pytest.mark.parametrize("text, message", [
    ("plugin: Nope\n", "unknown nipype plugin"),
    ("plugin_args: {n_procs: 2}\n", "'plugin' name"),
    ("plugin: MultiProc\nextra: 1\n", "unknown keys"),
    ("plugin: [unclosed\n", "not valid YAML"),
])
def test_bad_plugin_file_is_a_usage_error(tmp_path, capsys, text, message):
    from ihf_bids.cli.run import main

    bad = tmp_path / "plugin.yml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), str(tmp_path / "out"), "participant", "--use-plugin", str(bad)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_use_plugin_runs_the_participant_workflow(tmp_path):
    """--use-plugin pipelines/nipype/multiproc.yml (JSON works the same) on one phantom session."""
    from ihf_bids.cli.run import main
    from ihf_bids.phantom import generate_phantom

    dataset = generate_phantom(tmp_path / "bids", n_subjects=1, n_sites=1, size="tiny", seed=4, modalities=("T1w",))
    code = main([str(dataset.root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
                 "--use-plugin", str(ROOT / "pipelines" / "nipype" / "multiproc.yml"), "--skip-bids-validation",
                 "--modalities", "T1w", "--anat-resolution", "4", "--nprocs", "1", "--omp-nthreads", "1"])
    assert code == 0
    site = dataset.sites[0]
    assert list((tmp_path / "out" / "sub-01" / f"ses-{site}" / "anat").glob("*_desc-preproc_T1w.nii.gz"))
