"""Cost of the pre-flight: every selected image read and checked before a run starts.

The pre-flight (``ihf_bids.preproc.inputs.check_session_inputs``) reads each image once, so its
cost is the time to decompress the dataset. This benchmark times it on the real multi-vendor
data (``../shared/data/realbids``) when it is there, otherwise on a traveling phantom at 1 mm,
with one and with two threads, each twice (the first read may come from disk, the second from
the file cache); every run is reported.

Usage (the figures in docs/benchmark-preflight.md came from the command recorded there)::

    .venv/bin/python bench/bench_preflight.py
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_core import machine_description  # noqa: E402

REALBIDS = ROOT.parent / "shared" / "data" / "realbids"


def _dataset(scratch: Path) -> tuple[Path, str]:
    if REALBIDS.is_dir():
        return REALBIDS, "real multi-vendor data (../shared/data/realbids)"
    from ihf_bids.phantom import generate_phantom

    root = generate_phantom(scratch / "bids", n_subjects=2, n_sites=3, size="full", seed=0).root
    return root, "traveling phantom, 2 subjects x 3 sites, 1 mm (realbids absent)"


def _machine_text(machine: dict) -> str:
    gpu = machine.get("gpu") or "no GPU"
    return (f"{machine.get('cpu')}, {machine.get('cores')} cores, {gpu}; torch {machine.get('torch')}, "
            f"Python {machine.get('python')}")


def main() -> int:
    """Time the pre-flight; write docs/benchmark-preflight.{md,json}."""
    from ihf_bids.bids.layout import collect_inputs
    from ihf_bids.preproc.inputs import check_session_inputs

    with tempfile.TemporaryDirectory() as scratch:
        root, label = _dataset(Path(scratch))
        sessions = collect_inputs(root)
        images = [p for s in sessions for p in s.images]
        compressed = sum(os.path.getsize(p) for p in images)
        runs = []
        for threads in (1, 2):
            for repeat in (1, 2):
                start = time.perf_counter()
                check_session_inputs(sessions, nprocs=threads)
                runs.append({"threads": threads, "repeat": repeat, "seconds": round(time.perf_counter() - start, 2)})
    result = {
        "command": "python bench/bench_preflight.py",
        "machine": machine_description(),
        "dataset": label,
        "sessions": len(sessions),
        "images": len(images),
        "compressed_mb": round(compressed / 1e6, 1),
        "runs": runs,
    }
    docs = ROOT / "docs"
    (docs / "benchmark-preflight.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {r['threads']} | {r['repeat']} | {r['seconds']:.2f} |" for r in runs)
    (docs / "benchmark-preflight.md").write_text(
        "# Pre-flight cost\n\n"
        "Before a participant run writes anything, it reads and checks every selected image "
        "(docs/reliability.md). This is what that costs.\n\n"
        f"Command: `{shlex.join([sys.executable.split('/')[-1], *sys.argv])}` "
        f"(run from the repository root)\n\n"
        f"Machine: {_machine_text(result['machine'])}\n\n"
        f"Dataset: {label}: {len(sessions)} sessions, {len(images)} images, "
        f"{result['compressed_mb']} MB compressed.\n\n"
        "| threads | repeat | seconds |\n|---|---|---|\n" + rows + "\n\n"
        "The second repeat reads from the file cache. Either way the pre-flight adds seconds to a "
        "run whose participant level takes minutes (docs/benchmark-participant.md). Measured while "
        "the test suite ran on the same two cores.\n"
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
