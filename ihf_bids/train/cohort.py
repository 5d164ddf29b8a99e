"""``group --train``: train IHF-Harmony on the preprocessed participants of an output tree."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import InputDataError, WorkflowBuildError
from ..harmonize.model_dir import ModelDirectory
from ..imageio import load_float32
from ..templates import TEMPLATE_SPACE
from .data import TrainingVolume
from .distributed import context_from_env

__all__ = ["collect_training_volumes", "train_cohort_models"]

LOGGER = logging.getLogger("ihf_bids.train")


#: DWI volumes kept per shell and run, spread over the gradient directions: a site's profile
#: is an average of channel statistics, which a few directions already pin down, and the
#: profile pass over every volume would dominate the training time (a 2 mm run has 30-100).
DWI_VOLUMES_PER_SHELL = 4


def collect_training_volumes(output_dir: Path, modalities: tuple[str, ...] = ("T1w", "T2w", "dwi"), *,
                             dwi_volumes_per_shell: int = DWI_VOLUMES_PER_SHELL) -> dict[str, list[TrainingVolume]]:
    """Template-space preprocessed images of every participant, grouped by network ("anat", "dwi").

    Sites come from the ``Site`` field of each image's sidecar (written by the participant
    level). DWI runs are split into b-shell volumes that share their shell's intensity scale
    (``dwi_volumes_per_shell`` of each shell and run).

    Raises
    ------
    InputDataError
        A sidecar without ``Site``, or images on different grids (exit code 65).
    """
    from ..bids.derivatives import parse_entities
    from ..harmonize.dwi import shell_intensity_scales
    from ..preproc.dwi import shell_labels, spread_indices
    from ..preproc.inputs import check_same_grid, derivative_site

    found = {modality: sorted(output_dir.glob(f"sub-*/**/*_space-{TEMPLATE_SPACE}*_desc-preproc_{modality}.nii.gz"))
             for modality in modalities}
    # Every file's Site and grid before any is loaded: a bad derivative is an input data error
    # (exit 65) naming the file, not a failure half-way through the training.
    sites = {path: derivative_site(path) for paths in found.values() for path in paths}
    check_same_grid([p for m in ("T1w", "T2w") for p in found.get(m, [])], what="preprocessed T1w/T2w images")
    check_same_grid(found.get("dwi", []), what="preprocessed DWI runs")
    groups: dict[str, list[TrainingVolume]] = {}
    for modality in modalities:
        for path in found[modality]:
            site = sites[path]
            subject = parse_entities(path)["sub"]
            data, _ = load_float32(path)
            if modality != "dwi":
                groups.setdefault("anat", []).append(TrainingVolume(data, site, modality, subject, mask=data > 0))
                continue
            mask_path = Path(str(path).replace("_desc-preproc_dwi.nii.gz", "_desc-brain_mask.nii.gz"))
            mask = load_float32(mask_path)[0] > 0.5
            bval_path = Path(str(path).replace(".nii.gz", ".bval"))
            try:
                bvals = np.loadtxt(bval_path, ndmin=1)
            except (OSError, ValueError) as err:
                raise InputDataError(
                    f"the b-values {bval_path} of the derivative {path} cannot be read ({err}); re-run the "
                    "participant level for this participant, or remove its outputs from OUTPUT_DIR") from err
            labels = shell_labels(bvals)
            scales = shell_intensity_scales(data, labels, mask)
            for shell, scale in scales.items():
                members = np.flatnonzero(np.asarray(labels) == shell)
                for i in members[spread_indices(members.size, dwi_volumes_per_shell)]:
                    groups.setdefault("dwi", []).append(
                        TrainingVolume(data[..., i], site, f"dwi-{shell}", subject, mask=mask, scale=scale))
    return groups


#: Quantiles kept per site intensity reference (enough to draw its distribution and to
#: histogram-match to it).
INTENSITY_REFERENCE_QUANTILES = 256


def _write_intensity_references(model: ModelDirectory, volumes: list[TrainingVolume]) -> None:
    """Each site's intensity reference per modality: quantiles inside the brain, averaged over volumes."""
    from ..harmonize.baselines import intensity_quantiles

    by_key: dict[tuple[str, str], list[np.ndarray]] = {}
    for volume in volumes:
        mask = volume.mask if volume.mask is not None else volume.data > 0
        if mask.any():
            by_key.setdefault((volume.site, volume.modality), []).append(
                intensity_quantiles(volume.data, mask, INTENSITY_REFERENCE_QUANTILES))
    for (site, modality), quantiles in sorted(by_key.items()):
        model.write_intensity_reference(site, modality, np.mean(quantiles, axis=0), len(quantiles))


