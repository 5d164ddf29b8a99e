"""Image registration and resampling with antspyx (the ANTs library, no command-line tools).

Transforms are ANTs files: an affine ``.mat`` (ITK binary) and, for SyN, a displacement
field ``.nii.gz``. Lists of transforms follow ``ants.apply_transforms``: applied last to
first, so ``forward`` maps the moving image onto the fixed grid and ``inverse`` (with
``inverse_invert``) maps the fixed image back onto the moving grid.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

__all__ = ["REGISTRATION_MODES", "Registration", "apply_transforms", "register_images"]

#: Registration models offered on the command line (``rigid`` is used inside a subject).
REGISTRATION_MODES = ("rigid", "affine", "syn")

# Multi-resolution schedules: the finest level of the linear stages is skipped at 1 mm
# (half resolution is enough for 6/12 parameters and it halves the time).
_LINEAR_ITERATIONS = (1000, 500, 250, 0)
_SYN_ITERATIONS = (70, 50, 0)  # finest level skipped: 1 mm SyN took 293 s with 20 iterations there


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
    """

    forward: tuple[str, ...]
    inverse: tuple[str, ...]
    inverse_invert: tuple[bool, ...]
    mode: str

    @property
    def affine(self) -> str:
        """The linear part (an ITK ``.mat`` file)."""
        return next(t for t in self.forward if t.endswith(".mat"))


def _to_ants(data, affine):
    """An ANTs image from an array and its affine (units set to mm: ITK warns on files without them)."""
    import ants
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    return ants.from_nibabel_nifti(img)


def _read_ants(path):
    import nibabel as nib
    import numpy as np

    nii = nib.load(str(path))
    return _to_ants(np.asarray(nii.dataobj, dtype=np.float32), nii.affine)


def register_images(
    moving: str | Path,
    fixed: str | Path,
    out_prefix: str | Path,
    *,
    mode: Literal["rigid", "affine", "syn"] = "affine",
    moving_mask: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    random_seed: int = 0,
) -> Registration:
    """Register ``moving`` to ``fixed`` with mutual information; keep the transforms.

    Parameters
    ----------
    moving, fixed : path
        3-D NIfTI images.
    out_prefix : path
        The transforms are written as ``<out_prefix>affine.mat`` and, for ``syn``,
        ``<out_prefix>warp.nii.gz`` / ``<out_prefix>inverse_warp.nii.gz``.
    mode : {"rigid", "affine", "syn"}
        Rigid (6 parameters), affine (12) or affine followed by symmetric normalization.
    moving_mask, fixed_mask : path, optional
        Restrict the metric to these regions.
    random_seed : int
        Seed (>= 0) of the metric sampling; with ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``
        the result is reproducible bit for bit.
    """
    import ants

    if random_seed < 0:
        raise ValueError(f"random_seed must be >= 0, not {random_seed}")
    if mode not in REGISTRATION_MODES:
        raise ValueError(f"registration mode must be one of {REGISTRATION_MODES}, not {mode!r}")
    prefix = str(out_prefix)
    (Path(prefix) if prefix.endswith(('/', '\\')) else Path(prefix).parent).mkdir(parents=True, exist_ok=True)
    fixed_img = _read_ants(fixed)
    moving_img = _read_ants(moving)
    kwargs = dict(
        fixed=fixed_img,
        moving=moving_img,
        type_of_transform={"rigid": "Rigid", "affine": "Affine", "syn": "SyN"}[mode],
        outprefix=prefix + "ants_",
        aff_metric="mattes",
        aff_iterations=_LINEAR_ITERATIONS,
        aff_shrink_factors=(8, 4, 2, 1),
        aff_smoothing_sigmas=(3, 2, 1, 0),
    )
    if mode == "syn":
        kwargs["reg_iterations"] = _SYN_ITERATIONS
    if fixed_mask is not None:
        kwargs["mask"] = _read_ants(fixed_mask)
    if moving_mask is not None:
        kwargs["moving_mask"] = _read_ants(moving_mask)
    # antsRegistration --random-seed: 0 means "seed from the clock", so seed s is passed as s + 1.
    # With one ITK thread the result is then reproducible bit for bit (Mattes MI sums over
    # threads in a varying order otherwise).
    ants.config._random_seed = int(random_seed) + 1
    result = ants.registration(**kwargs)
    affine = prefix + "affine.mat"
    forward_affine = next((t for t in result["fwdtransforms"] if t.endswith(".mat")), None)
    if forward_affine is None or not Path(forward_affine).is_file():
        raise RuntimeError(f"ANTs registration of {moving} to {fixed} wrote no transform")
    shutil.copyfile(forward_affine, affine)
    if mode != "syn":
        return Registration((affine,), (affine,), (True,), mode)
    warp, inverse_warp = prefix + "warp.nii.gz", prefix + "inverse_warp.nii.gz"
    shutil.copyfile(next(t for t in result["fwdtransforms"] if t.endswith("Warp.nii.gz")), warp)
    shutil.copyfile(next(t for t in result["invtransforms"] if t.endswith("InverseWarp.nii.gz")), inverse_warp)
    return Registration((warp, affine), (affine, inverse_warp), (True, False), mode)


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
