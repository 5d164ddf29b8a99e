"""Per-session head position of the traveling phantom.

A traveling subject lies differently in every scanner. The phantom draws, for every
session (subject x site), a rigid head motion: a rotation of a few degrees about the
brain centre and a translation of a few millimetres. It is applied to the image
*headers* only (an oblique prescription that follows the head): the voxel data are
those of the template-aligned rendering, and the affine of every image of the session
becomes ``M @ grid_affine``, where ``M`` maps the template (truth) world coordinates of
an anatomical point to its scanner world coordinates in that session.

Examples
--------
>>> import numpy as np
>>> motion = draw_head_motion(np.random.default_rng(0))
>>> bool(HEAD_ROTATION_RANGE_DEG[0] <= motion.rotation_deg <= HEAD_ROTATION_RANGE_DEG[1])
True
>>> m = motion.matrix
>>> bool(np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3)))
True
>>> centre = np.array([*HEAD_MOTION_CENTRE_MM, 1.0])
>>> bool(np.allclose((m @ centre)[:3] - centre[:3], motion.translation_mm))
True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "HEAD_MOTION_CENTRE_MM",
    "HEAD_ROTATION_RANGE_DEG",
    "HEAD_TRANSLATION_MAX_MM",
    "HEAD_TRANSLATION_RANGE_MM",
    "HeadMotion",
    "draw_head_motion",
    "read_head_motion",
]

#: Centre of the rotation (MNI152 2009a world mm): roughly the centre of the cerebrum, near
#: the thalami. The template grid is centred on (0, -18, 22) mm; the centroid of the whole
#: brain mask (with cerebellum and brainstem) is near (0, -22, 10) mm.
HEAD_MOTION_CENTRE_MM: tuple[float, float, float] = (0.0, -18.0, 18.0)
#: Range of the rotation angle (degrees), drawn uniformly; the axis is uniform on the sphere.
HEAD_ROTATION_RANGE_DEG: tuple[float, float] = (2.0, 6.0)
#: Each translation component is uniform in [-x, x] mm ...
HEAD_TRANSLATION_RANGE_MM: float = 6.0
#: ... and the translation vector is shortened to this length (mm) if it is longer.
HEAD_TRANSLATION_MAX_MM: float = 10.0

_TRUTH_FILE = Path("derivatives", "phantom", "phantom.json")


@dataclass(frozen=True)
class HeadMotion:
    """A rigid head motion: rotation about ``centre_mm``, then translation.

    Attributes
    ----------
    rotation_deg : float
        Rotation angle in degrees (right-handed about ``rotation_axis``).
    rotation_axis : tuple of float
        Unit rotation axis in world (RAS) axes.
    translation_mm : tuple of float
        Displacement of the rotation centre (world mm).
    centre_mm : tuple of float
        Centre of the rotation (template world mm).
    """

    rotation_deg: float
    rotation_axis: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float] = HEAD_MOTION_CENTRE_MM

    @property
    def matrix(self) -> np.ndarray:
        """The 4x4 world->world matrix ``M``: ``x_scanner = R (x - c) + c + t``."""
        k = np.asarray(self.rotation_axis, dtype=float)
        k = k / np.linalg.norm(k)
        angle = np.deg2rad(self.rotation_deg)
        cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
        rotation = np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * np.outer(k, k)
        centre = np.asarray(self.centre_mm, dtype=float)
        out = np.eye(4)
        out[:3, :3] = rotation
        out[:3, 3] = centre - rotation @ centre + np.asarray(self.translation_mm, dtype=float)
        return out

    def to_dict(self) -> dict:
        """The ``head_motion`` record of ``phantom.json``."""
        return {
            "world_to_scanner": self.matrix.tolist(),
            "rotation_deg": self.rotation_deg,
            "rotation_axis": list(self.rotation_axis),
            "translation_mm": list(self.translation_mm),
            "centre_mm": list(self.centre_mm),
        }


def draw_head_motion(rng: np.random.Generator) -> HeadMotion:
    """Draw one session's head motion.

    The axis is uniform on the sphere (a normalised 3-D Gaussian), so both senses of
    rotation are equally likely; the angle is uniform in :data:`HEAD_ROTATION_RANGE_DEG`.
    Each translation component is uniform in ``[-6, 6]`` mm
    (:data:`HEAD_TRANSLATION_RANGE_MM`), and the vector is shortened to
    :data:`HEAD_TRANSLATION_MAX_MM` (10 mm) if it is longer.

    Parameters
    ----------
    rng : numpy.random.Generator
        The session's own random stream.

    Returns
    -------
    HeadMotion
        The drawn motion, about :data:`HEAD_MOTION_CENTRE_MM`.
    """
    axis = rng.normal(size=3)
    axis = axis / np.linalg.norm(axis)
    angle = float(rng.uniform(*HEAD_ROTATION_RANGE_DEG))
    shift = rng.uniform(-HEAD_TRANSLATION_RANGE_MM, HEAD_TRANSLATION_RANGE_MM, size=3)
    length = float(np.linalg.norm(shift))
    if length > HEAD_TRANSLATION_MAX_MM:
        shift = shift * (HEAD_TRANSLATION_MAX_MM / length)
    return HeadMotion(
        rotation_deg=angle,
        rotation_axis=(float(axis[0]), float(axis[1]), float(axis[2])),
        translation_mm=(float(shift[0]), float(shift[1]), float(shift[2])),
    )


def read_head_motion(dataset_root: str | os.PathLike[str], subject: str, site: str) -> np.ndarray:
    """The head motion ``M`` of one session of an existing phantom dataset.

    Reads ``derivatives/phantom/phantom.json``. ``M`` maps template (truth) world
    coordinates to the session's scanner world coordinates: the affine of each of the
    session's images is ``M @ grid_affine``, and ``M @ truth_affine`` puts a truth map
    onto the session's images voxel for voxel.

    Parameters
    ----------
    dataset_root : path-like
        Root of the phantom BIDS dataset.
    subject : str
        Participant label, with or without ``sub-``.
    site : str
        Site (= session) label, with or without ``ses-``.

    Returns
    -------
    numpy.ndarray
        4x4 ``float64`` matrix; the identity for a dataset written without head
        motion (no ``head_motion`` record).

    Raises
    ------
    FileNotFoundError
        If the dataset has no ``phantom.json``.
    KeyError
        If the subject or session is not in it.
    """
    path = Path(dataset_root) / _TRUTH_FILE
    record = json.loads(path.read_text(encoding="utf-8"))
    sub = subject if subject.startswith("sub-") else f"sub-{subject}"
    ses = site if site.startswith("ses-") else f"ses-{site}"
    subjects = record.get("subjects", {})
    if sub not in subjects:
        raise KeyError(f"{sub} is not in {path}")
    sessions = subjects[sub].get("sessions", {})
    if ses not in sessions:
        raise KeyError(f"{sub}/{ses} is not in {path}")
    motion = sessions[ses].get("head_motion")
    if motion is None:
        return np.eye(4)
    matrix = np.asarray(motion["world_to_scanner"], dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"{path}: {sub}/{ses} head_motion.world_to_scanner is not a 4x4 matrix")
    return matrix
