"""Image registration and resampling with antspyx (the ANTs library, no command-line tools).

Transforms are ANTs files: an affine ``.mat`` (ITK binary) and, for SyN, a displacement
field ``.nii.gz``. Lists of transforms follow ``ants.apply_transforms``: applied last to
first, so ``forward`` maps the moving image onto the fixed grid and ``inverse`` (with
``inverse_invert``) maps the fixed image back onto the moving grid.

Multi-resolution schedules are defined in millimetres (:func:`multiresolution_schedule`):
the same levels of detail are optimised whether the images have 1, 2 or 4 mm voxels, and the
finest level with iterations is never coarser than the images themselves. Every registration
can start from the scanner geometry (identity in world coordinates: two images of one session
are already related by their headers), from the centres of mass, or from a coarse rotation
search; :func:`register_images` bounds the result and falls back to the other starts when it
is implausible, and every result carries a :class:`RegistrationQuality`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ..errors import IhfBidsError

__all__ = [
    "REGISTRATION_MODES",
    "REGISTRATION_STARTS",
    "WITHIN_SESSION_BOUNDS",
    "QC_THRESHOLDS",
    "MotionBounds",
    "Registration",
    "RegistrationError",
    "RegistrationQuality",
    "Schedule",
    "apply_transforms",
    "linear_transform_summary",
    "multiresolution_schedule",
    "mutual_information",
    "register_images",
]

#: Registration models offered on the command line (``rigid`` is used inside a subject).
REGISTRATION_MODES = ("rigid", "affine", "syn")
#: Where an optimisation can start: the scanner geometry (identity in world coordinates), the
#: intensity centres of mass, or a coarse search over rotations (``ants.affine_initializer``).
REGISTRATION_STARTS = ("scanner geometry", "centre of mass", "rotation search")

# Levels of detail (effective voxel size in mm after shrinking) and their iterations. The
# finest level with iterations is the coarser of the images' own voxel size and the stage's
# floor: half-millimetre detail adds nothing to 6 or 12 parameters, and a 1 mm SyN level
# doubled the time (293 s with 20 iterations there) for no visible gain.
_LINEAR_LEVELS_MM = (8.0, 4.0, 2.0)
_LINEAR_FLOOR_MM = 2.0
_SYN_LEVELS_MM = (4.0, 2.0)
_SYN_FLOOR_MM = 2.0
_SYN_ITERATIONS = (70, 50)
_CONVERGENCE_THRESHOLD = 1e-6
_CONVERGENCE_WINDOW = 10
_MATTES_BINS = 32
# Regular sampling of the metric: a quarter of the voxels of each level.
_SAMPLING_RATE = 0.25
# Coarse rotation search of the last fallback: +-90 degrees in steps of 30 (ANTs'
# antsAffineInitializer), a few local iterations at each start.
_SEARCH_DEGREES = 30
_SEARCH_ARC = 0.5
_SEARCH_LOCAL_ITERATIONS = 10
_SEARCH_VOXEL_MM = 4.0
# Points (at most) used to measure how far a transform moves the brain.
_DISPLACEMENT_POINTS = 20000


class RegistrationError(IhfBidsError):
    """No start gave a plausible registration (exit 1; the message names the image)."""


@dataclass(frozen=True)
class Schedule:
    """A multi-resolution schedule of one ANTs stage.

    Attributes
    ----------
    shrink_factors : tuple of int
        Shrink factor of each level (voxels of the fixed image's finest axis; ANTs shrinks
        thicker axes less).
    smoothing_mm : tuple of float
        Gaussian smoothing sigma of each level, in mm.
    iterations : tuple of int
        Iterations of each level (0: the level only carries the result to full resolution).
    """

    shrink_factors: tuple[int, ...]
    smoothing_mm: tuple[float, ...]
    iterations: tuple[int, ...]

    def ants_arguments(self) -> list[str]:
        """``--convergence``, ``--smoothing-sigmas`` (mm) and ``--shrink-factors`` arguments."""
        return [
            "--convergence",
            f"[{'x'.join(str(i) for i in self.iterations)},{_CONVERGENCE_THRESHOLD:g},{_CONVERGENCE_WINDOW}]",
            "--smoothing-sigmas", "x".join(f"{s:g}" for s in self.smoothing_mm) + "mm",
            "--shrink-factors", "x".join(str(s) for s in self.shrink_factors),
        ]


def multiresolution_schedule(
    stage: Literal["linear", "syn"], fixed_zooms: Sequence[float], moving_zooms: Sequence[float] = ()
) -> Schedule:
    """The levels of one stage for images of these voxel sizes, defined in millimetres.

    Each level is an effective voxel size ``L`` (8, 4, 2 mm for linear stages; 4, 2 mm for
    SyN). The images are shrunk by ``round(L / v)`` (``v``: the fixed image's finest voxel
    size) and smoothed with a Gaussian of sigma ``(L_eff - v) / 2`` mm, where ``L_eff`` is
    the shrunken voxel size: about half a level's voxel, the usual anti-aliasing. Levels
    finer than the floor ``max(stage floor, coarsest of the two images' finest voxel
    sizes)`` are dropped, the floor itself is always a level, and there are at least two
    levels. A SyN stage that stops above full resolution gets a last level with no
    iterations, so that its field is written at the fixed image's resolution.

    Parameters
    ----------
    stage : {"linear", "syn"}
        Rigid/affine or SyN.
    fixed_zooms, moving_zooms : sequence of float
        Voxel sizes (mm) of the two images.

    Returns
    -------
    Schedule

    Examples
    --------
    >>> multiresolution_schedule("linear", (1, 1, 1))
    Schedule(shrink_factors=(8, 4, 2), smoothing_mm=(3.5, 1.5, 0.5), iterations=(1000, 500, 250))
    >>> multiresolution_schedule("linear", (4, 4, 4))
    Schedule(shrink_factors=(2, 1), smoothing_mm=(2.0, 0.0), iterations=(1000, 500))
    >>> multiresolution_schedule("linear", (1, 1, 1), (2, 2, 2)).shrink_factors  # b=0 onto a 1 mm T1w
    (8, 4, 2)
    >>> multiresolution_schedule("syn", (2, 2, 2))
    Schedule(shrink_factors=(2, 1), smoothing_mm=(1.0, 0.0), iterations=(70, 50))
    >>> multiresolution_schedule("syn", (1, 1, 1))
    Schedule(shrink_factors=(4, 2, 1), smoothing_mm=(1.5, 0.5, 0.0), iterations=(70, 50, 0))
    """
    if stage not in ("linear", "syn"):
        raise ValueError(f"stage must be 'linear' or 'syn', not {stage!r}")
    v = float(min(fixed_zooms))
    if not v > 0:
        raise ValueError(f"voxel sizes must be positive, not {tuple(fixed_zooms)}")
    moving = float(min(moving_zooms)) if len(moving_zooms) else v
    floor = max(_LINEAR_FLOOR_MM if stage == "linear" else _SYN_FLOOR_MM, v, moving)
    levels = [L for L in (_LINEAR_LEVELS_MM if stage == "linear" else _SYN_LEVELS_MM) if L > floor * 1.01]
    levels.append(floor)
    if len(levels) < 2:
        levels.insert(0, 2.0 * floor)
    shrinks: list[int] = []
    for level in levels:
        s = max(1, int(round(level / v)))
        if not shrinks or s < shrinks[-1]:
            shrinks.append(s)
    if stage == "linear":
        # 1000 iterations at 6 mm and coarser, 500 down to 3 mm, 250 below (the convergence
        # test usually stops a level well before).
        iterations = [1000 if s * v >= 6.0 else 500 if s * v >= 3.0 else 250 for s in shrinks]
    else:
        iterations = list(_SYN_ITERATIONS[-len(shrinks):]) if len(shrinks) <= len(_SYN_ITERATIONS) else (
            [_SYN_ITERATIONS[0]] * (len(shrinks) - len(_SYN_ITERATIONS)) + list(_SYN_ITERATIONS))
        if shrinks[-1] > 1:
            shrinks.append(1)
            iterations.append(0)
    smoothing = tuple(round(max(0.0, (s * v - v) / 2.0), 3) for s in shrinks)
    return Schedule(tuple(shrinks), smoothing, tuple(int(i) for i in iterations))


@dataclass(frozen=True)
class MotionBounds:
    """How far a plausible registration may move the brain from where it starts.

    Attributes
    ----------
    displacement_mm : float
        Largest mean displacement of the brain (mm).
    rotation_deg : float
        Largest rotation (degrees).
    """

    displacement_mm: float = 20.0
    rotation_deg: float = 15.0

    def violations(self, displacement_mm: float, rotation_deg: float) -> list[str]:
        """Why a transform is implausible (empty when it is plausible)."""
        out = []
        if displacement_mm > self.displacement_mm:
            out.append(f"moves the brain by {displacement_mm:.1f} mm (more than {self.displacement_mm:g} mm)")
        if rotation_deg > self.rotation_deg:
            out.append(f"rotates it by {rotation_deg:.1f} degrees (more than {self.rotation_deg:g})")
        return out


#: Quality thresholds below which a registration is flagged (in its sidecar, the participant
#: report and the group report; see docs/qc.md).
QC_THRESHOLDS: dict[str, float] = {
    # T1w -> template: Dice of the brain mask moved onto the template grid with the template's.
    # (The correlation with the template T1 is recorded but not flagged: it depends on the
    # contrast as much as on the registration; 0.11-0.62 on the real T1w of docs/realbids.md,
    # 0.11 for a Siemens reconstruction without intensity normalization that looks aligned.)
    "TemplateMaskDice": 0.85,
    # T2w / b=0 -> T1w: Dice of the moved foreground (brain) with the reference's (0.96-0.99 on
    # the phantom; 0.76-0.99 for the b=0 of real runs whose registration looks right: EPI
    # distortion and signal loss), and how much better (relative mutual information) the
    # left-right mirror image must fit to flag a flip.
    "WithinSessionMaskDice": 0.7,
    "MirrorMargin": 0.05,
}

#: Within a session (T2w -> T1w, b=0 -> T1w) the head moves a few millimetres between scans;
#: a rigid result beyond these bounds is a failed optimisation (docs/usage.md).
WITHIN_SESSION_BOUNDS = MotionBounds(displacement_mm=20.0, rotation_deg=15.0)


@dataclass(frozen=True)
class RegistrationQuality:
    """How a registration went: where it started, how far it moved, how well it fits.

    Attributes
    ----------
    start : str
        The start of the chosen result (one of :data:`REGISTRATION_STARTS`, or
        ``"previous stage"``).
    displacement_mm : float
        Mean distance (mm) the linear part moves the points of the fixed mask (or of the fixed
        image's foreground) from where the headers put them.
    rotation_deg : float
        Rotation angle of the linear part (degrees).
    mutual_information : float
        Mattes mutual information (nats) of the fixed and the registered moving image,
        inside the fixed mask: the metric the starts are compared by.
    tried : tuple of dict
        Every start tried: ``{"start", "mutual_information", "displacement_mm",
        "rotation_deg", "implausible"}``.
    mask_dice : float, optional
        Dice of the moved brain (or foreground) mask with the fixed one.
    correlation : float, optional
        Pearson correlation of the moved image with the fixed one inside the fixed brain
        (same-contrast steps only).
    mirror_mutual_information : float, optional
        The mutual information the moving image reaches when mirrored left-right (within a
        session): above the image's own, one of the headers is likely flipped.
    flags : tuple of str
        Why the result is doubtful (empty: it passed every check of :data:`QC_THRESHOLDS`).
    """

    start: str
    displacement_mm: float
    rotation_deg: float
    mutual_information: float
    tried: tuple[dict, ...] = field(default=())
    mask_dice: float | None = None
    correlation: float | None = None
    mirror_mutual_information: float | None = None
    flags: tuple[str, ...] = ()

    def to_sidecar(self) -> dict:
        """BIDS-style sidecar fields (CamelCase keys, rounded numbers)."""
        optional = {"MaskDice": self.mask_dice, "Correlation": self.correlation,
                    "MirrorMutualInformation": self.mirror_mutual_information}
        return {
            "Flagged": bool(self.flags),
            **({"Flags": list(self.flags)} if self.flags else {}),
            "Start": self.start,
            **{k: round(float(v), 4) for k, v in optional.items() if v is not None},
            "DisplacementMm": round(self.displacement_mm, 2),
            "RotationDeg": round(self.rotation_deg, 2),
            "MutualInformation": round(self.mutual_information, 4),
            "StartsTried": [
                {"Start": t["start"], "MutualInformation": round(t["mutual_information"], 4),
                 "DisplacementMm": round(t["displacement_mm"], 2), "RotationDeg": round(t["rotation_deg"], 2),
                 **({"Implausible": t["implausible"]} if t["implausible"] else {})}
                for t in self.tried
            ],
        }


@dataclass(frozen=True)
class Registration:
    """Transforms found by :func:`register_images`.

    Attributes
    ----------
    forward : tuple of str
        Moving -> fixed (pass to :func:`apply_transforms` as is).
    inverse : tuple of str
        Fixed -> moving, with ``inverse_invert`` flags.
    inverse_invert : tuple of bool
        Which of ``inverse`` to invert (the affine, not the inverse warp).
    mode : str
        ``"rigid"``, ``"affine"`` or ``"syn"``.
    quality : RegistrationQuality or None
        How it went.
    """

    forward: tuple[str, ...]
    inverse: tuple[str, ...]
    inverse_invert: tuple[bool, ...]
    mode: str
    quality: RegistrationQuality | None = None

    @property
    def affine(self) -> str:
        """The linear part (an ITK ``.mat`` file)."""
        return next(t for t in self.forward if t.endswith(".mat"))


def _to_ants(data, affine):
    """An ANTs image from an array and its affine (units set to mm: ITK warns on files without them)."""
    import ants
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    return ants.from_nibabel_nifti(img)


def _read_ants(path):
    import nibabel as nib

    nii = nib.load(str(path))
    return _to_ants(np.asarray(nii.dataobj, dtype=np.float32), nii.affine)


def _write_ants(image, path: str) -> None:
    import ants

    ants.image_write(image, path)


def _affine(path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).affine, dtype=float)


def _zooms(path) -> tuple[float, ...]:
    import nibabel as nib

    return tuple(float(z) for z in nib.load(str(path)).header.get_zooms()[:3])


def linear_transform_summary(mat_file: str | Path, points_ras: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean displacement (mm) of points and rotation angle (degrees) of an ITK linear transform.

    Parameters
    ----------
    mat_file : path
        An ANTs/ITK ``.mat`` transform (it maps fixed-space points to moving-space points).
    points_ras : numpy.ndarray
        ``(n, 3)`` world (RAS, mm) points of the fixed space.

    Returns
    -------
    displacement_mm : float
        Mean ``|T(x) - x|`` over the points.
    rotation_deg : float
        Angle of the rotation closest to the linear part (polar decomposition).
    matrix : numpy.ndarray
        The 4x4 RAS world -> world matrix of the transform.
    """
    import ants

    tx = ants.read_transform(str(mat_file))
    # ITK works in LPS: read the transform at the origin and the unit vectors.
    basis = [np.zeros(3), *np.eye(3)]
    mapped = [np.asarray(tx.apply_to_point(tuple(p)), dtype=float) for p in basis]
    lps = np.eye(4)
    lps[:3, :3] = np.column_stack([m - mapped[0] for m in mapped[1:]])
    lps[:3, 3] = mapped[0]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    matrix = flip @ lps @ flip
    points = np.asarray(points_ras, dtype=float).reshape(-1, 3)
    moved = points @ matrix[:3, :3].T + matrix[:3, 3]
    displacement = float(np.linalg.norm(moved - points, axis=1).mean()) if len(points) else 0.0
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rotation = u @ vt
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))
    return displacement, angle, matrix


