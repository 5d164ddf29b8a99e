"""Scanner sites of the traveling phantom: protocols and hardware effects.

Three sites are written by hand after typical 3 T vendor protocols
(``siemens``, ``ge``, ``philips``). Further sites are derived from them by a
seeded variation that depends only on the site's label, so a site is the same
in every phantom dataset whatever the user seed.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .anatomy import BRAIN_CENTRE_MM

__all__ = [
    "AnatProtocol",
    "DwiProtocol",
    "SiteProtocol",
    "site_protocols",
]


@dataclass(frozen=True)
class AnatProtocol:
    """An anatomical acquisition (T1w or T2w) at one site.

    Attributes
    ----------
    sequence : str
        ``"MPRAGE"`` (also Philips TFE), ``"SPGR"`` or ``"TSE"``.
    repetition_time : float
        TR in seconds; for MPRAGE the time between inversions.
    echo_time : float
        TE in seconds (effective TE for TSE).
    flip_angle : float
        Excitation flip angle in degrees.
    inversion_time : float or None
        TI in seconds (inversion to centre of k-space), MPRAGE only.
    echo_spacing : float or None
        Time between readout excitations (s), MPRAGE only.
    readout_pulses : int or None
        Excitations per inversion, MPRAGE only.
    psf_fwhm_mm : tuple of float
        Effective resolution: FWHM (mm) of the Gaussian point-spread function
        along x (left-right), y (posterior-anterior) and z (inferior-superior).
    snr : float
        White-matter signal over the noise standard deviation, per voxel.
    intensity_scale : float
        Stored intensity of pure white matter (arbitrary vendor units).
    """

    sequence: str
    repetition_time: float
    echo_time: float
    flip_angle: float
    psf_fwhm_mm: tuple[float, float, float]
    snr: float
    intensity_scale: float
    inversion_time: float | None = None
    echo_spacing: float | None = None
    readout_pulses: int | None = None


@dataclass(frozen=True)
class DwiProtocol:
    """A diffusion-weighted spin-echo EPI acquisition at one site.

    Attributes
    ----------
    repetition_time, echo_time : float
        TR and TE in seconds.
    shells : tuple of float
        Nominal b-values (s/mm^2) of the diffusion-weighted shells.
    directions_per_shell : tuple of int
        Number of gradient directions of each shell.
    n_b0 : int
        Number of b=0 volumes (the first volume is always a b=0).
    bvalue_jitter : float
        Largest deviation (s/mm^2) of a written b-value from its shell,
        rounded to multiples of 5 as scanners report them; 0 for exact values.
    psf_fwhm_mm : tuple of float
        Effective resolution (FWHM in mm along x, y, z).
    snr : float
        White-matter b=0 signal over the noise standard deviation, per voxel.
    intensity_scale : float
        Stored b=0 intensity of pure white matter (arbitrary vendor units).
    """

    repetition_time: float
    echo_time: float
    shells: tuple[float, ...]
    directions_per_shell: tuple[int, ...]
    n_b0: int
    bvalue_jitter: float
    psf_fwhm_mm: tuple[float, float, float]
    snr: float
    intensity_scale: float

    @property
    def n_volumes(self) -> int:
        """Total number of volumes."""
        return self.n_b0 + int(sum(self.directions_per_shell))


@dataclass(frozen=True)
class SiteProtocol:
    """Everything that makes one site's images differ from another's.

    Attributes
    ----------
    label : str
        Site label, also the BIDS session label (``ses-<label>``).
    manufacturer, model, institution, receive_coil : str
        Scanner description written to the JSON sidecars.
    t1w, t2w : AnatProtocol
        Anatomical protocols.
    dwi : DwiProtocol
        Diffusion protocol.
    bias_coefficients : dict
        The site's receive-coil profile: coefficients of a product-Legendre
        polynomial (keys ``"ijk"`` = degrees in x, y, z) of the log bias field,
        over coordinates normalised by :data:`BIAS_FIELD_EXTENT_MM`.
    bias_scan_variation : float
        Standard deviation of the per-scan random change of the first-order
        coefficients and of the log gain.
    """

    label: str
    manufacturer: str
    model: str
    institution: str
    receive_coil: str
    t1w: AnatProtocol
    t2w: AnatProtocol
    dwi: DwiProtocol
    bias_coefficients: dict[str, float] = field(default_factory=dict)
    bias_scan_variation: float = 0.02

    def to_dict(self) -> dict:
        """JSON-ready dictionary of the protocol (times in s, angles in degrees)."""
        out = asdict(self)
        out["dwi"]["n_volumes"] = self.dwi.n_volumes
        return out


#: Centre and half extent (mm, MNI) of the box over which the bias polynomial's
#: coordinates run from -1 to 1 (about the extent of the brain).
BIAS_FIELD_CENTRE_MM = BRAIN_CENTRE_MM
BIAS_FIELD_EXTENT_MM = (70.0, 90.0, 75.0)

_BASE_SITES: tuple[SiteProtocol, ...] = (
    SiteProtocol(
        label="siemens",
        manufacturer="Siemens",
        model="Prisma",
        institution="Traveling Phantom Site A (simulated)",
        receive_coil="Head_32",
        t1w=AnatProtocol("MPRAGE", repetition_time=2.3, echo_time=0.00298, flip_angle=9.0,
                         inversion_time=0.9, echo_spacing=0.0071, readout_pulses=176,
                         psf_fwhm_mm=(1.0, 1.0, 1.0), snr=40.0, intensity_scale=450.0),
        t2w=AnatProtocol("TSE", repetition_time=3.2, echo_time=0.100, flip_angle=120.0,
                         psf_fwhm_mm=(1.0, 1.0, 1.0), snr=30.0, intensity_scale=160.0),
        dwi=DwiProtocol(repetition_time=3.4, echo_time=0.089, shells=(1000.0, 2000.0),
                        directions_per_shell=(30, 30), n_b0=2, bvalue_jitter=10.0,
                        psf_fwhm_mm=(2.0, 2.0, 2.0), snr=25.0, intensity_scale=350.0),
        # 32-channel array: brighter cortex near the coils, gentle A-P slope.
        bias_coefficients={"200": 0.06, "020": 0.05, "002": 0.04, "010": -0.05, "001": 0.03},
    ),
    SiteProtocol(
        label="ge",
        manufacturer="GE",
        model="DISCOVERY MR750",
        institution="Traveling Phantom Site B (simulated)",
        receive_coil="8HRBRAIN",
        t1w=AnatProtocol("SPGR", repetition_time=0.022, echo_time=0.004, flip_angle=25.0,
                         psf_fwhm_mm=(1.6, 1.1, 1.1), snr=25.0, intensity_scale=2200.0),
        t2w=AnatProtocol("TSE", repetition_time=5.0, echo_time=0.100, flip_angle=90.0,
                         psf_fwhm_mm=(0.9, 0.9, 2.5), snr=22.0, intensity_scale=1100.0),
        dwi=DwiProtocol(repetition_time=8.0, echo_time=0.075, shells=(1000.0,),
                        directions_per_shell=(45,), n_b0=1, bvalue_jitter=0.0,
                        psf_fwhm_mm=(2.5, 2.5, 2.5), snr=18.0, intensity_scale=1800.0),
        # 8-channel coil, central brightening (dielectric effect), S-I falloff.
        bias_coefficients={"200": -0.07, "020": -0.06, "002": -0.05, "001": 0.09, "100": 0.03},
    ),
    SiteProtocol(
        label="philips",
        manufacturer="Philips",
        model="Achieva dStream",
        institution="Traveling Phantom Site C (simulated)",
        receive_coil="SENSE-Head-32",
        t1w=AnatProtocol("MPRAGE", repetition_time=2.5, echo_time=0.0031, flip_angle=8.0,
                         inversion_time=1.0, echo_spacing=0.0068, readout_pulses=150,
                         psf_fwhm_mm=(1.2, 1.2, 1.2), snr=32.0, intensity_scale=1600.0),
        t2w=AnatProtocol("TSE", repetition_time=3.0, echo_time=0.080, flip_angle=90.0,
                         psf_fwhm_mm=(0.8, 0.8, 3.0), snr=26.0, intensity_scale=900.0),
        dwi=DwiProtocol(repetition_time=7.0, echo_time=0.072, shells=(1000.0,),
                        directions_per_shell=(32,), n_b0=3, bvalue_jitter=5.0,
                        psf_fwhm_mm=(2.2, 2.2, 2.5), snr=22.0, intensity_scale=1200.0),
        # Left-right asymmetry and an anterior-posterior gradient.
        bias_coefficients={"100": -0.07, "010": 0.05, "110": 0.03, "200": 0.03, "002": -0.03},
    ),
)  # fmt: skip

# Scanner models of derived sites, by vendor (cycled through by generation).
_VENDOR_MODELS = {
    "Siemens": ("Skyra", "Vida", "TrioTim"),
    "GE": ("SIGNA Premier", "SIGNA Architect", "DISCOVERY MR750w"),
    "Philips": ("Ingenia", "Ingenia Elition X", "Achieva"),
}


def site_protocols(n_sites: int) -> tuple[SiteProtocol, ...]:
    """The first ``n_sites`` sites of the phantom.

    Sites 1-3 are ``siemens``, ``ge`` and ``philips``; site ``k > 3`` is a
    seeded variation of base site ``(k - 1) % 3`` labelled with the vendor and
    a generation number (``siemens2``, ``ge2``, ``philips2``, ``siemens3``, ...).

    Parameters
    ----------
    n_sites : int
        Number of sites (at least 1).

    Returns
    -------
    tuple of SiteProtocol
        The sites, in order.
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    sites = list(_BASE_SITES[:n_sites])
    for index in range(len(_BASE_SITES), n_sites):
        base = _BASE_SITES[index % len(_BASE_SITES)]
        generation = index // len(_BASE_SITES) + 1
        sites.append(_derive_site(base, f"{base.label}{generation}", index, generation))
    return tuple(sites)


