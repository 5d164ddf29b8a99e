"""Generation of the traveling-phantom BIDS dataset."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .anatomy import (
    HEAD_SCALE_STD,
    SubjectAnatomy,
    SubjectSpec,
    atrophy_index,
    fibre_directions,
    make_subject_anatomy,
)
from .motion import (
    HEAD_MOTION_CENTRE_MM,
    HEAD_ROTATION_RANGE_DEG,
    HEAD_TRANSLATION_MAX_MM,
    HEAD_TRANSLATION_RANGE_MM,
    HeadMotion,
    draw_head_motion,
)
from .sites import BIAS_FIELD_CENTRE_MM, BIAS_FIELD_EXTENT_MM, SiteProtocol, site_protocols
from .tissues import TISSUES
from .writers import write_bval_bvec, write_json, write_nifti, write_tsv

__all__ = ["MODALITIES", "PHANTOM_SIZES", "PhantomDataset", "generate_phantom"]

#: Anatomical voxel size (mm) of each phantom size.
PHANTOM_SIZES: dict[str, float] = {"tiny": 4.0, "small": 2.0, "1mm": 1.0}
#: Modalities the phantom can simulate (BIDS suffixes).
MODALITIES: tuple[str, ...] = ("T1w", "T2w", "dwi")
#: Name of the truth derivative (folder under ``derivatives/``).
TRUTH_PIPELINE = "phantom"
GENERATOR_NAME = "ihf-bids-phantom"
BIDS_VERSION = "1.10.0"

_MODALITY_CODE = {"T1w": 1, "T2w": 2, "dwi": 3}
_PURPOSE_SUBJECT, _PURPOSE_SCAN, _PURPOSE_MOTION = 1, 2, 3
_GOLDEN = 0.6180339887498949
_FIRST_SCAN_DAY = dt.datetime(2024, 2, 5, 8, 30)


@dataclass(frozen=True)
class PhantomDataset:
    """What :func:`generate_phantom` wrote.

    Attributes
    ----------
    root : pathlib.Path
        The BIDS dataset root.
    subjects : tuple of str
        Participant labels without ``sub-`` (``"01"``, ``"02"``, ...).
    sites : tuple of str
        Site labels; each is also the session label (``ses-<site>``).
    protocols : Mapping of str to SiteProtocol
        Every site's protocol and hardware parameters.
    size : str
        ``"tiny"``, ``"small"`` or ``"1mm"``.
    seed : int
        Seed the dataset was generated with.
    modalities : tuple of str
        Simulated modalities (``"T1w"``, ``"T2w"``, ``"dwi"``).
    anat_voxel_size, dwi_voxel_size : float
        Isotropic voxel sizes (mm) of the anatomical and diffusion grids.
    with_head_motion : bool
        Whether every session has its own head position (see :meth:`head_motion`).
    """

    root: Path
    subjects: tuple[str, ...]
    sites: tuple[str, ...]
    protocols: Mapping[str, SiteProtocol] = field(repr=False)
    size: str
    seed: int
    modalities: tuple[str, ...]
    anat_voxel_size: float
    dwi_voxel_size: float
    with_head_motion: bool = True

    @property
    def truth_root(self) -> Path:
        """Root of the ground-truth derivative dataset."""
        return self.root / "derivatives" / TRUTH_PIPELINE

    def image_path(self, subject: str, site: str, modality: str) -> Path:
        """Path of a simulated image (``modality`` is ``T1w``, ``T2w`` or ``dwi``)."""
        return self.root / _image_relpath(subject, site, modality)

    def truth_path(self, subject: str, label: str, *, grid: str = "anat") -> Path:
        """Path of a ground-truth map.

        Parameters
        ----------
        subject : str
            Participant label without ``sub-``.
        label : {"GM", "WM", "CSF", "brain", "fibre"}
            Tissue probability map, brain mask, or fibre directions (DWI grid only).
        grid : {"anat", "dwi"}, default="anat"
            Which grid.
        """
        return self.truth_root / _truth_relpath(subject, label, grid)

    def head_motion(self, subject: str, site: str) -> np.ndarray:
        """The head motion ``M`` of a session (the same as recorded in ``phantom.json``).

        ``M`` is the 4x4 rigid world->world matrix that maps the template (truth) world
        coordinates of an anatomical point to its scanner world coordinates in that
        session; every image of the session has the affine ``M @ grid_affine``.

        Parameters
        ----------
        subject : str
            Participant label without ``sub-``.
        site : str
            Site (= session) label.

        Returns
        -------
        numpy.ndarray
            4x4 ``float64`` matrix; the identity when the dataset was written without
            head motion.

        Raises
        ------
        ValueError
            If the subject or site is not in the dataset.
        """
        if subject not in self.subjects:
            raise ValueError(f"unknown subject {subject!r}; the dataset has {self.subjects}")
        if site not in self.sites:
            raise ValueError(f"unknown site {site!r}; the dataset has {self.sites}")
        if not self.with_head_motion:
            return np.eye(4)
        return _session_motion(self, self.subjects.index(subject), self.sites.index(site)).matrix


def _image_relpath(subject: str, site: str, modality: str) -> Path:
    folder = "dwi" if modality == "dwi" else "anat"
    return Path(f"sub-{subject}", f"ses-{site}", folder, f"sub-{subject}_ses-{site}_{modality}.nii.gz")


def _truth_relpath(subject: str, label: str, grid: str) -> Path:
    """Path of a truth map relative to the truth derivative's root."""
    from ..templates import TEMPLATE_SPACE

    if grid not in ("anat", "dwi"):
        raise ValueError(f"grid must be 'anat' or 'dwi', got {grid!r}")
    stem = f"sub-{subject}_space-{TEMPLATE_SPACE}" + ("_res-dwi" if grid == "dwi" else "")
    if label == "brain":
        name = f"{stem}_desc-brain_mask.nii.gz"
    elif label == "fibre":
        if grid != "dwi":
            raise ValueError("fibre directions exist on the DWI grid only")
        name = f"{stem}_desc-fibre_dwimap.nii.gz"
    elif label in TISSUES:
        name = f"{stem}_label-{label}_probseg.nii.gz"
    else:
        raise ValueError(f"unknown truth label {label!r}")
    return Path(f"sub-{subject}", grid, name)


