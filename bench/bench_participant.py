"""Per-participant benchmark of the BIDS App: wall time and peak memory at 1 mm on this machine.

One traveling-phantom subject is scanned at two sites (T1w, T2w, DWI; anatomy 1 mm, DWI
2 mm). The benchmark preprocesses both sessions, trains a small model (``group --train`` with
the smoke preset, batch 4, bounded steps: the benchmark measures the participant level, not
training quality), then
times the headline run: ``participant --target-site siemens`` for the other session with
an empty work dir, i.e. everything a participant costs (preprocessing, registration,
harmonization of T1w, T2w and every DWI volume, and both tensor fits).

Usage (the figures in docs/benchmark-participant.md came from the command recorded there)::

    .venv/bin/python bench/bench_participant.py --registration affine

Peak memory is the largest sum of resident memory over the ``ihf-bids`` process and all its
children (nipype workers), sampled every 0.2 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_core import machine_description  # noqa: E402


def _tree_rss_mib(root_pid: int) -> float:
    """Resident memory (MiB) of ``root_pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss[int(entry.name)] = int(line.split()[1])
                    break
            children.setdefault(ppid, []).append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 1024


def timed_run(argv: list[str], log: Path, *, pythonpath: str | None = None) -> dict:
    """Run ``ihf-bids`` with ``argv``; return exit code, wall seconds and peak tree RSS.

    ``pythonpath``: run the package found there instead (another checkout), from the log's
    folder so that this checkout is not on ``sys.path`` ahead of it.
    """
    command = [str(Path(sys.executable).with_name("ihf-bids")), *argv]
    env, cwd = None, None
    if pythonpath:
        command = [sys.executable, "-c", "import sys; from ihf_bids.cli.run import main; sys.exit(main())", *argv]
        env, cwd = {**os.environ, "PYTHONPATH": pythonpath}, log.parent
    peak = [0.0]
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_mib(proc.pid))
                time.sleep(0.2)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        code = proc.wait()
        done.set()
        thread.join()
    return {"command": "ihf-bids " + shlex.join(argv), "exit_code": code,
            "wall_s": round(time.perf_counter() - start, 1), "peak_rss_mib": round(peak[0])}


def node_times(work_dir: Path) -> dict[str, float]:
    """Seconds per workflow step (summed over sessions), from nipype's result files."""
    from nipype.utils.filemanip import loadpkl

    out: dict[str, float] = {}
    for path in work_dir.rglob("result_*.pklz"):
        try:
            seconds = float(loadpkl(path).runtime.duration)
        except Exception:  # noqa: BLE001 - a node without runtime information
            continue
        parts = path.parent.relative_to(work_dir).parts[2:]  # drop ihf_bids_wf/<session>_wf
        key = "/".join(p.removesuffix("_wf") for p in parts)
        out[key] = round(out.get(key, 0.0) + seconds, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def write_markdown(path: Path, result: dict) -> None:
    m = result["machine"]
    head = result["headline"]
    lines = [
        "# Per-participant benchmark (BIDS App, 1 mm)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), no GPU; "
        f"date {result['date']}.",
        "",
        "One traveling-phantom participant session with T1w and T2w (1 mm, 197x233x189 template grid) and "
        f"one DWI run ({result['dwi_volumes']} volumes, 2 mm template grid), `--registration "
        f"{result['registration']}`, `--nprocs 2`, empty work dir: preprocessing, registration, harmonization "
        "of every image and volume to another site, tensor fits before and after, derivatives.",
        "",
        "| run | exit | wall time (s) | peak memory (MiB, process tree) |",
        "|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        lines.append(f"| {name} | {run['exit_code']} | {run['wall_s']} | {run['peak_rss_mib']} |")
    lines += [
        "",
        f"**Headline** (`participant --target-site`, one session from scratch): **{head['wall_s']} s** "
        f"(target <= 300 s) and **{head['peak_rss_mib']} MiB** peak (target <= 6144 MiB): "
        f"{'met' if head['wall_s'] <= 300 and head['peak_rss_mib'] <= 6144 else 'NOT met'}.",
        "",
        "The phantom's images are skull-stripped, so the brain-mask registrations converge quickly; on real "
        "whole-head T1w they take longer (docs/realbids.md times the app on real data).",
        "",
        "Seconds per step of the headline run (nipype node runtimes; steps run two at a time):",
        "",
        "| step | s |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in list(result["node_seconds"].items())[:20]]
    lines += ["", "Commands of every run:", ""]
    lines += [f"- {name}: `{run['command']}`" for name, run in result["runs"].items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    import nibabel as nib

    from ihf_bids.phantom import generate_phantom

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registration", choices=("affine", "syn"), default="affine")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "bench" / "_runs" / "participant")
    parser.add_argument("--out-prefix", type=Path, default=ROOT / "docs" / "benchmark-participant")
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    dataset = generate_phantom(run_dir / "bids", n_subjects=1, n_sites=2, size="1mm", seed=0)
    bids, out = str(dataset.root), str(run_dir / "out")
    common = ["--nprocs", "2", "--registration", args.registration, "--skip-bids-validation"]
    runs = {}
    runs["participant, preprocessing only, both sessions"] = timed_run(
        [bids, out, "participant", "-w", str(run_dir / "work"), *common], run_dir / "preproc.log")
    runs["group --train"] = timed_run(
        [bids, out, "group", "--train", "--train-preset", str(ROOT / "pipelines" / "training" / "smoke.toml"),
         "--train-steps", str(args.train_steps), "-w", str(run_dir / "work")], run_dir / "train.log")
    target, source = dataset.sites[0], dataset.sites[1]
    headline_work = run_dir / "work_headline"
    runs[f"participant --target-site {target}, session {source}, empty work dir"] = head = timed_run(
        [bids, out, "participant", "--target-site", target, "--session-label", source, "-w", str(headline_work),
         *common], run_dir / "headline.log")
    dwi = nib.load(str(dataset.image_path(dataset.subjects[0], source, "dwi")))
    result = {
        "command": "python bench/bench_participant.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "registration": args.registration,
        "dwi_volumes": int(dwi.shape[3]),
        "runs": runs,
        "headline": head,
        "node_seconds": node_times(headline_work),
    }
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out_prefix}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(Path(f"{args.out_prefix}.md"), result)
    print(json.dumps({k: result[k] for k in ("runs",)}, indent=2))
    return 0 if all(r["exit_code"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
