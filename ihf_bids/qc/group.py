"""Group level: one table per modality of what the participant runs recorded, and the
harmonization evaluation (``group_qc.json``, ``group_report.html``)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..templates import TEMPLATE_SPACE

__all__ = ["collect_group_rows", "registration_summary", "write_group_report", "write_group_tables"]

_SUFFIXES = {"T1w": "T1w", "T2w": "T2w", "dwi": "dwimap"}


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}{key}.", inner, out)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out[prefix.rstrip(".")] = value


def collect_group_rows(output_dir: Path, modality: str) -> list[dict]:
    """One row per derivative image of ``modality`` (DWI: per FA map) with its sidecar's fields."""
    from ..bids.derivatives import parse_entities
    from ..imageio import read_sidecar

    rows = []
    suffix = _SUFFIXES[modality]
    for path in sorted(output_dir.glob(f"sub-*/**/*_space-{TEMPLATE_SPACE}*_{suffix}.nii.gz")):
        entities = parse_entities(path)
        fields = read_sidecar(path)
        row = {"file": str(path.relative_to(output_dir)), **{k: v for k, v in entities.items() if k != "space"}}
        flat: dict = {}
        _flatten("", {k: v for k, v in fields.items() if k != "Sources"}, flat)
        row.update(flat)
        rows.append(row)
    return rows


def _feature_columns(rows: list[dict], evaluation: dict | None, modality: str) -> None:
    """Add the evaluation's derived features of each row's image (``qc_<feature>`` columns)."""
    if not evaluation or modality not in evaluation.get("modalities", {}):
        return
    tables = evaluation["modalities"][modality].get("tables", {})
    by_image = {(entry["image"], method): entry for method, entries in tables.items() for entry in entries}
    for row in rows:
        method = {"preproc": "unharmonized", "harmonized": "ihf-harmony"}.get(row.get("desc"))
        entry = by_image.get((Path(row["file"]).name.split("_space-")[0], method))
        if entry:
            row.update({f"qc_{k}": round(v, 6) if isinstance(v, float) else v for k, v in entry.items()
                        if k not in ("subject", "site", "image")})


def write_group_tables(output_dir: Path, evaluation: dict | None = None) -> list[Path]:
    """Write ``group_<modality>.tsv`` for each modality with outputs; return the paths.

    With an ``evaluation`` (:func:`~ihf_bids.qc.evaluation.evaluate_cohort`) each row also
    gets the derived features of its image.
    """
    from ..harmonize.checkpoint import write_bytes_atomically

    written = []
    for modality in _SUFFIXES:
        rows = collect_group_rows(output_dir, modality)
        if not rows:
            continue
        _feature_columns(rows, evaluation, modality)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, delimiter="\t", lineterminator="\n", restval="n/a")
        writer.writeheader()
        writer.writerows(rows)
        path = output_dir / f"group_{modality}.tsv"
        write_bytes_atomically(path, lambda handle, text=buffer.getvalue(): handle.write(text.encode()))
        written.append(path)
    return written


def write_group_report(output_dir: Path, *, bids_dir: Path | None = None, target_site: str | None = None,
                       baselines: tuple[str, ...] = ("histogram-matching", "combat"),
                       modalities: tuple[str, ...] = ("T1w", "T2w", "dwi"), work_dir: Path | None = None,
                       seed: int = 0, command: str | None = None) -> list[Path]:
    """The group level's outputs: tables, ``group_qc.json`` and ``group_report.html``.

    ``group_qc.json`` holds the evaluation and, under ``registration``, the registration
    quality recorded in every preprocessed image's sidecar (:func:`registration_summary`);
    the report lists the flagged registrations at its top.

    Raises
    ------
    InputDataError
        When the derivatives cannot be evaluated (e.g. a sidecar without Site, several targets).
    """
    import sys

    from ..errors import InputDataError
    from ..harmonize.checkpoint import write_bytes_atomically
    from .evaluation import evaluate_cohort
    from .reports import write_group_report as render

    try:
        evaluation = evaluate_cohort(output_dir, bids_dir=bids_dir, target_site=target_site, baselines=baselines,
                                     modalities=modalities, work_dir=work_dir, seed=seed)
    except ValueError as err:
        raise InputDataError(f"the group evaluation cannot run: {err}") from err
    evaluation["command"] = command or "ihf-bids " + " ".join(sys.argv[1:])
    evaluation["registration"] = registration_summary(output_dir)
    written = write_group_tables(output_dir, evaluation)
    if not evaluation["modalities"]:
        return written
    path = output_dir / "group_qc.json"
    text = json.dumps(_finite_or_null(evaluation), indent=1, default=_json_default, allow_nan=False)
    write_bytes_atomically(path, lambda handle: handle.write(text.encode()))
    written += [path, render(output_dir, evaluation)]
    return written


def registration_summary(output_dir: Path) -> dict:
    """The ``registration`` section of ``group_qc.json``: every preprocessed image's recorded
    registrations (:func:`ihf_bids.qc.registrations.collect_registrations`).

    A failure to read them is logged and reported in the section (``error``); it never stops
    the group level.
    """
    import logging

    from .registrations import collect_registrations

    try:
        return collect_registrations(output_dir)
    except Exception as error:  # the summary must never stop the group level
        logging.getLogger("ihf_bids.qc").warning("group: the registration records could not be read: %s", error,
                                                 exc_info=True)
        return {"error": f"the registration records could not be read: {error}"}


def _finite_or_null(value):
    """NaN and infinities become null (JSON has no NaN)."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
