"""The MNI152 2009a symmetric template, as shipped inside the nilearn wheel.

The 1 mm ICBM152 2009a nonlinear symmetric template (T1 image and GM/WM
probability maps) is part of the nilearn distribution, so it is always
available offline. This module reads it, derives a CSF probability map and a
brain mask, and resamples everything onto isotropic, template-aligned grids of
any voxel size. Nothing is ever downloaded.

Examples
--------
>>> from ihf_bids.templates import load_template
>>> tpl = load_template(4.0)
>>> tpl.shape
(49, 58, 47)
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "TEMPLATE_KINDS",
    "TEMPLATE_SPACE",
    "TemplateImages",
    "load_template",
    "resample_to_grid",
    "template_grid",
    "template_image",
    "write_template",
]

#: BIDS ``space-`` label of the template (TemplateFlow identifier).
TEMPLATE_SPACE = "MNI152NLin2009aSym"

#: Images :func:`template_image` and :func:`write_template` provide.
TEMPLATE_KINDS = ("t1", "gm", "wm", "csf", "brain_mask")

_FILE_PATTERN = "mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
# Threshold applied to the (brain-extracted, 0..1 scaled) template T1 to get the
# brain mask; the same value nilearn's ``load_mni152_brain_mask`` uses.
_BRAIN_MASK_THRESHOLD = 0.2
# Gaussian sigma (mm) that softens the CSF residual map at 1 mm.
_CSF_SMOOTHING_MM = 0.6
_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True, eq=False)
class TemplateImages:
    """Template images on one isotropic, template-aligned grid.

    All arrays are read-only ``float32`` arrays of the same 3-D shape, in RAS
    voxel order (the first axis runs left to right).

    Attributes
    ----------
    t1 : numpy.ndarray
        Brain-extracted T1-weighted template, scaled to [0, 1].
    gm, wm, csf : numpy.ndarray
        Grey matter, white matter and cerebrospinal fluid probabilities in
        [0, 1], with ``gm + wm + csf <= 1``.
    brain_mask : numpy.ndarray
        Fraction of each voxel inside the brain mask (binary at 1 mm, partial
        at the edge on coarser grids; threshold at 0.5 for a binary mask).
    affine : numpy.ndarray
        4x4 voxel-to-world (MNI mm) affine, ``float64``.
    voxel_size : float
        Isotropic voxel size in mm.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    voxel_size: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(nx, ny, nz)``."""
        return tuple(int(n) for n in self.t1.shape)  # type: ignore[return-value]

    @property
    def space(self) -> str:
        """BIDS ``space-`` label of these images."""
        return TEMPLATE_SPACE


def template_grid(voxel_size: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the isotropic template-aligned grid of a voxel size.

    The grid covers the field of view of the 1 mm template (197 x 233 x 189
    voxels) with ``floor(n / voxel_size)`` voxels per axis, centred on the
    same point, with axes parallel to the template's.

    Parameters
    ----------
    voxel_size : float, default=1.0
        Isotropic voxel size in mm (must be positive).

    Returns
    -------
    shape : tuple of int
        Number of voxels per axis.
    affine : numpy.ndarray
        4x4 voxel-to-world affine (``float64``).
    """
    voxel_size = _check_voxel_size(voxel_size)
    base_shape, base_affine = _base_grid()
    base_shape_arr = np.asarray(base_shape, dtype=float)
    step = np.diag(base_affine)[:3]
    centre = base_affine[:3, 3] + step * (base_shape_arr - 1.0) / 2.0
    shape = np.maximum(np.floor(base_shape_arr * np.abs(step) / voxel_size + 1e-6), 1).astype(int)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.sign(step) * voxel_size)
    affine[:3, 3] = centre - np.sign(step) * voxel_size * (shape - 1.0) / 2.0
    return (int(shape[0]), int(shape[1]), int(shape[2])), affine


