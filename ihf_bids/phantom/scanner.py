"""Image formation at one site: contrast, blur, bias field, scaling and noise.

Order of operations for every image (all in float32):

1. tissue signals from the signal equations with the subject's per-voxel
   T1/T2/PD (texture-modulated tissue values), mixed by the partial-volume
   fractions (signed, so that MPRAGE CSF partially cancels neighbours);
2. the site's effective resolution: anisotropic Gaussian point-spread function;
3. the site's receive-coil profile times a small per-scan variation;
4. the site's global intensity scale (vendor units);
5. Rician noise: complex Gaussian noise, then the magnitude;
6. brain extraction with the subject's brain mask (images are skull-stripped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import SubjectAnatomy
from .sites import BIAS_FIELD_CENTRE_MM, BIAS_FIELD_EXTENT_MM, AnatProtocol, DwiProtocol, SiteProtocol
from .tissues import TISSUES, mprage_signal, spgr_signal, spin_echo_signal

__all__ = ["GradientTable", "bias_field", "gradient_table", "render_anat", "render_dwi"]

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
_TISSUE_ORDER = ("GM", "WM", "CSF")


@dataclass(frozen=True, eq=False)
class GradientTable:
    """Diffusion encoding of a DWI series.

    Attributes
    ----------
    bvals : numpy.ndarray
        b-values (s/mm^2) as written, one per volume.
    bvecs : numpy.ndarray
        Unit gradient directions in RAS world axes, shape ``(n, 3)``; zero for b=0.
    """

    bvals: np.ndarray
    bvecs: np.ndarray


def bias_field(
    coefficients: dict[str, float], shape: tuple[int, ...], affine: np.ndarray, gain: float = 1.0
) -> np.ndarray:
    """Multiplicative bias field ``gain * exp(sum_ijk c_ijk P_i(x) P_j(y) P_k(z))``.

    Parameters
    ----------
    coefficients : dict of str to float
        Product-Legendre coefficients keyed by degrees (``"201"`` is
        ``P2(x) P0(y) P1(z)``), over coordinates normalised by
        :data:`~ihf_bids.phantom.sites.BIAS_FIELD_EXTENT_MM`.
    shape : tuple of int
        Grid shape.
    affine : numpy.ndarray
        Axis-aligned voxel-to-world affine.
    gain : float, default=1.0
        Global multiplicative gain.

    Returns
    -------
    numpy.ndarray
        ``float32`` field of ``shape``.
    """
    from numpy.polynomial import legendre

    axes = []
    for axis in range(3):
        world = affine[axis, axis] * np.arange(shape[axis]) + affine[axis, 3]
        u = (world - BIAS_FIELD_CENTRE_MM[axis]) / BIAS_FIELD_EXTENT_MM[axis]
        axes.append([legendre.legval(u, [0] * d + [1]) for d in range(4)])
    log_field = np.zeros(shape, dtype=np.float64)
    for key, value in coefficients.items():
        i, j, k = (int(c) for c in key)
        log_field += value * axes[0][i][:, None, None] * axes[1][j][None, :, None] * axes[2][k][None, None, :]
    return (gain * np.exp(log_field)).astype(np.float32)


def scan_bias_coefficients(site: SiteProtocol, rng: np.random.Generator) -> tuple[dict[str, float], float]:
    """The site's coil profile plus this scan's small random variation.

    Returns
    -------
    coefficients : dict of str to float
        Bias polynomial coefficients of this scan.
    gain : float
        Global gain of this scan (about 1).
    """
    coefficients = dict(site.bias_coefficients)
    for key in ("100", "010", "001"):
        coefficients[key] = coefficients.get(key, 0.0) + float(rng.normal(0.0, site.bias_scan_variation))
    gain = float(np.exp(rng.normal(0.0, site.bias_scan_variation)))
    return coefficients, gain


def _psf_sigma_voxels(fwhm_mm: tuple[float, float, float], voxel_size: float) -> list[float]:
    """Extra Gaussian sigma (voxels) beyond the grid's own voxel size."""
    return [
        float(np.sqrt(max(f * f - voxel_size * voxel_size, 0.0)) * _FWHM_TO_SIGMA / voxel_size) for f in fwhm_mm
    ]


