"""Target profiles: what "harmonize to site X" means for the network.

A :class:`TargetProfile` holds, for one (site, modality), the target embedding z_s (VGG19
channel statistics) at every template slice position, averaged over the site's reference
volumes, and the site's typical intensity scale. Harmonizing a volume to a site uses the
profile entry of each slice's position; a single reference image is a profile of one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import write_bytes_atomically
from .volume import IntensityScale, robust_intensity_scale, volume_to_windows

__all__ = ["TargetProfile", "build_target_profile", "profile_filename"]

_FORMAT = "ihf-bids-target-profile"
_FORMAT_VERSION = 1


def profile_filename(site: str, modality: str) -> str:
    """File name of a profile inside a model directory's ``profiles/`` folder."""
    return f"site-{site}_modality-{modality}_profile.npz"


@dataclass
class TargetProfile:
    """VGG statistics of one site and modality per slice position.

    Attributes
    ----------
    site, modality : str
        E.g. ``"siemens"`` and ``"T1w"`` (DWI shells are ``"dwi-b0"``, ``"dwi-b1000"``...).
    embeddings : ndarray, shape (n_positions, 1920)
        Mean target embedding at each axial slice position.
    intensity_scale : float
        Median robust intensity scale of the reference volumes; harmonized images are
        returned on this scale.
    n_volumes : int
        Number of reference volumes averaged.
    sources : list of str
        Identifiers of the reference volumes (provenance).
    """

    site: str
    modality: str
    embeddings: np.ndarray
    intensity_scale: float
    n_volumes: int
    sources: list[str] = field(default_factory=list)

    def embeddings_for(self, n_slices: int) -> np.ndarray:
        """Embeddings for a volume of ``n_slices`` axial slices.

        Volumes in the template space have as many slices as the profile; another count
        (a different grid) is mapped proportionally to the nearest profile position.
        """
        n_pos = self.embeddings.shape[0]
        if n_slices == n_pos:
            return self.embeddings
        idx = np.clip(np.round((np.arange(n_slices) + 0.5) * n_pos / n_slices - 0.5), 0, n_pos - 1).astype(int)
        return self.embeddings[idx]

    def save(self, path: str | Path) -> Path:
        """Write the profile to an ``.npz`` file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "site": self.site,
            "modality": self.modality,
            "intensity_scale": self.intensity_scale,
            "n_volumes": self.n_volumes,
            "sources": self.sources,
        }
        write_bytes_atomically(
            path,
            lambda handle: np.savez_compressed(
                handle, embeddings=self.embeddings.astype(np.float32), metadata=np.array(json.dumps(meta))
            ),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> TargetProfile:
        """Read a profile written by :meth:`save`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["metadata"]))
                embeddings = data["embeddings"]
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path} is not a readable ihf-bids target profile ({err}); copy the whole model "
                             "directory again or retrain") from err
        if meta.get("format") != _FORMAT or meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{path} is not an ihf-bids target profile of format version {_FORMAT_VERSION}; use "
                             "the ihf-bids version that wrote the model, or retrain")
        return cls(
            site=meta["site"],
            modality=meta["modality"],
            embeddings=embeddings,
            intensity_scale=float(meta["intensity_scale"]),
            n_volumes=int(meta["n_volumes"]),
            sources=list(meta.get("sources", [])),
        )


def build_target_profile(
    volumes: Iterable[tuple[np.ndarray, np.ndarray | None, IntensityScale | None, str]],
    *,
    site: str,
    modality: str,
    vgg=None,
    batch_size: int = 16,
    device: str = "cpu",
) -> TargetProfile:
    """Average the per-position VGG statistics of a site's reference volumes.

    Parameters
    ----------
    volumes : iterable of (volume, mask, scale, source)
        Reference volumes on a common grid (the template space), their brain masks (or
        None), their intensity scale (None: :func:`robust_intensity_scale`; DWI passes the
        shell's scale in its run, shared by the shell's volumes) and an identifier for provenance.
    vgg : VGG19Features, optional
        The frozen VGG19 (loaded from the shipped weights when omitted).
    """
    import torch

    from ..model.vgg import load_vgg19, target_embedding

    vgg = (vgg or load_vgg19()).to(device)
    total: np.ndarray | None = None
    scales, sources = [], []
    for volume, mask, scale, source in volumes:
        scale = scale or robust_intensity_scale(volume, mask)
        windows = volume_to_windows(scale.normalize(volume))
        parts = []
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                batch = torch.from_numpy(windows[start : start + batch_size]).to(device)
                parts.append(target_embedding(vgg, batch).double().cpu().numpy())
        emb = np.concatenate(parts)
        if total is not None and total.shape != emb.shape:
            raise ValueError(
                f"reference volume {source} has {emb.shape[0]} slices, the others {total.shape[0]}: "
                "profiles need volumes on one grid (the template space)"
            )
        total = emb if total is None else total + emb
        scales.append(scale.scale)
        sources.append(source)
    if total is None:
        raise ValueError(f"no reference volumes for site {site!r}, modality {modality!r}")
    return TargetProfile(
        site=site,
        modality=modality,
        embeddings=(total / len(scales)).astype(np.float32),
        intensity_scale=float(np.median(scales)),
        n_volumes=len(scales),
        sources=sources,
    )
