"""Tell the site (scanner) of each session.

Sources, chosen with ``--site-source``:

``sessions``
    a column (``--site-column``, default ``site``) of ``sub-<label>/sub-<label>_sessions.tsv``;
``participants``
    the same column of ``participants.tsv`` (a subject's home site);
``sidecar``
    sidecar fields of the session's images (``--site-sidecar-fields``, default
    ``Manufacturer ManufacturersModelName``), joined: ``SiemensMAGNETOMPrismaFit``;
``auto``
    per session, the first of ``sessions``, ``participants`` and ``sidecar`` that
    gives a value.

Site labels are reduced to BIDS label characters (letters and digits) by
:func:`sanitize_label`; a label depends only on the session's own data, so every
participant job gets the same label for the same site.

Examples
--------
>>> sanitize_label("Philips Ingenia Elition X")
'PhilipsIngeniaElitionX'
"""

from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputDataError, UsageError
from .layout import SessionInputs, load_metadata

__all__ = ["SITE_SOURCES", "find_sites", "sanitize_label"]

LOGGER = logging.getLogger("ihf_bids.bids")

#: Accepted values of ``source`` (``--site-source``).
SITE_SOURCES = ("auto", "sessions", "participants", "sidecar")
_MISSING = {"", "n/a", "na", "nan", "none", "null"}
_OPTIONS_HINT = (
    "choose where sites come from with --site-source {auto,sessions,participants,sidecar}, "
    "--site-column COLUMN (sessions.tsv/participants.tsv) or --site-sidecar-fields FIELD [FIELD ...]"
)


def sanitize_label(value: object) -> str:
    """Reduce a value to a BIDS label: ASCII letters and digits only (may return ``""``).

    Examples
    --------
    >>> sanitize_label("MAGNETOM Prisma Fit (XA30)")
    'MAGNETOMPrismaFitXA30'
    >>> sanitize_label("Zürich-3T")
    'Zurich3T'
    """
    text = unicodedata.normalize("NFKD", str(value))
    return re.sub(r"[^A-Za-z0-9]", "", text.encode("ascii", "ignore").decode("ascii"))


def _read_tsv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows = list(reader)
            if reader.fieldnames is None:
                return []
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputDataError(f"{path} cannot be read as a tab-separated table ({err}); fix the file") from err