def load_template(voxel_size: float = 1.0) -> TemplateImages:
    """Load the MNI152 2009a symmetric template on an isotropic grid.

    Images are resampled from the 1 mm template with linear interpolation,
    after an anti-aliasing Gaussian whose FWHM matches the new voxel size when
    it is coarser than 1 mm (so probabilities become partial-volume
    fractions). Results are cached per voxel size; the arrays are read-only,
    copy them before modifying.

    Parameters
    ----------
    voxel_size : float, default=1.0
        Isotropic voxel size in mm.

    Returns
    -------
    TemplateImages
        T1, GM, WM, CSF, brain mask, affine and voxel size.

    Raises
    ------
    FileNotFoundError
        If the template files are not found in the installed nilearn.
    """
    return _load_template_cached(_check_voxel_size(voxel_size))


def template_image(kind: str, voxel_size: float = 1.0):
    """One template image as a NIfTI image (float32, RAS, qform/sform code 1, mm).

    Parameters
    ----------
    kind : {"t1", "gm", "wm", "csf", "brain_mask"}
        Which image (see :class:`TemplateImages`).
    voxel_size : float, default=1.0
        Isotropic voxel size in mm.

    Returns
    -------
    nibabel.Nifti1Image
        The image, with spatial units mm (ANTs warns about unknown units).

    Examples
    --------
    >>> img = template_image("brain_mask", 4.0)
    >>> img.shape, img.header.get_xyzt_units()[0], str(img.get_data_dtype())
    ((49, 58, 47), 'mm', 'float32')
    """
    from .imageio import nifti_image

    if kind not in TEMPLATE_KINDS:
        raise ValueError(f"template kind must be one of {TEMPLATE_KINDS}, not {kind!r}")
    tpl = load_template(voxel_size)
    img = nifti_image(getattr(tpl, kind), tpl.affine)
    img.header["descrip"] = f"{TEMPLATE_SPACE} {kind} {tpl.voxel_size:g}mm".encode()[:79]
    return img


def write_template(kind: str, voxel_size: float, path: str | Path) -> Path:
    """Write one template image to a NIfTI file (for tools that need files).

    Parameters
    ----------
    kind : {"t1", "gm", "wm", "csf", "brain_mask"}
        Which image.
    voxel_size : float
        Isotropic voxel size in mm.
    path : path
        Output ``.nii`` or ``.nii.gz`` file; parent folders are created.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import tempfile, nibabel as nib
    >>> out = write_template("t1", 4.0, Path(tempfile.mkdtemp()) / "tpl_T1w.nii.gz")
    >>> nib.load(out).shape
    (49, 58, 47)
    """
    import nibabel as nib

    img = template_image(kind, voxel_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def resample_to_grid(
    data: np.ndarray,
    source_affine: np.ndarray,
    target_shape: tuple[int, ...],
    target_affine: np.ndarray,
    *,
    order: int = 1,
    antialias: bool = True,
    mode: str = "constant",
    cval: float = 0.0,
) -> np.ndarray:
    """Resample a 3-D image onto another voxel grid.

    Parameters
    ----------
    data : numpy.ndarray
        3-D source image.
    source_affine, target_affine : numpy.ndarray
        4x4 voxel-to-world affines of the source and target grids.
    target_shape : tuple of int
        Shape of the target grid.
    order : int, default=1
        Spline order (0 nearest, 1 linear, 3 cubic).
    antialias : bool, default=True
        Smooth the source with a Gaussian (FWHM matching the target voxel size
        along each source axis) when the target grid is coarser.
    mode : str, default="constant"
        How values outside the source grid are filled (see
        :func:`scipy.ndimage.affine_transform`).
    cval : float, default=0.0
        Fill value for ``mode="constant"``.

    Returns
    -------
    numpy.ndarray
        Resampled image with ``target_shape``, ``float32`` for floating or
        integer input.
    """
    from scipy import ndimage

    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {data.shape}")
    work = data.astype(np.float32, copy=False)
    vox_to_vox = np.linalg.inv(np.asarray(source_affine, float)) @ np.asarray(target_affine, float)
    matrix, offset = vox_to_vox[:3, :3], vox_to_vox[:3, 3]
    if antialias:
        # Source-voxel step per target voxel, along each source axis.
        ratio = np.linalg.norm(matrix, axis=1)
        sigma = np.sqrt(np.clip(ratio**2 - 1.0, 0.0, None)) * _FWHM_TO_SIGMA
        if np.any(sigma > 0.05):
            work = ndimage.gaussian_filter(work, sigma=sigma, mode="nearest", truncate=3.0)
    is_identity = np.allclose(matrix, np.eye(3)) and np.allclose(offset, 0.0)
    if is_identity and tuple(target_shape) == data.shape:
        return np.array(work, dtype=np.float32, copy=True)
    if np.allclose(matrix, np.diag(np.diag(matrix))):
        matrix = np.diag(matrix)  # axis-aligned: scipy's faster zoom-and-shift path
    with warnings.catch_warnings():
        # scipy notes that a 1-D matrix means a diagonal one, which is what we want.
        warnings.filterwarnings("ignore", message=".*1-D array supplied for the matrix.*")
        return ndimage.affine_transform(
            work,
            matrix,
            offset=offset,
            output_shape=tuple(int(n) for n in target_shape),
            output=np.float32,
            order=order,
            mode=mode,
            cval=cval,
            prefilter=order > 1,
        )


# --------------------------------------------------------------------------- #
# internals
# --------------------------------------------------------------------------- #
def _check_voxel_size(voxel_size: float) -> float:
    value = float(voxel_size)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"voxel_size must be a positive number of mm, got {voxel_size!r}")
    return value


