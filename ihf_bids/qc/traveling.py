"""Traveling-subject evaluation: harmonize each subject's scans to a target site and compare
them with the same subject's own scan at that site.

This is the one measurement of harmonization accuracy that needs no model of the anatomy:
the truth is the subject itself, scanned at the target site.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .metrics import robust_data_range, similarity_report

__all__ = ["Scan", "evaluate_traveling_subjects", "summarize_rows"]


@dataclass
class Scan:
    """One subject's image of one modality at one site, on the common (template) grid.

    Attributes
    ----------
    volumes : ndarray
        (X, Y, Z) for anatomical images; (X, Y, Z, N) for the N volumes of one DWI shell.
    modality : str
        ``T1w``, ``T2w``, ``dwi-b0``, ``dwi-b1000``...
    mask : ndarray
        Brain mask (bool) on the same grid.
    scale : float, optional
        Intensity scale shared by all volumes (DWI: the shell's scale in its run).
    """

    subject: str
    site: str
    modality: str
    volumes: np.ndarray
    mask: np.ndarray
    scale: float | None = None

    @property
    def volume_list(self) -> list[np.ndarray]:
        """The 3D volumes of the scan."""
        return [self.volumes] if self.volumes.ndim == 3 else [self.volumes[..., i] for i in range(self.volumes.shape[3])]

    def summary_image(self, volumes: list[np.ndarray] | None = None) -> np.ndarray:
        """The image compared across sites: the volume itself, or a shell's direction average.

        Gradient directions differ between sites, so single DWI volumes are not comparable;
        their average over the shell (the trace-weighted image) is.
        """
        vols = volumes if volumes is not None else self.volume_list
        return vols[0] if len(vols) == 1 else np.mean(vols, axis=0)


#: A harmonizer maps a scan to its harmonized 3D volumes (one per input volume).
Harmonizer = Callable[[Scan], list[np.ndarray]]


def evaluate_traveling_subjects(
    scans: list[Scan], target_site: str, harmonizers: dict[str, Harmonizer]
) -> list[dict]:
    """Similarity of every harmonized scan to the same subject's target-site scan.

    Returns one row per (subject, modality, source site, method) with rmse, psnr, ssim and
    ms_ssim inside the subject's brain mask; ``data_range`` is the robust range of the
    target-site image so all methods are scored on the same scale. Rows with
    ``same_site=True`` harmonize the target-site scan to its own site (it must not degrade).
    """
    by_key = {(s.subject, s.modality, s.site): s for s in scans}
    rows = []
    for scan in scans:
        truth = by_key.get((scan.subject, scan.modality, target_site))
        if truth is None:
            continue
        reference = truth.summary_image()
        mask = truth.mask.astype(bool)
        data_range = robust_data_range(reference, mask)
        for method, harmonize in harmonizers.items():
            image = scan.summary_image(harmonize(scan))
            rows.append(
                {
                    "subject": scan.subject,
                    "modality": scan.modality,
                    "source_site": scan.site,
                    "target_site": target_site,
                    "same_site": scan.site == target_site,
                    "method": method,
                    **similarity_report(image, reference, mask, data_range=data_range),
                }
            )
    return rows


def summarize_rows(rows: list[dict], metrics: tuple[str, ...] = ("rmse", "psnr", "ssim", "ms_ssim")) -> list[dict]:
    """Mean and standard deviation of each metric per (modality, same_site, method)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["modality"], row["same_site"], row["method"])].append(row)
    out = []
    for (modality, same_site, method), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        entry = {"modality": modality, "same_site": same_site, "method": method, "n": len(members)}
        for m in metrics:
            values = np.array([r[m] for r in members], dtype=float)
            finite = values[np.isfinite(values)]
            # PSNR is +inf for an unchanged image (same-site, no harmonization): the mean is
            # then inf, and the spread is that of the finite values.
            entry[m] = float(values.mean()) if finite.size == values.size else float("inf")
            entry[f"{m}_sd"] = float(finite.std()) if finite.size else 0.0
        out.append(entry)
    return out
