"""Visual HTML reports: one per participant and one for the group.

Reports are single HTML files with inline CSS and no scripts; figures are PNG files next to
them, referenced by relative paths, so an output directory can be browsed offline (or
copied elsewhere as a whole). Nothing is ever fetched from the network.

Layout under the output directory::

    sub-01.html
    sub-01/figures/sub-01_ses-ge_desc-mosaic_T1w.png ...
    group_report.html
    group/figures/desc-sitekde_T1w.png ...
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..imageio import load_float32, read_sidecar

__all__ = [
    "DerivativeSet",
    "find_derivatives",
    "screenshot_html",
    "write_group_report",
    "write_participant_report",
]

_LOGGER = logging.getLogger("ihf_bids.qc.reports")
_MODALITIES = ("T1w", "T2w", "dwi")
_MODALITY_TITLES = {"T1w": "T1w", "T2w": "T2w", "dwi": "DWI"}
# Entities that do not tell one image series from another (only its version or resolution).
_NON_KEY = frozenset({"desc", "suffix", "extension", "datatype", "model", "param", "space", "res"})
_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# --------------------------------------------------------------------------- discovery


@dataclass
class DerivativeSet:
    """The template-space derivatives of one image series (one modality of one session/run).

    Attributes
    ----------
    modality : {"T1w", "T2w", "dwi"}
        Modality of the series.
    entities : dict of str to str
        Entities that identify the series (``sub``, ``ses``, ``acq``, ``run``, ...), in
        file-name order, without ``space``, ``res``, ``desc`` and the like.
    preproc, harmonized : Path or None
        The ``desc-preproc`` and ``desc-harmonized`` images.
    mask : Path or None
        The brain mask of the series (``desc-brain_mask``) in the same datatype folder.
    fa_preproc, fa_harmonized : Path or None
        DWI only: the tensor FA maps of the preprocessed and harmonized runs.
    """

    modality: str
    entities: dict[str, str]
    preproc: Path | None = None
    harmonized: Path | None = None
    mask: Path | None = None
    fa_preproc: Path | None = None
    fa_harmonized: Path | None = None

    @property
    def session(self) -> str | None:
        """The ``ses-`` label, or ``None`` for a dataset without sessions."""
        return self.entities.get("ses")

    @property
    def prefix(self) -> str:
        """``sub-01_ses-ge[_run-1]``: the start of this series' figure names."""
        return "_".join(f"{key}-{value}" for key, value in self.entities.items())


