"""Diffusion preprocessing steps: gradients, b=0 reference, brain mask, resampling, b-vectors.

The steps are plain functions that take and return file paths (they become nipype
nodes). Gradient files follow the FSL convention that BIDS adopts: ``.bval`` one row of
b-values (s/mm^2), ``.bvec`` three rows of unit vectors along the image axes, with the x
component negated when the image affine has a positive determinant (RAS storage).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputDataError
from ..imageio import save_image
from .anat import _one_line, check_spatial_header

if TYPE_CHECKING:  # pragma: no cover
    import nibabel as nib

__all__ = [
    "B0_THRESHOLD",
    "MIN_TENSOR_DIRECTIONS",
    "b0_mean",
    "distinct_directions",
    "dwi_brain_mask",
    "dwi_reference",
    "load_dwi",
    "read_gradients",
    "resample_dwi",
    "rotate_bvec_file",
    "rotate_bvecs",
    "shell_labels",
    "spread_indices",
    "write_gradients",
]

#: b-values at or below this (s/mm^2) count as b=0 (scanners write 0, 5 or 10).
B0_THRESHOLD = 50.0

#: Largest tolerated deviation of a diffusion-weighted b-vector's norm from 1.
BVEC_NORM_TOLERANCE = 0.1
#: Distinct gradient directions a diffusion tensor fit needs (six unknowns besides S0).
MIN_TENSOR_DIRECTIONS = 6


def shell_labels(bvals: np.ndarray, *, tolerance: float = 100.0) -> list[str]:
    """Label each volume with its b-shell: ``"b0"``, ``"b1000"``, ``"b2000"``...

    b-values within ``tolerance`` of each other form one shell (scanners write 995, 1000,
    1005 for one nominal shell); a shell is named by its median rounded to 100.

    Examples
    --------
    >>> shell_labels(np.array([0, 5, 995, 1000, 2010, 1005]))
    ['b0', 'b0', 'b1000', 'b1000', 'b2000', 'b1000']
    """
    b = np.asarray(bvals, dtype=float).ravel()
    if b.size == 0:
        raise ValueError("no b-values")
    if (b < 0).any() or not np.isfinite(b).all():
        raise ValueError("b-values must be finite and non-negative")
    labels = ["b0"] * b.size
    weighted = np.flatnonzero(b > B0_THRESHOLD)
    order = weighted[np.argsort(b[weighted])]
    clusters: list[list[int]] = []
    for i in order:
        if clusters and b[i] - b[clusters[-1][-1]] <= tolerance:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for members in clusters:
        name = f"b{int(round(np.median(b[members]) / 100.0) * 100)}"
        for i in members:
            labels[i] = name
    return labels


def spread_indices(n: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``).

    Used to keep a few volumes of a shell, spread over its gradient directions.

    Examples
    --------
    >>> spread_indices(10, 3).tolist(), spread_indices(2, 5).tolist()
    ([0, 4, 9], [0, 1])
    """
    return np.arange(n) if k >= n else np.unique(np.linspace(0, n - 1, k).round().astype(int))


def b0_mean(dwi: np.ndarray, bvals: np.ndarray) -> np.ndarray:
    """Mean of the b=0 volumes of a 4D run.

    Raises
    ------
    ValueError
        If the run has no b=0 volume (the intensity reference of the run).
    """
    b = np.asarray(bvals, dtype=float).ravel()
    if dwi.ndim != 4 or dwi.shape[3] != b.size:
        raise ValueError(f"DWI of shape {dwi.shape} does not match {b.size} b-values")
    zero = b <= B0_THRESHOLD
    if not zero.any():
        raise ValueError("the DWI run has no b=0 volume; ihf-bids needs one as the run's intensity reference")
    return dwi[..., zero].mean(axis=3)


# --------------------------------------------------------------------------- #
# gradients
# --------------------------------------------------------------------------- #
def _read_numbers(path: Path, what: str) -> list[list[float]]:
    """Rows of numbers of a whitespace-separated text file (empty lines skipped)."""
    if not path.is_file():
        raise InputDataError(f"{what} file {path} does not exist; every DWI run needs its .bval and .bvec next to it")
    try:
        text = path.read_text(encoding="utf-8")
        rows = [[float(t) for t in line.replace(",", " ").split()] for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError, OSError) as exc:
        raise InputDataError(
            f"{what} file {path} cannot be parsed ({exc}); it must hold whitespace-separated numbers (FSL format)"
        ) from exc
    if not rows:
        raise InputDataError(f"{what} file {path} is empty; rewrite it from the DICOM conversion (dcm2niix)")
    return rows


