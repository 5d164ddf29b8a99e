"""Diffusion tensor fit (DIPY) of a preprocessed DWI run: FA and MD maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputDataError

__all__ = ["fit_tensor"]


def _read_mask(path: str | Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    import nibabel as nib

    path = Path(path)
    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as exc:
        raise InputDataError(f"{what} {path} cannot be read ({exc})") from exc
    data = np.squeeze(data)
    if data.shape != tuple(shape):
        raise InputDataError(f"{what} {path} has shape {data.shape}, not the DWI grid {tuple(shape)}")
    return data > 0.5


def fit_tensor(
    dwi_file: str | Path,
    bval_file: str | Path,
    bvec_file: str | Path,
    mask_file: str | Path,
    out_fa: str | Path,
    out_md: str | Path | None = None,
    *,
    wm_mask_file: str | Path | None = None,
    max_bval: float | None = None,
) -> dict:
    """Fit a diffusion tensor (weighted least squares) and write FA (and MD) maps.

    All volumes are used by default: a single-tensor fit is adequate for the b-values met
    here (up to about 2500 s/mm^2, where the kurtosis bias on FA stays small); pass
    ``max_bval`` to keep only the b=0 volumes and those with ``b <= max_bval``.

    Parameters
    ----------
    dwi_file, bval_file, bvec_file : path
        The DWI run and its FSL gradients (b-vectors valid for this image, e.g. from
        :func:`ihf_bids.preproc.dwi.rotate_bvec_file` after resampling).
    mask_file : path
        Brain mask on the DWI grid; the maps are zero outside it.
    out_fa : path
        FA map (float32, in [0, 1], NaN-free).
    out_md : path, optional
        Mean diffusivity map (float32, mm^2/s).
    wm_mask_file : path, optional
        White-matter mask (or probability map, thresholded at 0.5) on the DWI grid, for the
        summary ``fa_median_wm``.
    max_bval : float, optional
        Largest b-value kept.

    Returns
    -------
    dict
        ``n_voxels`` (voxels fitted), ``n_volumes`` (volumes used), ``fa_median`` and
        ``fa_p90`` (within the mask), ``md_median`` (mm^2/s), and with a WM mask
        ``fa_median_wm`` and ``n_voxels_wm``. A summary that cannot be computed (an empty
        mask) is left out and its reason given in ``missing`` (name -> reason).
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    from ..imageio import save_image
    from .dwi import B0_THRESHOLD, MIN_TENSOR_DIRECTIONS, distinct_directions, load_dwi, read_gradients

    img, data = load_dwi(dwi_file)
    bvals, bvecs = read_gradients(bval_file, bvec_file, data.shape[3])
    keep = np.ones(bvals.size, dtype=bool)
    if max_bval is not None:
        keep = (bvals <= B0_THRESHOLD) | (bvals <= float(max_bval))
        if not (bvals[keep] > B0_THRESHOLD).any():
            raise InputDataError(f"{bval_file}: no diffusion-weighted volume with b <= {max_bval:g}")
    data, bvals, bvecs = data[..., keep], bvals[keep], bvecs[keep]
    if distinct_directions(bvals, bvecs) < MIN_TENSOR_DIRECTIONS:
        within = f" with b <= {max_bval:g}" if max_bval is not None else ""
        raise InputDataError(f"{bvec_file}: a tensor fit needs at least {MIN_TENSOR_DIRECTIONS} distinct gradient "
                             f"directions{within}; leave the run out with --bids-filter-file")
    mask = _read_mask(mask_file, data.shape[:3], "brain mask")
    np.clip(data, 0, None, out=data)

    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=B0_THRESHOLD)
    fit = TensorModel(gtab, fit_method="WLS").fit(data, mask=mask)
    fa = np.nan_to_num(np.asarray(fit.fa, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    fa = np.clip(fa, 0.0, 1.0).astype(np.float32)
    fa[~mask] = 0
    md = np.nan_to_num(np.asarray(fit.md, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    md = np.clip(md, 0.0, None).astype(np.float32)
    md[~mask] = 0

    affine = img.affine
    save_image(fa, affine, out_fa)
    if out_md is not None:
        save_image(md, affine, out_md)
    summary: dict = {"n_voxels": int(mask.sum()), "n_volumes": int(bvals.size), "missing": {}}
    if mask.any():
        summary.update(fa_median=float(np.median(fa[mask])), fa_p90=float(np.percentile(fa[mask], 90)),
                       md_median=float(np.median(md[mask])))
    else:
        reason = "the brain mask is empty"
        summary["missing"].update(fa_median=reason, fa_p90=reason, md_median=reason)
    if wm_mask_file is not None:
        wm = _read_mask(wm_mask_file, data.shape[:3], "white-matter mask") & mask
        summary["n_voxels_wm"] = int(wm.sum())
        if wm.any():
            summary["fa_median_wm"] = float(np.median(fa[wm]))
        else:
            summary["missing"]["fa_median_wm"] = (
                "no voxel of the template's white matter lies inside the run's brain mask: the run may be far "
                "off the template (see the Registration field of the run's sidecar)")
    return summary
