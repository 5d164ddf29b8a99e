"""A trained model as the app stores it: ``output_dir/models/<name>/<group>/``.

One network is trained per image grid ("anat" for T1w and T2w on the anatomical template
grid, "dwi" for the b-shells of diffusion runs on the coarser DWI grid), each a checkpoint
directory (``model.pt`` + ``model.json``, see :mod:`.checkpoint`) with a ``profiles/``
folder holding a :class:`~.profile.TargetProfile` for every site and modality it saw, and
next to each profile the site's intensity reference (evenly spaced intensity quantiles of its
brain voxels, ``..._intensity.json``): the target distribution drawn in the reports and used by
the histogram-matching baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WorkflowBuildError
from .profile import TargetProfile, profile_filename

__all__ = ["MODEL_GROUPS", "ModelDirectory", "find_model", "group_of", "intensity_filename"]

#: Network per grid: modality -> group.
MODEL_GROUPS = {"T1w": "anat", "T2w": "anat", "dwi": "dwi"}


def intensity_filename(site: str, modality: str) -> str:
    """File name of a site's intensity reference inside ``profiles/``."""
    return f"site-{site}_modality-{modality}_intensity.json"


def group_of(modality: str) -> str:
    """The model group of a modality (``dwi-b1000`` -> ``dwi``).

    Examples
    --------
    >>> group_of("T2w"), group_of("dwi-b1000")
    ('anat', 'dwi')
    """
    return "dwi" if modality.startswith("dwi") else MODEL_GROUPS[modality]


@dataclass(frozen=True)
class ModelDirectory:
    """A trained model: ``root/<group>/{model.pt, model.json, profiles/}``."""

    root: Path

    @property
    def name(self) -> str:
        """The model's name (its directory name)."""
        return self.root.name

    def group_dir(self, modality: str) -> Path:
        """The checkpoint directory serving ``modality``."""
        return self.root / group_of(modality)

    def metadata(self, modality: str) -> dict:
        """``model.json`` of the network serving ``modality`` ({} when there is none)."""
        path = self.group_dir(modality) / "model.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def profile_path(self, site: str, modality: str) -> Path:
        """Where the profile of ``site`` and ``modality`` is (it may not exist)."""
        return self.group_dir(modality) / "profiles" / profile_filename(site, modality)

    def sites(self, modality: str) -> list[str]:
        """Sites with a profile for ``modality`` (DWI: for any shell)."""
        folder = self.group_dir(modality) / "profiles"
        found = set()
        for path in folder.glob("site-*_modality-*_profile.npz"):
            site, _, mod = path.name[len("site-"):-len("_profile.npz")].partition("_modality-")
            if mod == modality or (modality == "dwi" and mod.startswith("dwi-")):
                found.add(site)
        return sorted(found)

    def profiles(self, site: str, modality: str) -> dict[str, TargetProfile]:
        """Profiles of ``site`` for ``modality``; for ``dwi`` every shell (``dwi-b0``...)."""
        folder = self.group_dir(modality) / "profiles"
        if modality != "dwi":
            path = self.profile_path(site, modality)
            return {modality: TargetProfile.load(path)} if path.is_file() else {}
        out = {}
        for path in sorted(folder.glob(f"site-{site}_modality-dwi-*_profile.npz")):
            profile = TargetProfile.load(path)
            out[profile.modality] = profile
        return out

    def intensity_references(self, site: str) -> dict[str, np.ndarray]:
        """Every intensity reference of ``site``: modality (``T1w``, ``dwi-b0``...) -> quantiles."""
        out = {}
        for group in sorted(set(MODEL_GROUPS.values())):
            for path in sorted((self.root / group / "profiles").glob(f"site-{site}_modality-*_intensity.json")):
                entry = json.loads(path.read_text())
                out[entry["modality"]] = np.asarray(entry["quantiles"], dtype=np.float64)
        return out

    def write_intensity_reference(self, site: str, modality: str, quantiles: np.ndarray, n_volumes: int) -> Path:
        """Write the intensity reference of ``site`` and ``modality`` (atomically)."""
        from .checkpoint import write_bytes_atomically

        path = self.group_dir(modality) / "profiles" / intensity_filename(site, modality)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"site": site, "modality": modality, "n_volumes": int(n_volumes),
                           "quantiles": [round(float(q), 6) for q in quantiles]})
        write_bytes_atomically(path, lambda handle: handle.write(text.encode()))
        return path

    def require_target(self, site: str, modality: str) -> None:
        """Raise :class:`WorkflowBuildError` unless ``site`` has a profile for ``modality``."""
        if not (self.group_dir(modality) / "model.pt").is_file():
            raise WorkflowBuildError(
                f"the model {self.root} has no {group_of(modality)} network for {modality}; train it with "
                f"'ihf-bids BIDS_DIR OUTPUT_DIR group --train' on a dataset with {modality} at two or more "
                f"sites, or leave {modality} out with --modalities"
            )
        if site not in self.sites(modality):
            known = ", ".join(self.sites(modality)) or "none"
            raise WorkflowBuildError(
                f"the model {self.root} has no {modality} profile for site {site!r} (sites: {known}); pick "
                "one of those with --target-site, retrain with 'ihf-bids BIDS_DIR OUTPUT_DIR group --train' "
                "including that site's participants, or pass one image with --target-reference"
            )


def find_model(spec: str | Path, output_dir: Path) -> ModelDirectory:
    """Resolve ``--model``: a directory, or a name under ``output_dir/models/``.

    Raises
    ------
    WorkflowBuildError
        When neither exists; the message names the command that trains one.
    """
    candidates = [Path(spec).expanduser(), output_dir / "models" / str(spec)]
    for path in candidates:
        if path.is_dir() and any((path / group / "model.pt").is_file() for group in set(MODEL_GROUPS.values())):
            return ModelDirectory(path.absolute())
    raise WorkflowBuildError(
        f"no trained model {spec!r} (looked in {candidates[0]} and {candidates[1]}); train one with "
        f"'ihf-bids BIDS_DIR {output_dir} group --train' after the participant runs, or pass --model DIR"
    )
