"""Harmonization evaluation on the traveling phantom: the group report's figures, measured.

Every subject of a simulated cohort is scanned at every site (traveling subjects), so the
group report can show everything it has: per-site intensity distributions, site effects on
derived features (Kruskal-Wallis, ANOVA, mixed-model R2), the site classifier, the age
association, traveling-subject similarity (RMSE, PSNR, SSIM, MS-SSIM, LPIPS) and the
cross-site spread of white-matter FA, for the unharmonized images, IHF-Harmony, histogram
matching and ComBat. The cohort workflow runs through the command line, as a user would:

1. ``ihf-bids-phantom`` (tiny: 4 mm anatomy) with N subjects x M sites;
2. ``participant`` (preprocessing);
3. ``group --train`` (pipelines/training/phantom-tiny.toml, steps from ``--train-steps``);
4. ``participant --target-site siemens`` (harmonization and per-participant reports);
5. ``group`` (tables, group_qc.json and group_report.html with both baselines).

All methods are fitted on the whole cohort (the network, the histogram-matching target and
ComBat alike), which is how a cohort is harmonized in practice. Steps 1-3 are skipped when
their outputs exist in ``--out`` (``--fresh`` starts over), so the report can be re-measured
without retraining. Writes docs/group-report-phantom.{json,md} and the screenshots
docs/images/report-{participant,group}.png.

Usage (the figures in docs/group-report-phantom.md came from the command recorded there)::

    .venv/bin/python bench/bench_group_report.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_core import machine_description  # noqa: E402
from bench_participant import timed_run  # noqa: E402

COMMON = ["--anat-resolution", "4", "--dwi-resolution", "4", "--nprocs", "2", "--omp-nthreads", "1"]
METHODS = ("unharmonized", "ihf-harmony", "histogram-matching", "combat")


def _run(step: str, argv: list[str], logs: Path, results: dict) -> None:
    reran = step in results["steps"]
    result = timed_run(argv, logs / f"{step}.log")
    result["work_dir_reused"] = reran  # a re-run finds the earlier run's finished steps in the work dir
    results["steps"][step] = result
    (logs / "steps.json").write_text(json.dumps(results["steps"], indent=1))
    print(f"{step}: exit {result['exit_code']} in {result['wall_s']} s", flush=True)
    if result["exit_code"] != 0:
        raise SystemExit(f"{step} failed; see {logs / (step + '.log')}")


def _row(rows: list[dict], **match) -> dict:
    for row in rows or []:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return {}


def summary(evaluation: dict) -> dict:
    """The headline numbers per modality and method, from group_qc.json."""
    out = {}
    for modality, section in evaluation["modalities"].items():
        entry = {}
        for method in METHODS:
            clf = _row(section.get("classifier"), method=method)
            trav = {row["image"]: {k: row.get(k) for k in ("psnr", "ssim", "ms_ssim", "rmse", "lpips")}
                    for row in section.get("traveling") or [] if row.get("method") == method}
            cov = _row(section.get("fa_cov"), method=method)
            effects = [r for r in section.get("site_effect", []) if r.get("method") == method]
            dist = _row(section.get("distribution_distance"), method=method)
            if not (clf or trav or effects):
                continue

            def mean_of(key, rows=effects):
                values = [r[key] for r in rows if r.get(key) is not None and r[key] == r[key]]
                return round(sum(values) / len(values), 3) if values else None

            entry[method] = {
                "classifier_accuracy": clf.get("accuracy"),
                "classifier_f1_macro": clf.get("f1_macro"),
                "chance": clf.get("chance"),
                "mean_marginal_r2": mean_of("marginal_r2"),
                "mean_conditional_r2": mean_of("conditional_r2"),
                "mean_subject_r2": mean_of("subject_r2"),
                "traveling": trav,
                "fa_cov": cov.get("cov_mean"),
                "distribution_distance": dist.get("mean"),
            }
        out[modality] = entry
    return out


def _fmt(value, digits=3) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}f}"


def write_markdown(path: Path, result: dict) -> None:
    m = result["machine"]
    lines = [
        "# Group report on the traveling phantom: IHF-Harmony against the baselines",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; date {result['date']}.",
        "",
        f"Cohort: {result['subjects']} simulated subjects, each scanned at {result['sites']} sites "
        f"({', '.join(result['site_names'])}); anatomy and DWI on 4 mm grids (size `tiny`, CPU-sized), "
        f"training {result['train_steps']} steps (pipelines/training/phantom-tiny.toml); target site "
        f"`{result['target_site']}`. Every method is fitted on the whole cohort.",
        "",
        "| step | exit | wall time (s) | peak memory (MiB) |",
        "| --- | --- | --- | --- |",
    ]
    for step, r in result["steps"].items():
        reused = " (re-run: finished steps reused from the work dir)" if r.get("work_dir_reused") else ""
        lines.append(f"| {step}{reused} (`{r['command']}`) | {r['exit_code']} | {r['wall_s']} | {r['peak_rss_mib']} |")
    lines += ["", "Lower classifier accuracy (toward chance) and lower marginal R2 mean less site information. "
              "The conditional R2 is site + subject; the subject R2 (conditional minus marginal) is the share of "
              "the variance the participants explain, which harmonization must keep. Traveling-subject "
              "similarity compares each harmonized image with the same subject's own target-site scan "
              "(PSNR/SSIM/MS-SSIM higher, RMSE/LPIPS lower is better). ComBat acts on the derived features "
              "only, so it has no image similarity.", ""]
    for modality, methods in result["summary"].items():
        lines += [f"## {modality}", "",
                  "| method | classifier accuracy (chance) | F1 | marginal R2 (site) | conditional R2 | subject R2 "
                  "| WM FA CoV | site distribution distance |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method, v in methods.items():
            lines.append(
                f"| {method} | {_fmt(v['classifier_accuracy'])} ({_fmt(v['chance'])}) | {_fmt(v['classifier_f1_macro'])} "
                f"| {_fmt(v['mean_marginal_r2'])} | {_fmt(v['mean_conditional_r2'])} | {_fmt(v['mean_subject_r2'])} "
                f"| {_fmt(v['fa_cov'], 4)} | {_fmt(v['distribution_distance'], 4)} |")
        lines += ["", "Traveling subjects (each non-target scan against the same subject's own target-site scan; "
                  "DWI per b-shell direction average), mean ± sd over pairs:", "",
                  "| image | method | pairs | PSNR | SSIM | MS-SSIM | RMSE | LPIPS |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["evaluation"]["modalities"][modality].get("traveling", []):
            cells = [f"{_fmt(row[k], d)} ± {_fmt(row[k + '_sd'], d)}" for k, d in
                     (("psnr", 2), ("ssim", 4), ("ms_ssim", 4), ("rmse", 4), ("lpips", 4))]
            lines.append(f"| {row['image']} | {row['method']} | {row['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["R2 values are averaged over the modality's derived features; per-feature values, p-values and "
              "the age association are in docs/group-report-phantom.json and in the report itself.", "",
              "Screenshots (headless Chromium): docs/images/report-participant.png, docs/images/report-group.png.",
              ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--target-site", default="siemens")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "_runs" / "group-report")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)

    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    bids, out, work, logs = (args.out / name for name in ("bids", "out", "work", "logs"))
    logs.mkdir(exist_ok=True)
    # Steps skipped because their outputs exist keep the measurement of the run that made them.
    steps_file = logs / "steps.json"
    results: dict = {"steps": json.loads(steps_file.read_text()) if steps_file.is_file() else {}}

    if not (bids / "dataset_description.json").is_file():
        from ihf_bids.phantom import generate_phantom

        generate_phantom(bids, n_subjects=args.subjects, n_sites=args.sites, size="tiny", seed=0)
    site_names = sorted({p.name[len("ses-"):] for p in bids.glob("sub-*/ses-*")})
    model = out / "models" / "ihf-harmony"
    if not (model / "anat" / "model.pt").is_file():
        _run("participant", [str(bids), str(out), "participant", "-w", str(work), *COMMON], logs, results)
        _run("group --train", [str(bids), str(out), "group", "--train", "--train-preset",
                               str(ROOT / "pipelines" / "training" / "phantom-tiny.toml"),
                               "--train-steps", str(args.train_steps), "-w", str(work)], logs, results)
    _run("participant --target-site", [str(bids), str(out), "participant", "--target-site", args.target_site,
                                       "-w", str(work), *COMMON], logs, results)
    _run("group", [str(bids), str(out), "group", "--target-site", args.target_site, "-w", str(work)],
         logs, results)

    evaluation = json.loads((out / "group_qc.json").read_text())
    result = {
        "command": ".venv/bin/python bench/bench_group_report.py " + shlex.join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "subjects": args.subjects, "sites": args.sites, "site_names": site_names,
        "train_steps": args.train_steps, "target_site": args.target_site,
        "steps": results["steps"],
        "summary": summary(evaluation),
        "evaluation": evaluation,
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "group-report-phantom.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_markdown(args.docs / "group-report-phantom.md", result)

    from ihf_bids.qc.reports import screenshot_html

    images = args.docs / "images"
    images.mkdir(exist_ok=True)
    screenshot_html(out / "sub-01.html", images / "report-participant.png")
    screenshot_html(out / "group_report.html", images / "report-group.png")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
