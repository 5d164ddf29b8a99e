"""Harmonize image files on disk (what the workflow's harmonization nodes call)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..imageio import save_image
from .model_dir import ModelDirectory

__all__ = ["device_description", "harmonize_dwi_file", "harmonize_image_file", "load_network_with_profiles"]

LOGGER = logging.getLogger("ihf_bids")

#: Reads of a network and its profiles before a model that keeps changing is reported.
READ_ATTEMPTS = 5


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


def _provenance(model_dir: ModelDirectory, modality: str, meta: dict, target: dict, device: str, source_site: str,
                source_profiled: bool) -> dict:
    """The sidecar's harmonization fields; ``meta`` is the metadata of the network actually used."""
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


def _read_profiles(group_dir: Path, modality: str, sites: list[str], digests: dict | None) -> dict:
    """The profiles of ``sites`` for ``modality`` (DWI: every shell) in a network's ``profiles/``.

    Every profile of the folder is read and checked against ``digests`` (those the network was
    saved with; ``None`` for models written before they were recorded) before any is used.

    Raises
    ------
    CheckpointError
        The folder does not hold exactly the profiles the network was saved with.
    """
    from .checkpoint import PROFILES_DIR, CheckpointError, profile_digest
    from .profile import TargetProfile

    found = {p.name: TargetProfile.load(p) for p in sorted((group_dir / PROFILES_DIR).glob("*_profile.npz"))}
    if digests is not None and {name: profile_digest(p) for name, p in found.items()} != digests:
        raise CheckpointError(f"the profiles in {group_dir / PROFILES_DIR} are not those its model.pt was saved "
                              "with (files added, removed or edited); copy the whole model directory again or "
                              "retrain")
    out: dict[str, dict] = {site: {} for site in sites}
    for profile in found.values():
        wanted = profile.modality == modality or (modality == "dwi" and profile.modality.startswith("dwi-"))
        if wanted and profile.site in out:
            out[profile.site][profile.modality] = profile
    return out


def load_network_with_profiles(model_dir: ModelDirectory, modality: str, sites: list[str], *,
                               attempts: int = READ_ATTEMPTS, wait_s: float = 0.2):
    """Load the network serving ``modality`` and the profiles of ``sites``, checked to belong together.

    ``model.pt`` is verified against ``model.json``, and the profiles as read against the
    digests saved inside ``model.pt``. ``group --train`` republishes a network by swapping its
    whole directory, so a read that overlaps a swap can find a mix of two versions (or, where
    the file system has no atomic swap, briefly none): it is read again, up to ``attempts`` times.

    Parameters
    ----------
    model_dir : ModelDirectory
        The trained model.
    modality : str
        ``T1w``, ``T2w`` or ``dwi``.
    sites : list of str
        Sites whose profiles are needed (for ``dwi`` every shell of each).

    Returns
    -------
    tuple
        ``(network, metadata, {site: {modality_key: TargetProfile}})``; the network is on the CPU.

    Raises
    ------
    CheckpointError
        The network or its profiles are missing, corrupt or kept changing while read.
    """
    from .checkpoint import CheckpointError, load_model

    group_dir = model_dir.group_dir(modality)
    error: Exception | None = None
    seen: set[str] = set()
    for attempt in range(attempts):
        try:
            network, meta = load_model(group_dir, map_location="cpu")
            return network, meta, _read_profiles(group_dir, modality, sites, meta.get("profiles_sha256"))
        except (CheckpointError, OSError, ValueError) as err:
            error = err
            seen.add(str(err))
            if attempt + 1 < attempts:
                LOGGER.info("reading %s again (%s)", group_dir, err)
                time.sleep(wait_s * (attempt + 1))
    if len(seen) == 1:  # the same fault every time: the files are bad, not being replaced
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(f"{group_dir} cannot be read ({error}); check that the model directory is complete "
                              "and readable (in a container, mount it), or copy it again") from error
    raise CheckpointError(f"{group_dir} could not be read consistently in {attempts} attempts ({error}); if "
                          "'group --train' is republishing it, re-run when it is done") from error


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
    sites = [source_site] if target_reference is not None else [source_site, target_site]
    network, meta, profiles = load_network_with_profiles(models, modality, sites)
    model = network.to(device).eval()
    source = profiles[source_site].get(modality)
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
        target = profiles[target_site][modality]
        description = {"Site": target_site, "Modality": modality}
    out = harmonize_volume(volume, model, target, source_profile=source, mask=mask, device=device)
    out[~mask] = 0.0
    save_image(out, like.affine, out_file)
    return _provenance(models, modality, meta, description, device, source_site, source is not None)


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
    network, meta, profiles = load_network_with_profiles(models, "dwi", [target_site, source_site])
    model = network.to(device).eval()
    targets, sources = profiles[target_site], profiles[source_site]
    out = harmonize_dwi(data, bvals, model, targets, source_profiles=sources or None, mask=mask, device=device)
    out[~mask] = 0.0
    save_image(out, like.affine, out_file)
    return _provenance(models, "dwi", meta, {"Site": target_site, "Modality": "dwi", "Shells": sorted(targets)},
                       device, source_site, bool(sources))
