"""The traveling-phantom experiment: simulate, train, harmonize held-out subjects, score.

``ihf-bids-demo OUT`` runs it end to end on the embedded phantom (nothing is downloaded):
it writes a phantom BIDS dataset, trains IHF-Harmony on some subjects from every site,
builds the target site's profiles, harmonizes the held-out subjects from every site to
the target site with three methods (no harmonization, histogram matching, IHF-Harmony) and
scores each against the same subject's own target-site scan. ``bench/bench_core.py`` runs
the same experiment at a larger size.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ExperimentConfig", "load_phantom_scans", "main", "run_phantom_experiment"]

LOGGER = logging.getLogger("ihf_bids.demo")

METHODS = ("unharmonized", "histogram-matching", "ihf-harmony")


@dataclass
class ExperimentConfig:
    """Settings of one phantom experiment."""

    size: str = "tiny"
    n_subjects: int = 5
    n_test: int = 2
    n_sites: int = 3
    target_site: str | None = None  # default: the first site
    seed: int = 0
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    dwi_volumes_per_run: int = 6  # per shell, for training and profiles
    eval_dwi_volumes_per_run: int | None = 12  # per shell, for evaluation (None: all)
    modalities: tuple[str, ...] = ("T1w", "T2w", "dwi")
    architecture: dict | None = None
    loss: dict = field(default_factory=dict)


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def load_phantom_scans(dataset, subjects, *, dwi_volumes_per_run: int | None = None):
    """Read a phantom's images as :class:`~ihf_bids.qc.traveling.Scan` objects.

    DWI runs are split into b-shells (``dwi-b0``, ``dwi-b1000``...); the volumes of a shell
    share one intensity scale (:func:`~ihf_bids.harmonize.dwi.shell_intensity_scales`). ``dwi_volumes_per_run`` keeps that many volumes
    of each shell, spread over the gradient directions (all when None).
    """
    from .harmonize.dwi import shell_intensity_scales
    from .preproc.dwi import b0_mean, shell_labels, spread_indices
    from .qc.traveling import Scan

    scans = []
    for subject in subjects:
        anat_mask = _load(dataset.truth_path(subject, "brain")) > 0.5
        if "dwi" in dataset.modalities:
            dwi_mask = _load(dataset.truth_path(subject, "brain", grid="dwi")) > 0.5
        for site in dataset.sites:
            for modality in dataset.modalities:
                path = dataset.image_path(subject, site, modality)
                if modality != "dwi":
                    scans.append(Scan(subject, site, modality, _load(path), anat_mask))
                    continue
                data = _load(path)
                bvals = np.loadtxt(str(path).replace(".nii.gz", ".bval"), ndmin=1)
                b0_mean(data, bvals)  # checks that the run has a b=0 volume
                labels = shell_labels(bvals)
                scales = shell_intensity_scales(data, labels, dwi_mask)
                for shell, scale in scales.items():
                    idx = np.flatnonzero(np.asarray(labels) == shell)
                    if dwi_volumes_per_run is not None:
                        idx = idx[spread_indices(idx.size, dwi_volumes_per_run)]
                    scans.append(Scan(subject, site, f"dwi-{shell}", data[..., idx], dwi_mask, scale.scale))
    return scans


def _scale(scan):
    from .harmonize.volume import IntensityScale, robust_intensity_scale

    if scan.scale is not None:
        return IntensityScale(scan.scale)
    return robust_intensity_scale(scan.volume_list[0], scan.mask)


def _harmonizers(model, profiles: dict, target: str, quantiles: dict, device: str) -> dict:
    """The three compared methods, each mapping a scan to harmonized volumes.

    ``profiles`` maps (site, modality) to every site's profile; ``target`` is the target site.
    """
    from .harmonize import harmonize_volume, histogram_match_to_quantiles

    def unharmonized(scan):
        # Only the linear intensity scale moves, by the ratio of the sites' typical scales.
        factor = profiles[target, scan.modality].intensity_scale / profiles[scan.site, scan.modality].intensity_scale
        return [v * factor for v in scan.volume_list]

    def histogram_matching(scan):
        return [histogram_match_to_quantiles(v, quantiles[scan.modality], source_mask=scan.mask) for v in scan.volume_list]

    def ihf(scan):
        return [
            harmonize_volume(
                v, model, profiles[target, scan.modality], source_profile=profiles[scan.site, scan.modality],
                mask=scan.mask, source_scale=_scale(scan), device=device,
            )
            for v in scan.volume_list
        ]

    return dict(zip(METHODS, (unharmonized, histogram_matching, ihf)))


def run_phantom_experiment(config: ExperimentConfig, workdir: str | Path, *, progress: bool = True) -> dict:
    """Run the whole experiment in ``workdir``.

    Returns a dict that is JSON-serialisable except for its ``dataset`` entry (the
    :class:`~ihf_bids.phantom.PhantomDataset` that was written).
    """
    import torch

    from .harmonize import intensity_quantiles, resolve_device
    from .model import load_vgg19
    from .phantom import generate_phantom
    from .qc.traveling import evaluate_traveling_subjects, summarize_rows
    from .train import SliceBank, TrainConfig, TrainingVolume, train_model

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    device = resolve_device("auto")

    t = time.monotonic()
    # The experiment trains and scores on the raw voxel arrays with the truth masks, without
    # the app's registration, so the phantom is written on the template grid (no head motion).
    dataset = generate_phantom(
        workdir / "phantom", n_subjects=config.n_subjects, n_sites=config.n_sites, size=config.size,
        seed=config.seed, overwrite=True, modalities=config.modalities, head_motion=False,
    )
    timings["phantom_s"] = time.monotonic() - t
    target = config.target_site or dataset.sites[0]
    if target not in dataset.sites:
        raise ValueError(f"target site {target!r} is not one of the phantom's sites {dataset.sites}")
    train_subjects = dataset.subjects[: config.n_subjects - config.n_test]
    test_subjects = dataset.subjects[config.n_subjects - config.n_test :]
    LOGGER.info("phantom %s: sites %s, training subjects %s, held out %s", config.size, dataset.sites, train_subjects, test_subjects)

    train_scans = load_phantom_scans(dataset, train_subjects, dwi_volumes_per_run=config.dwi_volumes_per_run)
    volumes = [
        TrainingVolume(v, s.site, s.modality, s.subject, s.mask, _scale(s))
        for s in train_scans
        for v in s.volume_list
    ]
    try:
        bank = SliceBank(volumes)
    except ValueError as err:  # at size 1mm, DWI lives on a coarser grid than the anatomy
        raise ValueError(f"{err}; run the phantom experiment at size 'tiny' or 'small'") from err
    vgg = load_vgg19()
    t = time.monotonic()
    model_dir = workdir / "model"
    # An experiment starts from scratch: the phantom was just rewritten, so a model or
    # profiles left by an earlier run would not belong to it.
    shutil.rmtree(model_dir, ignore_errors=True)
    train_config = TrainConfig(
        steps=config.steps, batch_size=config.batch_size, learning_rate=config.learning_rate, seed=config.seed,
        checkpoint_every=max(10, config.steps // 10), device=device, architecture=config.architecture, loss=config.loss,
    )
    result = train_model(bank, train_config, model_dir, progress=progress, vgg=vgg)
    timings["profiles_and_training_s"] = time.monotonic() - t

    # The model directory holds a profile for every site and modality (built from the
    # training subjects); the target site's quantiles are the histogram-matching reference.
    quantiles = {
        m: np.mean([intensity_quantiles(v, s.mask) for s in train_scans if (s.site, s.modality) == (target, m) for v in s.volume_list], axis=0)
        for m in bank.modalities
    }

    t = time.monotonic()
    test_scans = load_phantom_scans(dataset, test_subjects, dwi_volumes_per_run=config.eval_dwi_volumes_per_run)
    torch.set_grad_enabled(False)
    rows = evaluate_traveling_subjects(test_scans, target, _harmonizers(result.model, result.profiles, target, quantiles, device))
    torch.set_grad_enabled(True)
    timings["evaluation_s"] = time.monotonic() - t

    return {
        "config": asdict(config),
        "target_site": target,
        "sites": list(dataset.sites),
        "train_subjects": list(train_subjects),
        "test_subjects": list(test_subjects),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "timings": timings,
        "loss_first": result.history[0] if result.history else None,
        "loss_last": result.history[-1] if result.history else None,
        "summary": summarize_rows(rows),
        "rows": rows,
        "model_dir": str(model_dir),
        "dataset": dataset,  # the PhantomDataset (not JSON-serialisable)
    }


def to_json(data) -> str:
    """Strict JSON (infinite PSNR becomes the string "inf")."""

    def clean(value):
        if isinstance(value, float) and not np.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False, default=str) + "\n"


def format_summary(summary: list[dict]) -> str:
    """A Markdown table of the summary rows."""
    lines = [
        "| modality | case | method | n | RMSE (norm.) | PSNR (dB) | SSIM | MS-SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        case = "same site" if r["same_site"] else "other sites"
        rmse, psnr, ssim, ms_ssim = (float(r[k]) for k in ("rmse", "psnr", "ssim", "ms_ssim"))  # "inf" from JSON
        lines.append(
            f"| {r['modality']} | {case} | {r['method']} | {r['n']} | {rmse:.4f} | {psnr:.2f} | {ssim:.4f} | {ms_ssim:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``ihf-bids-demo``."""
    parser = argparse.ArgumentParser(
        prog="ihf-bids-demo",
        description="Simulate a traveling phantom, train IHF-Harmony briefly, harmonize held-out "
        "subjects to one site and compare with histogram matching. Nothing is downloaded.",
    )
    parser.add_argument("output_dir", type=Path, help="folder for the phantom, the model and the results")
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--test-subjects", type=int, default=2)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.test_subjects >= args.subjects:
        parser.error("--test-subjects must be smaller than --subjects")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ExperimentConfig(
        size=args.size, n_subjects=args.subjects, n_test=args.test_subjects, n_sites=args.sites,
        steps=args.steps, batch_size=args.batch_size, seed=args.seed,
    )
    result = run_phantom_experiment(config, args.output_dir)
    result.pop("dataset")
    (args.output_dir / "results.json").write_text(to_json(result))
    table = format_summary(result["summary"])
    (args.output_dir / "results.md").write_text(table + "\n")
    print(f"\nHeld-out subjects harmonized to site '{result['target_site']}' (inside the brain):\n")
    print(table)
    print(f"\nModel: {result['model_dir']}\nResults: {args.output_dir / 'results.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