@contextlib.contextmanager
def _exclusive_training(models_dir: Path, name: str) -> Iterator[None]:
    """Hold ``models/.<name>.lock`` while training ``name``: one ``group --train`` per model at a time.

    The lock (``flock``) goes with the process, so a killed run leaves none behind.

    Raises
    ------
    WorkflowBuildError
        Another process is training the same model into this output directory.
    """
    import fcntl
    import socket

    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{name}.lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise WorkflowBuildError(
                f"the model {name!r} in {models_dir} is being trained by {holder}; wait for that run to end, or "
                "train under another name with --model NAME") from None
        except OSError as err:  # a file system without locks: go on unguarded
            LOGGER.debug("no lock on %s (%s)", handle.name, err)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield


def _publish(staging: Path, root: Path, groups: list[str]) -> None:
    """Move the finished networks from the staging folder into ``root``, one directory swap each.

    A participant job reading ``root/<group>`` meanwhile finds the old network or the new one,
    each with its own profiles, never a mix (:func:`~ihf_bids.harmonize.checkpoint.replace_directory`).
    The resumable state is removed once published (until then it vouches for the profiles).
    """
    from ..harmonize.checkpoint import replace_directory
    from .loop import STATE_FILE

    for group in groups:
        replace_directory(staging / group, root / group)
        (root / group / STATE_FILE).unlink(missing_ok=True)
        LOGGER.info("published %s", root / group)
    shutil.rmtree(staging, ignore_errors=True)  # also what an interrupted run left of other groups


def train_cohort_models(output_dir: Path, *, name: str, config, modalities: tuple[str, ...] = ("T1w", "T2w", "dwi"),
                        progress: bool = True) -> ModelDirectory:
    """Train one network per grid on the output tree's participants; write ``models/<name>/``.

    Each network is trained in ``models/.staging-<name>/<group>/`` (profiles, the resumable
    ``train_state.pt``, the model): a run killed at any point and started again continues
    there. When every network is trained they are published into ``models/<name>/<group>/``
    by directory swaps, so readers never see a half-written or mismatched model; networks not
    retrained (other modalities) are left as they are. Only one run at a time trains a given
    model name into an output directory.

    Parameters
    ----------
    config : TrainConfig
        Training settings (steps, batch, seed, device...).

    Raises
    ------
    WorkflowBuildError
        No preprocessed images, or no modality seen at two or more sites.
    InputDataError
        A derivative without ``Site``, or derivatives on different grids.
    """
    import nibabel as nib

    from .data import SliceBank
    from .loop import train_model

    groups = collect_training_volumes(output_dir, modalities)
    if not groups:
        raise WorkflowBuildError(
            f"no preprocessed images in {output_dir}; run 'ihf-bids BIDS_DIR {output_dir} participant' first")
    models_dir = output_dir / "models"
    root, staging = models_dir / name, models_dir / f".staging-{name}"
    main = context_from_env().is_main
    trained = []
    with _exclusive_training(models_dir, name) if main else contextlib.nullcontext():
        for group, volumes in sorted(groups.items()):
            multi_site = sorted({v.modality for v in volumes
                                 if len({w.site for w in volumes if w.modality == v.modality}) > 1})
            if not multi_site:
                LOGGER.warning("not training the %s network: no modality was seen at two or more sites", group)
                continue
            sample = next(output_dir.glob(f"sub-*/**/*_space-{TEMPLATE_SPACE}*_desc-preproc_"
                                          f"{'dwi' if group == 'dwi' else volumes[0].modality}.nii.gz"))
            img = nib.load(str(sample))
            LOGGER.info("training the %s network on %d volumes (%s) from sites %s", group, len(volumes),
                        ", ".join(multi_site), ", ".join(sorted({v.site for v in volumes})))
            train_model(
                SliceBank(volumes), replace(config), staging / group, progress=progress,
                extra_metadata={
                    "template": TEMPLATE_SPACE,
                    "grid": {"shape": list(img.shape[:3]), "affine": img.affine.tolist()},
                    "group": group,
                    "modalities": sorted({v.modality for v in volumes}),
                    "sites": sorted({v.site for v in volumes}),
                    "participants": sorted({v.subject for v in volumes}),
                },
            )
            if main:
                _write_intensity_references(ModelDirectory(staging), volumes)
            trained.append(group)
        if not trained:
            raise WorkflowBuildError(
                f"nothing to train in {output_dir}: every modality was seen at one site only; IHF-Harmony "
                "learns from two or more sites")
        if main:
            _publish(staging, root, trained)
    return ModelDirectory(root)