def generate_phantom(
    output_dir: str | os.PathLike[str],
    *,
    n_subjects: int = 4,
    n_sites: int = 3,
    size: str = "tiny",
    seed: int = 0,
    modalities: Sequence[str] = MODALITIES,
    overwrite: bool = False,
    head_motion: bool = True,
) -> PhantomDataset:
    """Write a traveling-phantom BIDS dataset: every subject scanned at every site.

    The dataset is built in a temporary sibling directory and renamed into
    place when complete.

    Parameters
    ----------
    output_dir : path-like
        Dataset root to create. It must not exist or be empty, unless
        ``overwrite`` is true.
    n_subjects : int, default=4
        Number of subjects (traveling participants).
    n_sites : int, default=3
        Number of sites; each subject has one session per site.
    size : {"tiny", "small", "1mm"}, default="tiny"
        Anatomical voxel size 4, 2 or 1 mm; DWI voxel size ``max(2, anat)`` mm.
    seed : int, default=0
        Seed of subjects, per-scan variations and noise. Sites do not depend
        on it. The same seed gives identical image data.
    modalities : sequence of str, default=("T1w", "T2w", "dwi")
        Modalities to simulate.
    overwrite : bool, default=False
        Replace an existing non-empty ``output_dir``.
    head_motion : bool, default=True
        Give every session its own seeded rigid head position, written as an oblique
        image header (affine ``M @ grid_affine``; the voxel data do not change). False
        writes every image on the template grid, as needed by code that compares the
        raw images with the truth or with each other in world coordinates without
        registering them.

    Returns
    -------
    PhantomDataset
        Description of the written dataset.

    Raises
    ------
    ValueError
        On invalid arguments.
    FileExistsError
        If ``output_dir`` exists, is not empty and ``overwrite`` is false.
    """
    n_subjects, n_sites, seed = int(n_subjects), int(n_sites), int(seed)
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size not in PHANTOM_SIZES:
        raise ValueError(f"size must be one of {sorted(PHANTOM_SIZES)}, got {size!r}")
    modalities = tuple(dict.fromkeys(modalities))
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")

    root = Path(output_dir).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty (use overwrite=True / --overwrite to replace it)")

    sites = site_protocols(n_sites)
    anat_voxel = PHANTOM_SIZES[size]
    dataset = PhantomDataset(
        root=root,
        subjects=tuple(_subject_label(i, n_subjects) for i in range(n_subjects)),
        sites=tuple(s.label for s in sites),
        protocols={s.label: s for s in sites},
        size=size,
        seed=seed,
        modalities=tuple(m for m in MODALITIES if m in modalities),
        anat_voxel_size=anat_voxel,
        dwi_voxel_size=max(2.0, anat_voxel),
        with_head_motion=bool(head_motion),
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        _write_dataset(staging, dataset)
        os.chmod(staging, 0o755)
        _move_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataset


# --------------------------------------------------------------------------- #
# subjects and random streams
# --------------------------------------------------------------------------- #
def _subject_label(index: int, n_subjects: int) -> str:
    return f"{index + 1:0{max(2, len(str(n_subjects)))}d}"


def _subject_specs(dataset: PhantomDataset) -> list[SubjectSpec]:
    """Ages spread over 20-85 years by a golden-ratio sequence, alternating sex."""
    offset = float(np.random.default_rng([dataset.seed, 0]).uniform())
    n_sites = len(dataset.sites)
    specs = []
    for index, label in enumerate(dataset.subjects):
        rng = np.random.default_rng([dataset.seed, _PURPOSE_SUBJECT, index])
        age = float(np.clip(20.0 + 65.0 * ((offset + index * _GOLDEN) % 1.0) + rng.normal(0.0, 1.5), 18.0, 90.0))
        sex = "FM"[(index + int(offset * 2.0)) % 2]
        atrophy = atrophy_index(age) * float(np.exp(rng.normal(0.0, 0.2)))
        head_scale = float(np.clip(rng.normal(1.0, HEAD_SCALE_STD), 0.93, 1.07)) * (1.015 if sex == "M" else 0.985)
        home = index % n_sites
        specs.append(
            SubjectSpec(
                label=label,
                index=index,
                age=round(age, 1),
                sex=sex,
                atrophy=round(atrophy, 4),
                head_scale=round(head_scale, 4),
                deformation_seed=int(rng.integers(0, 2**31 - 1)),
                sessions=tuple(dataset.sites[(home + k) % n_sites] for k in range(n_sites)),
            )
        )
    return specs


def _diffusivities(spec: SubjectSpec) -> dict[str, tuple[float, float]]:
    """Tissue diffusivities of a subject; WM anisotropy falls with atrophy (age)."""
    a = spec.atrophy
    out = {}
    for name, tissue in TISSUES.items():
        axial, radial = tissue.axial_diffusivity, tissue.radial_diffusivity
        if name == "WM":
            axial, radial = axial * (1.0 + 0.03 * a), radial * (1.0 + 0.15 * a)
        elif name == "GM":
            axial = radial = axial * (1.0 + 0.05 * a)
        out[name] = (float(f"{axial:.4e}"), float(f"{radial:.4e}"))
    return out


def _scan_rng(dataset: PhantomDataset, subject_index: int, site_index: int, modality: str) -> np.random.Generator:
    return np.random.default_rng(
        [dataset.seed, _PURPOSE_SCAN, subject_index, site_index, _MODALITY_CODE[modality]]
    )


def _session_motion(dataset: PhantomDataset, subject_index: int, site_index: int) -> HeadMotion:
    """The head position of a session, from its own random stream (it changes no other stream)."""
    rng = np.random.default_rng([dataset.seed, _PURPOSE_MOTION, subject_index, site_index])
    return draw_head_motion(rng)


def _site_rng(site: SiteProtocol) -> np.random.Generator:
    """Random stream of a site's fixed choices (its gradient table)."""
    return np.random.default_rng([zlib.crc32(site.label.encode()), 11])


def _acq_time(spec: SubjectSpec, session_index: int) -> str:
    when = _FIRST_SCAN_DAY + dt.timedelta(days=3 * spec.index + 14 * session_index, hours=spec.index % 6)
    return when.strftime("%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------- #
# writing
# --------------------------------------------------------------------------- #
def _move_into_place(staging: Path, root: Path) -> None:
    """Rename the finished dataset to its final path, replacing what was there."""
    if not root.exists():
        staging.rename(root)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    previous = trash / root.name
    root.rename(previous)
    try:
        staging.rename(root)
    except BaseException:
        previous.rename(root)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _write_dataset(out: Path, dataset: PhantomDataset) -> None:
    from .. import __version__
    from ..templates import load_template
    from .scanner import gradient_table, render_anat, render_dwi

    specs = _subject_specs(dataset)
    anat_template = load_template(dataset.anat_voxel_size)
    dwi_template = load_template(dataset.dwi_voxel_size)
    tables = {s: gradient_table(dataset.protocols[s].dwi, _site_rng(dataset.protocols[s])) for s in dataset.sites}
    truth = out / "derivatives" / TRUTH_PIPELINE
    subjects_record: dict[str, dict] = {}

    for spec in specs:
        anatomy = make_subject_anatomy(spec, anat_template)
        sub = f"sub-{spec.label}"
        record: dict = {
            "age": spec.age,
            "sex": spec.sex,
            "home_site": spec.sessions[0],
            "atrophy": spec.atrophy,
            "head_scale": spec.head_scale,
            "deformation_seed": spec.deformation_seed,
            "volumes_ml": anatomy.volumes_ml,
            "sessions": {},
        }
        _write_truth(truth, spec.label, "anat", anatomy)

        dwi_anatomy: SubjectAnatomy | None = None
        fibres = None
        if "dwi" in dataset.modalities:
            if dataset.dwi_voxel_size == dataset.anat_voxel_size:
                dwi_anatomy = anatomy
            else:
                dwi_anatomy = anatomy.resampled(dwi_template.shape, dwi_template.affine)
            fibres = fibre_directions(dwi_anatomy.wm, dwi_anatomy.affine)
            _write_truth(truth, spec.label, "dwi", dwi_anatomy)
            write_nifti(truth / _truth_relpath(spec.label, "fibre", "dwi"), fibres, dwi_anatomy.affine, kind="truth")
            record["diffusivities_mm2_per_s"] = {
                name: {"axial": axial, "radial": radial} for name, (axial, radial) in _diffusivities(spec).items()
            }

        session_rows = []
        for session_index, site_label in enumerate(spec.sessions):
            site = dataset.protocols[site_label]
            site_index = dataset.sites.index(site_label)
            ses = f"ses-{site_label}"
            acq_time = _acq_time(spec, session_index)
            session_rows.append((ses, acq_time, site_label))
            scans: dict = {"acq_time": acq_time}
            # The head position of the session: the voxel grid follows the head, so only
            # the affines change (M @ grid); all images of the session share one M.
            motion = np.eye(4)
            if dataset.with_head_motion:
                head = _session_motion(dataset, spec.index, site_index)
                motion = head.matrix
                scans["head_motion"] = head.to_dict()
            for modality in ("T1w", "T2w"):
                if modality not in dataset.modalities:
                    continue
                rng = _scan_rng(dataset, spec.index, site_index, modality)
                image, scans[modality] = render_anat(anatomy, site, modality, dataset.anat_voxel_size, rng)
                path = out / _image_relpath(spec.label, site_label, modality)
                write_nifti(path, image, motion @ anatomy.affine, kind="raw")
                write_json(_with_suffix(path, ".json"), _anat_sidecar(site, modality))
            if dwi_anatomy is not None and fibres is not None:
                rng = _scan_rng(dataset, spec.index, site_index, "dwi")
                table = tables[site_label]
                series, scans["dwi"] = render_dwi(
                    dwi_anatomy, fibres, _diffusivities(spec), site, table, dataset.dwi_voxel_size, rng
                )
                path = out / _image_relpath(spec.label, site_label, "dwi")
                write_nifti(
                    path, series, motion @ dwi_anatomy.affine, kind="raw", repetition_time=site.dwi.repetition_time
                )
                # The gradient directions are fixed to the head, as the voxel axes are: in
                # image axes they are the same with or without head motion. Expressing the
                # head-frame vectors with the unmoved grid gives exactly those numbers.
                write_bval_bvec(_with_suffix(path, ""), table.bvals, table.bvecs, dwi_anatomy.affine)
                write_json(_with_suffix(path, ".json"), _dwi_sidecar(site))
            record["sessions"][ses] = scans
        write_tsv(out / sub / f"{sub}_sessions.tsv", ("session_id", "acq_time", "site"), session_rows)
        subjects_record[sub] = record

    _write_top_level(out, dataset, specs, __version__)
    _write_truth_description(truth, dataset, subjects_record, tables, __version__)


def _with_suffix(nifti: Path, suffix: str) -> Path:
    """``x.nii.gz`` -> ``x<suffix>``."""
    return nifti.with_name(nifti.name[: -len(".nii.gz")] + suffix)


def _write_truth(truth: Path, subject: str, grid: str, anatomy: SubjectAnatomy) -> None:
    for label, data in (("GM", anatomy.gm), ("WM", anatomy.wm), ("CSF", anatomy.csf)):
        write_nifti(truth / _truth_relpath(subject, label, grid), data, anatomy.affine, kind="truth")
    write_nifti(truth / _truth_relpath(subject, "brain", grid), anatomy.brain > 0.5, anatomy.affine, kind="mask")


_SEQUENCE_FIELDS = {  # DICOM-style ScanningSequence / SequenceVariant / PulseSequenceType
    "MPRAGE": ("GR\\IR", "SK\\SP\\MP", "MPRAGE"),
    "SPGR": ("GR", "SS\\SP", "Spoiled gradient echo"),
    "TSE": ("SE", "SK\\SP", "Turbo spin echo"),
    "DWI": ("EP", "SK\\SP", "Spin-echo EPI"),
}


def _scanner_fields(site: SiteProtocol, sequence: str) -> dict:
    scanning, variant, pulse = _SEQUENCE_FIELDS[sequence]
    return {
        "Manufacturer": site.manufacturer,
        "ManufacturersModelName": site.model,
        "InstitutionName": site.institution,
        "MagneticFieldStrength": 3,
        "ReceiveCoilName": site.receive_coil,
        "ScanningSequence": scanning,
        "SequenceVariant": variant,
        "PulseSequenceType": pulse,
    }


def _anat_sidecar(site: SiteProtocol, modality: str) -> dict:
    p = site.t1w if modality == "T1w" else site.t2w
    two_d = max(p.psf_fwhm_mm) >= 2.0
    sidecar = _scanner_fields(site, p.sequence)
    sidecar.update(
        {
            "MRAcquisitionType": "2D" if two_d else "3D",
            "RepetitionTime": p.repetition_time,
            "EchoTime": p.echo_time,
        }
    )
    if p.sequence == "MPRAGE":
        sidecar["InversionTime"] = p.inversion_time
        sidecar["RepetitionTimeExcitation"] = p.echo_spacing
    sidecar["FlipAngle"] = p.flip_angle
    if two_d:
        sidecar["SliceThickness"] = max(p.psf_fwhm_mm)
    sidecar["SkullStripped"] = True
    return sidecar


def _dwi_sidecar(site: SiteProtocol) -> dict:
    sidecar = _scanner_fields(site, "DWI")
    sidecar.update(
        {
            "MRAcquisitionType": "2D",
            "RepetitionTime": site.dwi.repetition_time,
            "EchoTime": site.dwi.echo_time,
            "FlipAngle": 90,
            "SkullStripped": True,
        }
    )
    return sidecar


def _write_top_level(out: Path, dataset: PhantomDataset, specs: list[SubjectSpec], version: str) -> None:
    write_json(
        out / "dataset_description.json",
        {
            "Name": "ihf-bids traveling phantom",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["ihf-bids developers"],
            "GeneratedBy": [
                {
                    "Name": GENERATOR_NAME,
                    "Version": version,
                    "Description": (
                        f"Simulated traveling subjects: {len(dataset.subjects)} subjects x "
                        f"{len(dataset.sites)} sites, size {dataset.size}, seed {dataset.seed}."
                    ),
                }
            ],
        },
    )
    (out / "README").write_text(_readme(dataset), encoding="utf-8")
    write_tsv(
        out / "participants.tsv",
        ("participant_id", "age", "sex", "site"),
        [(f"sub-{s.label}", s.age, s.sex, s.sessions[0]) for s in specs],
    )
    site_levels = {s: f"{p.manufacturer} {p.model}, {p.institution}" for s, p in dataset.protocols.items()}
    write_json(
        out / "participants.json",
        {
            "participant_id": {"Description": "Unique participant identifier"},
            "age": {"Description": "Age of the participant at the first session", "Units": "year"},
            "sex": {"Description": "Sex of the participant", "Levels": {"F": "female", "M": "male"}},
            "site": {
                "Description": "Home site: the site of the participant's first session "
                "(every participant is scanned at every site; see sub-<label>_sessions.tsv)",
                "Levels": site_levels,
            },
        },
    )
    write_json(
        out / "sessions.json",
        {
            "acq_time": {"Description": "Acquisition date and time of the session (simulated)"},
            "site": {
                "Description": "Site (scanner) the session was acquired at; equal to the session label",
                "Levels": site_levels,
            },
        },
    )


def _readme(dataset: PhantomDataset) -> str:
    lines = [
        "# ihf-bids traveling phantom",
        "",
        "Simulated multi-site brain MRI of traveling subjects: every subject is scanned once at",
        "every site (one session per site, labelled by the site). Anatomy, tissue properties and",
        "every site effect are known; the ground truth is in derivatives/phantom/.",
        "",
        f"- subjects: {len(dataset.subjects)}; sites: {', '.join(dataset.sites)}",
        f"- size: {dataset.size} (anatomical voxel {dataset.anat_voxel_size:g} mm, "
        f"diffusion voxel {dataset.dwi_voxel_size:g} mm), seed: {dataset.seed}",
        f"- modalities: {', '.join(dataset.modalities)}",
        *_readme_position(dataset),
        "",
        "Generated by ihf-bids-phantom (see docs/phantom.md of ihf-bids). License: CC0.",
        "",
    ]
    return "\n".join(lines)


def _motion_convention(dataset: PhantomDataset) -> dict[str, str]:
    """The conventions entry of the head motion (none without motion, as before it existed)."""
    if not dataset.with_head_motion:
        return {}
    low, high = HEAD_ROTATION_RANGE_DEG
    return {
        "head_motion": "subjects.<sub>.sessions.<ses>.head_motion.world_to_scanner is the 4x4 rigid matrix M "
        "that maps template (truth) world mm to that session's scanner world mm: "
        "M x = R (x - centre_mm) + centre_mm + translation_mm, R the right-handed rotation by rotation_deg "
        "about the unit rotation_axis (RAS). The voxel data are those of the template grid; every image of "
        "the session (T1w, T2w, dwi) has the affine M @ its grid affine, so M @ truth affine puts a truth map "
        "on the session's images voxel for voxel. bvecs are in image axes and do not depend on M. Centre "
        f"{list(HEAD_MOTION_CENTRE_MM)} mm; angle uniform in [{low:g}, {high:g}] degrees about an axis uniform "
        f"on the sphere; translation components uniform in [-{HEAD_TRANSLATION_RANGE_MM:g}, "
        f"{HEAD_TRANSLATION_RANGE_MM:g}] mm, length capped at {HEAD_TRANSLATION_MAX_MM:g} mm; one seeded draw "
        "per session",
    }


def _readme_position(dataset: PhantomDataset) -> list[str]:
    """README lines on the images' grids and head position."""
    if not dataset.with_head_motion:
        return ["- images are skull-stripped and aligned to the MNI152NLin2009aSym template grid"]
    low, high = HEAD_ROTATION_RANGE_DEG
    return [
        "- images are skull-stripped; their voxel grids are those of the MNI152NLin2009aSym",
        "  template, moved with the head: each session has its own head position, a rigid motion M",
        f"  (a rotation of {low:g}-{high:g} degrees and a shift of up to {HEAD_TRANSLATION_MAX_MM:g} mm). "
        "The image affines are",
        "  M @ template grid (oblique); the voxel data match the truth maps voxel for voxel.",
        "  Each session's M: derivatives/phantom/phantom.json, subjects.<sub>.sessions.<ses>.head_motion.",
    ]


def _write_truth_description(
    truth: Path,
    dataset: PhantomDataset,
    subjects_record: dict[str, dict],
    tables: dict,
    version: str,
) -> None:
    from ..templates import TEMPLATE_SPACE, template_grid

    write_json(
        truth / "dataset_description.json",
        {
            "Name": "ihf-bids traveling phantom: ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "License": "CC0",
            "GeneratedBy": [{"Name": GENERATOR_NAME, "Version": version}],
            "SourceDatasets": [{"URL": "../.."}],
        },
    )
    grids = {}
    for name, voxel in (("anat", dataset.anat_voxel_size), ("dwi", dataset.dwi_voxel_size)):
        shape, affine = template_grid(voxel)
        grids[name] = {"voxel_size_mm": voxel, "shape": list(shape), "affine": affine.tolist()}
    sites = {}
    for label, site in dataset.protocols.items():
        entry = site.to_dict()
        entry["dwi"]["bvals"] = [float(b) for b in tables[label].bvals]
        sites[label] = entry
    write_json(
        truth / "phantom.json",
        {
            "generator": {"name": GENERATOR_NAME, "version": version},
            "seed": dataset.seed,
            "size": dataset.size,
            "modalities": list(dataset.modalities),
            "template_space": TEMPLATE_SPACE,
            "grids": grids,
            "tissues": {name: t.to_dict() for name, t in TISSUES.items()},
            "conventions": {
                "units": "times in s, angles in degrees, diffusivities in mm^2/s, b-values in s/mm^2",
                "psf_fwhm_mm": "Gaussian point-spread function FWHM along x (L-R), y (P-A), z (I-S)",
                "snr": "pure white-matter signal (b=0 for DWI) over the noise standard deviation per voxel",
                "intensity_scale": "stored intensity of pure white matter before bias field and noise",
                "bias_field": "gain * exp(sum c_ijk P_i(x') P_j(y') P_k(z')) with Legendre P and "
                "x' = (x - centre) / extent in MNI mm (see bias_field_box)",
                "bias_field_box": {"centre_mm": list(BIAS_FIELD_CENTRE_MM), "extent_mm": list(BIAS_FIELD_EXTENT_MM)},
                "bvec": "BIDS/FSL convention: image axes, x negated because the affine has a positive determinant",
                "fibre": "desc-fibre_dwimap: unit WM fibre directions in RAS world axes",
                "noise": "Rician: magnitude of the signal plus complex Gaussian noise of sd noise_sigma",
                **_motion_convention(dataset),
            },
            "sites": sites,
            "subjects": subjects_record,
        },
    )