def _blur(image: np.ndarray, fwhm_mm: tuple[float, float, float], voxel_size: float) -> np.ndarray:
    from scipy import ndimage

    sigma = _psf_sigma_voxels(fwhm_mm, voxel_size)
    if max(sigma) < 0.05:
        return image
    sigma = [s if s >= 0.05 else 0.0 for s in sigma]
    return ndimage.gaussian_filter(image, sigma, mode="constant", truncate=3.0)


def _anat_tissue_signal(protocol: AnatProtocol, pd, t1, t2, t2star) -> np.ndarray:
    if protocol.sequence == "MPRAGE":
        return mprage_signal(
            pd, t1, t2star,
            repetition_time=protocol.repetition_time,
            inversion_time=float(protocol.inversion_time),  # type: ignore[arg-type]
            echo_spacing=float(protocol.echo_spacing),  # type: ignore[arg-type]
            readout_pulses=int(protocol.readout_pulses),  # type: ignore[arg-type]
            flip_angle=protocol.flip_angle,
            echo_time=protocol.echo_time,
        )  # fmt: skip
    if protocol.sequence == "SPGR":
        return spgr_signal(pd, t1, t2star, repetition_time=protocol.repetition_time,
                           echo_time=protocol.echo_time, flip_angle=protocol.flip_angle)  # fmt: skip
    if protocol.sequence == "TSE":
        return spin_echo_signal(pd, t1, t2, repetition_time=protocol.repetition_time, echo_time=protocol.echo_time)
    raise ValueError(f"unknown anatomical sequence {protocol.sequence!r}")


def reference_signal(protocol: AnatProtocol) -> float:
    """Signal of pure, unmodulated white matter for an anatomical protocol."""
    wm = TISSUES["WM"]
    return float(abs(_anat_tissue_signal(protocol, wm.pd, wm.t1, wm.t2, wm.t2star)))


