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
        """The settings as JSON (paths as strings), with what a re-run needs to compare.

        Besides the fields (``random_seed``, ``versions`` of the libraries, ``device`` as
        asked...), ``network_device`` is the device the network runs on here (``cpu`` or
        ``cuda (<GPU name>)``): bit-identical re-runs need the same seed, ``omp_nthreads``,
        versions and device.
        """
        fields = asdict(self)
        fields["network_device"] = _network_device(self.device)
        return json.dumps(fields, default=str, indent=2, sort_keys=True)


def _network_device(device: str) -> str:
    """What ``device`` resolves to on this machine, as sidecars name it; the error text if it cannot."""
    from .harmonize.device import resolve_device
    from .harmonize.files import device_description

    try:
        return device_description(resolve_device(device))
    except Exception as err:  # noqa: BLE001 - a record, never a reason to fail the run
        return f"unavailable ({err.__class__.__name__}: {err})"