def _template_file(kind: str) -> Path:
    """Path of a template file inside the installed nilearn package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; it ships the MNI152 template")
    for location in spec.submodule_search_locations:
        path = Path(location) / "datasets" / "data" / _FILE_PATTERN.format(kind=kind)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"MNI152 2009a template file {_FILE_PATTERN.format(kind=kind)!r} not found in the "
        "installed nilearn package"
    )


@functools.lru_cache(maxsize=1)
def _base_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    import nibabel as nib

    img = nib.load(_template_file("t1"))
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, float)  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _load_base() -> dict[str, np.ndarray]:
    """The 1 mm template maps as float32 arrays in [0, 1]."""
    import nibabel as nib
    from scipy import ndimage

    maps: dict[str, np.ndarray] = {}
    for kind in ("t1", "gm", "wm"):
        img = nib.load(_template_file(kind))
        data = np.asarray(img.dataobj, dtype=np.float32)
        maps[kind] = np.clip(data / np.float32(max(float(data.max()), 1.0)), 0.0, 1.0)
    gm, wm = maps["gm"], maps["wm"]
    brain = (maps["t1"] > _BRAIN_MASK_THRESHOLD).astype(np.float32)
    # CSF = what is inside the brain mask and neither GM nor WM; its intensity in
    # the template T1 is CSF-like (about 0.28 of the scale, GM 0.65, WM 0.87).
    residual = np.clip(brain - gm - wm, 0.0, 1.0)
    csf = ndimage.gaussian_filter(residual, _CSF_SMOOTHING_MM, truncate=3.0)
    csf = np.clip(np.minimum(csf * brain, 1.0 - gm - wm), 0.0, 1.0).astype(np.float32)
    maps["csf"] = csf
    maps["brain_mask"] = brain
    return maps


@functools.lru_cache(maxsize=8)
def _load_template_cached(voxel_size: float) -> TemplateImages:
    base = _load_base()
    base_shape, base_affine = _base_grid()
    shape, affine = template_grid(voxel_size)
    out: dict[str, np.ndarray] = {}
    for name in ("t1", "gm", "wm", "csf", "brain_mask"):
        if voxel_size == 1.0:
            arr = base[name].copy()
        else:
            arr = resample_to_grid(base[name], base_affine, shape, affine, order=1)
        out[name] = np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False)
    # Interpolation preserves gm + wm + csf <= 1 up to rounding; enforce it.
    excess = out["gm"] + out["wm"] + out["csf"] - 1.0
    out["csf"] = np.clip(out["csf"] - np.clip(excess, 0.0, None), 0.0, 1.0)
    for arr in out.values():
        arr.setflags(write=False)
    affine.setflags(write=False)
    return TemplateImages(affine=affine, voxel_size=voxel_size, **out)
