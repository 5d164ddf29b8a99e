"""Diffusion helpers: b-shells and the run's b=0 reference."""

from __future__ import annotations

import numpy as np

__all__ = ["B0_THRESHOLD", "b0_mean", "shell_labels"]

#: b-values at or below this (s/mm^2) count as b=0 (scanners write 0, 5 or 10).
B0_THRESHOLD = 50.0


def shell_labels(bvals: np.ndarray, *, tolerance: float = 100.0) -> list[str]:
    """Label each volume with its b-shell: ``"b0"``, ``"b1000"``, ``"b2000"``...

    b-values within ``tolerance`` of each other form one shell (scanners write 995, 1000,
    1005 for one nominal shell); a shell is named by its median rounded to 100.

    Examples
    --------
    >>> shell_labels(np.array([0, 5, 995, 1000, 2010, 1005]))
    ['b0', 'b0', 'b1000', 'b1000', 'b2000', 'b1000']
    """
    b = np.asarray(bvals, dtype=float).ravel()
    if b.size == 0:
        raise ValueError("no b-values")
    if (b < 0).any() or not np.isfinite(b).all():
        raise ValueError("b-values must be finite and non-negative")
    labels = ["b0"] * b.size
    weighted = np.flatnonzero(b > B0_THRESHOLD)
    order = weighted[np.argsort(b[weighted])]
    clusters: list[list[int]] = []
    for i in order:
        if clusters and b[i] - b[clusters[-1][-1]] <= tolerance:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for members in clusters:
        name = f"b{int(round(np.median(b[members]) / 100.0) * 100)}"
        for i in members:
            labels[i] = name
    return labels


def b0_mean(dwi: np.ndarray, bvals: np.ndarray) -> np.ndarray:
    """Mean of the b=0 volumes of a 4D run.

    Raises
    ------
    ValueError
        If the run has no b=0 volume (the intensity reference of the run).
    """
    b = np.asarray(bvals, dtype=float).ravel()
    if dwi.ndim != 4 or dwi.shape[3] != b.size:
        raise ValueError(f"DWI of shape {dwi.shape} does not match {b.size} b-values")
    zero = b <= B0_THRESHOLD
    if not zero.any():
        raise ValueError("the DWI run has no b=0 volume; ihf-bids needs one as the run's intensity reference")
    return dwi[..., zero].mean(axis=3)
