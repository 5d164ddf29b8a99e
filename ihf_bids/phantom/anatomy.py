"""Subject anatomy of the traveling phantom: atrophy, deformation, texture, fibres.

A subject is the MNI152 2009a template with

* age-related atrophy applied in template space (grey matter thinned from its
  CSF side, ventricles dilated into the surrounding white matter),
* a smooth random deformation (global scaling plus a cubic B-spline
  free-form deformation of a few mm),
* smooth, subject-specific "texture" fields that modulate T1, T2 and PD by a
  few percent within each tissue.

All random fields are defined in world (MNI mm) coordinates, so they can be
evaluated on any template-aligned grid and agree between grids.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BSplineField",
    "SubjectAnatomy",
    "SubjectSpec",
    "atrophy_index",
    "fibre_directions",
    "make_subject_anatomy",
]

# Control-point spacing (mm) and standard deviation (mm) of the free-form deformation.
DEFORMATION_SPACING_MM = 24.0
DEFORMATION_STD_MM = 1.4
# Standard deviation of the global (isotropic) head-size scaling, and its centre (MNI mm).
HEAD_SCALE_STD = 0.03
BRAIN_CENTRE_MM = (0.0, -18.0, 8.0)
# Texture: control-point spacing (mm) and relative standard deviation.
TEXTURE_SPACING_MM = 12.0
TEXTURE_STD = 0.03
# Atrophy at atrophy index 1 (about age 80): fraction of GM volume lost, and
# how far (mm) the ventricle walls move outwards.
GM_LOSS_AT_FULL_ATROPHY = 0.14
VENTRICLE_DILATION_MM = 2.0
# CSF deeper than this below the brain surface counts as ventricular.
VENTRICLE_DEPTH_MM = 14.0
_WORLD_BOX_MIN = np.array([-110.0, -146.0, -84.0])  # template FOV plus margin
_WORLD_BOX_MAX = np.array([110.0, 112.0, 130.0])
_BSPLINE_SQUARED_INTEGRAL = 151.0 / 315.0  # integral of the cubic B-spline squared


@dataclass(frozen=True)
class SubjectSpec:
    """Who a phantom subject is.

    Attributes
    ----------
    label : str
        Participant label without ``sub-``.
    index : int
        Zero-based subject index.
    age : float
        Age in years.
    sex : str
        ``"F"`` or ``"M"``.
    atrophy : float
        Atrophy index (0 at 20 years, about 1 at 80 years).
    head_scale : float
        Global isotropic scaling of the template.
    deformation_seed : int
        Seed of the subject's free-form deformation and texture fields.
    sessions : tuple of str
        Site labels in scanning order; the first is the home site.
    """

    label: str
    index: int
    age: float
    sex: str
    atrophy: float
    head_scale: float
    deformation_seed: int
    sessions: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class SubjectAnatomy:
    """Tissue maps of one subject on a template-aligned grid.

    Use :meth:`resampled` to get the same subject on another grid.

    Attributes
    ----------
    gm, wm, csf, brain : numpy.ndarray
        Tissue probabilities and brain fraction (``float32``).
    affine : numpy.ndarray
        Voxel-to-world affine of the grid.
    texture : dict of str to BSplineField
        Relative modulation fields of ``"t1"``, ``"t2"`` and ``"pd"``.
    volumes_ml : dict of str to float
        Tissue volumes (GM, WM, CSF, ventricles) in millilitres.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    texture: dict[str, BSplineField]
    volumes_ml: dict[str, float]

    @functools.cached_property
    def modulation(self) -> dict[str, np.ndarray]:
        """Relative factors (about 1) of T1, T2 and PD on this grid, ``float32``."""
        return {name: 1.0 + f.evaluate(self.gm.shape, self.affine)[0] for name, f in self.texture.items()}

    def resampled(self, shape: tuple[int, int, int], affine: np.ndarray) -> SubjectAnatomy:
        """The same subject on another template-aligned grid (anti-aliased linear resampling)."""
        from ..templates import resample_to_grid

        def resample(volume: np.ndarray) -> np.ndarray:
            return np.clip(resample_to_grid(volume, self.affine, shape, affine), 0.0, 1.0)

        return SubjectAnatomy(
            gm=resample(self.gm),
            wm=resample(self.wm),
            csf=resample(self.csf),
            brain=resample(self.brain),
            affine=np.asarray(affine, dtype=float),
            texture=self.texture,
            volumes_ml=self.volumes_ml,
        )