def _derive_site(base: SiteProtocol, label: str, index: int, generation: int) -> SiteProtocol:
    """A new site: the base protocol with seeded, plausible changes."""
    rng = np.random.default_rng([zlib.crc32(label.encode()), 7])

    def jitter(value: float, rel: float) -> float:
        return float(value * (1.0 + rng.uniform(-rel, rel)))

    def psf(fwhm: tuple[float, float, float]) -> tuple[float, float, float]:
        factor = rng.uniform(0.9, 1.3, size=3)
        return tuple(round(float(f * s), 2) for f, s in zip(fwhm, factor))  # type: ignore[return-value]

    def anat(p: AnatProtocol) -> AnatProtocol:
        changes: dict = {
            "repetition_time": round(jitter(p.repetition_time, 0.08), 4),
            "echo_time": round(jitter(p.echo_time, 0.1), 5),
            "flip_angle": round(float(np.clip(p.flip_angle + rng.uniform(-2, 2), 5, 180)), 1),
            "psf_fwhm_mm": psf(p.psf_fwhm_mm),
            "snr": round(jitter(p.snr, 0.3), 1),
            "intensity_scale": round(float(p.intensity_scale * np.exp(rng.normal(0, 0.5))), 1),
        }
        if p.sequence == "MPRAGE":
            assert p.inversion_time and p.echo_spacing and p.readout_pulses
            pulses = int(round(jitter(p.readout_pulses, 0.1)))
            spacing = round(jitter(p.echo_spacing, 0.08), 5)
            half_train = 0.5 * pulses * spacing
            ti = float(np.clip(jitter(p.inversion_time, 0.12), half_train + 0.1, 1.3))
            tr = max(changes["repetition_time"], ti + half_train + 0.3)
            changes.update(inversion_time=round(ti, 4), repetition_time=round(tr, 4),
                           echo_spacing=spacing, readout_pulses=pulses)
        return replace(p, **changes)

    shells_choice = [(1000.0,), (1000.0, 2000.0), (1000.0, 3000.0), (700.0, 1000.0, 2000.0)]
    shells = shells_choice[int(rng.integers(len(shells_choice)))]
    directions = tuple(int(rng.choice([20, 30, 32, 45, 60, 64])) for _ in shells)
    dwi = replace(
        base.dwi,
        repetition_time=round(jitter(base.dwi.repetition_time, 0.15), 3),
        echo_time=round(jitter(base.dwi.echo_time, 0.1), 4),
        shells=shells,
        directions_per_shell=directions,
        n_b0=int(rng.integers(1, 4)),
        psf_fwhm_mm=psf(base.dwi.psf_fwhm_mm),
        snr=round(jitter(base.dwi.snr, 0.3), 1),
        intensity_scale=round(float(base.dwi.intensity_scale * np.exp(rng.normal(0, 0.5))), 1),
    )
    keys = ("100", "010", "001", "200", "020", "002", "110", "101", "011")
    coefficients = {k: round(float(rng.normal(0, 0.045)), 4) for k in keys}
    models = _VENDOR_MODELS[base.manufacturer]
    return replace(
        base,
        label=label,
        model=models[(generation - 2) % len(models)],
        institution=f"Traveling Phantom Site {index + 1} (simulated)",
        t1w=anat(base.t1w),
        t2w=anat(base.t2w),
        dwi=dwi,
        bias_coefficients=coefficients,
    )