def _columns(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        header = handle.readline().rstrip("\r\n")
    return [c.strip() for c in header.split("\t")] if header else []


class _Tables:
    """participants.tsv and sessions.tsv, each read once."""

    def __init__(self, root: Path, column: str):
        self.root = root
        self.column = column
        self._participants: dict[str, str] | None = None
        self._sessions: dict[str, dict[str, str] | None] = {}

    def participants_path(self) -> Path:
        return self.root / "participants.tsv"

    def participants(self) -> dict[str, str]:
        """participant label -> raw column value (only rows with a value); {} if no column."""
        if self._participants is None:
            self._participants = {}
            path = self.participants_path()
            if path.is_file() and self.column in _columns(path):
                for row in _read_tsv(path):
                    label = row.get("participant_id", "").removeprefix("sub-")
                    value = row.get(self.column, "")
                    if label and value.lower() not in _MISSING:
                        self._participants[label] = value
        return self._participants

    def sessions_path(self, subject: str) -> Path:
        return self.root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"

    def sessions(self, subject: str) -> dict[str, str] | None:
        """session label -> raw column value; None if the file or the column is missing."""
        if subject not in self._sessions:
            path = self.sessions_path(subject)
            table = None
            if path.is_file() and self.column in _columns(path):
                table = {}
                for row in _read_tsv(path):
                    label = row.get("session_id", "").removeprefix("ses-")
                    value = row.get(self.column, "")
                    if label and value.lower() not in _MISSING:
                        table[label] = value
            self._sessions[subject] = table
        return self._sessions[subject]


def _from_sidecars(root: Path, session: SessionInputs, fields: Sequence[str]) -> tuple[str | None, str]:
    """Label from the sidecars of the session's images, or (None, why not)."""
    values: dict[str, dict[str, list[Path]]] = {f: {} for f in fields}
    for image in session.images:
        metadata = load_metadata(image, root)
        for f in fields:
            raw = metadata.get(f)
            if raw is None or sanitize_label(raw) == "":
                continue
            values[f].setdefault(str(raw).strip(), []).append(image)
    parts = []
    for f in fields:
        seen = values[f]
        if not seen:
            return None, f"no image of {session.label} has a sidecar with {f}"
        # Case and spacing variants of one value ("SIEMENS", "Siemens") are the same scanner.
        groups: dict[str, list[str]] = {}
        for raw in seen:
            groups.setdefault(sanitize_label(raw).lower(), []).append(raw)
        if len(groups) > 1:
            detail = "; ".join(f"{raw!r} in {', '.join(p.name for p in seen[raw])}" for raw in sorted(seen))
            raise InputDataError(
                f"the sidecars of {session.label} disagree on {f}: {detail}. One session must come from "
                "one scanner: fix the sidecars, split the session, or give the site in the "
                f"sessions.tsv/participants.tsv column ({_OPTIONS_HINT})"
            )
        parts.append(min(sanitize_label(raw) for raw in seen))
    return "".join(parts), ""


def find_sites(
    bids_dir: str | os.PathLike[str],
    sessions: Sequence[SessionInputs],
    *,
    source: str = "auto",
    column: str = "site",
    sidecar_fields: Sequence[str] = ("Manufacturer", "ManufacturersModelName"),
) -> dict[tuple[str, str | None], str]:
    """Site label of each session.

    Parameters
    ----------
    bids_dir : str or path-like
        Root of the BIDS dataset.
    sessions : sequence of SessionInputs
        From :func:`~ihf_bids.bids.collect_inputs`.
    source : {"auto", "sessions", "participants", "sidecar"}
        Where the site comes from (see the module docstring).
    column : str, default "site"
        Column of ``sessions.tsv`` and ``participants.tsv``.
    sidecar_fields : sequence of str
        Sidecar fields joined into the label.

    Returns
    -------
    dict
        ``{(subject, session): site_label}``; ``session`` is ``None`` in datasets without
        sessions.

    Raises
    ------
    UsageError
        Unknown ``source``, empty ``column`` or ``sidecar_fields``.
    InputDataError
        A session whose site cannot be told (names the session, the files looked at
        and the options), or whose sidecars disagree (names the files).
    """
    if source not in SITE_SOURCES:
        raise UsageError(f"--site-source {source!r} is not one of {', '.join(SITE_SOURCES)}")
    if not column:
        raise UsageError("--site-column must name a column of sessions.tsv/participants.tsv")
    if isinstance(sidecar_fields, str):
        sidecar_fields = (sidecar_fields,)
    if not sidecar_fields:
        raise UsageError("--site-sidecar-fields needs at least one field, e.g. Manufacturer")
    root = Path(os.path.abspath(bids_dir))
    tables = _Tables(root, column)
    order = ("sessions", "participants", "sidecar") if source == "auto" else (source,)

    sites: dict[tuple[str, str | None], str] = {}
    for session in sessions:
        tried = []
        label = None
        for kind in order:
            if kind == "sessions":
                if session.session is None:
                    tried.append("the dataset has no sessions, so no sessions.tsv")
                    continue
                table = tables.sessions(session.subject)
                path = tables.sessions_path(session.subject)
                raw = (table or {}).get(session.session)
                if raw is None:
                    why = "has no row with a value" if table is not None else "is missing or has no such column"
                    tried.append(f"{path} {why} for column {column!r}, session ses-{session.session}")
                    continue
            elif kind == "participants":
                path = tables.participants_path()
                raw = tables.participants().get(session.subject)
                if raw is None:
                    tried.append(f"{path} has no {column!r} value for sub-{session.subject}")
                    continue
            else:
                raw, why = _from_sidecars(root, session, sidecar_fields)
                if raw is None:
                    tried.append(f"sidecar fields {', '.join(sidecar_fields)}: {why}")
                    continue
            label = sanitize_label(raw)
            if not label:
                tried.append(f"{kind}: value {raw!r} has no letters or digits")
                continue
            LOGGER.debug("%s: site %s (from %s)", session.label, label, kind)
            break
        if not label:
            raise InputDataError(
                f"cannot tell the site of {session.label}: " + "; ".join(tried) + f". Add the site, or {_OPTIONS_HINT}"
            )
        sites[session.key] = label
    return sites
