"""Registration quality as recorded in the sidecars: the reports' tables and the group summary.

Every preprocessed image's sidecar has a ``Registration`` field, one record per registration
that placed the image on the template grid, keyed by step name (``T1wToMNI152NLin2009aSym``,
``T2wToT1w``, ``DwiToT1w``...)::

    {"Flagged": false, "Start": "centre of mass", "MaskDice": 0.9868, "Correlation": 0.7526,
     "DisplacementMm": 7.03, "RotationDeg": 2.36, "MutualInformation": 0.321,
     "StartsTried": [{"Start": ..., "MutualInformation": ..., "DisplacementMm": ...,
                      "RotationDeg": ..., "Implausible": "why it was rejected"}]}

plus ``"Flags": [reasons]`` when ``Flagged``. An image carries the records of every
registration it went through, so the T1w's template step is repeated in the T2w's and the
DWI's sidecars; the group summary counts each registration once. Sidecars written before
the field existed are counted as "not recorded". See docs/qc.md.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = [
    "collect_registrations",
    "flag_reasons",
    "is_flagged",
    "registration_records",
    "registration_rows",
    "rejected_starts",
    "step_label",
    "threshold_sentence",
]

#: Modalities whose preprocessed images carry a Registration field, in report order.
_MODALITIES = ("T1w", "T2w", "dwi")
_NAMES = {"dwi": "DWI", "Dwi": "DWI", "flair": "FLAIR", "Flair": "FLAIR"}
#: The statistics per step in the group summary: (sidecar key, JSON name).
_STATISTICS = (("MaskDice", "mask_dice"), ("Correlation", "correlation"))


def registration_records(sidecar: Mapping | None) -> dict[str, dict] | None:
    """The ``Registration`` records of a sidecar, by step; ``None`` when none is recorded.

    ``None`` means the sidecar predates the field (or has no usable one): the report says
    "not recorded". Records that are not JSON objects are left out.
    """
    value = (sidecar or {}).get("Registration")
    if not isinstance(value, Mapping):
        return None
    records = {str(step): dict(record) for step, record in value.items() if isinstance(record, Mapping)}
    return records or None


def _parts(step: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"(.+?)To([A-Z0-9].*)", str(step))
    return (match.group(1), match.group(2)) if match else None


def step_label(step: str) -> str:
    """A step name written readably: ``T2wToT1w`` -> ``T2w → T1w``, ``DwiToT1w`` -> ``DWI → T1w``."""
    parts = _parts(step)
    if parts is None:
        return str(step)
    return " \u2192 ".join(_NAMES.get(part, part) for part in parts)


def _is_template_step(step: str) -> bool:
    from ..templates import TEMPLATE_SPACE

    parts = _parts(step)
    return parts is not None and parts[1] in (TEMPLATE_SPACE, "Template")


def number(value) -> float | None:
    """A finite number, else ``None`` (missing, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def is_flagged(record: Mapping) -> bool:
    """Whether a registration record is flagged (``Flagged`` true, or reasons in ``Flags``)."""
    return record.get("Flagged") is True or bool(record.get("Flags"))


def flag_reasons(record: Mapping) -> list[str]:
    """Why a flagged record was flagged (``Flags``); one placeholder when it gives no reason."""
    flags = record.get("Flags")
    if isinstance(flags, str):
        flags = [flags]
    reasons = [str(f) for f in flags or [] if str(f).strip()] if isinstance(flags, (list, tuple, str)) else []
    if not reasons and is_flagged(record):
        reasons = ["flagged (no reason recorded)"]
    return reasons


def rejected_starts(record: Mapping) -> list[tuple[str, str]]:
    """``(start, why)`` of the starts tried and rejected as implausible."""
    tried = record.get("StartsTried")
    out = []
    for entry in tried if isinstance(tried, list) else []:
        if isinstance(entry, Mapping) and entry.get("Implausible"):
            out.append((str(entry.get("Start") or "unknown start"), str(entry["Implausible"])))
    return out


def _thresholds():
    """``(QC_THRESHOLDS, WITHIN_SESSION_BOUNDS)``, or ``(None, None)`` if they cannot be imported."""
    try:
        from ..preproc.registration import QC_THRESHOLDS, WITHIN_SESSION_BOUNDS
    except (ImportError, AttributeError):  # pragma: no cover - the module always defines them
        return None, None
    return dict(QC_THRESHOLDS), WITHIN_SESSION_BOUNDS


def _beyond(step: str, thresholds, bounds) -> dict[str, Callable]:
    """Per sidecar key, a test of whether a value is beyond the step's threshold."""
    if thresholds is None:
        return {}
    if _is_template_step(step):
        return {"MaskDice": lambda v: v < thresholds.get("TemplateMaskDice", -math.inf),
                "Correlation": lambda v: v < thresholds.get("TemplateCorrelation", -math.inf)}
    tests = {"MaskDice": lambda v: v < thresholds.get("WithinSessionMaskDice", -math.inf)}
    if bounds is not None:
        tests["DisplacementMm"] = lambda v: v > bounds.displacement_mm
        tests["RotationDeg"] = lambda v: v > bounds.rotation_deg
    return tests


def _cell(record: Mapping, key: str, digits: int, tests: Mapping) -> dict:
    value = number(record.get(key))
    if value is None:
        return {"text": "n/a", "beyond": False}
    return {"text": f"{value:.{digits}f}", "beyond": bool(key in tests and tests[key](value))}


def registration_rows(records: Mapping[str, Mapping]) -> list[dict]:
    """Table rows of a sidecar's records: the participant report's Registration table.

    Each row has ``step``, ``label``, ``start``, ``dice``, ``correlation``, ``displacement``,
    ``rotation`` (cells ``{"text", "beyond"}``: beyond the step's threshold), ``flagged``,
    ``reasons`` and ``rejected`` (``[(start, why)]``).
    """
    thresholds, bounds = _thresholds()
    rows = []
    for step, record in records.items():
        tests = _beyond(step, thresholds, bounds)
        rows.append({
            "step": step,
            "label": step_label(step),
            "start": str(record.get("Start") or "n/a"),
            "dice": _cell(record, "MaskDice", 3, tests),
            "correlation": _cell(record, "Correlation", 3, tests),
            "displacement": _cell(record, "DisplacementMm", 2, tests),
            "rotation": _cell(record, "RotationDeg", 2, tests),
            "flagged": is_flagged(record),
            "reasons": flag_reasons(record),
            "rejected": rejected_starts(record),
        })
    return rows


def threshold_sentence() -> str | None:
    """When a registration is flagged, in one sentence (from ``QC_THRESHOLDS`` and
    ``WITHIN_SESSION_BOUNDS``)."""
    thresholds, bounds = _thresholds()
    if not thresholds:
        return None
    parts = []
    tests = []
    if "TemplateMaskDice" in thresholds:
        tests.append(f"its brain mask overlaps the template's by Dice below {thresholds['TemplateMaskDice']:g}")
    if "TemplateCorrelation" in thresholds:
        tests.append(f"it correlates with the template below {thresholds['TemplateCorrelation']:g}")
    if tests:
        parts.append("to the template when " + " or ".join(tests))
    within = []
    if "WithinSessionMaskDice" in thresholds:
        within.append(f"the moved brain overlaps the reference's by Dice below {thresholds['WithinSessionMaskDice']:g}")
    if "MirrorMargin" in thresholds:
        within.append("its left-right mirror image fits the reference better (by more than "
                      f"{100 * thresholds['MirrorMargin']:g}% mutual information)")
    if within:
        parts.append("within the session when " + " or ".join(within))
    if not parts:
        return None
    sentence = "A registration is flagged " + "; ".join(parts) + "."
    if bounds is not None:
        sentence += (f" Within a session a start that moves the brain more than {bounds.displacement_mm:g} mm or "
                     f"rotates it more than {bounds.rotation_deg:g} degrees is rejected and the next one is tried.")
    return sentence


def _image_label(modality: str, entities: Mapping[str, str]) -> str:
    others = [f"{k}-{v}" for k, v in entities.items()
              if k not in ("sub", "ses", "space", "res", "desc", "suffix", "extension", "datatype")]
    name = _NAMES.get(modality, modality)
    return f"{name} ({', '.join(others)})" if others else name


def _summary(values: list[float], name: str, out: dict) -> None:
    out[f"{name}_median"] = statistics.median(values) if values else None
    out[f"{name}_min"] = min(values) if values else None


def collect_registrations(output_dir: Path) -> dict:
    """Every preprocessed image's registration records across an output tree, summarised.

    The images are those the group evaluation reads
    (:func:`ihf_bids.qc.evaluation.preproc_paths`). A registration repeated in several
    sidecars (the T1w's template step in the T2w's and the DWI's) is counted once, under the
    first image that records it (T1w before T2w before DWI). Never raises for a sidecar
    without the field: it is counted in ``not_recorded``.

    Returns
    -------
    dict
        ``n_images`` (preprocessed images looked at), ``n_checked`` (distinct registrations),
        ``n_flagged``, ``flagged`` (``subject``, ``session``, ``image``, ``file``, ``step``,
        ``step_label``, ``reasons``, ``also_in``), ``flagged_sessions`` (``sub-XX[_ses-YY]``),
        ``n_not_recorded`` and ``not_recorded`` (files without the field), ``steps`` (per step:
        ``n``, ``n_flagged``, median and minimum ``mask_dice`` and ``correlation``, maximum
        ``displacement_mm`` and ``rotation_deg``) and ``thresholds``.
    """
    from ..bids.derivatives import parse_entities
    from ..imageio import read_sidecar
    from .evaluation import preproc_paths

    output_dir = Path(output_dir)
    seen: dict[tuple, dict] = {}
    not_recorded: list[str] = []
    n_images = 0
    for modality in _MODALITIES:
        for path in preproc_paths(output_dir, modality):
            n_images += 1
            relative = path.relative_to(output_dir).as_posix()
            try:
                entities = parse_entities(path)
            except ValueError:
                entities = {}
            records = registration_records(read_sidecar(path))
            if records is None:
                not_recorded.append(relative)
                continue
            subject, session = entities.get("sub"), entities.get("ses")
            for step, record in records.items():
                key = (subject, session, step, json.dumps(record, sort_keys=True, default=str))
                if key in seen:
                    seen[key]["also_in"].append(relative)
                    continue
                seen[key] = {"subject": subject, "session": session, "image": _image_label(modality, entities),
                             "file": relative, "step": step, "record": record, "also_in": []}
    flagged, steps = [], {}
    for entry in seen.values():
        record = entry["record"]
        step = steps.setdefault(entry["step"], {"label": step_label(entry["step"]), "n": 0, "n_flagged": 0,
                                                "values": {key: [] for key in
                                                           ("MaskDice", "Correlation", "DisplacementMm",
                                                            "RotationDeg")}})
        step["n"] += 1
        for key, values in step["values"].items():
            value = number(record.get(key))
            if value is not None:
                values.append(value)
        if is_flagged(record):
            step["n_flagged"] += 1
            flagged.append({"subject": entry["subject"], "session": entry["session"], "image": entry["image"],
                            "file": entry["file"], "step": entry["step"], "step_label": step_label(entry["step"]),
                            "reasons": flag_reasons(record), "also_in": entry["also_in"]})
    flagged.sort(key=lambda f: (str(f["subject"]), str(f["session"] or "")))
    per_step = {}
    for name, step in steps.items():  # in the order first met: T1w steps, then T2w, then DWI
        values = step.pop("values")
        for key, json_name in _STATISTICS:
            _summary(values[key], json_name, step)
        step["displacement_mm_max"] = max(values["DisplacementMm"]) if values["DisplacementMm"] else None
        step["rotation_deg_max"] = max(values["RotationDeg"]) if values["RotationDeg"] else None
        per_step[name] = step
    thresholds, bounds = _thresholds()
    sessions = list(dict.fromkeys(
        f"sub-{f['subject']}" + (f"_ses-{f['session']}" if f["session"] else "") for f in flagged))
    return {
        "n_images": n_images,
        "n_checked": len(seen),
        "n_flagged": len(flagged),
        "flagged_sessions": sessions,
        "flagged": flagged,
        "n_not_recorded": len(not_recorded),
        "not_recorded": not_recorded,
        "steps": per_step,
        "thresholds": {**(thresholds or {}),
                       **({"WithinSessionDisplacementMm": bounds.displacement_mm,
                           "WithinSessionRotationDeg": bounds.rotation_deg} if bounds is not None else {})},
    }
