"""Volumes in, harmonized volumes out: windows, target profiles, checkpoints, inference.

This is the only place that turns volumes into tensors and back.
"""

from __future__ import annotations

from .baselines import histogram_match, histogram_match_to_quantiles, intensity_quantiles
from .checkpoint import CheckpointError, load_model, save_model
from .device import resolve_device
from .dwi import MissingShellError, harmonize_dwi, shell_intensity_scales
from .inference import harmonize_volume
from .profile import TargetProfile, build_target_profile, profile_filename
from .volume import IntensityScale, robust_intensity_scale, volume_to_windows, windows_to_volume

__all__ = [
    "CheckpointError",
    "IntensityScale",
    "MissingShellError",
    "TargetProfile",
    "build_target_profile",
    "harmonize_dwi",
    "harmonize_volume",
    "histogram_match",
    "histogram_match_to_quantiles",
    "intensity_quantiles",
    "load_model",
    "profile_filename",
    "resolve_device",
    "robust_intensity_scale",
    "save_model",
    "shell_intensity_scales",
    "volume_to_windows",
    "windows_to_volume",
]
