"""Command-line arguments of ``ihf-bids`` (BIDS App conventions; docs/usage.md).

Only the standard library is imported here so that ``ihf-bids --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

__all__ = ["build_parser", "int_at_least", "parse_memory"]

MODALITIES = ("T1w", "T2w", "dwi")
SITE_SOURCES = ("auto", "sessions", "participants", "sidecar")
#: Kept equal to ihf_bids.qc.evaluation.BASELINES (a test checks), without importing it here.
QC_BASELINES = ("histogram-matching", "combat")


def parse_memory(text: str) -> float:
    """Memory in GB from ``16``, ``16G``, ``16GB``, ``500MB``, ``1.5T``.

    Examples
    --------
    >>> parse_memory("16G"), parse_memory("500MB"), parse_memory("2")
    (16.0, 0.5, 2.0)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read memory {text!r}; write e.g. 16G or 500MB")
    value, unit = float(match.group(1)), match.group(2).upper()
    return value * {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3, "": 1.0}[unit]


def _existing_dir(text: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is not a directory (in a container, check that it is mounted, e.g. docker -v /data:/bids:ro)"
        )
    return path


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} does not exist or is not a file")
    return path


def int_at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


def _plugin_file(text: str) -> dict:
    from .plugin import plugin_file

    return plugin_file(text)


def _voxel_size(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of mm") from None
    if not 0.5 <= value <= 8:
        raise argparse.ArgumentTypeError(f"voxel size {value} mm is outside 0.5-8 mm")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``ihf-bids`` argument parser."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="ihf-bids",
        description=(
            "Harmonize multi-site brain MRI (T1w, T2w, DWI) to a reference site with IHF-Harmony. "
            "participant: preprocess (and harmonize, with --target-site); group: train a model "
            "(--train) or aggregate QC. Exit codes: 0 success, 1 processing failure, 2 usage error, "
            "65 input data error, 70 workflow could not be built."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=_existing_dir, help="the root of the input BIDS dataset (read only)")
    parser.add_argument("output_dir", type=lambda s: Path(s).expanduser().absolute(),
                        help="where the derivatives go (may be bids_dir/derivatives/<name>)")
    parser.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    parser.add_argument("--version", action="version", version=f"ihf-bids {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat for debug)")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                     help="participants to process, with or without 'sub-' (default: all)")
    sel.add_argument("--session-label", nargs="+", metavar="LABEL",
                     help="sessions to process, with or without 'ses-' (default: all)")
    sel.add_argument("--bids-filter-file", type=_existing_file, metavar="JSON",
                     help="pybids filters per query (t1w, t2w, dwi); null = entity absent, \"*\" = any")
    sel.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES),
                     help="modalities to process")
    sel.add_argument("--skip-bids-validation", action="store_true",
                     help="do not run bids-validator-deno on the input dataset")

    sites = parser.add_argument_group("sites")
    sites.add_argument("--site-source", choices=SITE_SOURCES, default="auto",
                       help="where site labels come from: sessions.tsv, participants.tsv, sidecars, "
                            "or auto (sessions.tsv, then participants.tsv, then sidecars)")
    sites.add_argument("--site-column", default="site", help="column of sessions.tsv/participants.tsv")
    sites.add_argument("--site-sidecar-fields", nargs="+",
                       default=["Manufacturer", "ManufacturersModelName"],
                       help="sidecar fields joined into a site label (e.g. InstitutionName StationName)")

    harm = parser.add_argument_group("harmonization")
    harm.add_argument("--target-site", metavar="SITE",
                      help="participant: harmonize every image to this site; group: the target to evaluate "
                           "(default: the one recorded in the harmonized images)")
    harm.add_argument("--target-reference", type=_existing_file, metavar="IMAGE",
                      help="harmonize to this single preprocessed image (template space, e.g. a "
                           "desc-preproc image of ihf-bids) instead of a site profile")
    harm.add_argument("--model", metavar="DIR_OR_NAME", default="ihf-harmony",
                      help="a model directory, or a name under output_dir/models/ (with group --train: the name "
                           "of the model to write, letters, digits, ., _ and -)")
    harm.add_argument("--registration", choices=["affine", "syn"], default="affine",
                      help="anatomical registration to the template")
    harm.add_argument("--anat-resolution", type=_voxel_size, default=1.0, metavar="MM",
                      help="voxel size of the template grid for T1w/T2w")
    harm.add_argument("--dwi-resolution", type=_voxel_size, default=2.0, metavar="MM",
                      help="voxel size of the template grid for DWI")
    harm.add_argument("--native-outputs", action="store_true",
                      help="also write harmonized images resampled back to the T1w's native space")
    harm.add_argument("--train", action="store_true", help="group level: train IHF-Harmony on all participants")
    harm.add_argument("--train-steps", type=int_at_least(1), metavar="N",
                      help="group --train: optimisation steps (default: the preset's)")
    harm.add_argument("--train-preset", type=_existing_file, metavar="TOML",
                      help="group --train: a training preset (pipelines/training/*.toml)")

    qc = parser.add_argument_group("quality control (group level)")
    qc.add_argument("--qc-baselines", nargs="+", choices=[*QC_BASELINES, "none"], default=list(QC_BASELINES),
                    metavar="METHOD",
                    help="baselines evaluated beside IHF-Harmony in the group report: histogram-matching "
                         "(images), combat (derived features, neuroHarmonize); 'none' for neither "
                         "(default: both)")

    perf = parser.add_argument_group("resources")
    perf.add_argument("-w", "--work-dir", type=lambda s: Path(s).expanduser().absolute(),
                      default=Path("work").absolute(), help="intermediate results (reused on re-runs)")
    perf.add_argument("--nprocs", "--n-cpus", type=int_at_least(1), default=os.cpu_count() or 1,
                      help="processes nipype may run at once")
    perf.add_argument("--omp-nthreads", type=int_at_least(1), default=None,
                      help="threads per process (default: min(nprocs, 8))")
    perf.add_argument("--mem", type=parse_memory, metavar="GB",
                      help="memory the run may use (a scheduling hint, e.g. 16G)")
    perf.add_argument("--use-plugin", type=_plugin_file, metavar="FILE",
                      help="nipype plugin settings, YAML or JSON with 'plugin' and 'plugin_args' (e.g. "
                           "pipelines/nipype/slurm.yml); default: MultiProc with --nprocs (Linear with 1)")
    perf.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="device for the network (auto: CUDA when present)")
    perf.add_argument("--random-seed", type=int_at_least(0), default=0,
                      help="seed of registration and training (bit-identical re-runs on the CPU also need --omp-nthreads 1)")
    perf.add_argument("--stop-on-first-crash", action="store_true", help="stop at the first failing step")
    return parser
