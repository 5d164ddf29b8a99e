"""Core benchmark: harmonization quality on held-out traveling-phantom subjects, the
model's round-trip error, and inference time and peak memory for a 1 mm volume.

Usage (the figures in docs/benchmark-core.md came from the command recorded there)::

    .venv/bin/python bench/bench_core.py --size tiny --subjects 8 --test-subjects 3 --steps 2000 --batch-size 16

Writes docs/benchmark-core.json and docs/benchmark-core.md (override with --out-prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

_INFERENCE_SNIPPET = r"""
import json, resource, sys, time
import numpy as np, torch
from ihf_bids.harmonize import TargetProfile, harmonize_volume, load_model
from ihf_bids.templates import load_template
model_dir, repeats = sys.argv[1], int(sys.argv[2])
model, meta = load_model(model_dir)
target, source = TargetProfile.load(sys.argv[3]), TargetProfile.load(sys.argv[4])
tpl = load_template(1.0)
volume = (tpl.t1 * tpl.brain_mask).astype(np.float32)
mask = tpl.brain_mask > 0.5
result = {"shape": list(volume.shape), "threads": torch.get_num_threads()}
for name, source_profile, n in (("site_profiles", source, repeats), ("no_source_profile", None, 1)):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = harmonize_volume(volume, model, target, source_profile=source_profile, mask=mask, batch_size=8)
        times.append(time.perf_counter() - t)
    result[name] = {"seconds": times, "median_s": float(np.median(times)), "finite": bool(np.isfinite(out).all())}
    result[name + "_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def machine_description() -> dict:
    """CPU model, cores and library versions of this machine."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def round_trip_error(model, scans) -> dict:
    """Max |decode(encode(x)) - x| with the AAN bypassed, on real windows, float32 and float64."""
    import copy

    import torch

    from ihf_bids.harmonize import robust_intensity_scale, volume_to_windows

    scan = next(s for s in scans if s.modality == "T1w")
    volume = scan.volume_list[0]
    windows = volume_to_windows(robust_intensity_scale(volume, scan.mask).normalize(volume), model.config.size_multiple)
    out = {}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        net = copy.deepcopy(model).to(dtype)
        x = torch.from_numpy(windows).to(dtype)
        with torch.no_grad():
            z, cache = net.encode(x)
            out[name] = float((net.decode(z, cache) - x).abs().max())
    return out


def inference_1mm(model_dir: Path, target_profile: Path, source_profile: Path, repeats: int = 3) -> dict:
    """Time harmonize_volume on the 1 mm MNI152 T1 (197x233x189) in a fresh process.

    Timed twice: with both sites' profiles (the normal path: no VGG pass) and without a
    source-site profile (the fallback that computes the volume's own VGG statistics).
    """
    result = subprocess.run(
        [sys.executable, "-c", _INFERENCE_SNIPPET, str(model_dir), str(repeats), str(target_profile), str(source_profile)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_markdown(path: Path, result: dict) -> None:
    from ihf_bids.demo import format_summary

    m = result["machine"]
    inf = result["inference_1mm"]
    c = result["experiment"]["config"]
    lines = [
        "# Core benchmark: IHF-Harmony on the traveling phantom",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cores']}-core CPU ({m['cpu']}), torch {m['torch']} with {m['torch_threads']} threads"
        + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU") + f"; date {result['date']}.",
        "",
        f"Data: traveling phantom, size `{c['size']}`, {c['n_subjects']} subjects x {c['n_sites']} sites "
        f"({', '.join(result['experiment']['sites'])}); trained on subjects "
        f"{', '.join(result['experiment']['train_subjects'])} from every site, evaluated on held-out subjects "
        f"{', '.join(result['experiment']['test_subjects'])}. Target site: `{result['experiment']['target_site']}`.",
        f"Training: {c['steps']} steps, batch {c['batch_size']}, Adam lr {c['learning_rate']}, seed {c['seed']}; "
        f"{c['dwi_volumes_per_run']} DWI volumes per shell and run for training and profiles.",
        "",
        "Methods: *unharmonized* = the source scan with only its linear intensity scale moved onto the "
        "target site's (99.5th percentile in the brain); *histogram-matching* = quantile mapping of the brain "
        "intensities onto the target site's average quantiles (training subjects); *ihf-harmony* = the network "
        "with the target site's profile. Metrics inside the subject's brain mask against the same subject's "
        "scan at the target site, data range = robust range of that scan; RMSE is normalized by it. DWI shells "
        "are compared as direction averages (gradient tables differ between sites). 'same site' rows harmonize "
        "the target-site scan to its own site (it must not degrade).",
        "",
        format_summary(result["experiment"]["summary"]),
        "",
        "## Round trip (AAN bypassed, real T1w windows)",
        f"max |x - decode(encode(x))|: float32 {result['round_trip']['float32']:.2e}, "
        f"float64 {result['round_trip']['float64']:.2e}.",
        "",
        "## Inference of a 1 mm volume",
        f"`harmonize_volume` on the MNI152 2009a T1 at 1 mm ({' x '.join(map(str, inf['shape']))}), batch 8, "
        f"{inf['threads']} threads, fresh process, CPU:",
        "",
        f"- with the source and target sites' profiles (the normal path, no VGG pass): median "
        f"{inf['site_profiles']['median_s']:.1f} s over {len(inf['site_profiles']['seconds'])} runs "
        f"({', '.join(f'{s:.1f}' for s in inf['site_profiles']['seconds'])} s); peak resident memory "
        f"{inf['site_profiles_peak_rss_mib']:.0f} MiB (whole process, model and template included);",
        f"- without a source-site profile (single reference image or unprofiled site: one VGG19 pass over the "
        f"volume): {inf['no_source_profile']['median_s']:.1f} s; peak {inf['no_source_profile_peak_rss_mib']:.0f} MiB.",
        "",
        "No GPU was available for this measurement.",
        "",
        "## Time spent",
        ", ".join(f"{k.replace('_s', '')} {v:.0f} s" for k, v in result["experiment"]["timings"].items()) + ".",
        "",
        "## Remarks",
        "- The phantom is small (4 mm voxels at size `tiny`) because training runs on a 2-core CPU; larger "
        "sizes need a GPU, which this run did not have.",
        "- Training is seeded and deterministic on the CPU, but small changes of the training set-up move the "
        "figures: the SSIM margins over histogram matching are thin (a few tenths of a percentage point), "
        "while the PSNR margins are about 1-5 dB. docs/model.md lists a variant that lost the T1w SSIM margin.",
        "- `dwi-b2000` exists at one site only, so it is never a training source and can only be harmonized to "
        "its own site; the network changes it somewhat even then (same-site rows).",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    from ihf_bids.demo import ExperimentConfig, run_phantom_experiment, to_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--test-subjects", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_runs" / "core")
    parser.add_argument("--out-prefix", type=Path, default=ROOT / "docs" / "benchmark-core")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from an existing .json")
    args = parser.parse_args(argv)
    if args.markdown_only:
        write_markdown(args.out_prefix.with_suffix(".md"), json.loads(args.out_prefix.with_suffix(".json").read_text()))
        return 0
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ExperimentConfig(
        size=args.size, n_subjects=args.subjects, n_test=args.test_subjects, n_sites=args.sites, seed=args.seed,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, eval_dwi_volumes_per_run=None,
    )
    t0 = time.monotonic()  # run_phantom_experiment starts from scratch (no resumed model)
    experiment = run_phantom_experiment(config, args.workdir)
    from ihf_bids.demo import load_phantom_scans
    from ihf_bids.harmonize import load_model, profile_filename

    model_dir = Path(experiment["model_dir"])
    model, _ = load_model(model_dir)
    scans = load_phantom_scans(experiment["dataset"], experiment["test_subjects"][:1])
    result = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_core.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "experiment": {k: v for k, v in experiment.items() if k not in ("rows", "dataset")},
        "rows": experiment["rows"],
        "round_trip": round_trip_error(model, scans),
        "inference_1mm": inference_1mm(
            model_dir,
            model_dir / "profiles" / profile_filename(experiment["target_site"], "T1w"),
            model_dir / "profiles" / profile_filename(
                next(s for s in experiment["sites"] if s != experiment["target_site"]), "T1w"
            ),
        ),
        "total_s": time.monotonic() - t0,
    }
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    args.out_prefix.with_suffix(".json").write_text(to_json(result))
    write_markdown(args.out_prefix.with_suffix(".md"), result)
    print(args.out_prefix.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