def read_gradients(
    bval_file: str | Path, bvec_file: str | Path, n_volumes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check FSL/BIDS ``.bval`` and ``.bvec`` files.

    Parameters
    ----------
    bval_file, bvec_file : path
        b-values (one row, or one column) and b-vectors (three rows of ``n_volumes``).
    n_volumes : int
        Number of volumes of the DWI run the files belong to.

    Returns
    -------
    bvals : numpy.ndarray
        Shape ``(n_volumes,)``, float64.
    bvecs : numpy.ndarray
        Shape ``(n_volumes, 3)``: unit vectors (renormalized) for diffusion-weighted
        volumes, zeros for b=0 volumes (``b <= B0_THRESHOLD``, whatever their file vector).

    Raises
    ------
    InputDataError
        Missing or unparsable files, counts that do not match ``n_volumes``, b-vectors not
        in 3 rows, negative or non-finite values, zero or non-unit b-vectors
        (``|norm - 1| >= 0.1``) for diffusion-weighted volumes, or no b=0 volume.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "x.bval").write_text("0 1000 1000\\n")
    >>> _ = (d / "x.bvec").write_text("0 1 0\\n0 0 0.99\\n0 0 0\\n")
    >>> bvals, bvecs = read_gradients(d / "x.bval", d / "x.bvec", 3)
    >>> bvals.tolist(), bvecs.tolist()
    ([0.0, 1000.0, 1000.0], [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    """
    bval_file, bvec_file = Path(bval_file), Path(bvec_file)
    bvals = _read_bvals(bval_file, n_volumes)

    bvec_rows = _read_numbers(bvec_file, "b-vector")
    if len(bvec_rows) != 3:
        hint = " (it looks transposed: write it as 3 rows)" if all(len(r) == 3 for r in bvec_rows) else ""
        raise InputDataError(
            f"b-vector file {bvec_file} has {len(bvec_rows)} rows; FSL/BIDS b-vectors are 3 rows of "
            f"{n_volumes} values{hint}"
        )
    lengths = {len(r) for r in bvec_rows}
    if lengths != {n_volumes}:
        raise InputDataError(
            f"b-vector file {bvec_file} has rows of {sorted(lengths)} values but the DWI run has {n_volumes} "
            "volumes; use the .bvec written with this image (dcm2niix)"
        )
    bvecs = np.array(bvec_rows, dtype=float).T.copy()
    if not np.isfinite(bvecs).all():
        raise InputDataError(f"b-vector file {bvec_file} holds non-finite values; fix the file")
    weighted = bvals > B0_THRESHOLD
    norms = np.linalg.norm(bvecs, axis=1)
    bad = weighted & (np.abs(norms - 1.0) >= BVEC_NORM_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputDataError(
            f"b-vector file {bvec_file}: volume {i} (b={bvals[i]:g}) has a b-vector of norm {norms[i]:.3g}; "
            f"diffusion-weighted volumes need unit b-vectors ({int(bad.sum())} volume(s) affected). Remove "
            "derived volumes (trace, ADC) from the run or fix the file"
        )
    bvecs[weighted] /= norms[weighted, None]
    bvecs[~weighted] = 0.0
    return bvals, bvecs


def distinct_directions(bvals: np.ndarray, bvecs: np.ndarray) -> int:
    """Number of distinct gradient directions among the diffusion-weighted volumes (b > 50).

    Examples
    --------
    >>> distinct_directions(np.array([0, 1000, 1000, 1000]), np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]]))
    2
    """
    weighted = np.asarray(bvecs, dtype=float)[np.asarray(bvals) > B0_THRESHOLD]
    return int(np.unique(np.round(weighted, 3), axis=0).shape[0])


def write_gradients(bvals: np.ndarray | None, bvecs: np.ndarray, *, bval_file: str | Path | None = None,
                    bvec_file: str | Path | None = None) -> None:
    """Write b-values (one row) and/or ``(n, 3)`` b-vectors (three rows) in FSL format."""
    if bval_file is not None and bvals is not None:
        Path(bval_file).write_text(" ".join(f"{b:g}" for b in np.asarray(bvals).ravel()) + "\n", encoding="utf-8")
    if bvec_file is not None:
        vectors = np.asarray(bvecs, dtype=float) + 0.0  # no negative zeros in the text
        rows = [" ".join(f"{v:.6f}" for v in vectors[:, axis]) for axis in range(3)]
        Path(bvec_file).write_text("\n".join(rows) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- #
# images
# --------------------------------------------------------------------------- #
def load_dwi(path: str | Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a DWI run and check it can be used.

    Returns
    -------
    image : nibabel.Nifti1Image
        The image (header and affine).
    data : numpy.ndarray
        Its 4-D data as float32.

    Raises
    ------
    InputDataError
        Missing, corrupt or truncated file, not 4-D, a header that cannot be trusted
        (:func:`~ihf_bids.preproc.anat.check_spatial_header`), NaN/Inf values, all zero
        or constant.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"DWI file {path} does not exist; check the path and the dataset")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many kinds (ImageFileError, EOFError, zlib.error, OSError)
        raise InputDataError(
            f"DWI file {path} cannot be read ({_one_line(exc)}); it is corrupt or truncated, "
            "convert the run again"
        ) from exc
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[3] < 2:
        raise InputDataError(
            f"DWI file {path} has shape {data.shape}; a DWI run is a 4-D series (b=0 and diffusion-weighted "
            "volumes): convert the whole run again (dcm2niix), or leave the file out with --bids-filter-file"
        )
    check_spatial_header(img, path)
    if not np.isfinite(data).all():
        raise InputDataError(f"DWI file {path} holds NaN or infinite values; convert the run again")
    if not data.any():
        raise InputDataError(f"DWI file {path} is all zero; convert the run again")
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise InputDataError(f"DWI file {path}: every voxel equals {low:g}, the run holds no image; convert it again")
    return img, data


def dwi_reference(dwi_file: str | Path, bval_file: str | Path, out_file: str | Path) -> Path:
    """Write the run's b=0 reference: the mean of its b=0 volumes (3-D float32).

    Raises
    ------
    InputDataError
        Unusable image or b-values, or no b=0 volume.
    """
    img, data = load_dwi(dwi_file)
    bvals = _read_bvals(bval_file, data.shape[3])
    return save_image(b0_mean(data, bvals).astype(np.float32), img.affine, out_file)


def _read_bvals(bval_file: str | Path, n_volumes: int) -> np.ndarray:
    """b-values only, with the checks of :func:`read_gradients` that concern them."""
    bval_file = Path(bval_file)
    rows = _read_numbers(bval_file, "b-value")
    if len(rows) > 1 and any(len(r) != 1 for r in rows):
        raise InputDataError(
            f"b-value file {bval_file} has {len(rows)} rows; it must hold one row of b-values (FSL format)"
        )
    bvals = np.array([v for row in rows for v in row], dtype=float)
    if bvals.size != n_volumes:
        raise InputDataError(
            f"b-value file {bval_file} lists {bvals.size} b-values but the DWI run has {n_volumes} volumes; "
            "use the .bval written with this image (dcm2niix)"
        )
    if not np.isfinite(bvals).all() or (bvals < 0).any():
        raise InputDataError(f"b-value file {bval_file} holds negative or non-finite b-values; fix the file")
    if not (bvals <= B0_THRESHOLD).any():
        raise InputDataError(
            f"b-value file {bval_file} has no b=0 volume (b <= {B0_THRESHOLD:g}); ihf-bids needs one as the "
            "run's intensity reference"
        )
    return bvals


def dwi_brain_mask(
    reference_file: str | Path,
    out_file: str | Path,
    *,
    median_radius_mm: float = 6.0,
    numpass: int = 4,
) -> Path:
    """Brain mask of a b=0 reference with DIPY's ``median_otsu``.

    The median filter radius is set in millimetres (``median_radius_mm`` / voxel size,
    at least 1 voxel: 3 voxels at 2 mm, 2 at 3 or 4 mm), then the mask's largest connected
    component is kept and its holes are filled (slice by slice as well, for the ventricles
    that touch the edge of a partial-coverage slab).

    Parameters
    ----------
    reference_file : path
        3-D b=0 reference (:func:`dwi_reference`).
    out_file : path
        The mask, written as uint8 (0/1) on the reference's grid.
    median_radius_mm : float
        Radius of the median filter in mm.
    numpass : int
        Passes of the median filter.
    """
    import nibabel as nib
    from dipy.segment.mask import median_otsu
    from scipy import ndimage

    reference_file = Path(reference_file)
    try:
        img = nib.load(str(reference_file))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise InputDataError(f"b=0 reference {reference_file} cannot be read ({exc})") from exc
    data = np.squeeze(data)
    if data.ndim != 3 or not np.isfinite(data).all() or not data.any():
        raise InputDataError(f"b=0 reference {reference_file} must be a finite, non-zero 3-D image")
    voxel = float(np.mean(img.header.get_zooms()[:3]))
    radius = max(1, round(median_radius_mm / voxel))
    _, mask = median_otsu(np.clip(data, 0, None), median_radius=radius, numpass=numpass)
    mask = _largest_component(mask)
    mask = ndimage.binary_fill_holes(mask)
    for axis in range(3):  # 2-D fill: holes open to a slab's edge
        for k in range(mask.shape[axis]):
            index = [slice(None)] * 3
            index[axis] = k
            mask[tuple(index)] = ndimage.binary_fill_holes(mask[tuple(index)])
    if not mask.any():
        raise InputDataError(f"no brain found in the b=0 reference {reference_file}")
    return save_image(mask, img.affine, out_file, dtype=np.uint8)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def resample_dwi(
    dwi_file: str | Path,
    reference_file: str | Path,
    transforms: Sequence[str],
    out_file: str | Path,
    *,
    invert: Sequence[bool] | None = None,
) -> Path:
    """Resample a DWI run onto ``reference_file``'s grid (linear, volume by volume).

    A thin call of :func:`ihf_bids.preproc.registration.apply_transforms`; negative values
    (interpolation overshoot) are set to 0. Rotate the b-vectors with
    :func:`rotate_bvec_file` using the same transforms.
    """
    import nibabel as nib

    from .registration import apply_transforms

    load_dwi(dwi_file)  # refuse unusable input with a clear message
    out = apply_transforms(dwi_file, reference_file, list(transforms), out_file, invert=invert,
                           interpolation="linear")  # fmt: skip
    img = nib.load(str(out))
    data = np.clip(np.asarray(img.dataobj, dtype=np.float32), 0, None)
    return save_image(data, img.affine, out)


# --------------------------------------------------------------------------- #
# b-vector rotation
# --------------------------------------------------------------------------- #
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)


def _polar_rotation(matrix: np.ndarray) -> np.ndarray:
    """Rotation (orthonormal) part of a 3x3 matrix, by polar decomposition ``M = R S``."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, dtype=float)[:3, :3])
    return u @ vt


