"""Registration benchmark: does the same brain land in the same place at every site?

A traveling phantom whose every session has its own head position (a seeded rigid motion of
2-6 degrees and up to 10 mm, docs/phantom.md) is preprocessed by the app's participant level
(``ihf-bids BIDS OUT participant``); the transforms the run wrote are then compared with the
known head positions (``ihf_bids.phantom.alignment``): for every pair of images of one
subject (T1w, T2w and DWI of every session), the mean distance over the template's brain
between the anatomical points the two images put at the same template voxel. Perfect
registration gives 0; the app's target is below one voxel for every pair.

``--code REV`` runs the same benchmark on another revision of the package (a ``git
worktree`` of REV on ``PYTHONPATH``, the same virtual environment), for the "before" rows;
older revisions wrote the within-session transforms only into the work directory, where they
are read from.

Usage (the figures in docs/benchmark-registration.md came from the commands recorded there)::

    .venv/bin/python bench/bench_registration.py --size tiny --subjects 2 --sites 3 --seed 1
    .venv/bin/python bench/bench_registration.py --size tiny --subjects 2 --sites 3 --seed 1 --code c5b884e

Each run adds (or replaces) its row in docs/benchmark-registration.json and rewrites
docs/benchmark-registration.md from all rows.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_core import machine_description  # noqa: E402
from bench_participant import timed_run  # noqa: E402

DOC = ROOT / "docs" / "benchmark-registration"
VOXEL = {"tiny": 4.0, "small": 2.0, "1mm": 1.0}


def placements(out: Path, work: Path, bids: Path, subject: str, sites: list[str], anat: float, dwi: float):
    """Where each image went: the derivatives' transforms, or (older revisions) the work dir's."""
    from ihf_bids.phantom.alignment import ImagePlacement, placements_from_derivatives

    found = []
    for item in placements_from_derivatives(out, bids, subject, sites, anat_voxel_size=anat, dwi_voxel_size=dwi):
        last = Path(item.transforms[-1])
        if not last.is_file():  # an older revision: the rigid step's file in the work dir
            session = work / "ihf_bids_wf" / f"sub_{subject}_ses_{item.site}_wf"
            node = {"T2w": "anat_1_T2w_wf/register_to_reference", "dwi": "dwi_0_wf/register_to_anat"}[item.modality]
            item = ImagePlacement(item.subject, item.site, item.modality, item.image,
                                  (*item.transforms[:-1], str(session / node / "affine.mat")), item.voxel_size)
        found.append(item)
    return found


def _complete(items):
    """Placements whose transforms all exist, and the names of the others (a run that failed on them)."""
    done = [p for p in items if all(Path(t).is_file() for t in p.transforms)]
    return done, [f"sub-{p.subject}/{p.site}/{p.modality}" for p in items if p not in done]


def write_markdown(rows: list[dict]) -> None:
    """docs/benchmark-registration.md from every recorded row."""
    lines = [
        "# Registration benchmark: the same brain in the same place at every site",
        "",
        "Written by `bench/bench_registration.py` (its docstring explains the measure). A traveling phantom "
        "whose every session has its own head position (2-6 degrees, up to 10 mm; docs/phantom.md) runs "
        "through the app's participant level; for every pair of images of one subject (T1w, T2w and DWI of "
        "every session) the table gives the mean distance, over the template's brain, between the anatomical "
        "points that the two images place at the same template voxel. Perfect registration gives 0; the "
        "target is below one voxel (of the coarser of the two grids) for every pair.",
        "",
        "Columns: pair kinds; `worst` = the largest mean distance of any pair of that kind (mm); `median` = the "
        "median over pairs (mm); `> 1 voxel` = pairs above one voxel / pairs.",
        "",
        "| code | grid (anat/DWI mm) | registration | sessions | pair kind | median (mm) | worst (mm) | > 1 voxel | "
        "participant wall (s) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        first = True
        for kind, entry in row["summary"].items():
            head = (f"| {row['code']} | {row['anat_voxel']:g}/{row['dwi_voxel']:g} | {row['registration']} | "
                    f"{row['subjects']}x{row['sites']} | ") if first else "| | | | | "
            tail = (f" {row['run']['wall_s']} | {row['run']['peak_rss_mib']} |" if first else " | |")
            lines.append(f"{head}{kind} | {entry['median_mean_mm']:.2f} | {entry['max_mean_mm']:.2f} | "
                         f"{entry['above_one_voxel']}/{entry['pairs']} |{tail}")
            first = False
    lines += ["", "Runs (command, machine, date, exit code of the participant level):", ""]
    for row in rows:
        m = row["machine"]
        missing = row.get("missing_images") or []
        lines.append(f"- `{row['command']}`: {m['cpu']}, {m['cores']} cores; {row['date']}; exit "
                     f"{row['run']['exit_code']}; phantom seed {row['seed']}"
                     + (f"; no transform for {len(missing)} image(s), left out: {', '.join(missing)}" if missing
                        else "") + ".")
    lines += [
        "",
        "`code` is the package revision: `current` is this one; a revision hash is the code before the "
        "registration fixes (millimetre schedules, starts from the scanner geometry inside a session, bounded "
        "results with fallbacks, metric regions applied to the images instead of ANTs masks, which failed "
        "silently on oblique images; docs/usage.md). The participant wall times include the quality checks "
        "(the mirror registration of every within-session step) and were taken on a shared 2-core machine: "
        "docs/benchmark-participant.md has the clean 1 mm timing.",
        "",
    ]
    Path(f"{DOC}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    from ihf_bids.phantom import generate_phantom
    from ihf_bids.phantom.alignment import misalignment_table, summarize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(VOXEL), default="tiny")
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--registration", choices=("affine", "syn"), default="affine")
    parser.add_argument("--code", default="current", help="a git revision to benchmark instead of this tree")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "bench" / "_runs" / "registration")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)

    anat = VOXEL[args.size]
    dwi = max(2.0, anat)
    tag = f"{args.code}_{args.size}_{args.registration}_{args.subjects}x{args.sites}_seed{args.seed}"
    run_dir = args.run_dir / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    pythonpath = None
    if args.code != "current":
        checkout = run_dir / "code"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), args.code],
                       check=True, capture_output=True)
        pythonpath = str(checkout)
    try:
        dataset = generate_phantom(run_dir / "bids", n_subjects=args.subjects, n_sites=args.sites, size=args.size,
                                   seed=args.seed)
        out, work = run_dir / "out", run_dir / "work"
        app = [str(dataset.root), str(out), "participant", "-w", str(work), "--anat-resolution", f"{anat:g}",
               "--dwi-resolution", f"{dwi:g}", "--registration", args.registration, "--nprocs", "2",
               "--skip-bids-validation"]
        run = timed_run(app, run_dir / "participant.log", pythonpath=pythonpath)
        found = []
        for subject in dataset.subjects:
            found += placements(out, work, dataset.root, subject, list(dataset.sites), anat, dwi)
        found, missing = _complete(found)
        pairs = misalignment_table(found, dataset.root, voxel_size=dwi)
    finally:
        if pythonpath:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", pythonpath], check=False)
    row = {
        "command": "python bench/bench_registration.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "code": args.code, "date": time.strftime("%Y-%m-%d"), "machine": machine_description(),
        "size": args.size, "anat_voxel": anat, "dwi_voxel": dwi, "registration": args.registration,
        "subjects": args.subjects, "sites": args.sites, "seed": args.seed, "run": run,
        "summary": summarize(pairs), "pairs": pairs, "missing_images": missing,
    }
    store = Path(f"{DOC}.json")
    rows = json.loads(store.read_text()) if store.is_file() else []
    rows = [r for r in rows if (r["code"], r["size"], r["registration"], r["subjects"], r["sites"], r["seed"])
            != (row["code"], row["size"], row["registration"], row["subjects"], row["sites"], row["seed"])]
    rows.append(row)
    rows.sort(key=lambda r: (-r["anat_voxel"], r["registration"], r["code"] == "current"))
    store.write_text(json.dumps(rows, indent=1) + "\n")
    write_markdown(rows)
    print(json.dumps({"run": run, "summary": row["summary"]}, indent=1))
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if run["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
