"""Small writers for the phantom's BIDS files: NIfTI, JSON, TSV, gradient files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["write_bval_bvec", "write_json", "write_nifti", "write_tsv"]

_INT16_MAX = 32767
# NIfTI xform codes
_SCANNER, _ALIGNED, _MNI = 1, 2, 4


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write an indented JSON file with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def write_tsv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a tab-separated file with a header row; ``None`` becomes ``n/a``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join("n/a" if value is None else str(value) for value in row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    kind: str,
    repetition_time: float | None = None,
) -> None:
    """Write a gzipped NIfTI-1 image with sensible header fields.

    Parameters
    ----------
    path : pathlib.Path
        Output ``.nii.gz`` path.
    data : numpy.ndarray
        3-D or 4-D image.
    affine : numpy.ndarray
        Voxel-to-world affine (RAS mm).
    kind : {"raw", "truth", "mask"}
        ``"raw"``: simulated acquisition, stored as rounded int16 values with
        ``scl_slope`` 1 (or a nibabel-chosen slope if the range needs it),
        qform code scanner and sform code aligned. ``"truth"``: float32
        values, both codes MNI. ``"mask"``: uint8, both codes MNI.
    repetition_time : float, optional
        Written as the 4th zoom of 4-D images (seconds).
    """
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "raw":
        rounded = np.rint(data)
        if float(np.abs(rounded).max(initial=0.0)) <= _INT16_MAX:
            array: np.ndarray = rounded.astype(np.int16)
        else:  # nibabel picks scl_slope so that the range fits int16
            array = np.asarray(data, dtype=np.float32)
        codes = (_SCANNER, _ALIGNED)
        dtype = np.int16
    elif kind == "truth":
        array, codes, dtype = np.asarray(data, dtype=np.float32), (_MNI, _MNI), np.float32
    elif kind == "mask":
        array, codes, dtype = np.asarray(data, dtype=np.uint8), (_MNI, _MNI), np.uint8
    else:
        raise ValueError(f"unknown NIfTI kind {kind!r}")
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(dtype)
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    header = img.header
    header.set_xyzt_units("mm", "sec")
    if array.ndim == 4 and repetition_time is not None:
        zooms = header.get_zooms()
        header.set_zooms((*zooms[:3], float(repetition_time)))
    header["descrip"] = b"ihf-bids traveling phantom"
    img.to_filename(str(path))


def write_bval_bvec(stem: Path, bvals: np.ndarray, bvecs_world: np.ndarray, affine: np.ndarray) -> None:
    """Write BIDS/FSL ``.bval`` and ``.bvec`` files next to a DWI series.

    The vectors are expressed along the image axes in the FSL convention
    (which BIDS adopts): the x component is negated when the voxel-to-world
    affine has a positive determinant (RAS storage, as here).

    Parameters
    ----------
    stem : pathlib.Path
        Path without extension (``.../sub-01_ses-x_dwi``).
    bvals : numpy.ndarray
        b-values, one per volume.
    bvecs_world : numpy.ndarray
        Unit directions in world (RAS) axes, shape ``(n, 3)``.
    affine : numpy.ndarray
        Affine of the DWI series.
    """
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    voxel_axes = bvecs_world @ rotation  # world -> voxel axes (orthonormal rotation)
    if np.linalg.det(affine[:3, :3]) > 0:
        voxel_axes = voxel_axes * np.array([-1.0, 1.0, 1.0])
    voxel_axes = voxel_axes + 0.0  # no negative zeros in the text
    stem.with_name(stem.name + ".bval").write_text(
        " ".join(f"{b:g}" for b in bvals) + "\n", encoding="utf-8"
    )
    rows = [" ".join(f"{v:.6f}" for v in voxel_axes[:, axis]) for axis in range(3)]
    stem.with_name(stem.name + ".bvec").write_text("\n".join(rows) + "\n", encoding="utf-8")