def _linear_part(transform: str, invert: bool) -> np.ndarray:
    """3x3 linear part of an ANTs linear transform file (fixed -> moving points, LPS)."""
    import ants

    if not str(transform).endswith(".mat"):
        raise ValueError(f"{transform} is not a linear ANTs transform (.mat)")
    tx = ants.read_transform(str(transform))
    if invert:
        tx = tx.invert()
    origin = np.asarray(tx.apply_to_point((0.0, 0.0, 0.0)), dtype=float)
    columns = [np.asarray(tx.apply_to_point(tuple(e)), dtype=float) - origin for e in np.eye(3)]
    return np.stack(columns, axis=1)


def rotate_bvecs(
    bvecs: np.ndarray,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    transforms: Sequence[str] = (),
    *,
    invert: Sequence[bool] | None = None,
    skip_nonlinear: bool = False,
) -> np.ndarray:
    """b-vectors of a DWI run resampled onto another grid, in FSL convention.

    The run (voxel-to-RAS affine ``source_affine``) is resampled with
    ``apply_transforms(dwi, reference, transforms, ...)`` onto a grid with affine
    ``target_affine``. ANTs transforms map fixed (output) points to moving (input)
    points in LPS coordinates; the list is applied to points first to last. With ``A`` the
    composed linear part and ``R`` its rotation (polar decomposition, so scaling and shear
    are ignored), a gradient ``g`` of the input becomes ``R^T g`` in the output.

    Parameters
    ----------
    bvecs : numpy.ndarray
        ``(n, 3)`` FSL b-vectors of the input run (image axes, x negated when
        ``det(source_affine) > 0``). Zero vectors (b=0) stay zero.
    source_affine, target_affine : numpy.ndarray
        4x4 voxel-to-RAS affines of the input run and of the output grid.
    transforms : list of str
        ANTs ``.mat`` files, as given to ``apply_transforms`` (moving -> fixed).
    invert : list of bool, optional
        Which transforms are inverted (as in ``apply_transforms``).
    skip_nonlinear : bool
        Skip displacement fields (only the linear parts rotate the vectors) instead of
        refusing them.

    Returns
    -------
    numpy.ndarray
        ``(n, 3)`` FSL b-vectors valid for the output image.

    Examples
    --------
    A pure LAS -> RAS reorientation leaves FSL b-vectors unchanged (that is what the x
    flip of the convention is for):

    >>> las = np.diag([-2.0, 2.0, 2.0, 1.0]); ras = np.diag([2.0, 2.0, 2.0, 1.0])
    >>> rotate_bvecs(np.array([[0.6, 0.8, 0.0]]), las, ras).round(6).tolist()
    [[0.6, 0.8, 0.0]]
    """
    vectors = np.asarray(bvecs, dtype=float).reshape(-1, 3)
    flags = list(invert) if invert is not None else [False] * len(transforms)
    if len(flags) != len(transforms):
        raise ValueError("invert must have one flag per transform")
    # FSL (input voxel axes) -> RAS world
    r_source = _polar_rotation(source_affine)
    voxel = vectors * ([-1.0, 1.0, 1.0] if np.linalg.det(np.asarray(source_affine)[:3, :3]) > 0 else 1.0)
    world = voxel @ r_source.T
    # composed linear part, fixed -> moving (points go through the list first to last)
    linear = np.eye(3)
    for transform, flag in zip(transforms, flags):
        if not str(transform).endswith(".mat"):
            if skip_nonlinear:
                continue
            raise ValueError(
                f"{transform} is not a linear transform; pass skip_nonlinear=True to rotate by the linear parts only"
            )
        linear = _linear_part(transform, flag) @ linear
    rotation = _polar_rotation(linear)  # LPS, fixed -> moving
    world = world @ _LPS.T              # RAS -> LPS
    world = world @ rotation            # g_fixed = R^T g_moving (row vectors)
    world = world @ _LPS.T              # LPS -> RAS
    # RAS world -> FSL (output voxel axes)
    r_target = _polar_rotation(target_affine)
    out = world @ r_target
    if np.linalg.det(np.asarray(target_affine)[:3, :3]) > 0:
        out = out * np.array([-1.0, 1.0, 1.0])
    return out + 0.0


