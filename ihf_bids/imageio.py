"""NIfTI images the one way ihf-bids writes them (qform/sform code 1, units mm), read back as
float32 arrays, and their JSON sidecars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_float32", "nifti_image", "read_sidecar", "save_image", "sidecar_path"]


def nifti_image(data: np.ndarray, affine: np.ndarray, dtype: Any = np.float32):
    """A ``nibabel.Nifti1Image`` of ``data`` as ``dtype`` with both orientation codes 1 and mm units.

    Examples
    --------
    >>> img = nifti_image(np.zeros((2, 2, 2)), np.eye(4), np.uint8)
    >>> int(img.header["sform_code"]), img.get_data_dtype().name, img.header.get_xyzt_units()
    (1, 'uint8', ('mm', 'sec'))
    """
    import nibabel as nib

    affine = np.asarray(affine, dtype=float)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    img.header.set_data_dtype(dtype)
    return img


def save_image(data: np.ndarray, affine: np.ndarray, out_file: str | os.PathLike[str], dtype: Any = np.float32) -> Path:
    """Write :func:`nifti_image` to ``out_file`` (parent folders created); return the path."""
    import nibabel as nib

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nifti_image(data, affine, dtype), str(out))
    return out


def load_float32(path: str | os.PathLike[str]):
    """Read an image; return its data as a float32 array and the nibabel image (header, affine).

    Raises
    ------
    ihf_bids.errors.InputDataError
        The file is missing, truncated or not an image (exit code 65); the message names it.
    """
    import nibabel as nib

    from .errors import InputDataError

    try:
        img = nib.load(str(path))
        return np.asarray(img.dataobj, dtype=np.float32), img
    except Exception as err:
        raise InputDataError(
            f"{path} cannot be read ({err.__class__.__name__}: {err}); the file is missing, truncated or "
            "corrupt: if it is an ihf-bids output, delete it and re-run the participant level for it"
        ) from err


def sidecar_path(image_path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar beside a ``.nii``/``.nii.gz`` image (whether or not it exists).

    Examples
    --------
    >>> sidecar_path("sub-01/anat/sub-01_T1w.nii.gz").name
    'sub-01_T1w.json'
    """
    name = str(image_path)
    stem = name.removesuffix(".nii.gz") if name.endswith(".nii.gz") else name.removesuffix(".nii")
    return Path(stem + ".json")


def read_sidecar(image_path: str | os.PathLike[str] | None) -> dict:
    """The JSON sidecar of a ``.nii``/``.nii.gz`` image; ``{}`` when there is none or it is unreadable."""
    import json

    if image_path is None:
        return {}
    try:
        value = json.loads(sidecar_path(image_path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
