"""Site-labelled 2.5D slices for unpaired training.

Each training sample is a source window x, its site, a target site that has the same
modality (the source's own site included) and the window's template slice position (all
volumes are in the template space). The training loop turns the two sites' profiles at that
position into the site shift that conditions the network, exactly as inference does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..harmonize.volume import IntensityScale, pad_to_multiple, robust_intensity_scale

__all__ = ["SliceBank", "TrainingSample", "TrainingVolume"]


class TrainingSample(NamedTuple):
    """Where a drawn source window comes from and which site it is harmonized to."""

    source_site: str
    target_site: str
    modality: str
    position: int


@dataclass
class TrainingVolume:
    """One preprocessed volume in the template space with its labels.

    Attributes
    ----------
    data : ndarray (X, Y, Z)
        Physical intensities.
    site, modality, subject : str
        Labels; ``modality`` is ``T1w``, ``T2w`` or a DWI shell such as ``dwi-b1000``.
    mask : ndarray, optional
        Brain mask (intensity scale and the choice of slices with brain).
    scale : IntensityScale, optional
        Override of the volume's own scale (DWI: the shell's scale in its run, see
        :func:`~ihf_bids.harmonize.dwi.shell_intensity_scales`).
    """

    data: np.ndarray
    site: str
    modality: str
    subject: str
    mask: np.ndarray | None = None
    scale: IntensityScale | None = None


class SliceBank:
    """Normalized volumes of several sites, sampled as (source, target) window pairs.

    Parameters
    ----------
    volumes : list of TrainingVolume
        All volumes must share one grid (the template space).
    multiple : int
        Pad heights and widths to multiples of this (the network's size multiple).
    min_brain_fraction : float
        Slices whose mask covers less of the slice than this are not used as sources.
    """

    def __init__(self, volumes: list[TrainingVolume], *, multiple: int = 4, min_brain_fraction: float = 0.02) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        shapes = {v.data.shape for v in volumes}
        if len(shapes) != 1:
            raise ValueError(f"training volumes must share one grid (the template space); got shapes {sorted(shapes)}")
        self.shape = shapes.pop()
        px, py = pad_to_multiple(self.shape[:2], multiple)
        self._arrays: list[np.ndarray] = []
        self.volumes = volumes
        by_group: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        sources: list[tuple[int, int]] = []
        for i, vol in enumerate(volumes):
            scale = vol.scale or robust_intensity_scale(vol.data, vol.mask)
            norm = np.pad(scale.normalize(vol.data), (px, py, (1, 1)), constant_values=-1.0)
            norm[..., 0], norm[..., -1] = norm[..., 1], norm[..., -2]
            self._arrays.append(norm.astype(np.float32))
            by_group[vol.modality][vol.site].append(i)
            brain = vol.mask if vol.mask is not None else vol.data > 0
            fraction = brain.reshape(-1, self.shape[2]).mean(axis=0)
            sources.extend((i, k) for k in np.flatnonzero(fraction >= min_brain_fraction))
        self._groups = {m: dict(s) for m, s in by_group.items()}
        # Only modalities seen at two or more sites are sources. (Also training on a modality
        # seen at one site, with same-site targets only, was measured: it did not make those
        # scans come back closer to unchanged and took samples from the others; see
        # docs/model.md.)
        self._sources = [(i, k) for i, k in sources if len(self._groups[volumes[i].modality]) > 1]
        if not self._sources:
            raise ValueError(
                "training needs at least one modality at two or more sites; got "
                + ", ".join(f"{m}: {sorted(s)}" for m, s in self._groups.items())
            )

    @property
    def sites(self) -> list[str]:
        """All site labels."""
        return sorted({v.site for v in self.volumes})

    @property
    def modalities(self) -> list[str]:
        """All modality labels."""
        return sorted(self._groups)

    def summary(self) -> dict:
        """Counts of volumes per modality and site (stored in the checkpoint metadata)."""
        return {
            "grid_shape": list(self.shape),
            "volumes": {m: {s: len(ix) for s, ix in sorted(g.items())} for m, g in sorted(self._groups.items())},
            "source_slices": len(self._sources),
        }

    def window(self, index: int, k: int) -> np.ndarray:
        """The (3, X', Y') window of volume ``index`` centred on slice ``k``."""
        return np.ascontiguousarray(self._arrays[index][..., k : k + 3].transpose(2, 0, 1))

    def volumes_of(self, site: str, modality: str) -> list[TrainingVolume]:
        """The bank's volumes of one site and modality (e.g. to build its profile)."""
        return [self.volumes[i] for i in self._groups.get(modality, {}).get(site, [])]

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, list[TrainingSample]]:
        """Draw ``batch_size`` source windows, each with its :class:`TrainingSample`.

        The target site is drawn among all sites that have the source's modality, the
        source's own included: harmonizing a scan to its own site must leave it unchanged,
        and the network learns that from these same-site samples.
        """
        xs, targets = [], []
        for j in rng.integers(len(self._sources), size=batch_size):
            i, k = self._sources[j]
            vol = self.volumes[i]
            sites = sorted(self._groups[vol.modality])
            xs.append(self.window(i, k))
            targets.append(TrainingSample(vol.site, sites[rng.integers(len(sites))], vol.modality, int(k)))
        return np.stack(xs), targets
