"""``ihf-bids`` main: check the arguments, build the nipype workflow, run it.

Exit codes are those of :mod:`ihf_bids.errors` (docs/usage.md).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ..errors import EXIT_PROCESSING_FAILURE, EXIT_SUCCESS, IhfBidsError, UsageError, WorkflowBuildError

__all__ = ["main"]

LOGGER = logging.getLogger("ihf_bids")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * (verbosity + 1)
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("ihf_bids").setLevel(max(level, logging.DEBUG))
    # nipype logs through its own handler; keep it out of the root handler (no double lines)
    # and report its node-by-node progress from -v on.
    for name in ("nipype", "nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False
    logging.getLogger("nipype.workflow").setLevel(logging.INFO if verbosity >= 1 else logging.WARNING)


def _set_threads(omp_nthreads: int) -> None:
    """Thread counts of every library, set before they are imported (and inherited by workers)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(omp_nthreads)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("ihf-bids", "torch", "numpy", "nibabel", "nipype", "antspyx", "dipy", "pybids"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_config(args):
    """Check the arguments against the file system; return a :class:`~ihf_bids.config.RunConfig`."""
    from ..bids.layout import check_output_paths
    from ..config import RunConfig

    if args.omp_nthreads is None:
        args.omp_nthreads = min(args.nprocs, 8)
    elif args.omp_nthreads > args.nprocs:
        LOGGER.warning("--omp-nthreads %d is larger than --nprocs %d", args.omp_nthreads, args.nprocs)
    if args.target_site and args.target_reference:
        raise UsageError("give --target-site or --target-reference, not both")
    if args.analysis_level == "group" and args.target_reference:
        raise UsageError("--target-reference belongs to the participant level")
    if args.train and args.target_site:
        raise UsageError("group --train learns every site; choose the target later with "
                         "'participant --target-site SITE'")
    if "none" in args.qc_baselines and len(args.qc_baselines) > 1:
        raise UsageError("--qc-baselines none cannot be combined with other baselines")
    if args.train and args.analysis_level != "group":
        raise UsageError("--train belongs to the group level: ihf-bids BIDS_DIR OUTPUT_DIR group --train")
    check_output_paths(args.bids_dir, args.output_dir, args.work_dir)
    model_dir = None
    if args.analysis_level == "participant" and (args.target_site or args.target_reference):
        from ..harmonize.model_dir import find_model

        model_dir = find_model(args.model, args.output_dir).root
    return RunConfig(
        bids_dir=args.bids_dir, output_dir=args.output_dir, work_dir=args.work_dir,
        analysis_level=args.analysis_level, modalities=tuple(args.modalities), registration=args.registration,
        anat_resolution=args.anat_resolution, dwi_resolution=args.dwi_resolution,
        target_site=args.target_site, target_reference=args.target_reference, model_dir=model_dir,
        model_name=Path(args.model).name, native_outputs=args.native_outputs, device=args.device,
        random_seed=args.random_seed, nprocs=args.nprocs, omp_nthreads=args.omp_nthreads, mem_gb=args.mem,
        stop_on_first_crash=args.stop_on_first_crash, site_source=args.site_source, site_column=args.site_column,
        site_sidecar_fields=tuple(args.site_sidecar_fields), train_steps=args.train_steps,
        train_preset=args.train_preset, versions=_versions(),
        qc_baselines=tuple(b for b in args.qc_baselines if b != "none"),
    )


def _select_sessions(args, config):
    """Ingest: validate, query the layout, find the sites."""
    from ..bids.layout import check_bids_dataset, collect_inputs, load_bids_filters, normalize_labels
    from ..bids.sites import find_sites

    check_bids_dataset(config.bids_dir)
    if not args.skip_bids_validation:
        from ..bids.validation import validate_dataset

        LOGGER.info("validating %s with bids-validator-deno (skip with --skip-bids-validation)", config.bids_dir)
        validate_dataset(config.bids_dir)
    sessions = collect_inputs(
        config.bids_dir,
        participant_labels=normalize_labels(args.participant_label, "sub") if args.participant_label else None,
        session_labels=normalize_labels(args.session_label, "ses") if args.session_label else None,
        bids_filters=load_bids_filters(args.bids_filter_file) if args.bids_filter_file else None,
        modalities=config.modalities,
    )
    if not sessions:
        raise WorkflowBuildError(f"no {', '.join(config.modalities)} images selected in {config.bids_dir}; "
                                 "check --participant-label, --session-label, --modalities and --bids-filter-file")
    sites = find_sites(config.bids_dir, sessions, source=config.site_source, column=config.site_column,
                       sidecar_fields=config.site_sidecar_fields)
    return sessions, sites


def _check_targets(config, sessions) -> None:
    """Fail before any work when the model cannot harmonize what was selected."""
    from ..harmonize.model_dir import ModelDirectory

    if not config.harmonize:
        LOGGER.warning(
            "no --target-site or --target-reference: preprocessing only (no harmonized images). Train a "
            "model with 'ihf-bids %s %s group --train', then run the participant level with --target-site.",
            config.bids_dir, config.output_dir)
        return
    model = ModelDirectory(config.model_dir)
    present = {m for s in sessions for m, files in (("T1w", s.t1w), ("T2w", s.t2w), ("dwi", s.dwi)) if files}
    for modality in sorted(present & set(config.modalities)):
        if config.target_reference is not None:
            if modality == "dwi":
                LOGGER.warning("--target-reference applies to T1w/T2w; DWI runs are preprocessed only")
            elif not (model.group_dir(modality) / "model.pt").is_file():
                raise WorkflowBuildError(f"the model {model.root} has no network for {modality}")
            continue
        model.require_target(config.target_site, modality)


def _run_participant(args, config) -> int:
    from ..bids.derivatives import write_bidsignore, write_citation, write_dataset_description
    from ..workflows.base import init_ihf_bids_wf, write_template_files

    sessions, sites = _select_sessions(args, config)
    _check_targets(config, sessions)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(config.output_dir, bids_dir=config.bids_dir, version=config.versions["ihf-bids"])
    write_bidsignore(config.output_dir)
    write_citation(config.output_dir, _citation(config))
    _write_config(config)
    template = write_template_files(config.work_dir / "templates", anat_resolution=config.anat_resolution,
                                    dwi_resolution=config.dwi_resolution)
    try:
        workflow = init_ihf_bids_wf(config=config, sessions=sessions, sites=sites, template=template)
    except IhfBidsError:
        raise  # already says what to do
    except Exception as err:  # noqa: BLE001 - any failure here means the workflow cannot be built
        raise WorkflowBuildError(f"the workflow could not be built: {err.__class__.__name__}: {err}") from err
    crash_dir = config.work_dir / "crash"
    workflow.config["execution"].update({
        "crashdump_dir": str(crash_dir), "crashfile_format": "txt", "hash_method": "content",
        "stop_on_first_crash": config.stop_on_first_crash, "remove_unnecessary_outputs": False,
        # nipype sleeps this long between scheduling passes (default 2 s): with many short steps
        # (and every step of a re-run being a cache hit) the sleeps dominated the wall time.
        "poll_sleep_duration": 0.1,
    })
    workflow.config["monitoring"] = {"enabled": False}
    _nipype_logging(args.verbose)
    LOGGER.info("running %d session(s) of %d participant(s) with %d process(es)", len(sessions),
                len({s.subject for s in sessions}), config.nprocs)
    start = time.monotonic()
    try:
        if args.use_plugin:  # --use-plugin FILE (ihf_bids/cli/plugin.py)
            from .plugin import run_settings

            LOGGER.info("nipype plugin %s from %s", args.use_plugin["plugin"], args.use_plugin["file"])
            settings, execution = run_settings(args.use_plugin, nprocs=config.nprocs, mem_gb=config.mem_gb)
            workflow.config["execution"].update(execution)
            workflow.run(**settings)
        elif config.nprocs > 1:
            # forkserver: workers never inherit the threads (OpenMP, torch) of the calling process,
            # which deadlocks forked workers when ihf-bids runs inside a Python session.
            plugin_args = {"n_procs": config.nprocs, "raise_insufficient": False, "mp_context": "forkserver"}
            if config.mem_gb:
                plugin_args["memory_gb"] = config.mem_gb
            workflow.run(plugin="MultiProc", plugin_args=plugin_args)
        else:
            workflow.run(plugin="Linear")
    except Exception as err:  # noqa: BLE001 - nipype reports failed nodes as RuntimeError
        crashes = sorted(crash_dir.glob("crash-*.txt")) if crash_dir.is_dir() else []
        LOGGER.error("processing failed (%s). Crash reports: %s. Fix the cause and re-run with the same "
                     "--work-dir: finished steps are reused.", err, ", ".join(map(str, crashes[-5:])) or crash_dir)
        for crash in crashes[-3:]:
            LOGGER.error("%s:\n%s", crash.name, _crash_summary(crash))
        return EXIT_PROCESSING_FAILURE
    LOGGER.info("participant level finished in %.0f s; outputs in %s", time.monotonic() - start, config.output_dir)
    _write_participant_reports(config, sorted({s.subject for s in sessions}))
    return EXIT_SUCCESS


def _write_participant_reports(config, subjects: list[str]) -> None:
    """``sub-<label>.html`` for every participant of the run, with the target site's distribution."""
    from ..harmonize.model_dir import ModelDirectory
    from ..qc.reports import write_participant_report

    targets = {}
    if config.model_dir is not None and config.target_site is not None:
        targets = ModelDirectory(config.model_dir).intensity_references(config.target_site)
    for subject in subjects:
        path = write_participant_report(config.output_dir, subject, target_intensities=targets or None)
        LOGGER.info("report: %s", path)


def _nipype_logging(verbosity: int) -> None:
    """nipype's own loggers: node progress from -v on, warnings otherwise."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    level = "INFO" if verbosity >= 1 else "WARNING"
    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, level if key == "workflow_level" else "WARNING")
    nipype_logging.update_logging(nipype_config)


def _crash_summary(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(lines[-6:])


def _citation(config) -> str:
    return (
        "# Methods\n\n"
        f"Images were processed with ihf-bids {config.versions['ihf-bids']} (nipype {config.versions['nipype']}). "
        "Anatomical images were reoriented to RAS, corrected for intensity non-uniformity with N4 "
        f"(ANTs through antspyx {config.versions['antspyx']}), brain-extracted and registered to the "
        f"MNI152NLin2009aSym template ({config.registration} registration, mutual information), resampled onto a "
        f"{config.anat_resolution:g} mm grid and intensity-normalized. Diffusion runs were checked for "
        "gradient consistency, registered through their b=0 reference to the anatomical reference, resampled "
        f"onto a {config.dwi_resolution:g} mm template grid with rotated b-vectors, and fitted with a diffusion "
        f"tensor model (DIPY {config.versions['dipy']}) to give FA maps. Site effects were removed with "
        "IHF-Harmony, an invertible hierarchy flow conditioned on target-site VGG19 feature statistics.\n"
    )


def _write_config(config) -> None:
    from ..harmonize.checkpoint import write_bytes_atomically

    logs = config.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = logs / f"config-{config.analysis_level}-{stamp}-{os.getpid()}.json"
    write_bytes_atomically(path, lambda handle: handle.write(config.to_json().encode()))


def _run_group(args, config) -> int:
    from ..bids.derivatives import write_bidsignore

    if not config.output_dir.is_dir():
        raise UsageError(f"{config.output_dir} does not exist; run the participant level first")
    write_bidsignore(config.output_dir)
    _write_config(config)
    if args.train:
        from ..train.cohort import train_cohort_models
        from ..train.loop import TrainConfig, load_train_preset

        train = load_train_preset(config.train_preset) if config.train_preset else TrainConfig()
        train.seed = config.random_seed
        train.device = config.device
        if config.train_steps:
            train.steps = config.train_steps
        models = train_cohort_models(config.output_dir, name=config.model_name, config=train,
                                     modalities=config.modalities, progress=sys.stderr.isatty())
        LOGGER.info("model written to %s; harmonize with 'ihf-bids %s %s participant --target-site SITE'",
                    models.root, config.bids_dir, config.output_dir)
        return EXIT_SUCCESS
    from ..qc.group import write_group_report

    written = write_group_report(config.output_dir, bids_dir=config.bids_dir, target_site=config.target_site,
                                 baselines=config.qc_baselines, modalities=config.modalities,
                                 work_dir=config.work_dir, seed=config.random_seed)
    LOGGER.info("group QC: %s", ", ".join(str(t) for t in written) or "nothing (no participant outputs)")
    return EXIT_SUCCESS


def main(argv: list[str] | None = None) -> int:
    """Run ``ihf-bids``; return the exit code."""
    from .parser import build_parser

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    _set_threads(args.omp_nthreads or min(args.nprocs, 8))
    try:
        config = build_config(args)
        if config.analysis_level == "participant":
            return _run_participant(args, config)
        return _run_group(args, config)
    except IhfBidsError as err:
        LOGGER.error("%s", err)
        return err.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
