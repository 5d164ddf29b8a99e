"""Tissue properties at 3 T and the signal equations of the simulated sequences.

Relaxation times are in seconds, diffusivities in mm^2/s, proton density is
relative to pure water. Sources are given in ``docs/phantom.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "TISSUES",
    "TissueProperties",
    "mprage_signal",
    "spgr_signal",
    "spin_echo_signal",
]


@dataclass(frozen=True)
class TissueProperties:
    """MR properties of one tissue class at 3 T.

    Attributes
    ----------
    name : str
        Tissue label as used in BIDS ``label-`` entities (``GM``, ``WM``, ``CSF``).
    t1, t2, t2star : float
        Longitudinal, transverse and effective transverse relaxation times (s).
    pd : float
        Proton density (water content) relative to pure water.
    axial_diffusivity, radial_diffusivity : float
        Tensor eigenvalues along and across the local fibre direction (mm^2/s);
        equal for isotropic tissue.
    """

    name: str
    t1: float
    t2: float
    t2star: float
    pd: float
    axial_diffusivity: float
    radial_diffusivity: float

    @property
    def fractional_anisotropy(self) -> float:
        """FA of the tissue's own diffusion tensor (no partial volume, no noise)."""
        ev = np.array([self.axial_diffusivity, self.radial_diffusivity, self.radial_diffusivity])
        dev = ev - ev.mean()
        return float(np.sqrt(1.5 * np.sum(dev**2) / np.sum(ev**2)))

    def to_dict(self) -> dict[str, float | str]:
        """JSON-ready dictionary, with the derived FA."""
        out: dict[str, float | str] = dict(asdict(self))
        out["fractional_anisotropy"] = round(self.fractional_anisotropy, 4)
        return out


#: The three simulated tissues, in the order used throughout the phantom.
TISSUES: dict[str, TissueProperties] = {
    "GM": TissueProperties("GM", t1=1.33, t2=0.099, t2star=0.066, pd=0.80,
                           axial_diffusivity=0.80e-3, radial_diffusivity=0.80e-3),
    "WM": TissueProperties("WM", t1=0.83, t2=0.069, t2star=0.053, pd=0.70,
                           axial_diffusivity=1.60e-3, radial_diffusivity=0.45e-3),
    "CSF": TissueProperties("CSF", t1=4.30, t2=1.90, t2star=0.40, pd=1.00,
                            axial_diffusivity=3.00e-3, radial_diffusivity=3.00e-3),
}  # fmt: skip


def spgr_signal(
    pd: np.ndarray | float,
    t1: np.ndarray | float,
    t2star: np.ndarray | float,
    *,
    repetition_time: float,
    echo_time: float,
    flip_angle: float,
) -> np.ndarray:
    """Steady-state spoiled gradient echo (SPGR / FLASH) signal.

    ``S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE / T2*)`` with
    ``E1 = exp(-TR / T1)``.

    Parameters
    ----------
    pd, t1, t2star : array_like
        Proton density and relaxation times (s); broadcast together.
    repetition_time, echo_time : float
        TR and TE in seconds.
    flip_angle : float
        Excitation flip angle in degrees.

    Returns
    -------
    numpy.ndarray
        Signal in units of the fully relaxed magnetisation of pure water.
    """
    alpha = np.deg2rad(flip_angle)
    e1 = np.exp(-repetition_time / np.asarray(t1))
    steady = (1.0 - e1) / (1.0 - np.cos(alpha) * e1)
    return np.asarray(pd * np.sin(alpha) * steady * np.exp(-echo_time / np.asarray(t2star)))


def mprage_signal(
    pd: np.ndarray | float,
    t1: np.ndarray | float,
    t2star: np.ndarray | float,
    *,
    repetition_time: float,
    inversion_time: float,
    echo_spacing: float,
    readout_pulses: int,
    flip_angle: float,
    echo_time: float,
    inversion_efficiency: float = 0.96,
) -> np.ndarray:
    """Signed MPRAGE / TFE signal at the centre of k-space (linear ordering).

    One cycle: adiabatic inversion, free recovery for ``TI - n/2 * esp``, a
    train of ``n`` low flip-angle excitations spaced by the echo spacing,
    free recovery until the next inversion ``TR`` after the previous one. The
    longitudinal magnetisation before the inversion is solved for its steady
    state (Deichmann et al., 2000); the signal is taken at the train's middle
    excitation. The sign is kept (CSF can be negative) so that partial-volume
    mixing and noise can be applied before taking the magnitude.

    Parameters
    ----------
    pd, t1, t2star : array_like
        Proton density and relaxation times (s); broadcast together.
    repetition_time : float
        Time between two inversions (s).
    inversion_time : float
        Time from the inversion to the centre of k-space (s).
    echo_spacing : float
        Time between excitations of the readout train (s).
    readout_pulses : int
        Number of excitations per train.
    flip_angle : float
        Readout flip angle in degrees.
    echo_time : float
        Echo time (s).
    inversion_efficiency : float, default=0.96
        Fraction of the magnetisation inverted by the inversion pulse.

    Returns
    -------
    numpy.ndarray
        Signed signal in units of the fully relaxed magnetisation of pure water.
    """
    t1 = np.asarray(t1)
    alpha = np.deg2rad(flip_angle)
    half_train = 0.5 * readout_pulses * echo_spacing
    delay_before = inversion_time - half_train
    delay_after = repetition_time - inversion_time - half_train
    if delay_before <= 0 or delay_after <= 0:
        raise ValueError("MPRAGE timing is inconsistent: the readout train does not fit in TI/TR")
    e1 = np.exp(-echo_spacing / t1)
    decay = np.cos(alpha) * e1  # per-excitation factor of the train
    m_train_limit = (1.0 - e1) / (1.0 - decay)
    e_before = np.exp(-delay_before / t1)
    e_after = np.exp(-delay_after / t1)
    decay_train = decay**readout_pulses

    # Longitudinal magnetisation just before an inversion, m, maps linearly
    # onto its value one cycle later: m -> a + b * m. Its fixed point is the
    # steady state.
    def start_of_train(m_before_inversion: np.ndarray | float) -> np.ndarray:
        return 1.0 - (1.0 + inversion_efficiency * np.asarray(m_before_inversion)) * e_before

    def after_cycle(m_start: np.ndarray) -> np.ndarray:
        m_end = m_train_limit + (m_start - m_train_limit) * decay_train
        return 1.0 - (1.0 - m_end) * e_after

    a = after_cycle(start_of_train(0.0))
    b = after_cycle(start_of_train(1.0)) - a
    m_steady = a / (1.0 - b)
    m_start = start_of_train(m_steady)
    m_centre = m_train_limit + (m_start - m_train_limit) * decay ** (readout_pulses // 2)
    return np.asarray(pd * np.sin(alpha) * m_centre * np.exp(-echo_time / np.asarray(t2star)))


def spin_echo_signal(
    pd: np.ndarray | float,
    t1: np.ndarray | float,
    t2: np.ndarray | float,
    *,
    repetition_time: float,
    echo_time: float,
) -> np.ndarray:
    """Spin-echo / turbo spin-echo signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``.

    Parameters
    ----------
    pd, t1, t2 : array_like
        Proton density and relaxation times (s); broadcast together.
    repetition_time, echo_time : float
        TR and (effective) TE in seconds.

    Returns
    -------
    numpy.ndarray
        Signal in units of the fully relaxed magnetisation of pure water.
    """
    t1 = np.asarray(t1)
    recovery = 1.0 - np.exp(-repetition_time / t1)
    return np.asarray(pd * recovery * np.exp(-echo_time / np.asarray(t2)))
