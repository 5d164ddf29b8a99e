"""Anatomical preprocessing steps as plain functions (nibabel, antspyx, SciPy).

Each step reads NIfTI files and writes NIfTI files, so that it can be wrapped as a
nipype node as is; each returns the output path(s) or a small record. Images are
written as ``float32`` and masks as ``uint8``, with qform and sform codes 1
(scanner) and spatial units mm.

The steps, in the order the anatomical workflow runs them:

1. :func:`load_anatomical` / :func:`check_anatomical_image`: refuse unusable inputs
   with an :class:`~ihf_bids.errors.InputDataError` that names the file and the fix.
2. :func:`conform_to_ras`: reorient to the closest canonical RAS (no resampling).
3. :func:`n4_bias_correct`: N4 bias-field correction.
4. :func:`brain_mask_via_template`: brain mask (and native -> template transform)
   from two registrations to the bundled MNI152 template; nothing is downloaded.
5. :func:`normalize_intensity`: robust scaling, skull stripping.

Examples
--------
>>> import tempfile, numpy as np, nibabel as nib
>>> from pathlib import Path
>>> tmp = Path(tempfile.mkdtemp())
>>> data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) + 1
>>> nib.save(nib.Nifti1Image(data, np.diag([-2.0, 2.0, 2.0, 1.0])), tmp / "las.nii.gz")
>>> conform_to_ras(tmp / "las.nii.gz", tmp / "ras.nii.gz")["original_orientation"]
'LAS'
>>> nib.aff2axcodes(nib.load(tmp / "ras.nii.gz").affine)
('R', 'A', 'S')
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import InputDataError
from ..imageio import nifti_image, save_image
from .registration import RegistrationError

if TYPE_CHECKING:  # pragma: no cover
    import nibabel as nib

    from .registration import Registration, RegistrationQuality

__all__ = [
    "MAX_VOXEL_SIZE_MM",
    "MIN_VOXEL_SIZE_MM",
    "N4_CONVERGENCE",
    "QSFORM_TOLERANCE_VOXELS",
    "brain_mask_via_template",
    "check_anatomical_image",
    "check_spatial_header",
    "conform_to_ras",
    "dice",
    "foreground_mask",
    "load_anatomical",
    "n4_bias_correct",
    "normalize_intensity",
]

#: Voxel sizes (mm) outside this range are refused as a header error.
MIN_VOXEL_SIZE_MM = 0.2
MAX_VOXEL_SIZE_MM = 8.0
#: qform and sform (both with a code) may place the grid this many voxels apart at most
#: (float32 quaternions round the qform a little; a real disagreement is refused).
QSFORM_TOLERANCE_VOXELS = 0.1

#: N4 iterations per fitting level and convergence threshold. Four levels of at most
#: 50 iterations on a 4x shrunken image: about 25 s for a 1 mm whole-head T1w on 2
#: threads (the threshold is rarely reached; the iterations bound the time).
N4_CONVERGENCE: dict[str, Any] = {"iters": [50, 50, 40, 30], "tol": 1e-6}
#: B-spline control-point spacing (mm) of the N4 bias field (as in antsBrainExtraction).
_N4_SPLINE_DISTANCE_MM = 200

# Brain masking: how far (mm) the template brain mask is dilated to crop the head
# after the first registration, and to restrict the metric on the template side.
_CROP_DILATION_MM = 12.0
_METRIC_DILATION_MM = 6.0
# ... and for the second pass (0: the template brain mask itself). Measured on three
# real whole-head T1w: 2 mm let the affine grow the brain onto the skull.
_PASS2_METRIC_DILATION_MM = 0.0
# Model of the first pass: an affine from the centre of mass grew the brain onto the skull.
_PASS1_MODE = "rigid"
# Pass 1 sees the head down to this distance (mm) below the vertex: the template
# brain spans 154 mm from its top to the bottom of the field of view, plus the scalp.
_HEAD_TOP_HEIGHT_MM = 170.0
# Refinement of the brain mask: foreground above this fraction of the Otsu threshold.
_REFINE_OTSU_FRACTION = 0.2
# Obliquity (degrees) below which a grid is reported as not oblique.
_OBLIQUE_TOLERANCE_DEG = 0.01


# --------------------------------------------------------------------------- #
# loading and checking
# --------------------------------------------------------------------------- #
def _one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line (library messages may hold newlines).

    Examples
    --------
    >>> _one_line(OSError("Expected 10 bytes, got 5 bytes from \\n - could the file be damaged?"))
    'OSError: Expected 10 bytes, got 5 bytes from - could the file be damaged?'
    """
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def load_anatomical(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Load a 3-D anatomical image, refusing files that cannot be used.

    A 4-D image with a single volume (or trailing singleton axes) is squeezed to
    3-D. The returned image holds ``float32`` data in memory (scaling applied),
    the input's affine and qform/sform codes, and spatial units mm when the input
    had none.

    Parameters
    ----------
    path : path
        NIfTI file (``.nii`` or ``.nii.gz``).

    Returns
    -------
    nibabel.Nifti1Image
        The 3-D image.

    Raises
    ------
    InputDataError
        If the file is missing, unreadable, truncated or not NIfTI; has more than
        one volume or fewer than 3 dimensions; contains NaN or infinite values; is
        constant (e.g. all zero); has voxel sizes outside 0.2-8 mm; or has both
        qform and sform codes 0 (unknown orientation). The message names the file
        and says what to do.

    Examples
    --------
    >>> import tempfile, numpy as np, nibabel as nib
    >>> from pathlib import Path
    >>> f = Path(tempfile.mkdtemp()) / "one_volume.nii.gz"
    >>> nib.save(nib.Nifti1Image(np.random.rand(5, 6, 7, 1).astype("f4"), np.eye(4)), f)
    >>> load_anatomical(f).shape
    (5, 6, 7)
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: the anatomical image does not exist; check the path and the dataset.")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many kinds for broken files
        raise InputDataError(
            f"{path}: cannot be read as a NIfTI image ({_one_line(exc)}); "
            "the file is corrupt or not NIfTI. Re-export or re-convert it (e.g. dcm2niix) "
            "and check that it is not truncated."
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputDataError(
            f"{path}: is a {type(img).__name__}, not a NIfTI image; convert it to NIfTI "
            "(BIDS requires .nii or .nii.gz)."
        )
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise InputDataError(
            f"{path}: the image data cannot be read ({_one_line(exc)}); the file "
            "is probably truncated or corrupt. Copy or convert it again."
        ) from exc
    if data.ndim > 3:
        extra = data.shape[3:]
        if int(np.prod(extra)) != 1:
            raise InputDataError(
                f"{path}: has {int(np.prod(extra))} volumes (shape {data.shape}); an anatomical "
                "image must be 3-D. Keep one volume (or average the repeats) before running."
            )
        data = data.reshape(data.shape[:3])
    if data.ndim < 3 or min(data.shape) < 2:
        raise InputDataError(
            f"{path}: has shape {data.shape}, not a 3-D volume; provide the full 3-D anatomical image."
        )
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputDataError(
            f"{path}: contains {int(bad.sum())} NaN or infinite voxels; replace them "
            "(e.g. by 0) or re-export the image."
        )
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise InputDataError(
            f"{path}: every voxel equals {low:g}"
            + (" (the image is empty)" if low == 0 else "")
            + "; the image holds no anatomy. Check the conversion or remove the file."
        )
    check_spatial_header(img, path)
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    affine = np.asarray(img.affine, dtype=float)
    out = nib.Nifti1Image(data.astype(np.float32, copy=False), affine)
    if qform is not None and qcode:
        out.set_qform(qform, code=int(qcode))
    else:
        out.set_qform(None, code=0)
    if sform is not None and scode:
        out.set_sform(sform, code=int(scode))
    else:
        out.set_sform(None, code=0)
    xyz_units = img.header.get_xyzt_units()[0]
    out.header.set_xyzt_units(xyz=xyz_units if xyz_units != "unknown" else "mm", t="sec")
    out.header.set_data_dtype(np.float32)
    return out


def check_spatial_header(img: nib.Nifti1Image, path: str | os.PathLike[str]) -> None:
    """Refuse a NIfTI header whose placement in space cannot be trusted.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        The loaded image (header and affine).
    path : path
        Its file, named in the message.

    Raises
    ------
    InputDataError
        Both qform and sform codes 0 (orientation unknown); qform and sform both set but
        placing the image more than a tenth of a voxel apart (tools disagree on which to
        use: nibabel takes the sform, ANTs/ITK the qform when the sform code is not 1);
        a degenerate or non-finite affine; or voxel sizes outside 0.2-8 mm (wrong units
        or pixdim).

    Examples
    --------
    >>> import nibabel as nib
    >>> img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> img.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    >>> check_spatial_header(img, "ok.nii.gz") is None
    True
    >>> shifted = np.diag([2.0, 2.0, 2.0, 1.0]); shifted[0, 3] = 5.0
    >>> img.set_sform(shifted, code=2)
    >>> check_spatial_header(img, "bad.nii.gz")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ihf_bids.errors.InputDataError: bad.nii.gz: its qform (code 1) and sform (code 2) disagree...
    """
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    if not qcode and not scode:
        raise InputDataError(
            f"{path}: its qform and sform codes are both 0, so its orientation in space is "
            "unknown; fix the header (reconvert from DICOM, or set a correct qform/sform "
            "with code 1, e.g. nibabel's set_qform/set_sform) before running."
        )
    affine = np.asarray(img.affine, dtype=float)
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputDataError(f"{path}: its voxel-to-world affine is degenerate; fix the header.")
    if np.any(sizes < MIN_VOXEL_SIZE_MM) or np.any(sizes > MAX_VOXEL_SIZE_MM):
        units = img.header.get_xyzt_units()[0]
        raise InputDataError(
            f"{path}: voxel size {np.round(sizes, 4).tolist()} (header units {units!r}) is outside "
            f"{MIN_VOXEL_SIZE_MM}-{MAX_VOXEL_SIZE_MM} mm; the header is probably wrong (units or "
            "pixdim). Fix the voxel size in the header."
        )
    if qcode and scode and qform is not None and sform is not None:
        shape = tuple(int(n) for n in img.shape[:3]) + (1,) * max(0, 3 - len(img.shape))
        apart = _forms_apart_mm(np.asarray(qform, float), np.asarray(sform, float), shape)
        voxel = float(np.min(np.sqrt((np.asarray(sform, float)[:3, :3] ** 2).sum(axis=0))))
        if not np.isfinite(apart) or apart > QSFORM_TOLERANCE_VOXELS * voxel:
            raise InputDataError(
                f"{path}: its qform (code {int(qcode)}) and sform (code {int(scode)}) disagree: they place "
                f"the image up to {apart:.3g} mm apart. Tools read such a file differently (nibabel uses "
                "the sform, ANTs/ITK may use the qform), so its position in space is ambiguous. Make them "
                "agree: copy the correct one over the other (e.g. 'fslorient -copysform2qform FILE' when "
                "the sform is right, or reconvert from DICOM) before running."
            )


def _forms_apart_mm(qform: np.ndarray, sform: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between where two affines put the corners of a grid of ``shape``."""
    import itertools

    corners = np.array(list(itertools.product(*[(0.0, float(n - 1)) for n in shape[:3]])))
    corners = np.column_stack([corners, np.ones(len(corners))])
    return float(np.max(np.linalg.norm((corners @ (qform - sform).T)[:, :3], axis=1)))


def check_anatomical_image(path: str | os.PathLike[str]) -> Path:
    """Check an anatomical image (see :func:`load_anatomical`) and return its path.

    Parameters
    ----------
    path : path
        NIfTI file.

    Returns
    -------
    pathlib.Path
        ``path``, when the image can be used.

    Raises
    ------
    InputDataError
        As :func:`load_anatomical`.
    """
    load_anatomical(path)
    return Path(path)


# --------------------------------------------------------------------------- #
# orientation
# --------------------------------------------------------------------------- #
def conform_to_ras(in_file: str | os.PathLike[str], out_file: str | os.PathLike[str]) -> dict[str, Any]:
    """Reorient an image to the closest canonical RAS orientation, without resampling.

    Axes are permuted and flipped only (``nibabel.as_closest_canonical``), so every
    voxel keeps its world coordinates and value; an oblique grid stays oblique.

    Parameters
    ----------
    in_file : path
        Anatomical NIfTI (checked with :func:`load_anatomical`).
    out_file : path
        Output NIfTI (float32, qform/sform code 1, mm).

    Returns
    -------
    dict
        Record for the sidecar of the preprocessed image (the workflow merges it in):
        ``original_orientation`` (axis codes of the input, e.g. ``"LPS"``),
        ``reoriented`` (bool), ``oblique`` (bool), ``obliquity_deg`` (largest axis
        deviation), ``voxel_size`` and ``shape`` (after reorientation, lists). The
        output path is not part of it: a sidecar must not depend on the work directory.
    """
    import nibabel as nib
    from nibabel.affines import obliquity

    img = load_anatomical(in_file)
    orientation = "".join(nib.aff2axcodes(img.affine))
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    affine = np.asarray(canonical.affine, dtype=float)
    save_image(data, affine, out_file)
    oblique_deg = float(np.degrees(np.max(np.abs(obliquity(affine)))))
    return {
        "original_orientation": orientation,
        "oblique": bool(oblique_deg > _OBLIQUE_TOLERANCE_DEG),
        "obliquity_deg": round(oblique_deg, 4),
        "voxel_size": [round(float(v), 6) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "shape": [int(n) for n in data.shape],
        "reoriented": orientation != "RAS",
    }


# --------------------------------------------------------------------------- #
# bias field
# --------------------------------------------------------------------------- #
def n4_bias_correct(
    in_file: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    mask_file: str | os.PathLike[str] | None = None,
    shrink_factor: int = 4,
) -> Path:
    """Correct the intensity bias field with N4 (antspyx).

    Negative intensities are set to 0 first (N4 works on log intensities) and in the
    result. The field is fitted inside ``mask_file`` or, without one, inside the
    foreground (:func:`foreground_mask`), and divided out everywhere.

    Parameters
    ----------
    in_file : path
        Anatomical NIfTI.
    out_file : path
        Output NIfTI (float32, same grid).
    mask_file : path, optional
        Where to fit the field (same grid as ``in_file``; values > 0.5 are inside).
    shrink_factor : int, default=4
        Downsampling of the image for the fit (1 for small images).

    Returns
    -------
    pathlib.Path
        ``out_file``.
    """
    import ants

    img = load_anatomical(in_file)
    data = np.clip(np.asarray(img.dataobj, dtype=np.float32), 0.0, None)
    affine = np.asarray(img.affine, dtype=float)
    if mask_file is not None:
        mask = _load_mask_on_grid(mask_file, img, in_file)
    else:
        mask = foreground_mask(data)
    mask &= data > 0
    if mask.sum() < 8:
        raise InputDataError(
            f"{in_file}: fewer than 8 positive voxels inside the bias-field mask"
            + (f" {mask_file}" if mask_file is not None else "")
            + "; the image is (nearly) empty or mostly negative: view the input image, convert it again or "
            "leave it out."
        )
    image = ants.from_nibabel_nifti(nifti_image(data, affine))
    mask_img = ants.from_nibabel_nifti(nifti_image(mask.astype(np.float32), affine))
    corrected = ants.n4_bias_field_correction(
        image,
        mask=mask_img,
        shrink_factor=int(max(1, shrink_factor)),
        convergence=dict(N4_CONVERGENCE),
        spline_param=_N4_SPLINE_DISTANCE_MM,
    )
    result = np.clip(corrected.numpy().astype(np.float32), 0.0, None)
    result[~np.isfinite(result)] = 0.0
    return save_image(result, affine, out_file)


# --------------------------------------------------------------------------- #
# brain mask
# --------------------------------------------------------------------------- #
def brain_mask_via_template(
    anat_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    voxel_size: float = 1.0,
    mode: Literal["affine", "syn"] = "affine",
    random_seed: int = 0,
    refine: bool = True,
) -> tuple[Path, Registration]:
    """Brain mask of a whole-head or skull-stripped T1w from the bundled MNI template.

    Two passes, no downloads:

    1. rigid registration of the top 170 mm of the head (below the highest
       foreground voxel, so that a neck in the field of view does not pull the
       centre of mass, which starts ANTs, down) to the (brain-extracted) template
       T1, with the metric inside the template brain dilated by 6 mm (rigid, so that
       the brain cannot grow onto the skull); the template brain mask dilated by
       12 mm is warped back to crop the head;
    2. the cropped image is registered again (affine, starting from pass 1), with
       the metric inside the template brain mask, and the template brain mask is
       warped back to native space (linear interpolation, threshold 0.5);
    3. with ``mode="syn"`` only, the brain-extracted image is registered to the
       template with SyN, starting from pass 2 (SyN on the head with its skull
       stretches the brain onto the skull), and that registration is returned.

    Pass 1 starts from the centres of mass. When the result fails its quality check
    (:func:`template_registration_quality`: the brain mask moved onto the template grid
    overlaps the template's by less than ``QC_THRESHOLDS["TemplateMaskDice"]``), passes
    1 and 2 run again from a coarse rotation search, and the result with the higher
    mutual information is kept; the registration's ``quality`` records both tries.

    With ``refine``, the mask is intersected with the (hole-filled) foreground,
    which trims it to the support of a skull-stripped image and leaves a whole-head
    image unchanged, and then holes are filled and the largest component kept.

    Parameters
    ----------
    anat_file : path
        T1-weighted NIfTI (preferably bias-corrected and RAS, see
        :func:`n4_bias_correct`, :func:`conform_to_ras`).
    out_dir : path
        Folder for the mask, the template files and the transforms (created).
    voxel_size : float, default=1.0
        Voxel size (mm) of the template grid registered to; the returned
        registration maps onto this grid.
    mode : {"affine", "syn"}, default="affine"
        Model of the final pass.
    random_seed : int, default=0
        Seed of the registration metric sampling.
    refine : bool, default=True
        Intersect with the foreground, fill holes, keep the largest component.

    Returns
    -------
    mask_path : pathlib.Path
        ``<out_dir>/<stem>_desc-brain_mask.nii.gz``: uint8 0/1 mask on the grid of
        ``anat_file``.
    registration : Registration
        Native -> template transform of the final pass (``forward`` resamples the
        image onto the template grid, ``template_t1`` of this pass's files).
    """

    from ..templates import write_template
    from .registration import apply_transforms, register_images

    if mode not in ("affine", "syn"):
        raise ValueError(f"brain-mask registration mode must be 'affine' or 'syn', not {mode!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img = load_anatomical(anat_file)
    data = np.clip(np.asarray(img.dataobj, dtype=np.float32), 0.0, None)
    affine = np.asarray(img.affine, dtype=float)
    stem = _stem(anat_file)

    tag = f"{float(voxel_size):g}mm".replace(".", "p")
    tpl_t1 = write_template("t1", voxel_size, out_dir / f"tpl-{tag}_T1w.nii.gz")
    tpl_mask = write_template("brain_mask", voxel_size, out_dir / f"tpl-{tag}_desc-brain_mask.nii.gz")
    tpl_mask_img = _read(tpl_mask)
    tpl_brain = np.asarray(tpl_mask_img.dataobj) > 0.5
    tpl_zooms = np.sqrt((tpl_mask_img.affine[:3, :3] ** 2).sum(axis=0))
    metric_mask = save_image(
        _dilate_mm(tpl_brain, tpl_zooms, _METRIC_DILATION_MM).astype(np.uint8),
        tpl_mask_img.affine, out_dir / f"tpl-{tag}_desc-metric_mask.nii.gz", dtype=np.uint8,
    )
    brain_metric_mask = save_image(
        _dilate_mm(tpl_brain, tpl_zooms, _PASS2_METRIC_DILATION_MM).astype(np.uint8),
        tpl_mask_img.affine, out_dir / f"tpl-{tag}_desc-metric2_mask.nii.gz", dtype=np.uint8,
    )
    crop_mask = save_image(
        _dilate_mm(tpl_brain, tpl_zooms, _CROP_DILATION_MM).astype(np.float32),
        tpl_mask_img.affine, out_dir / f"tpl-{tag}_desc-crop_mask.nii.gz",
    )
    # The input as a clean float32 file (ANTs reads it; the header may be odd).
    native = save_image(data, affine, out_dir / f"{stem}_desc-input_T1w.nii.gz")

    # Pass 1: the top of the head (so that the centres of mass, which start the
    # registration, are close even when the neck is in the field of view), metric
    # inside the (dilated) template brain.
    top = save_image(
        data * _head_top(data, affine, _HEAD_TOP_HEIGHT_MM), affine, out_dir / f"{stem}_desc-headtop_T1w.nii.gz"
    )
    # Pass 1 from the centres of mass; when the result fails its quality check (below), once
    # more from a coarse rotation search, and the better of the two by the metric is kept.
    candidates, tried = [], []
    for start in ("centre of mass", "rotation search"):
        tag_start = "com" if start == "centre of mass" else "search"
        first = register_images(
            top, tpl_t1, out_dir / f"{stem}_pass-1-{tag_start}_", mode=_PASS1_MODE,
            fixed_mask=metric_mask, random_seed=random_seed, start=start,
        )
        crop_native = apply_transforms(
            crop_mask, native, list(first.inverse), out_dir / f"{stem}_start-{tag_start}_desc-crop_mask.nii.gz",
            invert=list(first.inverse_invert), interpolation="linear",
        )
        crop = np.asarray(_read(crop_native).dataobj) > 0.5
        if crop.sum() == 0:
            continue
        save_image(crop.astype(np.uint8), affine, crop_native, dtype=np.uint8)
        cropped = save_image(data * crop, affine, out_dir / f"{stem}_desc-cropped_T1w.nii.gz")
        # Pass 2: the cropped head, affine (SyN on a head with skull would stretch the brain
        # onto the skull: 2.7 L masks on real whole-head images).
        final = register_images(
            cropped, tpl_t1, out_dir / f"{stem}_start-{tag_start}_to-template_", mode="affine",
            moving_mask=crop_native, fixed_mask=brain_metric_mask, random_seed=random_seed,
            initial_transform=first.affine,
        )
        Path(cropped).unlink(missing_ok=True)
        mask = _native_brain_mask(tpl_mask, native, final, data, refine=refine,
                                  out_file=out_dir / f"{stem}_start-{tag_start}_desc-brain_probseg.nii.gz")
        quality = template_registration_quality(native, mask, affine, final, tpl_t1, tpl_mask, start=start)
        candidates.append((quality, final, mask))
        tried.append({"start": start, "mutual_information": quality.mutual_information,
                      "displacement_mm": quality.displacement_mm, "rotation_deg": quality.rotation_deg,
                      "implausible": "; ".join(quality.flags)})
        if not quality.flags:
            break
    if not candidates:
        raise RegistrationError(
            f"registration of {anat_file} to the template failed: the brain is outside the image from every "
            "start. View the image: its header may place it far from the scanner's centre, or it may not be a "
            "brain image.")
    quality, final, mask = max(candidates, key=lambda c: c[0].mutual_information)
    quality = dataclasses.replace(quality, tried=tuple(tried))
    final = dataclasses.replace(final, quality=quality)
    mask_path = save_image(mask.astype(np.uint8), affine, out_dir / f"{stem}_desc-brain_mask.nii.gz", dtype=np.uint8)
    brain = None
    if mode == "syn":
        # Pass 3: the brain alone (skull removed with the mask), SyN from the affine.
        brain = save_image(data * mask, affine, out_dir / f"{stem}_desc-brain_T1w.nii.gz")
        syn = register_images(
            brain, tpl_t1, out_dir / f"{stem}_to-template-syn_", mode="syn",
            moving_mask=mask_path, fixed_mask=brain_metric_mask, random_seed=random_seed,
            initial_transform=final.affine,
        )
        final = dataclasses.replace(
            syn, quality=template_registration_quality(native, mask, affine, syn, tpl_t1, tpl_mask,
                                                       start=quality.start, tried=quality.tried))
    for temporary in (native, top, brain):
        if temporary is None:
            continue
        Path(temporary).unlink(missing_ok=True)
    return mask_path, final


def _native_brain_mask(tpl_mask, native, registration: Registration, data: np.ndarray, *, refine: bool,
                       out_file: Path) -> np.ndarray:
    """The template brain mask warped back onto the native grid (threshold 0.5), optionally refined."""
    from scipy import ndimage

    from .registration import apply_transforms

    prob = apply_transforms(tpl_mask, native, list(registration.inverse), out_file,
                            invert=list(registration.inverse_invert), interpolation="linear")
    mask = np.asarray(_read(prob).dataobj) >= 0.5
    if refine and mask.any():
        mask &= foreground_mask(data, fraction=_REFINE_OTSU_FRACTION, fill=True)
        mask = _largest_component(mask)
        mask = ndimage.binary_fill_holes(mask)
    return mask


def template_registration_quality(
    image: str | os.PathLike[str],
    mask: np.ndarray,
    affine: np.ndarray,
    registration: Registration,
    template_t1: str | os.PathLike[str],
    template_mask: str | os.PathLike[str],
    *,
    start: str,
    tried: tuple[dict, ...] | None = None,
) -> RegistrationQuality:
    """Quality of a T1w -> template registration, measured in template space.

    The native brain mask and the T1w are moved onto the template grid. ``MaskDice`` is the
    Dice of the moved mask with the template's brain mask: a mask that lost part of the
    brain (the refinement keeps only the image's foreground) or sits off the template's
    brain lowers it; it is compared with :data:`~ihf_bids.preproc.registration.QC_THRESHOLDS`.
    ``Correlation`` (the Pearson correlation of the moved T1w with the template T1 inside the
    template's brain) is recorded, not flagged: it depends on the contrast as much as on the
    registration.

    Parameters
    ----------
    image : path
        The native T1w.
    mask : numpy.ndarray
        Its brain mask (native grid, boolean).
    affine : numpy.ndarray
        The native grid's affine.
    registration : Registration
        Native -> template.
    template_t1, template_mask : path
        The template T1 and brain mask on the grid registered to.
    start : str
        The start of the registration (recorded).
    tried : tuple of dict, optional
        The starts tried (default: those of ``registration.quality``).

    Returns
    -------
    RegistrationQuality
    """
    import tempfile

    from .registration import (
        QC_THRESHOLDS,
        RegistrationQuality,
        apply_transforms,
        linear_transform_summary,
        mutual_information,
    )

    forward = list(registration.forward)
    with tempfile.TemporaryDirectory() as scratch:
        mask_file = save_image(mask.astype(np.float32), affine, Path(scratch) / "mask.nii.gz")
        moved_mask = np.asarray(_read(apply_transforms(
            mask_file, template_t1, forward, Path(scratch) / "mask_tpl.nii.gz")).dataobj) >= 0.5
        moved = np.asarray(_read(apply_transforms(
            image, template_t1, forward, Path(scratch) / "t1_tpl.nii.gz")).dataobj, dtype=np.float64)
    tpl_brain = np.asarray(_read(template_mask).dataobj) > 0.5
    tpl = np.asarray(_read(template_t1).dataobj, dtype=np.float64)
    a, b = moved[tpl_brain], tpl[tpl_brain]
    correlation = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    mask_dice = dice(moved_mask, tpl_brain)
    points = np.argwhere(tpl_brain)[::7]
    tpl_affine = _read(template_t1).affine
    displacement, rotation, _ = linear_transform_summary(
        registration.affine, points @ tpl_affine[:3, :3].T + tpl_affine[:3, 3])
    flags = []
    if mask_dice < QC_THRESHOLDS["TemplateMaskDice"]:
        flags.append(f"the brain mask in template space overlaps the template's by Dice {mask_dice:.2f} "
                     f"(below {QC_THRESHOLDS['TemplateMaskDice']:g})")
    previous = registration.quality
    return RegistrationQuality(
        start=start, displacement_mm=displacement, rotation_deg=rotation,
        mutual_information=mutual_information(template_t1, image, forward, fixed_mask=template_mask),
        tried=tried if tried is not None else (previous.tried if previous is not None else ()),
        mask_dice=mask_dice, correlation=correlation, flags=tuple(flags),
    )



def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty).

    Examples
    --------
    >>> dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    0.6666666666666666
    """
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def foreground_mask(data: np.ndarray, *, fraction: float = 0.5, fill: bool = False) -> np.ndarray:
    """Foreground (head or skull-stripped brain): above a fraction of the Otsu threshold.

    The Otsu threshold of the positive voxels separates air from tissue in a
    whole-head image (and dark from bright tissue in a skull-stripped one); half of
    it keeps dark tissue (CSF, bone marrow) while leaving out the air noise.

    Parameters
    ----------
    data : numpy.ndarray
        3-D image.
    fraction : float, default=0.5
        Fraction of the Otsu threshold of the positive voxels used as threshold.
    fill : bool, default=False
        Fill the holes of the mask (3-D, then slice by slice along each axis).

    Returns
    -------
    numpy.ndarray
        Boolean mask.

    Examples
    --------
    >>> img = np.zeros((8, 8, 8)); img[2:6, 2:6, 2:6] = 100.0; img[3, 3, 3] = 0.0
    >>> int(foreground_mask(img).sum()), int(foreground_mask(img, fill=True).sum())
    (63, 64)
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    data = np.asarray(data, dtype=np.float32)
    positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, dtype=bool)
    if np.ptp(positive) == 0:
        mask = data > 0
    else:
        mask = data > float(fraction) * float(threshold_otsu(positive))
    if fill:
        mask = ndimage.binary_fill_holes(mask)
        for axis in range(mask.ndim):
            moved = np.moveaxis(mask, axis, 0)
            filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
            mask = np.moveaxis(filled, 0, axis)
    return np.asarray(mask, dtype=bool)


# --------------------------------------------------------------------------- #
# intensity
# --------------------------------------------------------------------------- #
def normalize_intensity(
    in_file: str | os.PathLike[str],
    mask_file: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    percentile: float = 99.0,
    target: float = 1000.0,
) -> Path:
    """Scale intensities so that a robust in-mask maximum becomes ``target``; skull-strip.

    Negative values are set to 0 and everything outside the mask to 0 (the
    derivative is skull-stripped).

    Parameters
    ----------
    in_file : path
        Anatomical NIfTI (bias-corrected).
    mask_file : path
        Brain mask on the same grid (values > 0.5 inside).
    out_file : path
        Output NIfTI (float32).
    percentile : float, default=99.0
        Percentile of the in-mask intensities mapped to ``target``.
    target : float, default=1000.0
        Value of that percentile after scaling.

    Returns
    -------
    pathlib.Path
        ``out_file``.

    Examples
    --------
    >>> import tempfile, nibabel as nib
    >>> tmp = Path(tempfile.mkdtemp())
    >>> data = np.linspace(-1, 200, 4 * 4 * 4, dtype="f4").reshape(4, 4, 4)
    >>> nib.save(nib.Nifti1Image(data, np.eye(4)), tmp / "t1.nii.gz")
    >>> nib.save(nib.Nifti1Image(np.ones((4, 4, 4), "u1"), np.eye(4)), tmp / "mask.nii.gz")
    >>> out = normalize_intensity(tmp / "t1.nii.gz", tmp / "mask.nii.gz", tmp / "norm.nii.gz", percentile=100)
    >>> float(nib.load(out).get_fdata().max())
    1000.0
    """
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    if not float(target) > 0.0:
        raise ValueError(f"target must be positive, got {target!r}")
    img = load_anatomical(in_file)
    data = np.clip(np.asarray(img.dataobj, dtype=np.float32), 0.0, None)
    mask = _load_mask_on_grid(mask_file, img, in_file)
    if not mask.any():
        raise InputDataError(f"{mask_file}: the brain mask is empty; check the brain-masking step.")
    reference = float(np.percentile(data[mask], float(percentile)))
    if reference <= 0.0:
        raise InputDataError(
            f"{in_file}: the {percentile:g}th percentile of the intensities inside {mask_file} is "
            f"{reference:g}; the image is (nearly) empty inside the brain mask. Check both files."
        )
    out = np.where(mask, data * np.float32(float(target) / reference), np.float32(0.0)).astype(np.float32)
    return save_image(out, np.asarray(img.affine, dtype=float), out_file)


# --------------------------------------------------------------------------- #
# internals
# --------------------------------------------------------------------------- #
def _read(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    import nibabel as nib

    return nib.load(str(path))


def _stem(path: str | os.PathLike[str]) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _load_mask_on_grid(mask_file: str | os.PathLike[str], img: nib.Nifti1Image, in_file: Any) -> np.ndarray:
    """A binary mask (> 0.5) that must share the image's grid."""
    import nibabel as nib

    try:
        mask_img = nib.load(str(mask_file))
        mask = np.asarray(mask_img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise InputDataError(
            f"{mask_file}: the mask cannot be read ({_one_line(exc)}); recreate it."
        ) from exc
    mask = mask.reshape(mask.shape[:3]) if mask.ndim > 3 and int(np.prod(mask.shape[3:])) == 1 else mask
    if mask.shape != img.shape[:3] or not np.allclose(mask_img.affine, img.affine, atol=1e-3):
        raise InputDataError(
            f"{mask_file}: the mask's grid (shape {mask.shape}) differs from that of {in_file} "
            f"(shape {img.shape[:3]}); resample the mask onto the image grid."
        )
    return np.nan_to_num(mask) > 0.5


def _dilate_mm(mask: np.ndarray, zooms: np.ndarray, radius_mm: float) -> np.ndarray:
    """Dilate a binary mask by a radius in mm (exact Euclidean distance)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    distance = ndimage.distance_transform_edt(~mask, sampling=[float(z) for z in zooms])
    return distance <= float(radius_mm)


def _head_top(data: np.ndarray, affine: np.ndarray, height_mm: float) -> np.ndarray:
    """The part of the head within ``height_mm`` below its highest point (world S axis)."""
    head = _largest_component(foreground_mask(data))
    if not head.any():
        return np.ones(data.shape, dtype=bool)
    # World S coordinate of every voxel: separable in the voxel indices.
    ijk = [np.arange(n, dtype=float) for n in data.shape]
    z = (
        affine[2, 0] * ijk[0][:, None, None]
        + affine[2, 1] * ijk[1][None, :, None]
        + affine[2, 2] * ijk[2][None, None, :]
        + affine[2, 3]
    )
    vertex = float(np.percentile(z[head], 99.9))
    return z >= vertex - float(height_mm)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = ndimage.sum_labels(np.ones(mask.shape), labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)
