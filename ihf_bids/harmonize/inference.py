"""Harmonize whole volumes with a trained network and a target profile."""

from __future__ import annotations

import numpy as np

from .profile import TargetProfile
from .volume import IntensityScale, robust_intensity_scale, volume_to_windows, windows_to_volume

__all__ = ["harmonize_volume", "source_embeddings"]


def source_embeddings(windows: np.ndarray, vgg=None, *, batch_size: int | None = None,
                      device: str = "cpu") -> np.ndarray:
    """The target embedding of each source window itself (the source's own statistics).

    ``batch_size`` None: 8 windows a pass on the CPU, what fits in free memory on CUDA.
    """
    import torch

    from ..model.vgg import load_vgg19, target_embedding
    from .device import CPU_BATCH_SIZE, fit_batch_size

    vgg = (vgg or load_vgg19()).to(device)
    parts = []
    with torch.inference_mode():
        if batch_size is None:
            batch_size = fit_batch_size(
                device, lambda n: target_embedding(vgg, torch.from_numpy(windows[:n]).to(device)),
                default=CPU_BATCH_SIZE, maximum=max(1, len(windows)))
        for start in range(0, len(windows), batch_size):
            parts.append(target_embedding(vgg, torch.from_numpy(windows[start : start + batch_size]).to(device)).cpu().numpy())
    return np.concatenate(parts).astype(np.float32)


def harmonize_volume(
    volume: np.ndarray,
    model,
    profile: TargetProfile,
    *,
    source_profile: TargetProfile | None = None,
    mask: np.ndarray | None = None,
    source_scale: IntensityScale | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    vgg=None,
) -> np.ndarray:
    """Move a 3D volume's contrast to the profile's site, keeping its anatomy.

    Parameters
    ----------
    volume : ndarray (X, Y, Z)
        The source image on the template grid (axial slices along the last axis).
    model : IHFHarmony
        A trained network (see :func:`~ihf_bids.harmonize.checkpoint.load_model`).
    profile : TargetProfile
        The target site's statistics for this modality (or DWI shell).
    source_profile : TargetProfile, optional
        The source site's profile (same modality). The network is conditioned on the site
        shift between the two profiles at each slice position; the same site gives a zero
        shift and leaves the image unchanged. Without it (a site never profiled, or a single
        reference image as target), the source volume's own statistics stand in for its
        site's, which costs a VGG19 pass over the volume and also moves the subject's
        anatomy-driven statistics towards the target's (docs/model.md).
    mask : ndarray, optional
        Brain mask used to compute the source's intensity scale.
    source_scale : IntensityScale, optional
        Use this scale instead (DWI: the shell's scale, shared by all the shell's volumes
        of the run; see :func:`~ihf_bids.harmonize.dwi.harmonize_dwi`).
    batch_size : int, optional
        Windows per forward pass; by default 8 on the CPU and, on CUDA, as many as fit in
        80 % of the free GPU memory (measured with a two-window pass,
        :func:`~ihf_bids.harmonize.device.fit_batch_size`).
    device : str
        ``cpu`` or ``cuda``; on CUDA the pass runs in float16 autocast.
    vgg : VGG19Features, optional
        Reused when ``source_profile`` is None.

    Returns
    -------
    ndarray (X, Y, Z), float32
        The harmonized image on the target site's intensity scale: the source's own scale
        times the ratio of the target and source sites' typical scales (with a source
        profile), or the target profile's scale (without one).
    """
    import torch

    from ..model import restore_background, site_shift

    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"harmonize_volume expects a 3D volume, got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise ValueError("the volume contains NaN or infinite voxels")
    scale = source_scale or robust_intensity_scale(vol, mask)
    windows = volume_to_windows(scale.normalize(vol), model.config.size_multiple)
    target = torch.from_numpy(profile.embeddings_for(vol.shape[2]).astype(np.float32))
    if source_profile is not None:
        if source_profile.modality != profile.modality:
            raise ValueError(f"source profile is {source_profile.modality}, target profile {profile.modality}")
        source = torch.from_numpy(source_profile.embeddings_for(vol.shape[2]).astype(np.float32))
    else:
        source = torch.from_numpy(source_embeddings(windows, vgg, batch_size=batch_size, device=device))
    shift = site_shift(target, source).to(device)
    model = model.to(device).eval()
    out = np.empty_like(windows)
    use_amp = device.startswith("cuda")
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
        if batch_size is None:
            from .device import CPU_BATCH_SIZE, fit_batch_size

            batch_size = fit_batch_size(
                device, lambda n: model(torch.from_numpy(windows[:n]).to(device), shift[:n]),
                default=CPU_BATCH_SIZE, maximum=max(1, len(windows)))
        for start in range(0, len(windows), batch_size):
            stop = start + batch_size
            x = torch.from_numpy(windows[start:stop]).to(device)
            out[start:stop] = restore_background(x, model(x, shift[start:stop])).float().cpu().numpy()
    harmonized = windows_to_volume(np.clip(out, -1.0, 1.0), vol.shape)
    # The output scale follows the same relative rule as the statistics: the source's own
    # scale moved by the ratio of the two sites' typical scales (unchanged for the same site).
    if source_profile is not None:
        out_scale = scale.scale * profile.intensity_scale / source_profile.intensity_scale
    else:
        out_scale = profile.intensity_scale
    return IntensityScale(out_scale).denormalize(harmonized)
