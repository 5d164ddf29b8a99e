"""``ihf-bids`` main: check the arguments, build the nipype workflow, run it.

Exit codes are those of :mod:`ihf_bids.errors` (docs/usage.md).
"""

from __future__ import annotations

import logging
import os
import re
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


def _confine_scratch(work_dir: Path) -> None:
    """Send every library's scratch and cache files into the work directory.

    Temporary files (Python, ANTs), matplotlib's font cache, the BIDS validator's cache, torch's
    compile caches and any XDG cache go under ``<work>/scratch``, so a run writes nowhere but OUTPUT_DIR and
    WORK_DIR (tested with strace). nipype's online version check is turned off: the app
    makes no network access.
    """
    import tempfile

    scratch = work_dir / "scratch"
    for var, sub in (("TMPDIR", "tmp"), ("MPLCONFIGDIR", "matplotlib"), ("XDG_CACHE_HOME", "cache"),
                     ("DENO_DIR", "deno"), ("TORCHINDUCTOR_CACHE_DIR", "torchinductor"),
                     ("TRITON_CACHE_DIR", "triton")):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(scratch / sub)
    tempfile.tempdir = None  # re-read TMPDIR
    os.environ["NIPYPE_NO_ET"] = "1"


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
    if args.train and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(args.model)):
        raise UsageError(f"--model {args.model!r}: group --train writes the model to OUTPUT_DIR/models/NAME; give a "
                         "name (letters, digits, '.', '_', '-'), not a path")
    check_output_paths(args.bids_dir, args.output_dir, args.work_dir)
    if args.device != "auto":
        from ..harmonize.device import resolve_device

        resolve_device(args.device)  # --device cuda without a GPU: exit 2 now, not hours later
    if args.omp_nthreads > 1:
        LOGGER.info("--omp-nthreads %d: registration with several threads is not bit-for-bit repeatable; "
                    "use --omp-nthreads 1 for identical reruns (docs/usage.md)", args.omp_nthreads)
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
    labels = normalize_labels(args.participant_label, "sub") if args.participant_label else None
    if not args.skip_bids_validation:
        from ..bids.validation import validate_dataset

        LOGGER.info("validating %s with bids-validator-deno (skip with --skip-bids-validation)", config.bids_dir)
        validate_dataset(config.bids_dir, participant_labels=labels)  # other participants' issues ignored
    sessions = collect_inputs(
        config.bids_dir,
        participant_labels=labels,
        session_labels=normalize_labels(args.session_label, "ses") if args.session_label else None,
        bids_filters=load_bids_filters(args.bids_filter_file) if args.bids_filter_file else None,
        modalities=config.modalities,
    )
    sites = find_sites(config.bids_dir, sessions, source=config.site_source, column=config.site_column,
                       sidecar_fields=config.site_sidecar_fields)
    from ..preproc.inputs import check_session_inputs

    check_session_inputs(sessions, target_reference=config.target_reference, nprocs=config.nprocs)
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
    from ..harmonize.checkpoint import load_model
    from ..harmonize.files import load_network_with_profiles

    model = ModelDirectory(config.model_dir)
    present = {m for s in sessions for m, files in (("T1w", s.t1w), ("T2w", s.t2w), ("dwi", s.dwi)) if files}
    for modality in sorted(present & set(config.modalities)):
        # The network is verified now (sha256 against model.json, weights_only load, architecture,
        # format version), with the target's profiles against the digests inside it: a bad model
        # stops the run here (exit 70), before any output is written.
        if config.target_reference is not None:
            if modality == "dwi":
                LOGGER.warning("--target-reference applies to T1w/T2w; DWI runs are preprocessed only")
                continue
            if not (model.group_dir(modality) / "model.pt").is_file():
                raise WorkflowBuildError(f"the model {model.root} has no network for {modality}")
            _, meta = load_model(model.group_dir(modality))
        else:
            model.require_target(config.target_site, modality)
            _, meta, _ = load_network_with_profiles(model, modality, [config.target_site])
        LOGGER.info("model %s for %s verified (sha256 %s...)", model.group_dir(modality), modality,
                    meta["sha256"][:12])


