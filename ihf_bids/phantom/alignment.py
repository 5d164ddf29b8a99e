"""Does the same brain land in the same place? Registration error of a run on the phantom.

Every session of a phantom subject places the same anatomy in the scanner with its own known
head position ``M`` (:func:`~ihf_bids.phantom.read_head_motion`: truth world -> scanner
world). A run of the app maps each template point ``p`` to a scanner point ``q = T(p)`` of
each image (``T``: the chain of transforms that resampled the image onto the template
grid); ``a = M^-1 q`` is then the anatomical point of the subject that lands at ``p``. Two
images of one subject are aligned where their ``a(p)`` agree: the distance between them,
averaged over the template's brain, is their misalignment in template space. It is
independent of how well the subject matches the template (which the truth cannot say), and
it is what harmonization and every voxel-wise comparison across sites rely on.

``T`` is read from the app's own transform files and evaluated by resampling images of the
scanner coordinates with :func:`~ihf_bids.preproc.registration.apply_transforms`, the
function that resampled the images (linear interpolation of a linear function is exact).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["ImagePlacement", "misalignment_table", "placements_from_derivatives", "summarize", "template_points"]


@dataclass(frozen=True)
class ImagePlacement:
    """Where the app put one image: its transforms onto the template grid.

    Attributes
    ----------
    subject, site, modality : str
        Which image (``modality``: ``"T1w"``, ``"T2w"`` or ``"dwi"``).
    image : pathlib.Path
        The raw image (only its grid is read: it defines the scanner coordinates).
    transforms : tuple of str
        Template -> image, in :func:`~ihf_bids.preproc.registration.apply_transforms` order
        (the list that resampled the image onto the template grid).
    voxel_size : float
        The voxel size (mm) of the template grid the image was resampled onto.
    """

    subject: str
    site: str
    modality: str
    image: Path
    transforms: tuple[str, ...]
    voxel_size: float


def template_points(voxel_size: float, folder: str | os.PathLike[str]) -> Path:
    """Write the template brain mask on the grid of ``voxel_size`` into ``folder``; return its path."""
    from ..templates import write_template

    return write_template("brain_mask", voxel_size, Path(folder) / f"tpl_res-{voxel_size:g}_mask.nii.gz")


def _anatomical_points(placement: ImagePlacement, motion: np.ndarray, reference: Path, scratch: Path) -> np.ndarray:
    """``M^-1 T(p)`` for every voxel ``p`` of ``reference`` (NaN outside the image's field of view)."""
    import nibabel as nib

    from ..imageio import save_image
    from ..preproc.registration import apply_transforms

    img = nib.load(str(placement.image))
    shape = img.shape[:3]
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    # Scanner coordinates (offset so that they stay positive) and a field-of-view channel.
    offset = 1000.0
    channels = np.concatenate([world + offset, np.ones((len(world), 1))], axis=1).reshape(*shape, 4)
    coords = save_image(channels.astype(np.float32), img.affine, scratch / "coords.nii.gz")
    moved = np.asarray(nib.load(str(apply_transforms(coords, reference, list(placement.transforms),
                                                     scratch / "coords_tpl.nii.gz"))).dataobj, dtype=np.float64)
    inside = moved[..., 3] > 0.999
    scanner = moved[..., :3] - offset
    anatomical = (scanner.reshape(-1, 3) - motion[:3, 3]) @ np.linalg.inv(motion[:3, :3]).T
    anatomical = anatomical.reshape(*moved.shape[:3], 3)
    anatomical[~inside] = np.nan
    return anatomical


def misalignment_table(
    placements: Sequence[ImagePlacement],
    dataset_root: str | os.PathLike[str],
    *,
    voxel_size: float,
) -> list[dict]:
    """Misalignment in template space of every pair of images of one subject.

    Parameters
    ----------
    placements : sequence of ImagePlacement
        Images of one or more subjects.
    dataset_root : path
        The phantom dataset (its truth holds the head positions).
    voxel_size : float
        Grid (mm) of the template points the pairs are compared on.

    Returns
    -------
    list of dict
        One row per pair of images of a subject: ``subject``, ``a`` and ``b`` (``site/modality``),
        ``mean_mm`` (mean distance over the template's brain), ``p95_mm`` (its 95th
        percentile), ``voxel_mm`` (the coarser grid of the two images) and ``coverage`` (the
        fraction of the brain inside both fields of view).
    """
    import nibabel as nib

    from .motion import read_head_motion

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        reference = template_points(voxel_size, scratch)
        brain = np.asarray(nib.load(str(reference)).dataobj) > 0.5
        points: dict[ImagePlacement, np.ndarray] = {}
        for placement in placements:
            motion = read_head_motion(dataset_root, placement.subject, placement.site)
            points[placement] = _anatomical_points(placement, motion, reference, scratch)[brain]
        by_subject: dict[str, list[ImagePlacement]] = {}
        for placement in placements:
            by_subject.setdefault(placement.subject, []).append(placement)
        for subject, items in sorted(by_subject.items()):
            for a, b in itertools.combinations(items, 2):
                distance = np.linalg.norm(points[a] - points[b], axis=1)
                valid = np.isfinite(distance)
                rows.append({
                    "subject": subject,
                    "a": f"{a.site}/{a.modality}",
                    "b": f"{b.site}/{b.modality}",
                    "mean_mm": float(distance[valid].mean()) if valid.any() else float("nan"),
                    "p95_mm": float(np.percentile(distance[valid], 95)) if valid.any() else float("nan"),
                    "voxel_mm": max(a.voxel_size, b.voxel_size),
                    "coverage": float(valid.mean()),
                })
    return rows


def placements_from_derivatives(
    output_dir: str | os.PathLike[str],
    dataset_root: str | os.PathLike[str],
    subject: str,
    sites: Sequence[str],
    *,
    anat_voxel_size: float,
    dwi_voxel_size: float,
    modalities: Sequence[str] = ("T1w", "T2w", "dwi"),
) -> list[ImagePlacement]:
    """The placements of a phantom subject's images, from the transforms the app wrote.

    The T1w's transform to the template (``from-T1w_to-<space>_mode-image_xfm.mat``, and its
    ``desc-warp`` field with SyN) is chained with the T2w's and the b=0 reference's rigid
    registrations to the T1w (``from-T2w_to-T1w``/``from-dwiref_to-T1w``
    ``_mode-image_desc-coreg_xfm.mat``).
    """
    from ..templates import TEMPLATE_SPACE

    out, root = Path(output_dir), Path(dataset_root)
    placements = []
    for site in sites:
        stem = f"sub-{subject}_ses-{site}"
        anat, dwi = out / f"sub-{subject}" / f"ses-{site}" / "anat", out / f"sub-{subject}" / f"ses-{site}" / "dwi"
        to_template: list[str] = []
        warp = anat / f"{stem}_from-T1w_to-{TEMPLATE_SPACE}_mode-image_desc-warp_xfm.nii.gz"
        if warp.is_file():
            to_template.append(str(warp))
        to_template.append(str(anat / f"{stem}_from-T1w_to-{TEMPLATE_SPACE}_mode-image_xfm.mat"))
        raw = {m: root / f"sub-{subject}" / f"ses-{site}" / ("dwi" if m == "dwi" else "anat") / f"{stem}_{m}.nii.gz"
               for m in modalities}
        if "T1w" in modalities:
            placements.append(ImagePlacement(subject, site, "T1w", raw["T1w"], tuple(to_template), anat_voxel_size))
        if "T2w" in modalities:
            coreg = anat / f"{stem}_from-T2w_to-T1w_mode-image_desc-coreg_xfm.mat"
            placements.append(ImagePlacement(subject, site, "T2w", raw["T2w"], (*to_template, str(coreg)),
                                             anat_voxel_size))
        if "dwi" in modalities:
            coreg = dwi / f"{stem}_from-dwiref_to-T1w_mode-image_desc-coreg_xfm.mat"
            placements.append(ImagePlacement(subject, site, "dwi", raw["dwi"],
                                             (*to_template, str(coreg)), dwi_voxel_size))
    return placements


def summarize(rows: Sequence[Mapping]) -> dict:
    """Per kind of pair (``T1w-T2w``, ``T1w-T1w``...): pairs, pairs above one voxel, worst and median mean distance."""
    out: dict = {}
    for row in rows:
        kinds = sorted(part.split("/")[1] for part in (row["a"], row["b"]))
        key = "-".join(kinds)
        entry = out.setdefault(key, {"pairs": 0, "above_one_voxel": 0, "max_mean_mm": 0.0, "means": []})
        entry["pairs"] += 1
        entry["above_one_voxel"] += int(row["mean_mm"] > row["voxel_mm"])
        entry["max_mean_mm"] = max(entry["max_mean_mm"], row["mean_mm"])
        entry["means"].append(row["mean_mm"])
    for entry in out.values():
        entry["median_mean_mm"] = float(np.median(entry.pop("means")))
    return out