class BSplineField:
    """A smooth random scalar or vector field: a cubic B-spline in world space.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the control-point coefficients.
    spacing_mm : float
        Control-point spacing.
    std : float
        Approximate standard deviation of each component.
    n_components : int, default=1
        1 for a scalar field, 3 for a displacement field.
    """

    def __init__(self, rng: np.random.Generator, spacing_mm: float, std: float, n_components: int = 1):
        self.spacing = float(spacing_mm)
        self.origin = _WORLD_BOX_MIN - self.spacing
        n = np.ceil((_WORLD_BOX_MAX - _WORLD_BOX_MIN) / self.spacing).astype(int) + 3
        scale = std / np.sqrt(_BSPLINE_SQUARED_INTEGRAL**3)
        self.coefficients = (rng.standard_normal((n_components, *n)) * scale).astype(np.float64)

    def evaluate(self, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
        """Field values on an axis-aligned grid.

        Parameters
        ----------
        shape : tuple of int
            Grid shape (3-D).
        affine : numpy.ndarray
            Voxel-to-world affine; must be diagonal in its 3x3 part.

        Returns
        -------
        numpy.ndarray
            ``float32`` array of shape ``(n_components, *shape)``.
        """
        if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
            raise ValueError("BSplineField.evaluate needs an axis-aligned grid")
        bases = []
        for axis in range(3):
            world = affine[axis, axis] * np.arange(shape[axis]) + affine[axis, 3]
            t = (world - self.origin[axis]) / self.spacing
            knots = np.arange(self.coefficients.shape[axis + 1])
            bases.append(_cubic_bspline(t[:, None] - knots[None, :]))
        out = np.empty((self.coefficients.shape[0], *shape), dtype=np.float32)
        for component, coefficients in enumerate(self.coefficients):
            field = np.tensordot(bases[0], coefficients, axes=(1, 0))  # (x, b, k)
            field = np.tensordot(field, bases[1], axes=(1, 1))  # (x, k, y)
            field = np.tensordot(field, bases[2], axes=(1, 1))  # (x, y, z)
            out[component] = field
        return out


def _cubic_bspline(x: np.ndarray) -> np.ndarray:
    """Centred cubic B-spline kernel."""
    ax = np.abs(x)
    out = np.where(ax < 1.0, 2.0 / 3.0 - ax**2 + 0.5 * ax**3, 0.0)
    return np.where((ax >= 1.0) & (ax < 2.0), (2.0 - ax) ** 3 / 6.0, out)


def atrophy_index(age: float) -> float:
    """Population atrophy index for an age: 0 at 20 years, 1 at 80 years."""
    return float(np.clip((age - 20.0) / 60.0, 0.0, 1.3))


def make_subject_anatomy(spec: SubjectSpec, template) -> SubjectAnatomy:
    """Tissue maps of a subject on the grid of a template.

    Parameters
    ----------
    spec : SubjectSpec
        The subject.
    template : ihf_bids.templates.TemplateImages
        Template on the grid to use.

    Returns
    -------
    SubjectAnatomy
        The subject's tissue maps on the template's grid.
    """
    from scipy import ndimage

    voxel = float(template.voxel_size)
    gm, wm, csf = (np.array(a, dtype=np.float32) for a in (template.gm, template.wm, template.csf))
    brain = np.array(template.brain_mask, dtype=np.float32)
    rng = np.random.default_rng(spec.deformation_seed)

    # --- atrophy, in template space ------------------------------------- #
    ventricles = _ventricle_map(csf, brain, voxel)
    if spec.atrophy > 0:
        # Grey matter thins from its CSF side: loss weighted by nearby non-tissue.
        outside = np.clip(1.0 - gm - wm, 0.0, 1.0)
        near_csf = ndimage.gaussian_filter(outside, 1.5 / voxel, truncate=3.0)
        loss = gm * np.clip(near_csf, 0.0, 1.0)
        target = GM_LOSS_AT_FULL_ATROPHY * spec.atrophy * float(gm.sum())
        loss *= np.float32(target / max(float(loss.sum()), 1e-6))
        loss = np.minimum(loss, 0.9 * gm)
        gm -= loss
        csf += loss
        # Ventricles dilate into the surrounding tissue by up to the atrophy radius.
        radius = VENTRICLE_DILATION_MM * spec.atrophy
        distance = ndimage.distance_transform_edt(ventricles < 0.5) * voxel
        # distance is measured between voxel centres; the wall lies half a voxel out.
        grown = np.clip((radius - distance) / voxel + 1.0, 0.0, 1.0).astype(np.float32)
        grown = np.maximum(grown, ventricles) * (brain > 0.5)
        tissue = gm + wm
        gain = np.minimum(np.clip(grown - ventricles, 0.0, None), tissue)
        share = np.divide(gain, tissue, out=np.zeros_like(gain), where=tissue > 1e-6)
        gm -= gm * share
        wm -= wm * share
        csf += gain
        ventricles = ventricles + gain

    # --- deformation (pull-back) ---------------------------------------- #
    shape, affine = template.shape, np.asarray(template.affine)
    displacement = BSplineField(rng, DEFORMATION_SPACING_MM, DEFORMATION_STD_MM, 3).evaluate(shape, affine)
    centre = np.asarray(BRAIN_CENTRE_MM)
    coords = []
    for axis in range(3):
        world = affine[axis, axis] * np.arange(shape[axis], dtype=np.float32) + affine[axis, 3]
        world = world.reshape([-1 if a == axis else 1 for a in range(3)])
        # Subject point x samples the template at c + (x - c) / scale + u(x).
        source = centre[axis] + (world - centre[axis]) / spec.head_scale + displacement[axis]
        coords.append((source - affine[axis, 3]) / affine[axis, axis])
    coords_arr = np.stack(coords).astype(np.float32)
    del displacement, coords

    def warp(volume: np.ndarray) -> np.ndarray:
        out = ndimage.map_coordinates(volume, coords_arr, order=1, mode="nearest", prefilter=False, output=np.float32)
        return np.clip(out, 0.0, 1.0)

    gm, wm, csf, brain, ventricles = (warp(v) for v in (gm, wm, csf, brain, ventricles))
    total = gm + wm + csf
    over = total > 1.0
    if np.any(over):
        for arr in (gm, wm, csf):
            arr[over] /= total[over]

    texture = {name: BSplineField(rng, TEXTURE_SPACING_MM, TEXTURE_STD) for name in ("t1", "t2", "pd")}
    ml = voxel**3 / 1000.0
    volumes = {
        "GM": round(float(gm.sum()) * ml, 1),
        "WM": round(float(wm.sum()) * ml, 1),
        "CSF": round(float(csf.sum()) * ml, 1),
        "ventricles": round(float(ventricles.sum()) * ml, 1),
    }
    return SubjectAnatomy(gm=gm, wm=wm, csf=csf, brain=brain, affine=affine, texture=texture, volumes_ml=volumes)


def _ventricle_map(csf: np.ndarray, brain: np.ndarray, voxel: float) -> np.ndarray:
    """CSF deep inside the brain (lateral and third ventricles), soft."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(brain > 0.5) * voxel
    deep = np.clip((depth - VENTRICLE_DEPTH_MM) / 4.0, 0.0, 1.0).astype(np.float32)
    return (csf * deep * (csf > 0.3)).astype(np.float32)


def fibre_directions(wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A smooth fibre-orientation field from the shape of the white matter.

    The direction along which the (smoothed) WM map varies least: the
    eigenvector of the smallest eigenvalue of its structure tensor. Near the
    mid-sagittal plane above the brainstem (the corpus callosum) the tensor is
    blended with a left-right prior, so callosal fibres cross the midline.

    Parameters
    ----------
    wm : numpy.ndarray
        White-matter probability map on an axis-aligned, isotropic grid.
    affine : numpy.ndarray
        Voxel-to-world (MNI mm) affine of the grid.

    Returns
    -------
    numpy.ndarray
        ``float32`` unit vectors, shape ``(*wm.shape, 3)``, in RAS world axes;
        zero where ``wm < 0.05``.
    """
    from scipy import ndimage

    voxel_size = float(abs(affine[0, 0]))
    smooth = ndimage.gaussian_filter(wm.astype(np.float32), 2.0 / voxel_size, truncate=3.0)
    grads = np.gradient(smooth)
    integration = max(5.0 / voxel_size, 1.0)
    where = wm >= 0.05
    tensor = np.empty((int(where.sum()), 3, 3), dtype=np.float64)
    for a in range(3):
        for b in range(a, 3):
            comp = ndimage.gaussian_filter(grads[a] * grads[b], integration, truncate=3.0)[where]
            tensor[:, a, b] = comp
            tensor[:, b, a] = comp
    # Corpus callosum prior: weight on directions orthogonal to x near the midline.
    world = [affine[k, k] * np.arange(wm.shape[k]) + affine[k, 3] for k in range(3)]
    x, y, z = np.meshgrid(*world, indexing="ij")
    weight = (
        np.exp(-0.5 * (x / 5.0) ** 2)
        * _sigmoid((z + 2.0) / 3.0)
        * _sigmoid((32.0 - z) / 3.0)
        * _sigmoid((y + 45.0) / 3.0)
        * _sigmoid((38.0 - y) / 3.0)
    )[where]
    strength = 2.0 * float(np.median(np.trace(tensor, axis1=1, axis2=2))) if tensor.size else 0.0
    tensor[:, 1, 1] += strength * weight
    tensor[:, 2, 2] += strength * weight
    _, vectors = np.linalg.eigh(tensor)
    out = np.zeros((*wm.shape, 3), dtype=np.float32)
    out[where] = vectors[:, :, 0]  # eigenvalues ascend: the least-varying direction
    return out


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-t))