def _run_participant(args, config) -> int:
    from ..bids.derivatives import write_bidsignore, write_citation, write_dataset_description
    from ..workflows.base import init_ihf_bids_wf, write_template_files

    sessions, sites = _select_sessions(args, config)
    _check_targets(config, sessions)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    from ..harmonize.checkpoint import (
        remove_stale_temporaries,  # what killed runs left (reliability)
    )
    remove_stale_temporaries(config.output_dir, subjects=sorted({s.subject for s in sessions}))
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
    except Exception as err:
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
    earlier_crashes = set(crash_dir.glob("crash-*.txt")) if crash_dir.is_dir() else set()
    try:
        if args.use_plugin:  # --use-plugin FILE (ihf_bids/cli/plugin.py)
            from .plugin import run_settings

            LOGGER.info("nipype plugin %s from %s", args.use_plugin["plugin"], args.use_plugin["file"])
            settings, execution = run_settings(args.use_plugin, nprocs=config.nprocs, mem_gb=config.mem_gb)
            workflow.config["execution"].update(execution)
            workflow.run(**settings)
        elif config.nprocs > 1:
            # spawn: workers never inherit the threads (OpenMP, torch) of the calling process, which
            # deadlocks forked workers when ihf-bids runs inside a Python session; unlike forkserver,
            # it needs no AF_UNIX socket in TMPDIR (<work>/scratch/tmp), whose path is limited to
            # 108 characters and so failed with long --work-dir paths.
            plugin_args = {"n_procs": config.nprocs, "raise_insufficient": False, "mp_context": "spawn"}
            if config.mem_gb:
                plugin_args["memory_gb"] = config.mem_gb
            workflow.run(plugin="MultiProc", plugin_args=plugin_args)
        else:
            workflow.run(plugin="Linear")
    except Exception as err:  # noqa: BLE001 - nipype reports failed nodes as RuntimeError
        # this run's crash reports only: earlier runs' reports stay in the folder
        crashes = sorted(set(crash_dir.glob("crash-*.txt")) - earlier_crashes) if crash_dir.is_dir() else []
        LOGGER.error("processing failed (%s). Crash reports: %s. Fix the cause and re-run with the same "
                     "--work-dir: finished steps are reused.", str(err).strip().split("\n", 1)[0], ", ".join(map(str, crashes[-5:])) or crash_dir)
        for crash in crashes[-3:]:
            LOGGER.error("%s failed on %s:\n%s", crash.name, _crash_source(crash, config, sessions) or "the run",
                         _crash_summary(crash))
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


def _crash_source(path: Path, config, sessions) -> Path | None:
    """The input image whose processing wrote crash report ``path`` (its first line names the node)."""
    from ..workflows.base import source_of_node

    first = path.read_text(errors="replace").split("\n", 1)[0]
    return source_of_node(first.removeprefix("Node:").strip(), config=config, sessions=sessions)


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
    from ..harmonize.checkpoint import (
        remove_stale_temporaries,  # what killed runs left (reliability)
    )
    remove_stale_temporaries(config.output_dir)
    if args.train:  # a bad preset is refused before anything is written
        from ..train.loop import TrainConfig, load_train_preset

        train = load_train_preset(config.train_preset) if config.train_preset else TrainConfig()
    write_bidsignore(config.output_dir)
    _write_config(config)
    if args.train:
        from ..train.cohort import train_cohort_models

        train.seed = config.random_seed
        if config.device != "auto":
            train.device = config.device  # --device wins over the preset's device
        if train.device != "auto":
            from ..harmonize.device import resolve_device

            resolve_device(train.device)  # a preset asking for CUDA on a machine without: exit 2 now
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


def _report_unexpected(args) -> int:
    """Log an unexpected exception in one line, with its traceback saved to a file; return exit code 1."""
    import traceback

    text = traceback.format_exc()
    last = text.strip().splitlines()[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(args.work_dir) / "crash" / f"ihf-bids-error-{stamp}-{os.getpid()}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        LOGGER.error("unexpected error: %s. This is a bug in ihf-bids, or a case it does not check yet; "
                     "please report it with this traceback:\n%s", last, text)
        return EXIT_PROCESSING_FAILURE
    LOGGER.error("unexpected error: %s. This is a bug in ihf-bids, or a case it does not check yet; the "
                 "traceback is in %s. Please report it with that file (docs/troubleshooting.md).", last, path)
    LOGGER.debug("%s", text)
    return EXIT_PROCESSING_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run ``ihf-bids``; return the exit code."""
    from .parser import build_parser

    import tempfile

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    # The run changes the environment (threads, scratch folders); a caller in the same Python
    # process (a notebook, the tests) gets its own back afterwards.
    environment, tempdir = dict(os.environ), tempfile.tempdir
    os.environ["NIPYPE_NO_ET"] = "1"  # no online version check (nipype reads it when imported)
    _set_threads(args.omp_nthreads or min(args.nprocs, 8))
    try:
        config = build_config(args)
        _confine_scratch(config.work_dir)
        if config.analysis_level == "participant":
            return _run_participant(args, config)
        return _run_group(args, config)
    except IhfBidsError as err:
        LOGGER.error("%s", err)
        return err.exit_code
    except Exception:  # noqa: BLE001 - a bug: keep the traceback, say where it is, exit 1
        return _report_unexpected(args)
    finally:
        os.environ.clear()
        os.environ.update(environment)
        tempfile.tempdir = tempdir


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