def render_anat(
    anatomy: SubjectAnatomy,
    site: SiteProtocol,
    modality: str,
    voxel_size: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """Simulate a T1w or T2w image of a subject at a site.

    Parameters
    ----------
    anatomy : SubjectAnatomy
        Tissue maps on the anatomical grid.
    site : SiteProtocol
        The site.
    modality : {"T1w", "T2w"}
        Which anatomical protocol of the site.
    voxel_size : float
        Grid voxel size (mm).
    rng : numpy.random.Generator
        Per-scan random source (bias variation and noise).

    Returns
    -------
    image : numpy.ndarray
        ``float32`` magnitude image in the site's units, zero outside the brain.
    scan : dict
        This scan's bias coefficients, gain and noise standard deviation.
    """
    protocol = site.t1w if modality == "T1w" else site.t2w
    shape = anatomy.gm.shape
    inside = anatomy.brain > 0.01
    mod = {k: v[inside] for k, v in anatomy.modulation.items()}
    clean = np.zeros(shape, dtype=np.float32)
    values = np.zeros(int(inside.sum()), dtype=np.float32)
    for name, fraction in zip(_TISSUE_ORDER, (anatomy.gm, anatomy.wm, anatomy.csf)):
        tissue = TISSUES[name]
        signal = _anat_tissue_signal(
            protocol, tissue.pd * mod["pd"], tissue.t1 * mod["t1"], tissue.t2 * mod["t2"], tissue.t2star * mod["t2"]
        )
        values += fraction[inside] * signal.astype(np.float32)
    clean[inside] = values
    return _acquire(clean, anatomy, site, protocol.psf_fwhm_mm, protocol.snr, protocol.intensity_scale,
                    reference_signal(protocol), voxel_size, rng)  # fmt: skip


def _acquire(
    clean: np.ndarray,
    anatomy: SubjectAnatomy,
    site: SiteProtocol,
    psf_fwhm_mm: tuple[float, float, float],
    snr: float,
    intensity_scale: float,
    reference: float,
    voxel_size: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """Blur, bias, scale, add Rician noise and brain-extract one volume or a 4-D series."""
    coefficients, gain = scan_bias_coefficients(site, rng)
    bias = bias_field(coefficients, anatomy.gm.shape, anatomy.affine, gain)
    scale = np.float32(intensity_scale / reference)
    sigma = np.float32(intensity_scale / snr)
    mask = anatomy.brain > 0.5
    n_inside = int(mask.sum())
    volumes = clean[..., None] if clean.ndim == 3 else clean
    out = np.zeros(volumes.shape, dtype=np.float32)
    for v in range(volumes.shape[-1]):
        signal = _blur(volumes[..., v], psf_fwhm_mm, voxel_size) * bias * scale
        real = signal[mask] + sigma * rng.standard_normal(n_inside, dtype=np.float32)
        imag = sigma * rng.standard_normal(n_inside, dtype=np.float32)
        out[..., v][mask] = np.hypot(real, imag)
    scan = {
        "bias_coefficients": {k: round(v, 5) for k, v in coefficients.items()},
        "bias_gain": round(gain, 5),
        "noise_sigma": round(float(sigma), 4),
    }
    return (out[..., 0] if clean.ndim == 3 else out), scan


def gradient_table(protocol: DwiProtocol, rng: np.random.Generator) -> GradientTable:
    """The site's diffusion gradient table.

    Each shell gets its own set of directions spread over the hemisphere by
    electrostatic repulsion (antipodally symmetric charges); b=0 volumes are
    the first volume and then evenly interleaved.

    Parameters
    ----------
    protocol : DwiProtocol
        The diffusion protocol.
    rng : numpy.random.Generator
        Source of the initial charge positions and b-value jitter (seed it per
        site so that a site always uses the same table).

    Returns
    -------
    GradientTable
        b-values and unit directions (world RAS axes), one per volume.
    """
    bvals: list[float] = []
    bvecs: list[np.ndarray] = []
    for shell, n_dirs in zip(protocol.shells, protocol.directions_per_shell):
        directions = _repelled_directions(int(n_dirs), rng)
        jitter = np.zeros(n_dirs)
        if protocol.bvalue_jitter > 0:
            steps = int(protocol.bvalue_jitter // 5)
            jitter = 5.0 * rng.integers(-steps, steps + 1, size=n_dirs)
        bvals.extend(float(shell + j) for j in jitter)
        bvecs.extend(directions)
    weighted = len(bvals)
    # Interleave b=0 volumes: one first, the rest evenly through the series.
    b0_positions = [0] + [int(round(k * weighted / protocol.n_b0)) for k in range(1, protocol.n_b0)]
    all_bvals: list[float] = []
    all_bvecs: list[np.ndarray] = []
    cursor = 0
    for position in range(weighted + 1):
        while b0_positions and b0_positions[0] == position:
            b0_positions.pop(0)
            all_bvals.append(0.0)
            all_bvecs.append(np.zeros(3))
        if position < weighted:
            all_bvals.append(bvals[cursor])
            all_bvecs.append(bvecs[cursor])
            cursor += 1
    return GradientTable(bvals=np.asarray(all_bvals), bvecs=np.asarray(all_bvecs, dtype=np.float64))


def _repelled_directions(n: int, rng: np.random.Generator, iterations: int = 400) -> list[np.ndarray]:
    """``n`` unit vectors spread over the sphere, ``v`` and ``-v`` counting as one axis.

    Each direction repels every other direction and its antipode with a
    Coulomb force; points move along the tangential force and are projected
    back onto the sphere.
    """
    points = rng.standard_normal((n, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    step = 0.3 / np.sqrt(n)
    others = ~np.eye(n, dtype=bool)
    for _ in range(iterations):
        force = np.zeros_like(points)
        for sign in (1.0, -1.0):
            diff = points[:, None, :] - sign * points[None, :, :]
            dist = np.linalg.norm(diff, axis=2)
            weight = np.where(others, 1.0 / np.maximum(dist, 1e-9) ** 3, 0.0)
            force += (diff * weight[..., None]).sum(axis=1)
        force -= (force * points).sum(axis=1, keepdims=True) * points
        largest = float(np.linalg.norm(force, axis=1).max())
        points += step * force / max(largest, 1e-12)
        points /= np.linalg.norm(points, axis=1, keepdims=True)
    # Put every direction on the upper (z >= 0) hemisphere, as scanners tend to.
    points *= np.where(points[:, 2:3] < 0, -1.0, 1.0)
    return list(points)


def render_dwi(
    anatomy: SubjectAnatomy,
    fibres: np.ndarray,
    diffusivities: dict[str, tuple[float, float]],
    site: SiteProtocol,
    table: GradientTable,
    voxel_size: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """Simulate a DWI series of a subject at a site.

    Signal per tissue: ``S0_t exp(-b g^T D_t g)`` with a cylindrically
    symmetric tensor along the fibre direction for WM and isotropic GM/CSF
    tensors; ``S0_t`` is the spin-echo signal at the site's TR/TE.

    Parameters
    ----------
    anatomy : SubjectAnatomy
        Tissue maps on the DWI grid.
    fibres : numpy.ndarray
        Unit fibre directions on the DWI grid, shape ``(*grid, 3)``.
    diffusivities : dict of str to (float, float)
        Axial and radial diffusivity (mm^2/s) of each tissue for this subject.
    site : SiteProtocol
        The site.
    table : GradientTable
        The site's gradient table.
    voxel_size : float
        Grid voxel size (mm).
    rng : numpy.random.Generator
        Per-scan random source.

    Returns
    -------
    series : numpy.ndarray
        ``float32`` 4-D series in the site's units, zero outside the brain.
    scan : dict
        This scan's bias coefficients, gain and noise standard deviation.
    """
    protocol = site.dwi
    shape = anatomy.gm.shape
    inside = anatomy.brain > 0.01
    mod = {k: v[inside] for k, v in anatomy.modulation.items()}
    bvals = table.bvals.astype(np.float32)
    bvecs = table.bvecs.astype(np.float32)
    values = np.zeros((int(inside.sum()), bvals.size), dtype=np.float32)
    for name, fraction in zip(_TISSUE_ORDER, (anatomy.gm, anatomy.wm, anatomy.csf)):
        tissue = TISSUES[name]
        s0 = spin_echo_signal(tissue.pd * mod["pd"], tissue.t1 * mod["t1"], tissue.t2 * mod["t2"],
                              repetition_time=protocol.repetition_time, echo_time=protocol.echo_time)  # fmt: skip
        axial, radial = diffusivities[name]
        if axial == radial:
            attenuation = np.exp(-bvals * np.float32(axial))[None, :]
        else:
            cos2 = (fibres[inside] @ bvecs.T) ** 2
            attenuation = np.exp(-bvals[None, :] * (np.float32(radial) + np.float32(axial - radial) * cos2))
        values += (fraction[inside] * s0.astype(np.float32))[:, None] * attenuation
    clean = np.zeros((*shape, bvals.size), dtype=np.float32)
    clean[inside] = values
    wm = TISSUES["WM"]
    reference = float(spin_echo_signal(wm.pd, wm.t1, wm.t2, repetition_time=protocol.repetition_time,
                                       echo_time=protocol.echo_time))  # fmt: skip
    return _acquire(clean, anatomy, site, protocol.psf_fwhm_mm, protocol.snr, protocol.intensity_scale,
                    reference, voxel_size, rng)  # fmt: skip
