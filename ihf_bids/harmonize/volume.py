"""Volumes to 2.5D windows and back, and the intensity scale that maps them to [-1, 1].

A window is an axial slice with its two neighbours as three channels (edge slices repeat
themselves). Every slice appears in three windows (as the centre and as either neighbour);
reassembly averages the three predictions of each slice. Heights and widths are padded
with background (-1) up to the network's size multiple and cropped back afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "IntensityScale",
    "pad_to_multiple",
    "robust_intensity_scale",
    "volume_to_windows",
    "windows_to_volume",
]

#: Percentile of the in-mask intensities that maps to +1.
SCALE_PERCENTILE = 99.5


@dataclass(frozen=True)
class IntensityScale:
    """Linear map between physical intensities and the network's [-1, 1] range.

    ``normalized = 2 * value / scale - 1`` (0 maps to -1, ``scale`` to +1), clipped to
    [-1, 1] on the way in; the inverse is applied on the way out with the *target's*
    scale, so harmonized images come back on the target site's intensity scale.
    """

    scale: float

    def normalize(self, volume: np.ndarray) -> np.ndarray:
        """Physical intensities -> [-1, 1] (float32)."""
        out = 2.0 * np.asarray(volume, dtype=np.float32) / np.float32(self.scale) - 1.0
        return np.clip(out, -1.0, 1.0, out=out)

    def denormalize(self, normalized: np.ndarray) -> np.ndarray:
        """[-1, 1] -> physical intensities, non-negative (float32)."""
        out = (np.asarray(normalized, dtype=np.float32) + 1.0) * np.float32(self.scale / 2.0)
        return np.maximum(out, 0.0, out=out)


def robust_intensity_scale(volume: np.ndarray, mask: np.ndarray | None = None) -> IntensityScale:
    """The scale of a volume: the 99.5th percentile of its in-mask (else positive) voxels.

    Raises
    ------
    ValueError
        If the volume has no finite positive voxel in the mask (an empty or constant image).
    """
    data = np.asarray(volume)
    values = data[mask.astype(bool)] if mask is not None else data[data > 0]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("the image has no positive finite voxels inside the mask: nothing to harmonize")
    scale = float(np.percentile(values, SCALE_PERCENTILE))
    if not scale > 0:
        raise ValueError("the image's robust maximum is not positive (all-zero or negative image)")
    return IntensityScale(scale)


def pad_to_multiple(shape: tuple[int, int], multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric (before, after) padding that makes both sides multiples of ``multiple``."""
    pads = []
    for n in shape:
        total = (-n) % multiple
        pads.append((total // 2, total - total // 2))
    return pads[0], pads[1]


def volume_to_windows(volume: np.ndarray, multiple: int = 1) -> np.ndarray:
    """Cut a normalized 3D volume (X, Y, Z) into Z axial 2.5D windows (Z, 3, X', Y').

    ``X'`` and ``Y'`` are padded with -1 up to multiples of ``multiple``.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
    px, py = pad_to_multiple(vol.shape[:2], multiple)
    vol = np.pad(vol, (px, py, (1, 1)), mode="constant", constant_values=-1.0)
    vol[..., 0], vol[..., -1] = vol[..., 1], vol[..., -2]  # edge slices are their own neighbours
    z = vol.shape[2] - 2
    windows = np.stack([vol[..., k : k + 3] for k in range(z)])  # (Z, X', Y', 3)
    return np.ascontiguousarray(windows.transpose(0, 3, 1, 2))


def windows_to_volume(windows: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Reassemble (Z, 3, X', Y') windows into a (X, Y, Z) volume, averaging each slice's 3 predictions."""
    z = windows.shape[0]
    if z != shape[2]:
        raise ValueError(f"{z} windows for a volume of {shape[2]} slices")
    xpad = windows.shape[2] - shape[0]
    ypad = windows.shape[3] - shape[1]
    x0, y0 = xpad // 2, ypad // 2
    crop = windows[:, :, x0 : x0 + shape[0], y0 : y0 + shape[1]]
    total = np.zeros((shape[0], shape[1], z + 2), dtype=np.float64)
    count = np.zeros(z + 2, dtype=np.float64)
    for k in range(z):
        for c in range(3):
            total[..., k + c] += crop[k, c]
            count[k + c] += 1
    # Windows at the edges hold the edge slice twice (as itself and as its mirrored neighbour).
    total[..., 1] += total[..., 0]
    count[1] += count[0]
    total[..., z] += total[..., z + 1]
    count[z] += count[z + 1]
    return (total[..., 1 : z + 1] / count[1 : z + 1]).astype(np.float32)
