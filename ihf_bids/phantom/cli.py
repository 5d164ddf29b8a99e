"""Command line: ``ihf-bids-phantom OUTPUT_DIR [options]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from ..cli.parser import int_at_least
from .generate import MODALITIES, PHANTOM_SIZES


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ihf-bids-phantom``."""
    parser = argparse.ArgumentParser(
        prog="ihf-bids-phantom",
        description=(
            "Write a simulated traveling-subject BIDS dataset: every subject scanned at every "
            "site, with the ground truth in OUTPUT_DIR/derivatives/phantom."
        ),
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path, help="dataset root to create")
    parser.add_argument("--subjects", type=int_at_least(1), default=4, metavar="N", help="number of subjects (default 4)")
    parser.add_argument("--sites", type=int_at_least(1), default=3, metavar="M", help="number of sites (default 3)")
    parser.add_argument(
        "--size",
        choices=tuple(PHANTOM_SIZES),
        default="tiny",
        help="anatomical voxel size: tiny 4 mm, small 2 mm, 1mm 1 mm (default tiny)",
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument(
        "--modalities",
        nargs="+",
        choices=MODALITIES,
        default=list(MODALITIES),
        metavar="MOD",
        help=f"modalities to simulate, among {' '.join(MODALITIES)} (default all)",
    )
    parser.add_argument(
        "--no-head-motion",
        dest="head_motion",
        action="store_false",
        help="write every image on the template grid (by default each session has its own head position: "
        "a rigid motion of a few degrees and mm, written into the image headers)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.output_dir.expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"OUTPUT_DIR {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"OUTPUT_DIR {out} is not empty; use --overwrite to replace it")

    from .generate import generate_phantom

    start = time.perf_counter()
    try:
        dataset = generate_phantom(
            out,
            n_subjects=args.subjects,
            n_sites=args.sites,
            size=args.size,
            seed=args.seed,
            modalities=args.modalities,
            overwrite=args.overwrite,
            head_motion=args.head_motion,
        )
    except (FileExistsError, ValueError) as error:
        parser.error(str(error))
    if not args.quiet:
        print(
            f"wrote {len(dataset.subjects)} subjects x {len(dataset.sites)} sites "
            f"({', '.join(dataset.sites)}), size {dataset.size}, to {dataset.root} "
            f"in {time.perf_counter() - start:.1f} s"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