def _mask_points(path, image_path) -> np.ndarray:
    """World (RAS) points of a mask, or of an image's foreground, subsampled."""
    import nibabel as nib

    from .anat import foreground_mask

    img = nib.load(str(path if path is not None else image_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    inside = data > 0.5 if path is not None else foreground_mask(data)
    ijk = np.argwhere(inside)
    if len(ijk) > _DISPLACEMENT_POINTS:
        ijk = ijk[:: int(np.ceil(len(ijk) / _DISPLACEMENT_POINTS))]
    return ijk @ img.affine[:3, :3].T + img.affine[:3, 3]


def mutual_information(
    fixed: str | Path, moving: str | Path, transforms: Sequence[str], *, fixed_mask: str | Path | None = None
) -> float:
    """Mattes mutual information (nats; higher is better) of ``fixed`` and the moved ``moving``.

    Parameters
    ----------
    fixed, moving : path
        3-D NIfTI images.
    transforms : sequence of str
        Moving -> fixed, as for :func:`apply_transforms`.
    fixed_mask : path, optional
        Where to measure it.
    """
    fixed_img = _read_ants(fixed)
    if fixed_mask is not None:
        fixed_img = fixed_img * _read_ants(fixed_mask)
    return _mutual_information(fixed_img, _read_ants(moving), transforms)


def _mutual_information(fixed_img, moving_img, transforms) -> float:
    import ants

    warped = ants.apply_transforms(fixed=fixed_img, moving=moving_img, transformlist=list(transforms),
                                   interpolator="linear")
    return -float(ants.image_similarity(fixed_img, warped, metric_type="MattesMutualInformation"))


def _grown(mask_img, margin_mm: float):
    """An ANTs mask grown by ``margin_mm`` (Euclidean distance, in mm)."""
    from scipy import ndimage

    inside = mask_img.numpy() > 0.5
    distance = ndimage.distance_transform_edt(~inside, sampling=tuple(float(s) for s in mask_img.spacing))
    return mask_img.new_image_like((distance <= margin_mm).astype(np.float32))


def _mirror_fit(fixed_img, moving_img, moving_affine: np.ndarray, run_prefix: str, mode: str, moving_zooms,
                random_seed: int, fixed_mask: str | None, metric_fixed) -> float:
    """Mutual information reached by the moving image mirrored left-right (a flip check).

    The voxels are mirrored along the axis closest to the scanner's left-right axis, the
    header kept, and the result registered from the centres of mass like the image itself.
    """
    axis = int(np.argmax(np.abs(moving_affine[0, :3])))
    mirrored = moving_img.new_image_like(np.ascontiguousarray(np.flip(moving_img.numpy(), axis=axis)))
    transforms = _run_ants(fixed_img, mirrored, f"[{_pointer(fixed_img)},{_pointer(mirrored)},1]", mode=mode,
                           moving_zooms=moving_zooms, run_prefix=run_prefix, random_seed=random_seed,
                           masks=(fixed_mask, None))
    return _mutual_information(metric_fixed, mirrored, transforms)


def _overlap(fixed_img, moving_img, fixed_mask_img, moving_mask_img, transforms) -> float:
    """Dice of the moved moving mask with the fixed mask, or of the two images' foregrounds.

    Without a moving mask, the foregrounds (above half the Otsu threshold, holes filled) are
    compared inside the fixed mask (grown) and the moving image's field of view: the brain
    of skull-stripped images; whole-head images fill that region and score near 1.
    """
    import ants

    from .anat import dice, foreground_mask

    def moved(image, interpolator="linear"):
        return ants.apply_transforms(fixed=fixed_img, moving=image, transformlist=list(transforms),
                                     interpolator=interpolator).numpy()

    if fixed_mask_img is not None and moving_mask_img is not None:
        return dice(moved(moving_mask_img) >= 0.5, fixed_mask_img.numpy() > 0.5)
    region = moved(moving_img.new_image_like(np.ones(moving_img.shape, np.float32))) > 0.5
    if fixed_mask_img is not None:
        region &= fixed_mask_img.numpy() > 0.5
    return dice(foreground_mask(moved(moving_img), fill=True) & region,
                foreground_mask(fixed_img.numpy(), fill=True) & region)


def _run_ants(fixed_img, moving_img, initial: str, *, mode: str, moving_zooms, run_prefix: str,
              random_seed: int, masks: tuple[str | None, str | None] = (None, None)) -> list[str]:
    """One antsRegistration call (the library's, through antspyx); its transforms, in apply order.

    ``masks`` are file names: a mask passed as an in-memory antspyx image was read by
    antsRegistration as empty on real images, and every stage threw ("VirtualSampledPointSet
    must have 1 or more points"). antsRegistration reports such an exception only with
    ``--verbose`` and then writes its starting transform as the result, with exit code 0;
    its output goes to ``<run_prefix>ants.log`` and an exception there raises here.
    """
    from ants.internal import get_lib_fn, process_arguments

    args = [
        "--verbose", "1", "--dimensionality", "3", "--float", "1", "--collapse-output-transforms", "1",
        "--write-composite-transform", "0", "--initial-moving-transform", initial,
        *_ants_stages(mode, fixed_img, moving_zooms, _pointer(fixed_img), _pointer(moving_img)),
        *(["--masks", f"[{masks[0] or 'NA'},{masks[1] or 'NA'}]"] if any(masks) else []),
        "--use-histogram-matching", "0", "--winsorize-image-intensities", "[0.005,0.995]",
        "--output", run_prefix,
        # antsRegistration --random-seed: 0 means "seed from the clock", so seed s is passed as s + 1.
        # With one ITK thread the result is then reproducible bit for bit (Mattes MI sums over
        # threads in a varying order otherwise).
        "--random-seed", str(int(random_seed) + 1),
    ]
    with _native_output(run_prefix + "ants.log") as log:
        code = get_lib_fn("antsRegistration")(process_arguments(args))
    text = log.read_text(errors="replace")
    if code != 0 or "Exception caught" in text:
        # antsRegistration catches an ITK exception of a stage, prints it and goes on with the
        # stage's starting transform: a failed registration that looks like a result.
        detail = " ".join(line.strip() for line in text.splitlines() if "ERROR" in line or "Description" in line)
        raise RuntimeError(f"antsRegistration failed (exit code {code}): {detail or 'see ' + str(log)}")
    return _collect(run_prefix, mode)


@contextlib.contextmanager
def _native_output(path: str):
    """Send what native code writes to stdout and stderr (file descriptors 1 and 2) to ``path``."""
    import sys

    log = Path(path)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "wb") as handle:
        try:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
            yield log
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _rotation_search(fixed_img, moving_img, out_file: str) -> str:
    """A coarse search over rotations (and a few local iterations); the best start, as a file.

    The search runs on copies resampled to :data:`_SEARCH_VOXEL_MM` (at 1 mm it took minutes);
    the transform is in world coordinates, so it starts the full-resolution registration.
    """
    import ants

    def coarse(img, interpolation: int):
        if min(img.spacing) >= _SEARCH_VOXEL_MM:
            return img
        return ants.resample_image(img, (_SEARCH_VOXEL_MM,) * 3, use_voxels=False, interp_type=interpolation)

    ants.affine_initializer(coarse(fixed_img, 0), coarse(moving_img, 0), search_factor=_SEARCH_DEGREES,
                            radian_fraction=_SEARCH_ARC, use_principal_axis=False,
                            local_search_iterations=_SEARCH_LOCAL_ITERATIONS, txfn=out_file)
    if not Path(out_file).is_file():
        raise RuntimeError("the rotation search wrote no transform")
    return out_file


def _ants_stages(mode: str, fixed_img, moving_zooms, fixed_str: str, moving_str: str) -> list[str]:
    fixed_zooms = tuple(float(s) for s in fixed_img.spacing)
    linear = multiresolution_schedule("linear", fixed_zooms, moving_zooms)
    metric = f"MI[{fixed_str},{moving_str},1,{_MATTES_BINS},Regular,{_SAMPLING_RATE:g}]"
    if mode == "rigid":
        return ["--transform", "Rigid[0.25]", "--metric", metric, *linear.ants_arguments()]
    if mode == "affine":
        return ["--transform", "Affine[0.25]", "--metric", metric, *linear.ants_arguments()]
    syn = multiresolution_schedule("syn", fixed_zooms, moving_zooms)
    return ["--transform", "SyN[0.2,3,0]", "--metric", f"MI[{fixed_str},{moving_str},1,{_MATTES_BINS}]",
            *syn.ants_arguments()]


def register_images(
    moving: str | Path,
    fixed: str | Path,
    out_prefix: str | Path,
    *,
    mode: Literal["rigid", "affine", "syn"] = "affine",
    moving_mask: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    random_seed: int = 0,
    start: Literal["scanner geometry", "centre of mass", "rotation search"] = "centre of mass",
    initial_transform: str | Path | None = None,
    bounds: MotionBounds | None = None,
    fixed_mask_margin_mm: float = 0.0,
) -> Registration:
    """Register ``moving`` to ``fixed`` with Mattes mutual information; keep the transforms.

    The optimisation runs on the schedule of :func:`multiresolution_schedule` (levels in mm,
    so 1, 2 and 4 mm grids are treated alike). It starts from ``start`` (or from
    ``initial_transform``). With ``bounds``, a result whose linear part moves the brain
    further than the bounds from the scanner geometry is implausible; when the first result
    is implausible or its Dice is below ``QC_THRESHOLDS["WithinSessionMaskDice"]``, the
    other starts of :data:`REGISTRATION_STARTS` are tried in turn (centre of mass, then a
    coarse rotation search) until one passes both. The result with the highest mutual
    information is kept; if it is implausible, the images fit best further apart than a head
    moves within a session, and :class:`RegistrationError` is raised.

    Parameters
    ----------
    moving, fixed : path
        3-D NIfTI images.
    out_prefix : path
        The transforms are written as ``<out_prefix>affine.mat`` and, for ``syn``,
        ``<out_prefix>warp.nii.gz`` / ``<out_prefix>inverse_warp.nii.gz``.
    mode : {"rigid", "affine", "syn"}
        Rigid (6 parameters), affine (12) or SyN. ``syn`` is the deformable stage alone:
        give the linear part as ``initial_transform`` (it is composed into the written
        ``affine.mat``).
    moving_mask, fixed_mask : path, optional
        Restrict the metric to these regions (at every level).
    random_seed : int
        Seed (>= 0) of the metric sampling; with ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``
        the result is reproducible bit for bit.
    start : {"scanner geometry", "centre of mass", "rotation search"}
        The first start: the headers as they are (images of one session), the intensity
        centres of mass (images of different sessions or a template), or a coarse search
        over rotations.
    initial_transform : path, optional
        An ITK transform to start from instead (``start`` is then ``"previous stage"``).
    bounds : MotionBounds, optional
        Plausible motion from the scanner geometry; see above. With bounds, the quality also
        holds the Dice of the moved moving mask (or foreground) with the fixed one, flagged
        below :data:`QC_THRESHOLDS` ``["WithinSessionMaskDice"]``.
    fixed_mask_margin_mm : float
        Grow ``fixed_mask`` by this margin for the metric, so that the brain's edge, where
        most of the alignment signal of two images lies, is inside the region (on the
        phantom at 4 mm, regions that ended at the brain's edge let within-session results
        wander by 1-7 mm).

    Returns
    -------
    Registration
        With its :class:`RegistrationQuality`.

    Raises
    ------
    RegistrationError
        With ``bounds``, when no start gives a plausible result.
    """
    if random_seed < 0:
        raise ValueError(f"random_seed must be >= 0, not {random_seed}")
    if mode not in REGISTRATION_MODES:
        raise ValueError(f"registration mode must be one of {REGISTRATION_MODES}, not {mode!r}")
    if start not in REGISTRATION_STARTS:
        raise ValueError(f"start must be one of {REGISTRATION_STARTS}, not {start!r}")
    if mode == "syn" and initial_transform is None:
        raise ValueError("a SyN registration starts from a linear one: give initial_transform")
    prefix = str(out_prefix)
    (Path(prefix) if prefix.endswith(("/", "\\")) else Path(prefix).parent).mkdir(parents=True, exist_ok=True)
    fixed_img, moving_img = _read_ants(fixed), _read_ants(moving)
    fixed_mask_img = _read_ants(fixed_mask) if fixed_mask is not None else None
    moving_mask_img = _read_ants(moving_mask) if moving_mask is not None else None
    moving_zooms = _zooms(moving)
    points = _mask_points(fixed_mask, fixed)
    fixed_mask_file = str(fixed_mask) if fixed_mask is not None else None
    if fixed_mask_margin_mm > 0 and fixed_mask_img is not None:
        fixed_mask_img = _grown(fixed_mask_img, fixed_mask_margin_mm)
        fixed_mask_file = prefix + "fixed_mask_grown.nii.gz"
        _write_ants(fixed_mask_img, fixed_mask_file)
    masks = (fixed_mask_file, str(moving_mask) if moving_mask is not None else None)
    # The regions applied to the images (zero outside): for the mutual information the starts are
    # compared by, and for the rotation search (it takes no mask).
    metric_fixed = fixed_img * fixed_mask_img if fixed_mask_img is not None else fixed_img
    metric_moving = moving_img * moving_mask_img if moving_mask_img is not None else moving_img

    if initial_transform is not None:
        starts: list[str] = ["previous stage"]
    else:
        # The fallbacks come after the first start, in the order of REGISTRATION_STARTS.
        later = REGISTRATION_STARTS[REGISTRATION_STARTS.index(start) + 1:]
        starts = [start, *(later if bounds is not None else ())]

    tried: list[dict] = []
    results: list[tuple[dict, list[str], float | None]] = []
    for index, how in enumerate(starts):
        run_prefix = f"{prefix}ants_{index}_"
        if how == "previous stage":
            # "[file,0]": a bare file name is first tried as an image by antsRegistration, which
            # then starts from a translation only (measured on real T1w).
            initial = f"[{initial_transform},0]"
        elif how == "scanner geometry":
            initial = "Identity"
        elif how == "centre of mass":
            initial = f"[{_pointer(fixed_img)},{_pointer(moving_img)},1]"
        else:
            initial = _rotation_search(metric_fixed, metric_moving, run_prefix + "search.mat")
        transforms = _run_ants(fixed_img, moving_img, initial, mode=mode, moving_zooms=moving_zooms,
                               run_prefix=run_prefix, random_seed=random_seed, masks=masks)
        displacement, rotation, _ = linear_transform_summary(transforms[-1], points)
        mi = _mutual_information(metric_fixed, metric_moving, transforms)
        why = bounds.violations(displacement, rotation) if bounds is not None and how != "previous stage" else []
        dice = _overlap(fixed_img, moving_img, fixed_mask_img, moving_mask_img, transforms) if bounds else None
        record = {"start": how, "mutual_information": mi, "displacement_mm": displacement,
                  "rotation_deg": rotation, "implausible": "; ".join(why)}
        tried.append(record)
        results.append((record, transforms, dice))
        if not why and (dice is None or dice >= QC_THRESHOLDS["WithinSessionMaskDice"]):
            break
    # The best fit decides. Implausible, it says that the two images lie further apart than a
    # head moves in a session (a plausible result that fits worse is a local optimum).
    record, transforms, mask_dice = max(results, key=lambda item: item[0]["mutual_information"])
    if record["implausible"]:
        detail = "; ".join(f"from the {r['start']}: {r['implausible'] or 'plausible but fits worse'}" for r in tried)
        raise RegistrationError(
            f"registration of {moving} to {fixed} failed: no start gave a plausible result ({detail}). "
            "View the two images together: a header that places them far apart or flips one of them, or an "
            "image of another subject or session, makes them impossible to align rigidly; fix the header or "
            "leave the image out.")
    mirror_mi, flags = None, []
    if bounds is not None:
        if mask_dice < QC_THRESHOLDS["WithinSessionMaskDice"]:
            flags.append(f"the moved {'brain mask' if moving_mask_img is not None else 'foreground'} overlaps "
                         f"the reference's by Dice {mask_dice:.2f} (below {QC_THRESHOLDS['WithinSessionMaskDice']:g})")
        mirror_mi = _mirror_fit(fixed_img, moving_img, _affine(moving), f"{prefix}ants_mirror_", mode,
                                moving_zooms, random_seed, fixed_mask_file, metric_fixed)
        if mirror_mi > record["mutual_information"] * (1.0 + QC_THRESHOLDS["MirrorMargin"]):
            flags.append(f"its left-right mirror image fits the reference better (mutual information {mirror_mi:.3f} "
                         f"against {record['mutual_information']:.3f}): is one of the two headers flipped left-right?")
    quality = RegistrationQuality(start=record["start"], displacement_mm=record["displacement_mm"],
                                  rotation_deg=record["rotation_deg"],
                                  mutual_information=record["mutual_information"], tried=tuple(tried),
                                  mask_dice=mask_dice, mirror_mutual_information=mirror_mi, flags=tuple(flags))
    affine = prefix + "affine.mat"
    shutil.copyfile(transforms[-1], affine)
    if mode != "syn":
        return Registration((affine,), (affine,), (True,), mode, quality)
    warp, inverse_warp = prefix + "warp.nii.gz", prefix + "inverse_warp.nii.gz"
    shutil.copyfile(transforms[0], warp)
    shutil.copyfile(transforms[0].replace("Warp.nii.gz", "InverseWarp.nii.gz"), inverse_warp)
    return Registration((warp, affine), (affine, inverse_warp), (True, False), mode, quality)


def _pointer(image) -> str:
    from ants.internal import get_pointer_string

    return get_pointer_string(image)


def _collect(run_prefix: str, mode: str) -> list[str]:
    """The transforms one antsRegistration call wrote, in ``apply_transforms`` order."""
    affine = run_prefix + "0GenericAffine.mat"
    if not Path(affine).is_file():
        raise RuntimeError(f"antsRegistration wrote no transform ({affine})")
    if mode != "syn":
        return [affine]
    warp = run_prefix + "1Warp.nii.gz"
    if not Path(warp).is_file():
        raise RuntimeError(f"antsRegistration wrote no warp ({warp})")
    return [warp, affine]


def apply_transforms(
    moving: str | Path,
    reference: str | Path,
    transforms: Sequence[str],
    out_file: str | Path,
    *,
    invert: Sequence[bool] | None = None,
    interpolation: str = "linear",
) -> Path:
    """Resample ``moving`` (3-D, or 4-D volume by volume) onto ``reference``'s grid.

    Parameters
    ----------
    transforms : list of str
        ANTs transform files, applied last to first (e.g. ``Registration.forward``, or
        ``[*to_template.forward, *to_anat.forward]`` to chain two registrations).
    invert : list of bool, optional
        Which transforms to invert.
    interpolation : str
        An ANTs interpolator: ``"linear"``, ``"nearestNeighbor"``, ``"lanczosWindowedSinc"``,
        ``"bSpline"``...

    Returns
    -------
    Path
        ``out_file``, written as float32 with the reference's affine.
    """
    import ants
    import nibabel as nib
    import numpy as np

    from ..imageio import save_image

    moving_nii = nib.load(str(moving))
    reference_img = _read_ants(reference)
    flags = list(invert) if invert is not None else [False] * len(transforms)
    data = np.asarray(moving_nii.dataobj, dtype=np.float32)
    volumes = data[..., None] if data.ndim == 3 else data.reshape(*data.shape[:3], -1)
    out = []
    for k in range(volumes.shape[3]):
        vol = _to_ants(volumes[..., k], moving_nii.affine)
        warped = ants.apply_transforms(
            fixed=reference_img, moving=vol, transformlist=list(transforms),
            whichtoinvert=flags, interpolator=interpolation,
        )
        out.append(warped.numpy().astype(np.float32))
    result = np.stack(out, axis=-1) if data.ndim == 4 else out[0]
    return save_image(result, nib.load(str(reference)).affine, out_file)
