"""Harmonize image files on disk (what the workflow's harmonization nodes call)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..imageio import save_image
from .model_dir import ModelDirectory

__all__ = ["device_description", "harmonize_dwi_file", "harmonize_image_file"]


def device_description(device: str) -> str:
    """``"cpu"`` or ``"cuda (NVIDIA H100 80GB HBM3)"``: what sidecars record as the device."""
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _load(path):
    import nibabel as nib

    img = nib.load(str(path))
    return img, np.asarray(img.dataobj, dtype=np.float32)


def _provenance(model_dir: ModelDirectory, modality: str, target: dict, device: str, source_site: str,
                source_profiled: bool) -> dict:
    meta = model_dir.metadata(modality)
    return {
        "HarmonizationTarget": target,
        "SourceSite": source_site,
        "SiteShiftFrom": "source-site profile" if source_profiled else "the image's own statistics",
        "HarmonizationModel": {
            "Name": model_dir.name,
            "Network": Path(model_dir.group_dir(modality)).name,
            "Version": meta.get("package_version", "unknown"),
            "Sha256": meta.get("sha256", "unknown"),
        },
        "Device": device_description(device),
    }


def _load_network(model_dir: ModelDirectory, modality: str, device: str):
    from .checkpoint import load_model

    model, _ = load_model(model_dir.group_dir(modality), map_location="cpu")
    return model.to(device).eval()


def _reference_profile(reference: Path, modality: str, mask: np.ndarray | None, device: str):
    from .profile import build_target_profile

    _, data = _load(reference)
    return build_target_profile([(data, mask, None, str(reference))], site="reference", modality=modality,
                                device=device)


def harmonize_image_file(
    in_file: str | Path,
    mask_file: str | Path,
    out_file: str | Path,
    *,
    model_dir: str | Path,
    modality: str,
    source_site: str,
    target_site: str | None = None,
    target_reference: str | Path | None = None,
    device: str = "auto",
) -> dict:
    """Harmonize a template-space T1w or T2w file to a site (or to one reference image).

    Returns the provenance recorded in the output's sidecar (target, model name, version
    and sha256, device).
    """
    from .device import resolve_device
    from .inference import harmonize_volume

    device = resolve_device(device)
    models = ModelDirectory(Path(model_dir))
    like, volume = _load(in_file)
    _, mask = _load(mask_file)
    mask = mask > 0.5
    source = models.profiles(source_site, modality).get(modality)
    if target_reference is not None:
        _, ref = _load(target_reference)
        if ref.shape != volume.shape:
            raise ValueError(
                f"--target-reference {target_reference} has shape {ref.shape}, not the template grid "
                f"{volume.shape}; pass a desc-preproc {modality} image written by ihf-bids at the same resolution"
            )
        target = _reference_profile(Path(target_reference), modality, None, device)
        description = {"Reference": str(target_reference), "Modality": modality}
        source = None  # a single image: compare with this image's own statistics (paper behaviour)
    else:
        target = models.profiles(target_site, modality)[modality]
        description = {"Site": target_site, "Modality": modality}
    model = _load_network(models, modality, device)
    out = harmonize_volume(volume, model, target, source_profile=source, mask=mask, device=device)
    out[~mask] = 0.0
    save_image(out, like.affine, out_file)
    return _provenance(models, modality, description, device, source_site, source is not None)


def harmonize_dwi_file(
    in_file: str | Path,
    bval_file: str | Path,
    mask_file: str | Path,
    out_file: str | Path,
    *,
    model_dir: str | Path,
    source_site: str,
    target_site: str,
    device: str = "auto",
) -> dict:
    """Harmonize every volume of a template-space DWI run with its b-shell's profiles.

    Raises
    ------
    MissingShellError
        The target site has no profile for a shell of this run (reported, not guessed).
    """
    from .device import resolve_device
    from .dwi import harmonize_dwi

    device = resolve_device(device)
    models = ModelDirectory(Path(model_dir))
    like, data = _load(in_file)
    _, mask = _load(mask_file)
    mask = mask > 0.5
    bvals = np.loadtxt(str(bval_file), ndmin=1)
    targets = models.profiles(target_site, "dwi")
    sources = models.profiles(source_site, "dwi")
    model = _load_network(models, "dwi", device)
    out = harmonize_dwi(data, bvals, model, targets, source_profiles=sources or None, mask=mask, device=device)
    out[~mask] = 0.0
    save_image(out, like.affine, out_file)
    return _provenance(models, "dwi", {"Site": target_site, "Modality": "dwi", "Shells": sorted(targets)},
                       device, source_site, bool(sources))
