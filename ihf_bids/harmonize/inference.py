"""Harmonize whole volumes with a trained network and a target profile."""

from __future__ import annotations

import numpy as np

from .profile import TargetProfile
from .volume import IntensityScale, robust_intensity_scale, volume_to_windows, windows_to_volume

__all__ = ["harmonize_volume"]


def harmonize_volume(
    volume: np.ndarray,
    model,
    profile: TargetProfile,
    *,
    mask: np.ndarray | None = None,
    source_scale: IntensityScale | None = None,
    batch_size: int = 8,
    device: str = "cpu",
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
    mask : ndarray, optional
        Brain mask used to compute the source's intensity scale.
    source_scale : IntensityScale, optional
        Use this scale instead (DWI: the run's b=0 scale, shared by all its volumes).
    batch_size : int
        Windows per forward pass.
    device : str
        ``cpu`` or ``cuda``; on CUDA the pass runs in float16 autocast.

    Returns
    -------
    ndarray (X, Y, Z), float32
        The harmonized image on the target site's intensity scale.
    """
    import torch

    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"harmonize_volume expects a 3D volume, got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise ValueError("the volume contains NaN or infinite voxels")
    scale = source_scale or robust_intensity_scale(vol, mask)
    windows = volume_to_windows(scale.normalize(vol), model.config.size_multiple)
    embeddings = profile.embeddings_for(vol.shape[2]).astype(np.float32)
    model = model.to(device).eval()
    out = np.empty_like(windows)
    use_amp = device.startswith("cuda")
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
        for start in range(0, len(windows), batch_size):
            stop = start + batch_size
            x = torch.from_numpy(windows[start:stop]).to(device)
            e = torch.from_numpy(embeddings[start:stop]).to(device)
            out[start:stop] = model(x, e).float().cpu().numpy()
    harmonized = windows_to_volume(np.clip(out, -1.0, 1.0), vol.shape)
    return IntensityScale(profile.intensity_scale).denormalize(harmonized)