def rotate_bvec_file(
    in_bvec: str | Path,
    dwi_file: str | Path,
    reference_file: str | Path,
    transforms: Sequence[str],
    out_bvec: str | Path,
    *,
    invert: Sequence[bool] | None = None,
    skip_nonlinear: bool = False,
) -> Path:
    """File version of :func:`rotate_bvecs`.

    Parameters
    ----------
    in_bvec : path
        FSL b-vectors of ``dwi_file`` (3 rows).
    dwi_file : path
        The input run (its affine is the source grid).
    reference_file : path
        The output grid (as given to :func:`resample_dwi`).
    transforms, invert, skip_nonlinear
        As for :func:`rotate_bvecs`.
    out_bvec : path
        The rotated b-vectors (3 rows).
    """
    import nibabel as nib

    in_bvec = Path(in_bvec)
    rows = _read_numbers(in_bvec, "b-vector")
    if len(rows) != 3 or len({len(r) for r in rows}) != 1:
        raise InputDataError(f"b-vector file {in_bvec} must hold 3 rows of equal length (FSL format)")
    bvecs = np.array(rows, dtype=float).T
    source = nib.load(str(dwi_file)).affine
    target = nib.load(str(reference_file)).affine
    rotated = rotate_bvecs(bvecs, source, target, transforms, invert=invert, skip_nonlinear=skip_nonlinear)
    out_bvec = Path(out_bvec)
    out_bvec.parent.mkdir(parents=True, exist_ok=True)
    write_gradients(None, rotated, bvec_file=out_bvec)
    return out_bvec
