"""How close is each candidate target to a held-out subject's true target-site statistics?

Compares, per held-out traveling-phantom subject, modality and source site, the artefact
loss (VGG19 relu1_1..relu3_1 channel statistics, k = 0.9) between the subject's own scan at
the target site and: the unharmonized source; the target site's profile (the paper's
population-style target); the source's statistics moved by the site shift (ihf-bids).
This is the measurement behind the "Target conditioning" section of docs/model.md.

Usage::

    .venv/bin/python bench/bench_target_statistics.py

Writes docs/benchmark-target-statistics.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from ihf_bids.demo import _scale, load_phantom_scans
    from ihf_bids.harmonize import build_target_profile, volume_to_windows
    from ihf_bids.model import HarmonyLoss, load_vgg19, shifted_statistics, site_shift, split_embedding, target_embedding
    from ihf_bids.model.losses import artefact_consistency_loss
    from ihf_bids.model.vgg import ARTEFACT_LAYERS
    from ihf_bids.phantom import generate_phantom

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--test-subjects", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_runs" / "target-statistics")
    parser.add_argument("--out-prefix", type=Path, default=ROOT / "docs" / "benchmark-target-statistics")
    args = parser.parse_args(argv)

    # Raw voxel arrays with the truth masks, no registration: the phantom stays on the template grid.
    dataset = generate_phantom(
        args.workdir / "phantom", n_subjects=args.subjects, n_sites=3, size=args.size, overwrite=True,
        modalities=("T1w", "T2w"), head_motion=False,
    )
    train = dataset.subjects[: args.subjects - args.test_subjects]
    test = dataset.subjects[args.subjects - args.test_subjects :]
    target_site = dataset.sites[0]
    vgg = load_vgg19()
    scales = HarmonyLoss().feature_scale
    train_scans = load_phantom_scans(dataset, train)
    profiles = {
        (site, m): torch.from_numpy(
            build_target_profile(
                [(s.volumes, s.mask, _scale(s), s.subject) for s in train_scans if (s.site, s.modality) == (site, m)],
                site=site, modality=m, vgg=vgg,
            ).embeddings
        )
        for site in dataset.sites
        for m in ("T1w", "T2w")
    }

    def embedding(scan):
        windows = volume_to_windows(_scale(scan).normalize(scan.volumes), 4)
        with torch.no_grad():
            return target_embedding(vgg, torch.from_numpy(windows))

    def distance(a_stats, b_stats, n):
        keep = slice(n // 6, n - n // 6)  # slices with brain
        return float(
            sum(
                artefact_consistency_loss(
                    tuple(x[keep] / s for x in a_stats[layer]), tuple(x[keep] / s for x in b_stats[layer]), 0.9
                )
                for layer, s in zip(ARTEFACT_LAYERS, scales)
            )
        )

    rows = []
    test_scans = {(s.subject, s.modality, s.site): s for s in load_phantom_scans(dataset, test)}
    for subject in test:
        for modality in ("T1w", "T2w"):
            truth = split_embedding(embedding(test_scans[subject, modality, target_site]))
            for site in dataset.sites[1:]:
                own = embedding(test_scans[subject, modality, site])
                n = own.shape[0]
                shift = site_shift(profiles[target_site, modality], profiles[site, modality])
                own_stats = split_embedding(own)
                candidates = {
                    "unharmonized source": own_stats,
                    "target-site profile (population)": split_embedding(profiles[target_site, modality]),
                    "source moved by the site shift": shifted_statistics(
                        {k: own_stats[k] for k in ARTEFACT_LAYERS}, shift
                    ),
                }
                for name, stats in candidates.items():
                    rows.append(
                        {"subject": subject, "modality": modality, "source_site": site, "candidate": name,
                         "distance": distance(truth, stats, n)}
                    )
    # Typical channel mean per artefact layer over the brain slices of the held-out scans:
    # the basis of HarmonyLoss.feature_scale.
    layer_means = {layer: [] for layer in ARTEFACT_LAYERS}
    for scan in test_scans.values():
        stats = split_embedding(embedding(scan))
        n = stats[ARTEFACT_LAYERS[0]][0].shape[0]
        for layer in ARTEFACT_LAYERS:
            layer_means[layer].append(float(stats[layer][0][n // 6 : n - n // 6].mean()))
    layer_means = {layer: float(np.mean(v)) for layer, v in layer_means.items()}
    summary = {}
    for name in dict.fromkeys(r["candidate"] for r in rows):
        values = np.array([r["distance"] for r in rows if r["candidate"] == name])
        summary[name] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()), "n": int(values.size)}
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_target_statistics.py", *(argv or sys.argv[1:])])
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "target_site": target_site,
              "train_subjects": list(train), "test_subjects": list(test), "summary": summary,
              "mean_channel_mean_per_layer": layer_means, "rows": rows}
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    args.out_prefix.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Which target statistics are closest to the truth?",
        "",
        f"Command: `{command}` (2-core CPU, {result['date']}).",
        "",
        f"Phantom `{args.size}`, profiles from subjects {', '.join(train)} at every site; held-out subjects "
        f"{', '.join(test)}; T1w and T2w from every other site to `{target_site}`. Distance: the artefact loss "
        "(relu1_1..relu3_1, k = 0.9, per-layer scales) between the held-out subject's own target-site scan and "
        "the candidate, over the slices with brain. Lower is closer.",
        "",
        "| candidate target | mean | min | max | n |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['mean']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {s['n']} |")
    lines += [
        "",
        "Mean VGG19 channel mean over the brain slices of the held-out scans (caffe-scaled input), the basis "
        "of the artefact loss's per-layer `feature_scale`: "
        + ", ".join(f"{layer} {value:.0f}" for layer, value in layer_means.items()) + ".",
    ]
    args.out_prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
