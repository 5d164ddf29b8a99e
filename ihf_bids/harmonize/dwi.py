"""Harmonize a whole DWI run, shell by shell."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .inference import harmonize_volume
from .profile import TargetProfile
from .volume import IntensityScale, robust_intensity_scale

__all__ = ["MissingShellError", "harmonize_dwi", "shell_intensity_scales"]


class MissingShellError(ValueError):
    """The target site has no profile for a b-shell of the source run."""


def shell_intensity_scales(
    dwi: np.ndarray, labels: list[str], mask: np.ndarray | None = None
) -> dict[str, IntensityScale]:
    """One intensity scale per b-shell of a run: that of the shell's mean image.

    All volumes of a shell share it, so the directional signal ratios within the shell
    (what the tensor's anisotropy is made of) stay physical (docs/model.md).
    """
    labels_arr = np.asarray(labels)
    return {
        shell: robust_intensity_scale(dwi[..., labels_arr == shell].mean(axis=3), mask)
        for shell in dict.fromkeys(labels)
    }


def harmonize_dwi(
    dwi: np.ndarray,
    bvals: np.ndarray,
    model,
    target_profiles: Mapping[str, TargetProfile],
    *,
    source_profiles: Mapping[str, TargetProfile] | None = None,
    mask: np.ndarray | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Harmonize every volume of a 4D DWI run with the profiles of its b-shell.

    Parameters
    ----------
    dwi : ndarray (X, Y, Z, N)
        The run on the template grid.
    bvals : ndarray (N,)
        b-values; shells are found with :func:`~ihf_bids.preproc.dwi.shell_labels`.
    target_profiles, source_profiles : mapping of modality to TargetProfile
        Keys ``dwi-b0``, ``dwi-b1000``...: the target site's profiles and, when the source
        site was profiled, its own (see :func:`harmonize_volume`).

    Raises
    ------
    MissingShellError
        A shell of the run has no target profile: it is reported, never guessed from
        another shell.
    """
    from ..preproc.dwi import shell_labels

    data = np.asarray(dwi, dtype=np.float32)
    if data.ndim != 4:
        raise ValueError(f"expected a 4D DWI run, got shape {data.shape}")
    labels = shell_labels(bvals)
    if len(labels) != data.shape[3]:
        raise ValueError(f"{data.shape[3]} volumes but {len(labels)} b-values")
    missing = sorted({f"dwi-{s}" for s in labels} - set(target_profiles))
    if missing:
        raise MissingShellError(
            f"the target site has no profile for {', '.join(missing)} (it has "
            f"{', '.join(sorted(target_profiles)) or 'none'}); these shells cannot be harmonized to it"
        )
    scales = shell_intensity_scales(data, labels, mask)
    out = np.empty_like(data)
    for i, shell in enumerate(labels):
        key = f"dwi-{shell}"
        out[..., i] = harmonize_volume(
            data[..., i],
            model,
            target_profiles[key],
            source_profile=(source_profiles or {}).get(key),
            source_scale=scales[shell],
            batch_size=batch_size,
            device=device,
        )
    return out