def _strip_nii(path: Path) -> str:
    name = str(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return str(path.with_suffix(""))


def _companion(path: Path | None, extension: str) -> Path | None:
    if path is None:
        return None
    candidate = Path(_strip_nii(path) + extension)
    return candidate if candidate.is_file() else None


def _subject_label(subject: str) -> str:
    label = subject.removeprefix("sub-")
    if not label or not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise ValueError(f"'{subject}' is not a BIDS subject label")
    return label


def find_derivatives(output_dir: Path, subject: str) -> list[DerivativeSet]:
    """Find a participant's template-space derivatives (T1w, T2w, DWI) by file name.

    Every piece may be missing: a series is reported when it has a preprocessed or a
    harmonized image; its other fields are ``None`` when their files are absent.

    Parameters
    ----------
    output_dir : Path
        The derivatives (output) directory.
    subject : str
        Subject label, with or without ``sub-``.

    Returns
    -------
    list of DerivativeSet
        Ordered by session, then modality (T1w, T2w, DWI), then the other entities.
    """
    from ..bids.derivatives import parse_entities
    from ..templates import TEMPLATE_SPACE

    label = _subject_label(subject)
    root = Path(output_dir) / f"sub-{label}"
    sets: dict[tuple, DerivativeSet] = {}
    masks: list[tuple[dict, Path]] = []
    if not root.is_dir():
        return []
    for path in sorted(root.rglob("*.nii*")):
        if not path.name.endswith((".nii", ".nii.gz")) or "figures" in path.relative_to(root).parts:
            continue
        try:
            entities = parse_entities(path)
        except ValueError:
            continue
        if entities.get("sub") != label or entities.get("space") != TEMPLATE_SPACE:
            continue
        suffix = entities["suffix"]
        datatype = entities.get("datatype", path.parent.name)
        if suffix == "mask":
            masks.append(({**entities, "datatype": datatype}, path))
            continue
        if suffix in ("T1w", "T2w"):
            modality, fa = suffix, False
        elif suffix == "dwi":
            modality, fa = "dwi", False
        elif suffix == "dwimap" and entities.get("param") == "fa":
            modality, fa = "dwi", True
        else:
            continue
        desc = entities.get("desc", "preproc")
        if desc not in ("preproc", "harmonized"):
            continue
        key_entities = {k: v for k, v in entities.items() if k not in _NON_KEY}
        key = (modality, tuple(key_entities.items()))
        item = sets.setdefault(key, DerivativeSet(modality=modality, entities=key_entities))
        attribute = ("fa_" if fa else "") + desc
        if getattr(item, attribute) is None:
            setattr(item, attribute, path)
        else:
            _LOGGER.info("report: %s ignored (already have %s)", path.name, getattr(item, attribute).name)
    for item in sets.values():
        item.mask = _match_mask(item, masks)
    order = {m: i for i, m in enumerate(_MODALITIES)}
    result = [s for s in sets.values() if s.preproc is not None or s.harmonized is not None]
    return sorted(result, key=lambda s: (s.session or "", order[s.modality], s.prefix))


def _match_mask(item: DerivativeSet, masks: list[tuple[dict, Path]]) -> Path | None:
    """The series' own brain mask, else another one of its session and datatype folder."""
    datatype = "dwi" if item.modality == "dwi" else "anat"
    reference = item.preproc or item.harmonized
    res = None
    if reference is not None:
        from ..bids.derivatives import parse_entities

        res = parse_entities(reference).get("res")
    candidates = [(e, p) for e, p in masks
                  if e["datatype"] == datatype and e.get("ses") == item.session and e.get("desc", "brain") == "brain"]
    for entities, path in candidates:
        if {k: v for k, v in entities.items() if k not in _NON_KEY} == item.entities and entities.get("res") == res:
            return path
    for entities, path in candidates:
        if entities.get("res") == res:
            return path
    return None


# --------------------------------------------------------------------------- images


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    data, img = load_float32(path)
    return data, np.asarray(img.affine, dtype=float), tuple(float(z) for z in img.header.get_zooms()[:3])


def _read_bvals(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        values = np.loadtxt(path, dtype=float, ndmin=1).ravel()
    except (OSError, ValueError):
        return None
    return values


@dataclass
class _Volumes:
    """What one DWI run contributes to the report: b=0 mean and the highest shell's mean."""

    b0: np.ndarray
    shell: np.ndarray | None
    shell_b: int | None


def _dwi_volumes(data: np.ndarray, bvals: np.ndarray | None) -> _Volumes:
    from ..preproc.dwi import shell_labels

    if data.ndim == 3:
        data = data[..., None]
    labels = None
    if bvals is not None and bvals.size == data.shape[3]:
        try:
            labels = np.asarray(shell_labels(bvals))
        except ValueError:
            labels = None
    if labels is None:
        return _Volumes(b0=data[..., 0], shell=None, shell_b=None)
    is_b0 = labels == "b0"
    b0 = data[..., is_b0].mean(axis=3) if is_b0.any() else data[..., 0]
    shells = sorted({int(label[1:]) for label in labels[~is_b0]})
    if not shells:
        return _Volumes(b0=b0, shell=None, shell_b=None)
    top = shells[-1]
    return _Volumes(b0=b0, shell=data[..., labels == f"b{top}"].mean(axis=3), shell_b=top)


def _template_for(affine: np.ndarray, zooms: tuple[float, ...], shape: tuple[int, ...]):
    """The template on the image's grid, or a sentence saying why it cannot be used."""
    from ..templates import load_template

    if not np.allclose(zooms, zooms[0], rtol=1e-3):
        return None, f"the voxels are not isotropic ({', '.join(f'{z:g}' for z in zooms)} mm)"
    try:
        template = load_template(float(zooms[0]))
    except (ValueError, OSError) as error:
        return None, f"the template could not be loaded at {zooms[0]:g} mm ({error})"
    if tuple(template.shape) != tuple(shape[:3]):
        return None, (f"the image grid {tuple(shape[:3])} differs from the template grid {template.shape} "
                      f"at {zooms[0]:g} mm")
    if not np.allclose(template.affine, affine, atol=1e-2):
        return None, "the image's affine differs from the template grid's"
    return template, None


# --------------------------------------------------------------------------- participant report


def _first(values: Sequence) -> object | None:
    for value in values:
        if value not in (None, "", {}, []):
            return value
    return None


def _format_target(value) -> str:
    if isinstance(value, Mapping):
        if "Site" in value:
            text = f"site {value['Site']}"
        elif "Reference" in value:
            text = f"reference image {Path(str(value['Reference'])).name}"
        else:
            text = ", ".join(f"{k}: {v}" for k, v in value.items())
        return text
    return str(value)


def _lower_keys(value: Mapping) -> dict:
    return {str(k).lower(): v for k, v in value.items()}


def _format_model(sidecar: Mapping) -> str | None:
    model = sidecar.get("HarmonizationModel")
    if not isinstance(model, Mapping):
        model = sidecar.get("Model")
    if isinstance(model, Mapping):
        fields = _lower_keys(model)
        parts = [str(fields.get("name", "unnamed model"))]
        if fields.get("network"):
            parts.append(f"network {fields['network']}")
        if fields.get("version"):
            parts.append(f"version {fields['version']}")
        if fields.get("sha256"):
            parts.append(f"sha256 {str(fields['sha256'])[:12]}")
        return ", ".join(parts)
    if isinstance(model, str) and model:
        return model
    return None


def _unique(values) -> list[str]:
    seen: list[str] = []
    for value in values:
        if value not in (None, "") and str(value) not in seen:
            seen.append(str(value))
    return seen


class _FigureWriter:
    """Draws a series' figures into ``figures_dir`` and keeps the sentences of what failed."""

    def __init__(self, output_dir: Path, figures_dir: Path):
        self.output_dir = output_dir
        self.figures_dir = figures_dir

    def __call__(self, section: dict, name: str, caption: str, draw: Callable[[Path], Path]) -> None:
        path = self.figures_dir / name
        try:
            draw(path)
        except Exception as error:  # a figure must never stop the report
            _LOGGER.warning("report: figure %s failed: %s", name, error, exc_info=True)
            section["notes"].append(f"The figure '{caption}' could not be drawn: {error}")
            return
        src = quote(path.relative_to(self.output_dir).as_posix())
        section["figures"].append({"src": src, "caption": caption, "alt": f"{caption} ({name})"})


def _target_samples(target_intensities, key: str) -> np.ndarray | None:
    if not target_intensities or key not in target_intensities or target_intensities[key] is None:
        return None
    values = np.asarray(target_intensities[key], dtype=float).ravel()
    values = values[np.isfinite(values)]
    return values if values.size >= 2 else None


def _section_base(item: DerivativeSet, pre_meta: dict, harm_meta: dict) -> dict:
    title = _MODALITY_TITLES[item.modality]
    others = [f"{k}-{v}" for k, v in item.entities.items() if k not in ("sub", "ses")]
    if others:
        title += f" ({', '.join(others)})"
    section = {
        "title": title,
        "anchor": (item.prefix + "_" + item.modality).replace("-", "").lower(),
        "notes": [],
        "warnings": [],
        "figures": [],
        "facts": [],
        "fa_rows": [],
    }
    facts = section["facts"]
    site = _first([pre_meta.get("Site"), harm_meta.get("Site"), harm_meta.get("SourceSite")])
    if site is not None:
        facts.append(("Site", str(site)))
    for role, path in (("Preprocessed", item.preproc), ("Harmonized", item.harmonized)):
        facts.append((f"{role} image", path.name if path is not None else "absent"))
    if harm_meta.get("HarmonizationTarget") is not None:
        facts.append(("Harmonization target", _format_target(harm_meta["HarmonizationTarget"])))
    model = _format_model(harm_meta)
    if model:
        facts.append(("Model", model))
    if harm_meta.get("Device"):
        facts.append(("Device", str(harm_meta["Device"])))
    description = _first([harm_meta.get("Description"), pre_meta.get("Description")])
    if description:
        facts.append(("Description", str(description)))
    for meta in (pre_meta, harm_meta):
        reason = meta.get("HarmonizationSkipped")
        if reason and f"Harmonization skipped: {reason}" not in section["warnings"]:
            section["warnings"].append(f"Harmonization skipped: {reason}")
    section["registration"] = _registration_part(pre_meta if item.preproc is not None else harm_meta)
    return section


def _registration_part(meta: Mapping) -> dict:
    """The section's Registration table, from the sidecar's ``Registration`` field.

    ``recorded`` is false for a sidecar written before the field existed ("not recorded").
    """
    from .registrations import registration_records, registration_rows, threshold_sentence

    records = registration_records(meta)
    if records is None:
        return {"recorded": False, "rows": [], "rejected": [], "thresholds": None}
    rows = registration_rows(records)
    rejected = [f"{row['label']}: {start} ({why})" for row in rows for start, why in row["rejected"]]
    return {"recorded": True, "rows": rows, "rejected": rejected,
            "thresholds": threshold_sentence() if any(row["flagged"] for row in rows) else None}


def _flagged_registrations(sessions: Mapping) -> tuple[list[dict], int, int]:
    """The participant's flagged registrations, each once (the T1w's template step is in the
    T2w's and DWI's sidecars too), with the images that carry it; and the numbers of distinct
    registrations recorded and of images without a record."""
    flagged: dict[tuple, dict] = {}
    seen: set[tuple] = set()
    not_recorded = 0
    for session in sessions.values():
        for section in session["sections"]:
            part = section.get("registration") or {}
            if not part.get("recorded"):
                not_recorded += 1
                continue
            for row in part["rows"]:
                key = (session["label"], row["step"], tuple(row["reasons"]),
                       *(row[c]["text"] for c in ("dice", "correlation", "displacement", "rotation")), row["start"])
                seen.add(key)
                if not row["flagged"]:
                    continue
                if key in flagged:
                    flagged[key]["also"].append(section["title"])
                    continue
                flagged[key] = {"session": session["title"], "anchor": section["anchor"], "image": section["title"],
                                "step": row["label"], "reasons": row["reasons"], "also": []}
    return list(flagged.values()), len(seen), not_recorded


def _anat_section(item: DerivativeSet, draw: _FigureWriter, target_intensities) -> dict:
    pre_meta, harm_meta = read_sidecar(item.preproc), read_sidecar(item.harmonized)
    section = _section_base(item, pre_meta, harm_meta)
    modality = item.modality
    reference = item.preproc or item.harmonized
    data, affine, zooms = _load(reference)
    harmonized = None
    if item.preproc is None:
        section["notes"].append(f"No preprocessed {modality} image was found; the harmonized image is shown alone.")
    elif item.harmonized is None:
        section["notes"].append(f"This {modality} image was not harmonized (no desc-harmonized image); "
                                "only the preprocessed image is shown.")
    else:
        harmonized, _, _ = _load(item.harmonized)
        if harmonized.shape != data.shape:
            section["notes"].append(f"The harmonized image's grid {harmonized.shape} differs from the preprocessed "
                                    f"image's {data.shape}; only the preprocessed image is shown.")
            harmonized = None
    mask = _mask_for(item, data, affine, zooms, section)
    label = "preprocessed" if item.preproc is not None else "harmonized"
    rows = [(label, data)] + ([("harmonized", harmonized)] if harmonized is not None else [])
    from . import figures

    name = f"{item.prefix}_desc-%s_{modality}.png"
    draw(section, name % "mosaic", f"{modality}: {' vs '.join(r[0] for r in rows)} (axial slices)",
         lambda p: figures.mosaic_figure(p, rows, mask))
    if harmonized is not None:
        draw(section, name % "difference", f"{modality}: harmonized minus preprocessed inside the brain mask",
             lambda p: figures.difference_figure(p, data, harmonized, mask))
    template, why = _template_for(affine, zooms, data.shape)
    if template is None:
        section["notes"].append(f"Registration overlay skipped: {why}.")
    else:
        draw(section, name % "registration", f"{modality} ({label}) with the template's brain-mask and "
             "white-matter contours", lambda p: figures.registration_figure(p, data, template.brain_mask, template.wm))
    sets = {f"{label} (source)" if label == "preprocessed" else label: data[mask]}
    if harmonized is not None:
        sets["harmonized"] = harmonized[mask]
    target = _target_samples(target_intensities, modality)
    if target is not None:
        sets["target-site profile"] = target
    draw(section, name % "kde", f"{modality} intensity densities inside the brain mask",
         lambda p: figures.kde_figure(p, [(modality, sets)]))
    return section


def _mask_for(item, data, affine, zooms, section) -> np.ndarray:
    """The series' brain mask; the template's, or the non-zero voxels, when it is missing."""
    shape = data.shape[:3]
    if item.mask is not None:
        mask, _, _ = _load(item.mask)
        if mask.shape[:3] == shape:
            return mask.reshape(shape) > 0.5
        section["notes"].append(f"The brain mask {item.mask.name} is not on the image grid; it was not used.")
    else:
        section["notes"].append("No brain mask was found for this image.")
    template, _ = _template_for(affine, zooms, shape)
    if item.modality == "dwi" and template is not None:
        section["notes"].append("The template brain mask is used instead.")
        return template.brain_mask > 0.5
    section["notes"].append("Non-zero voxels are used as the brain mask.")
    volume = data if data.ndim == 3 else data[..., 0]
    mask = np.isfinite(volume) & (volume != 0)
    return mask if mask.any() else np.ones(shape, dtype=bool)


def _dwi_section(item: DerivativeSet, draw: _FigureWriter, target_intensities) -> dict:
    pre_meta, harm_meta = read_sidecar(item.preproc), read_sidecar(item.harmonized)
    section = _section_base(item, pre_meta, harm_meta)
    from . import figures

    reference = item.preproc or item.harmonized
    data, affine, zooms = _load(reference)
    bvals = _read_bvals(_companion(reference, ".bval"))
    if bvals is None:
        section["notes"].append("No readable .bval file: b-values are unknown, the first volume is shown as b=0.")
    pre = _dwi_volumes(data, bvals)
    mask = _mask_for(item, data, affine, zooms, section)
    del data
    harm = None
    if item.preproc is None:
        section["notes"].append("No preprocessed DWI run was found; the harmonized run is shown alone.")
    elif item.harmonized is None:
        section["notes"].append("This DWI run was not harmonized (no desc-harmonized image); "
                                "only the preprocessed run is shown.")
    else:
        hdata, _, _ = _load(item.harmonized)
        hbvals = _read_bvals(_companion(item.harmonized, ".bval"))
        hbvals = bvals if hbvals is None else hbvals
        if hdata.shape[:3] != pre.b0.shape:
            section["notes"].append(f"The harmonized run's grid {hdata.shape[:3]} differs from the preprocessed "
                                    f"run's {pre.b0.shape}; only the preprocessed run is shown.")
        else:
            harm = _dwi_volumes(hdata, hbvals)
        del hdata
    label = "preprocessed" if item.preproc is not None else "harmonized"
    name = f"{item.prefix}_desc-%s_dwi.png"
    rows = [(f"{label} b=0", pre.b0)] + ([("harmonized b=0", harm.b0)] if harm is not None else [])
    draw(section, name % "b0mosaic", "DWI: mean b=0 image" + (", preprocessed vs harmonized" if harm else ""),
         lambda p: figures.mosaic_figure(p, rows, mask))
    if pre.shell is not None:
        b = pre.shell_b
        shell_rows = [(f"{label} b={b}", pre.shell)]
        if harm is not None and harm.shell is not None and harm.shell_b == b:
            shell_rows.append((f"harmonized b={b}", harm.shell))
        draw(section, name % "shellmosaic", f"DWI: mean of the b={b} shell (highest)"
             + (", preprocessed vs harmonized" if len(shell_rows) > 1 else ""),
             lambda p: figures.mosaic_figure(p, shell_rows, mask))
    if harm is not None:
        draw(section, name % "b0difference", "DWI: harmonized minus preprocessed mean b=0 inside the brain mask",
             lambda p: figures.difference_figure(p, pre.b0, harm.b0, mask))
        if pre.shell is not None and harm.shell is not None and harm.shell_b == pre.shell_b:
            draw(section, name % "shelldifference",
                 f"DWI: harmonized minus preprocessed mean b={pre.shell_b} inside the brain mask",
                 lambda p: figures.difference_figure(p, pre.shell, harm.shell, mask))
    template, why = _template_for(affine, zooms, pre.b0.shape)
    if template is None:
        section["notes"].append(f"Registration overlay skipped: {why}.")
    else:
        draw(section, name % "registration", "DWI mean b=0 with the template's brain-mask and white-matter contours",
             lambda p: figures.registration_figure(p, pre.b0, template.brain_mask, template.wm))
    panels = []
    for title, key, attribute in (("b=0", "dwi-b0", "b0"), (f"b={pre.shell_b}", f"dwi-b{pre.shell_b}", "shell")):
        before = getattr(pre, attribute)
        if before is None:
            continue
        sets = {f"{label} (source)" if label == "preprocessed" else label: before[mask]}
        after = getattr(harm, attribute) if harm is not None else None
        if after is not None and (attribute == "b0" or harm.shell_b == pre.shell_b):
            sets["harmonized"] = after[mask]
        target = _target_samples(target_intensities, key)
        if target is not None:
            sets["target-site profile"] = target
        panels.append((f"DWI {title}", sets))
    draw(section, name % "kde", "DWI intensity densities inside the brain mask",
         lambda p: figures.kde_figure(p, panels))
    _fa_part(item, section, draw, mask)
    return section


def _fa_part(item: DerivativeSet, section: dict, draw: _FigureWriter, mask: np.ndarray) -> None:
    from . import figures

    rows = []
    for role, path in (("preprocessed", item.fa_preproc), ("harmonized", item.fa_harmonized)):
        if path is None:
            continue
        meta = read_sidecar(path)
        section["fa_rows"].append({
            "role": role,
            "wm": _fmt(meta.get("WhiteMatterMedianFA")),
            "brain": _fmt(meta.get("MedianFA")),
            "file": path.name,
        })
        fa, _, _ = _load(path)
        if fa.shape[:3] == mask.shape:
            rows.append((f"FA {role}", fa.reshape(mask.shape)))
        else:
            section["notes"].append(f"The FA map {path.name} is not on the DWI grid; it is not shown.")
    if not section["fa_rows"]:
        section["notes"].append("No FA map was found.")
    if rows:
        draw(section, f"{item.prefix}_desc-fa_dwi.png", "Tensor FA" + (" before and after harmonization"
             if len(rows) > 1 else ""),
             lambda p: figures.mosaic_figure(p, rows, mask, cmap="viridis", limits=(0.0, 1.0),
                                             colorbar_label="FA"))


def _environment():
    """Jinja2 environment over the templates shipped in ``ihf_bids/data/reports``."""
    from importlib import resources

    import jinja2

    folder = resources.files("ihf_bids").joinpath("data").joinpath("reports")

    def load(name: str):
        resource = folder.joinpath(name)
        if not resource.is_file():
            return None
        return resource.read_text(encoding="utf-8")

    return jinja2.Environment(loader=jinja2.FunctionLoader(load), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def _write_text(path: Path, text: str) -> Path:
    from ..harmonize.checkpoint import write_bytes_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


def _now() -> str:
    return _dt.datetime.now().replace(microsecond=0).isoformat()


def write_participant_report(
    output_dir: Path,
    subject: str,
    *,
    target_intensities: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the visual report of one participant: ``sub-<label>.html`` and its figures.

    Parameters
    ----------
    output_dir : Path
        The derivatives (output) directory holding ``sub-<label>/``.
    subject : str
        Subject label, with or without ``sub-``.
    target_intensities : dict of str to numpy.ndarray, optional
        Evenly spaced intensity quantiles of the target site per modality key
        (``"T1w"``, ``"T2w"``, ``"dwi-b0"``, ``"dwi-b1000"``, ...), drawn as a third
        density curve.

    Returns
    -------
    Path
        ``output_dir / "sub-<label>.html"``; figures are in ``sub-<label>/figures/``.
    """
    from .. import __version__

    output_dir = Path(output_dir)
    label = _subject_label(subject)
    figures_dir = output_dir / f"sub-{label}" / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    draw = _FigureWriter(output_dir, figures_dir)
    items = find_derivatives(output_dir, label)
    sessions: dict[str | None, dict] = {}
    pre_metas, harm_metas, skipped = [], [], []
    for item in items:
        session = sessions.setdefault(item.session, {
            "label": item.session, "title": f"Session {item.session}" if item.session else "All images",
            "anchor": f"ses-{item.session}" if item.session else "images", "sections": [], "sites": []})
        pre_meta, harm_meta = read_sidecar(item.preproc), read_sidecar(item.harmonized)
        pre_metas.append(pre_meta)
        harm_metas.append(harm_meta)
        try:
            section = (_dwi_section if item.modality == "dwi" else _anat_section)(item, draw, target_intensities)
        except Exception as error:  # one unreadable image must not lose the rest of the report
            _LOGGER.warning("report: %s %s failed: %s", item.prefix, item.modality, error, exc_info=True)
            section = _section_base(item, pre_meta, harm_meta)
            section["notes"].append(f"This image could not be read: {error}")
        session["sections"].append(section)
        site = _first([pre_meta.get("Site"), harm_meta.get("SourceSite")])
        if site is not None and str(site) not in session["sites"]:
            session["sites"].append(str(site))
        for warning in section["warnings"]:
            skipped.append(f"{session['title']}, {section['title']}: {warning}")
    flagged, n_registrations, n_not_recorded = _flagged_registrations(sessions)
    registration = (f"{n_registrations} recorded, {len(flagged)} flagged" if n_registrations
                    else "not recorded" if n_not_recorded else "n/a")
    if n_registrations and n_not_recorded:
        registration += f"; not recorded for {n_not_recorded} image{'s' if n_not_recorded > 1 else ''}"
    summary = [
        ("Subject", f"sub-{label}"),
        ("Sessions", ", ".join(str(s) for s in sessions if s) or ("none (no session level)" if sessions else "none")),
        ("Sites", ", ".join(_unique(m.get("Site") for m in pre_metas + harm_metas)) or "unknown"),
        ("Harmonization target",
         ", ".join(_unique(_format_target(m["HarmonizationTarget"]) for m in harm_metas
                           if m.get("HarmonizationTarget") is not None)) or "not harmonized"),
        ("Model", "; ".join(_unique(_format_model(m) for m in harm_metas)) or "n/a"),
        ("Device", ", ".join(_unique(m.get("Device") for m in harm_metas)) or "n/a"),
        ("Target-site profile", ", ".join(sorted(k for k, v in (target_intensities or {}).items() if v is not None))
         or "not given"),
        ("Registrations", registration),
    ]
    from .registrations import threshold_sentence

    html = _environment().get_template("participant.html").render(
        subject=f"sub-{label}",
        summary=summary,
        skipped=skipped,
        flagged_registrations=flagged,
        thresholds=threshold_sentence() if flagged else None,
        sessions=list(sessions.values()),
        generated=_now(),
        version=__version__,
    )
    return _write_text(output_dir / f"sub-{label}.html", html)


# --------------------------------------------------------------------------- group report


def _is_missing(value) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and not math.isfinite(value)


def _fmt(value, column: str = "") -> str:
    """Format a table value: ``n/a`` for missing, p-values in scientific notation, ..."""
    if _is_missing(value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        name = column.lower()
        if name.endswith("_p") or name in ("p", "pvalue", "p_value"):
            return f"{value:.2e}"
        if "r2" in name:
            return f"{value:.3f}"
        if name == "psnr":
            return f"{value:.2f}"
        if name in ("n", "n_splits", "n_subjects", "n_images") and value.is_integer():
            return str(int(value))
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, column) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v, column)}" for k, v in value.items())
    return str(value)


#: Group-report sections: key, title, explanation, [(column, header)].
_GROUP_SECTIONS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("distribution_distance", "Distribution distance",
     ("Distance between the sites' intensity distributions (mean and largest over sites). "
      "Lower means the sites' intensity distributions agree better."),
     (("method", "Method"), ("mean", "Mean distance"), ("max", "Max distance"))),
    ("site_effect", "Site effect on image features",
     ("Kruskal-Wallis and one-way ANOVA tests of a site difference per feature (larger p-values and smaller "
      "H/F mean less site difference), and the R\u00b2 of a linear mixed model: marginal R\u00b2 is the variance "
      "explained by site, conditional R\u00b2 that explained by site and subject together, and subject "
      "R\u00b2 (their difference) that explained by the participants alone. Lower marginal R\u00b2 means "
      "less site effect; subject R\u00b2 should not fall."),
     (("feature", "Feature"), ("method", "Method"), ("kruskal_h", "KW H"), ("kruskal_p", "KW p"),
      ("anova_f", "ANOVA F"), ("anova_p", "ANOVA p"), ("marginal_r2", "Marginal R\u00b2"),
      ("conditional_r2", "Conditional R\u00b2"), ("subject_r2", "Subject R\u00b2"))),
    ("classifier", "Site classifier",
     ("Cross-validated prediction of the acquisition site from image features. Accuracy closer to the chance "
      "level means less site information left in the images."),
     (("method", "Method"), ("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
      ("f1_macro", "Macro F1"), ("chance", "Chance"), ("n_splits", "Splits"))),
    ("covariates", "Biological covariates",
     ("Association between image features and biological covariates. Harmonization should keep these "
      "associations (similar correlations before and after) while removing site effects."),
     (("covariate", "Covariate"), ("feature", "Feature"), ("method", "Method"), ("pearson_r", "Pearson r"),
      ("pearson_p", "Pearson p"), ("spearman_rho", "Spearman \u03c1"))),
    ("traveling", "Traveling subjects",
     ("Similarity of each participant's harmonized image to the same participant's own scan at the target site. "
      "Higher PSNR, SSIM and MS-SSIM and lower RMSE and LPIPS mean closer to the target-site scan."),
     (("method", "Method"), ("image", "Image"), ("n", "Pairs"), ("rmse", "RMSE"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
      ("ms_ssim", "MS-SSIM"), ("lpips", "LPIPS"))),
    ("fa_cov", "FA coefficient of variation across sites",
     ("Coefficient of variation of each participant's FA feature across the sites it was scanned at, "
      "averaged over participants. Lower means more consistent FA across sites."),
     (("feature", "Feature"), ("method", "Method"), ("cov_mean", "Mean CoV"), ("cov_sd", "SD of CoV"),
      ("n_subjects", "Subjects"))),
)


#: ``not_applicable`` keys that qualify a section: key -> (section, label).
_RELATED = {"mixed_model": ("site_effect", "mixed-model R\u00b2")}
_METHOD_NAMES = ("unharmonized", "ihf-harmony", "histogram-matching", "combat")


def _fmt_with_sd(row: Mapping, column: str) -> str:
    text = _fmt(row.get(column), column)
    sd = row.get(f"{column}_sd")
    return text if _is_missing(sd) or _is_missing(row.get(column)) else f"{text} \u00b1 {_fmt(sd, column)}"


def _table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]]) -> dict:
    known = [c for c, _ in columns]
    extra: list[str] = []
    for row in rows:
        for key, value in row.items():
            # ``<metric>_sd`` is shown with its metric ("mean ± sd"), not as a column of its own
            if key.endswith("_sd") and key[:-3] in row:
                continue
            if key not in known and key not in extra and (isinstance(value, (str, int, float)) or value is None):
                extra.append(key)
    shown = [(c, h) for c, h in columns if any(c in row for row in rows)] + [(c, c) for c in extra]
    numeric = {c for c, _ in shown
               if all(isinstance(row.get(c), (int, float, np.number)) or row.get(c) is None for row in rows)}
    return {
        "headers": [{"text": h, "numeric": c in numeric} for c, h in shown],
        "rows": [[{"text": _fmt_with_sd(row, c), "numeric": c in numeric} for c, _ in shown] for row in rows],
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", str(text)) or "x"


def _group_modality(name: str, info: Mapping, evaluation: Mapping, output_dir: Path, figures_dir: Path) -> dict:
    from . import figures

    not_applicable = info.get("not_applicable") or {}
    not_applicable = not_applicable if isinstance(not_applicable, Mapping) else {}
    methods = [str(m) for m in (info.get("methods") or [])]
    methods += [str(m) for m in evaluation.get("methods") or [] if str(m) not in methods]
    target = evaluation.get("target_site")
    title = _MODALITY_TITLES.get(name, str(name))
    sites = info.get("sites") or {}
    facts = [
        ("Images", _fmt(info.get("n_images"))),
        ("Subjects", _fmt(info.get("n_subjects"))),
        ("Sites", ", ".join(f"{site} ({_fmt(n)})" for site, n in sites.items()) if isinstance(sites, Mapping)
         else _fmt(sites)),
    ]
    block = {"title": title, "anchor": f"mod-{_slug(name)}", "facts": facts, "figures": [], "notes": [],
             "sections": []}

    def draw(stem: str, caption: str, function: Callable[[Path], Path]) -> dict | None:
        path = figures_dir / f"desc-{stem}_{_slug(name)}.png"
        try:
            function(path)
        except Exception as error:  # a figure must never stop the report
            _LOGGER.warning("group report: figure %s failed: %s", path.name, error, exc_info=True)
            block["notes"].append(f"The figure '{caption}' could not be drawn: {error}")
            return None
        return {"src": quote(path.relative_to(output_dir).as_posix()), "caption": caption,
                "alt": f"{caption} ({path.name})"}

    kdes = info.get("kdes") or {}
    kde = {"title": "Intensity distributions per site", "anchor": f"{block['anchor']}-kdes",
           "explanation": "Density of brain intensities per site (one curve per site, one panel per method). "
                          "Curves that overlap mean a small site effect; curves exist only for methods that "
                          "produce images.",
           "figure": None, "table": None, "note": None, "note_class": "", "extra_notes": []}
    if isinstance(kdes, Mapping) and kdes:
        kde["figure"] = draw("sitekde", f"{title}: intensity density per site and method",
                             lambda p: figures.site_kde_figure(p, kdes, methods=methods, target_site=target))
    else:
        reason = not_applicable.get("kdes")
        kde["note"], kde["note_class"] = (f"Not applicable: {reason}", "na") if reason else ("No data.", "nodata")
    block["sections"].append(kde)
    for key, section_title, explanation, columns in _GROUP_SECTIONS:
        rows = info.get(key) or []
        rows = [row for row in rows if isinstance(row, Mapping)] if isinstance(rows, Sequence) else []
        reason = not_applicable.get(key)
        if key == "fa_cov" and not rows and not reason and name != "dwi":
            continue
        section = {"title": section_title, "anchor": f"{block['anchor']}-{_slug(key)}", "explanation": explanation,
                   "figure": None, "table": None, "note": None, "note_class": "", "extra_notes": []}
        section["extra_notes"].extend(f"Not applicable ({label}): {not_applicable[k]}"
                                      for k, (owner, label) in _RELATED.items()
                                      if owner == key and not_applicable.get(k))
        if rows and reason:
            section["extra_notes"].append(f"Not applicable in part: {reason}")
        if rows:
            section["table"] = _table(rows, columns)
            if key == "classifier":
                section["figure"] = draw("classifier", f"{title}: site-classifier accuracy per method "
                                         "(dashed: chance level)",
                                         lambda p, rows=rows: figures.classifier_figure(p, rows, methods=methods))
        elif reason:
            section["note"], section["note_class"] = f"Not applicable: {reason}", "na"
        else:
            section["note"], section["note_class"] = "No data.", "nodata"
        block["sections"].append(section)
    known = {key for key, *_ in _GROUP_SECTIONS} | {"kdes"} | set(_RELATED)
    for key, reason in not_applicable.items():
        if key not in known and reason:
            label = f"method {key}" if key in methods or key in _METHOD_NAMES else str(key).replace("_", " ")
            block["notes"].append(f"Not applicable ({label}): {reason}")
    return block


#: Columns of the group report's per-step registration table.
_REGISTRATION_COLUMNS = (
    ("label", "Step"), ("n", "Registrations"), ("n_flagged", "Flagged"), ("mask_dice_median", "Median Dice"),
    ("mask_dice_min", "Min Dice"), ("correlation_median", "Median correlation"),
    ("correlation_min", "Min correlation"), ("displacement_mm_max", "Max displacement (mm)"),
    ("rotation_deg_max", "Max rotation (deg)"),
)


def _group_registration(info, output_dir: Path) -> dict | None:
    """The group report's registration block (its top box and per-step table); ``None`` when the
    evaluation has no ``registration`` section."""
    from .registrations import step_label, threshold_sentence

    if not isinstance(info, Mapping):
        return None
    block = {"error": info.get("error"), "n_checked": int(info.get("n_checked") or 0), "flagged": [],
             "sessions": [str(s) for s in info.get("flagged_sessions") or []], "not_recorded": [],
             "steps": None, "thresholds": threshold_sentence()}
    for entry in info.get("flagged") or []:
        if not isinstance(entry, Mapping):
            continue
        subject, session = entry.get("subject"), entry.get("session")
        page = f"sub-{subject}.html"
        link = None
        if subject and (output_dir / page).is_file():
            link = quote(page) + (f"#ses-{quote(str(session))}" if session else "")
        reasons = entry.get("reasons") or []
        block["flagged"].append({
            "subject": f"sub-{subject}" if subject else "n/a", "session": str(session) if session else "n/a",
            "link": link, "image": str(entry.get("image") or "n/a"), "file": str(entry.get("file") or ""),
            "step": str(entry.get("step_label") or step_label(str(entry.get("step")))),
            "reasons": "; ".join(str(r) for r in reasons) if isinstance(reasons, list) else str(reasons),
        })
    block["not_recorded"] = [str(f) for f in info.get("not_recorded") or []]
    steps = info.get("steps") or {}
    rows = [{**{c: value.get(c) for c, _ in _REGISTRATION_COLUMNS}, "label": value.get("label") or step_label(name)}
            for name, value in steps.items() if isinstance(value, Mapping)] if isinstance(steps, Mapping) else []
    if rows:
        block["steps"] = _table(rows, _REGISTRATION_COLUMNS)
    return block


def write_group_report(output_dir: Path, evaluation: dict) -> Path:
    """Write the group report ``group_report.html`` and its figures under ``group/figures/``.

    Parameters
    ----------
    output_dir : Path
        The derivatives (output) directory.
    evaluation : dict
        The group evaluation: ``target_site``, ``generated``, ``command``, ``methods`` and,
        per modality under ``modalities``, the site KDE curves and the tables
        (``distribution_distance``, ``site_effect``, ``classifier``, ``covariates``,
        ``traveling``, ``fa_cov``) with ``not_applicable`` reasons. Missing pieces are
        reported as "no data"; unknown keys are ignored. With a ``registration`` section
        (:func:`ihf_bids.qc.registrations.collect_registrations`) the flagged registrations
        are listed at the top, and a per-step table follows the summary.

    Returns
    -------
    Path
        ``output_dir / "group_report.html"``.
    """
    from .. import __version__

    output_dir = Path(output_dir)
    figures_dir = output_dir / "group" / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    modalities = evaluation.get("modalities") or {}
    blocks = [_group_modality(str(name), info, evaluation, output_dir, figures_dir)
              for name, info in modalities.items() if isinstance(info, Mapping)]
    target = evaluation.get("target_site")
    summary = [
        ("Target site", str(target) if target else "none"),
        ("Methods", ", ".join(str(m) for m in evaluation.get("methods") or []) or "n/a"),
        ("Generated", str(evaluation.get("generated") or _now())),
        ("Command", str(evaluation.get("command") or "n/a")),
        ("ihf-bids version", __version__),
    ]
    registration = _group_registration(evaluation.get("registration"), output_dir)
    html = _environment().get_template("group.html").render(summary=summary, modalities=blocks,
                                                             registration=registration,
                                                             generated=_now(), version=__version__)
    return _write_text(output_dir / "group_report.html", html)


# --------------------------------------------------------------------------- screenshots


def _chromium() -> str | None:
    for name in _CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot_html(html_path: Path, png_path: Path, *, width: int = 1280, height: int = 2000,
                    timeout: float = 120.0) -> Path:
    """Screenshot an HTML file with headless Chromium (offline; for the documentation).

    Parameters
    ----------
    html_path : Path
        The page to render (a local file).
    png_path : Path
        PNG file to write (atomically); parent folders are created.
    width, height : int
        Window size in CSS pixels: the screenshot shows the top ``height`` pixels of the page.
    timeout : float, default=120
        Seconds before Chromium is stopped.

    Returns
    -------
    Path
        ``png_path``.

    Raises
    ------
    FileNotFoundError
        No such HTML file, or no Chromium (or Chrome) executable on ``PATH``.
    RuntimeError
        Chromium failed or wrote no screenshot.
    """
    if not Path(html_path).is_file():
        raise FileNotFoundError(f"{html_path} does not exist; nothing to screenshot")
    browser = _chromium()
    if browser is None:
        raise FileNotFoundError("no chromium executable found on PATH (install Debian's 'chromium' package)")
    html_path = Path(html_path).resolve()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ihf-bids-chromium-") as scratch:
        shot = Path(scratch) / "screenshot.png"
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--disable-extensions", "--mute-audio", f"--user-data-dir={Path(scratch) / 'profile'}",
            f"--window-size={int(width)},{int(height)}", f"--screenshot={shot}", html_path.as_uri(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                                env={**os.environ, "HOME": scratch})
        if not shot.is_file() or shot.stat().st_size == 0:
            raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
        from ..harmonize.checkpoint import write_bytes_atomically

        write_bytes_atomically(png_path, lambda handle: handle.write(shot.read_bytes()))
    return png_path
