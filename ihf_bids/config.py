"""One run's settings, built by the command line and saved with the outputs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["RunConfig", "resolution_label"]


def resolution_label(voxel_size: float) -> str:
    """The BIDS ``res-`` label of a template grid: ``2``, ``1p5``.

    Examples
    --------
    >>> resolution_label(2.0), resolution_label(1.5)
    ('2', '1p5')
    """
    return f"{voxel_size:g}".replace(".", "p")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes (see ``ihf-bids --help``)."""

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    analysis_level: str
    modalities: tuple[str, ...] = ("T1w", "T2w", "dwi")
    registration: str = "affine"
    anat_resolution: float = 1.0
    dwi_resolution: float = 2.0
    target_site: str | None = None
    target_reference: Path | None = None
    model_dir: Path | None = None
    model_name: str = "ihf-harmony"
    native_outputs: bool = False
    device: str = "auto"
    random_seed: int = 0
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    stop_on_first_crash: bool = False
    site_source: str = "auto"
    site_column: str = "site"
    site_sidecar_fields: tuple[str, ...] = ("Manufacturer", "ManufacturersModelName")
    train_steps: int | None = None
    train_preset: Path | None = None
    qc_baselines: tuple[str, ...] = ("histogram-matching", "combat")
    versions: dict = field(default_factory=dict)

    @property
    def harmonize(self) -> bool:
        """Whether this participant run harmonizes (a target and a model are given)."""
        return self.model_dir is not None and (self.target_site is not None or self.target_reference is not None)

    def to_json(self) -> str:
        """The settings as JSON (paths as strings)."""
        return json.dumps(asdict(self), default=str, indent=2, sort_keys=True)
