"""``group --train``: train IHF-Harmony on the preprocessed participants of an output tree."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import WorkflowBuildError
from ..harmonize.model_dir import ModelDirectory
from ..imageio import load_float32, read_sidecar
from ..templates import TEMPLATE_SPACE
from .data import TrainingVolume

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
    """
    from ..bids.derivatives import parse_entities
    from ..harmonize.dwi import shell_intensity_scales
    from ..preproc.dwi import shell_labels, spread_indices

    groups: dict[str, list[TrainingVolume]] = {}
    for modality in modalities:
        pattern = f"sub-*/**/*_space-{TEMPLATE_SPACE}*_desc-preproc_{modality}.nii.gz"
        for path in sorted(output_dir.glob(pattern)):
            site = read_sidecar(path).get("Site")
            if not site:
                raise WorkflowBuildError(f"the sidecar of {path} has no Site field; re-run the participant level "
                                         "for it")
            subject = parse_entities(path)["sub"]
            data, _ = load_float32(path)
            if modality != "dwi":
                groups.setdefault("anat", []).append(TrainingVolume(data, site, modality, subject, mask=data > 0))
                continue
            mask_path = Path(str(path).replace("_desc-preproc_dwi.nii.gz", "_desc-brain_mask.nii.gz"))
            mask = load_float32(mask_path)[0] > 0.5
            bvals = np.loadtxt(str(path).replace(".nii.gz", ".bval"), ndmin=1)
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


def train_cohort_models(output_dir: Path, *, name: str, config, modalities: tuple[str, ...] = ("T1w", "T2w", "dwi"),
                        progress: bool = True) -> ModelDirectory:
    """Train one network per grid on the output tree's participants; write ``models/<name>/``.

    Parameters
    ----------
    config : TrainConfig
        Training settings (steps, batch, seed, device...).

    Raises
    ------
    WorkflowBuildError
        No preprocessed images, or no modality seen at two or more sites.
    """
    import nibabel as nib

    from .data import SliceBank
    from .loop import train_model

    groups = collect_training_volumes(output_dir, modalities)
    if not groups:
        raise WorkflowBuildError(
            f"no preprocessed images in {output_dir}; run 'ihf-bids BIDS_DIR {output_dir} participant' first")
    root = output_dir / "models" / name
    trained = []
    for group, volumes in sorted(groups.items()):
        multi_site = sorted({v.modality for v in volumes if len({w.site for w in volumes if w.modality == v.modality}) > 1})
        if not multi_site:
            LOGGER.warning("not training the %s network: no modality was seen at two or more sites", group)
            continue
        sample = next(output_dir.glob(f"sub-*/**/*_space-{TEMPLATE_SPACE}*_desc-preproc_"
                                      f"{'dwi' if group == 'dwi' else volumes[0].modality}.nii.gz"))
        img = nib.load(str(sample))
        LOGGER.info("training the %s network on %d volumes (%s) from sites %s", group, len(volumes),
                    ", ".join(multi_site), ", ".join(sorted({v.site for v in volumes})))
        train_model(
            SliceBank(volumes), replace(config), root / group, progress=progress,
            extra_metadata={
                "template": TEMPLATE_SPACE,
                "grid": {"shape": list(img.shape[:3]), "affine": img.affine.tolist()},
                "group": group,
                "modalities": sorted({v.modality for v in volumes}),
                "sites": sorted({v.site for v in volumes}),
                "participants": sorted({v.subject for v in volumes}),
            },
        )
        _write_intensity_references(ModelDirectory(root), volumes)
        trained.append(group)
    if not trained:
        raise WorkflowBuildError(
            f"nothing to train in {output_dir}: every modality was seen at one site only; IHF-Harmony "
            "learns from two or more sites")
    return ModelDirectory(root)
