"""Find the inputs of each session in a BIDS dataset, and check the paths given to the app.

The dataset is indexed with pybids in memory (nothing is written inside the
dataset). Sidecars, ``.bval`` and ``.bvec`` files are found by the BIDS inheritance
principle (:func:`applicable_files`).

Examples
--------
>>> normalize_labels(["sub-02", "01", "02"], "sub")
['01', '02']
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputDataError, UsageError
from .derivatives import ENTITY_ORDER, parse_entities

__all__ = [
    "DWIRun",
    "SessionInputs",
    "applicable_files",
    "check_bids_dataset",
    "check_output_paths",
    "collect_inputs",
    "load_bids_filters",
    "load_metadata",
    "normalize_labels",
]

LOGGER = logging.getLogger("ihf_bids.bids")

#: pybids queries of the images, by modality; ``--bids-filter-file`` keys are their lower-case names.
BASE_QUERIES: dict[str, dict[str, Any]] = {
    "T1w": {"datatype": "anat", "suffix": "T1w", "extension": [".nii", ".nii.gz"]},
    "T2w": {"datatype": "anat", "suffix": "T2w", "extension": [".nii", ".nii.gz"]},
    "dwi": {"datatype": "dwi", "suffix": "dwi", "extension": [".nii", ".nii.gz"]},
}
_LABEL = re.compile(r"[A-Za-z0-9]+")
_CONTAINER_HINT = (
    "if ihf-bids runs in a container, BIDS_DIR is the path inside the container: check that the "
    "dataset is mounted there (e.g. docker run -v /host/bids:/data:ro ... /data ...; "
    "singularity run -B /host/bids:/data ...)"
)


# --------------------------------------------------------------------------- #
# data classes
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class DWIRun:
    """One diffusion-weighted series and its companion files.

    Attributes
    ----------
    nifti : pathlib.Path
        The ``_dwi.nii[.gz]`` image.
    bval, bvec : pathlib.Path or None
        Gradient files found by BIDS inheritance; ``None`` when absent (reported by the
        DWI code, which knows whether it needs them).
    sidecar : pathlib.Path or None
        The most specific JSON sidecar that applies to the image.
    """

    nifti: Path
    bval: Path | None = None
    bvec: Path | None = None
    sidecar: Path | None = None

    @property
    def entities(self) -> dict[str, str]:
        """Entities of the image name (short keys, plus ``suffix``, ``extension``, ``datatype``)."""
        return parse_entities(self.nifti)


@dataclass(frozen=True)
class SessionInputs:
    """The images of one session (or one subject, in datasets without sessions).

    Attributes
    ----------
    subject : str
        Participant label, without ``sub-``.
    session : str or None
        Session label, without ``ses-``; ``None`` when the dataset has no sessions.
    t1w, t2w : tuple of pathlib.Path
        Anatomical images, sorted.
    dwi : tuple of DWIRun
        Diffusion series, sorted by image path.

    Examples
    --------
    >>> s = SessionInputs("01", "A")
    >>> s.key, s.label, s.entities
    (('01', 'A'), 'sub-01_ses-A', {'subject': '01', 'session': 'A'})
    >>> SessionInputs("01", None).label
    'sub-01'
    """

    subject: str
    session: str | None
    t1w: tuple[Path, ...] = ()
    t2w: tuple[Path, ...] = ()
    dwi: tuple[DWIRun, ...] = ()

    @property
    def key(self) -> tuple[str, str | None]:
        """``(subject, session)``, the key of :func:`~ihf_bids.bids.find_sites`'s result."""
        return (self.subject, self.session)

    @property
    def entities(self) -> dict[str, str]:
        """pybids entities of the session (``subject`` and, if any, ``session``)."""
        out = {"subject": self.subject}
        if self.session is not None:
            out["session"] = self.session
        return out

    @property
    def label(self) -> str:
        """``sub-X_ses-Y`` (or ``sub-X``), the prefix of the session's file names."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session is not None else "")

    @property
    def images(self) -> tuple[Path, ...]:
        """All images of the session: T1w, T2w, then DWI."""
        return (*self.t1w, *self.t2w, *(run.nifti for run in self.dwi))


# --------------------------------------------------------------------------- #
# labels and paths
# --------------------------------------------------------------------------- #
def normalize_labels(labels: str | Iterable[str] | None, prefix: str) -> list[str] | None:
    """Strip ``<prefix>-`` from labels, de-duplicate and sort them.

    Parameters
    ----------
    labels : str or iterable of str or None
        Labels as given on the command line (``01`` or ``sub-01``).
    prefix : str
        ``"sub"`` or ``"ses"`` (a trailing ``-`` is accepted).

    Returns
    -------
    list of str or None
        ``None`` when ``labels`` is ``None`` (meaning: all).

    Raises
    ------
    UsageError
        A label that looks like a path or has characters other than letters and digits.

    Examples
    --------
    >>> normalize_labels("ses-pre", "ses")
    ['pre']
    >>> normalize_labels(["sub-01/"], "sub")
    Traceback (most recent call last):
    ...
    ihf_bids.errors.UsageError: participant label 'sub-01/' looks like a path; give the label only, e.g. 01 for sub-01
    """
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [labels]
    prefix = prefix.rstrip("-")
    what = {"sub": "participant", "ses": "session"}.get(prefix, prefix)
    option = {"sub": "--participant-label", "ses": "--session-label"}.get(prefix, "the label option")
    out = set()
    for raw in labels:
        text = str(raw).strip()
        if "/" in text or "\\" in text or text.startswith((".", "~")):
            raise UsageError(f"{what} label {raw!r} looks like a path; give the label only, e.g. 01 for {prefix}-01")
        if text.startswith(f"{prefix}-"):
            text = text[len(prefix) + 1 :]
        if not _LABEL.fullmatch(text):
            hint = "; separate several labels with spaces" if "," in text else ""
            raise UsageError(f"{what} label {raw!r} ({option}) is not a BIDS label: use letters and digits only{hint}")
        out.add(text)
    return sorted(out)


def check_bids_dataset(bids_dir: str | os.PathLike[str]) -> Path:
    """Check that ``bids_dir`` is the root of a BIDS dataset; return it as an absolute path.

    Raises
    ------
    UsageError
        Not a directory, or no ``dataset_description.json`` (the message says when a
        parent directory is the dataset root).
    InputDataError
        ``dataset_description.json`` cannot be read or is not a JSON object.
    """
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(bids_dir))))
    if not path.exists():
        raise UsageError(f"BIDS_DIR {path} does not exist; {_CONTAINER_HINT}")
    if not path.is_dir():
        raise UsageError(f"BIDS_DIR {path} is not a directory; give the root folder of the BIDS dataset")
    description = path / "dataset_description.json"
    if not description.is_file():
        hint = "give the dataset's root folder (the one holding dataset_description.json)"
        for parent in path.parents:
            if (parent / "dataset_description.json").is_file():
                hint = f"the dataset root seems to be {parent}; give that folder as BIDS_DIR"
                break
        raise UsageError(f"{path} is not a BIDS dataset: it has no dataset_description.json; {hint}")
    try:
        content = json.loads(description.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputDataError(
            f"{description} cannot be read as JSON ({err}); fix the file (it needs at least "
            '{"Name": "...", "BIDSVersion": "1.10.0"})'
        ) from err
    if not isinstance(content, dict):
        raise InputDataError(f"{description} must hold a JSON object with Name and BIDSVersion; fix the file")
    return path


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _writable(path: Path) -> bool:
    """Whether files can be created in ``path`` or, if it does not exist, in its nearest existing parent."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    if not probe.is_dir():
        return False
    if probe == path:
        try:
            with tempfile.TemporaryFile(dir=path):
                return True
        except OSError:
            return False
    return os.access(probe, os.W_OK | os.X_OK)


def check_output_paths(
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    work_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path | None]:
    """Refuse output and work directories that would write into the input dataset.

    ``bids_dir/derivatives/<name>`` is accepted as output (the BIDS convention); the
    dataset itself, ``bids_dir/derivatives`` and anything else inside the dataset are
    refused. The work directory may not be inside the dataset (derivatives included)
    nor inside the output directory.

    Parameters
    ----------
    bids_dir, output_dir : str or path-like
    work_dir : str or path-like, optional

    Returns
    -------
    tuple of (pathlib.Path, pathlib.Path or None)
        The absolute output and work directories (not created).

    Raises
    ------
    UsageError
        The message names the directory and what to do.
    """
    bids = Path(os.path.abspath(bids_dir)).resolve()
    out_given = Path(os.path.abspath(os.path.expanduser(os.fspath(output_dir))))
    out = out_given.resolve()
    if _is_within(out, bids):
        rel = out.relative_to(bids).parts
        if not (len(rel) >= 2 and rel[0] == "derivatives"):
            raise UsageError(
                f"OUTPUT_DIR {out_given} is inside the input dataset {bids}; write the outputs to "
                f"{bids / 'derivatives' / 'ihf-bids'} (the BIDS convention) or to a folder outside the dataset"
            )
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUTPUT_DIR {out_given} exists and is not a directory; choose another path")
    if not _writable(out):
        raise UsageError(
            f"OUTPUT_DIR {out_given} is not writable (or cannot be created); choose a writable folder "
            "(in a container, mount it read-write)"
        )
    work = None
    if work_dir is not None:
        work_given = Path(os.path.abspath(os.path.expanduser(os.fspath(work_dir))))
        work = work_given.resolve()
        if _is_within(work, bids):
            raise UsageError(
                f"the work directory {work_given} is inside the input dataset {bids}; give -w/--work-dir "
                "a folder outside the dataset (ideally on fast local scratch, one per job)"
            )
        if _is_within(work, out):
            raise UsageError(
                f"the work directory {work_given} is (inside) OUTPUT_DIR {out_given}; give -w/--work-dir "
                "a separate folder (intermediate files would end up in the derivative dataset)"
            )
        if work.exists() and not work.is_dir():
            raise UsageError(f"the work directory {work_given} exists and is not a directory; choose another path")
        if not _writable(work):
            raise UsageError(f"the work directory {work_given} is not writable (or cannot be created); choose another")
        work = work_given
    return out_given, work


# --------------------------------------------------------------------------- #
# BIDS inheritance
# --------------------------------------------------------------------------- #
def applicable_files(
    path: str | os.PathLike[str],
    bids_dir: str | os.PathLike[str],
    extension: str = ".json",
) -> list[Path]:
    """Files of ``extension`` that apply to ``path`` under the BIDS inheritance principle.

    A file applies when it has the same suffix, its entities are a subset of the data
    file's, and it lies in the data file's directory or one of its parents up to
    ``bids_dir``. At each level the file with the most entities is taken.

    Parameters
    ----------
    path : str or path-like
        A data file inside ``bids_dir``.
    bids_dir : str or path-like
        The dataset root.
    extension : str, default ".json"
        ``.json``, ``.bval``, ``.bvec``, ...

    Returns
    -------
    list of pathlib.Path
        From the least specific (top level) to the most specific; empty if none.
    """
    path = Path(path)
    root = Path(os.path.abspath(bids_dir))
    entities = parse_entities(path)
    suffix = entities["suffix"]
    keys = {k: v for k, v in entities.items() if k in ENTITY_ORDER}
    directory = Path(os.path.abspath(path.parent))
    levels = [directory, *[p for p in directory.parents if _is_within(p, root)]]
    found = []
    for level in reversed(levels):
        candidates = []
        try:
            names = os.listdir(level)
        except OSError:
            continue
        for name in names:
            if not name.endswith(f"_{suffix}{extension}") and name != f"{suffix}{extension}":
                continue
            if name == f"{suffix}{extension}":
                cand: dict[str, str] = {}
            else:
                stem = name[: -len(f"_{suffix}{extension}")]
                try:
                    cand = dict(part.split("-", 1) for part in stem.split("_"))
                except ValueError:
                    continue
            if all(keys.get(k) == v for k, v in cand.items()):
                candidates.append((len(cand), name))
        if candidates:
            found.append(level / max(candidates)[1])
    return found


def load_metadata(path: str | os.PathLike[str], bids_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata of a data file: its applicable JSON sidecars merged, most specific last.

    Raises
    ------
    InputDataError
        A sidecar that is not valid JSON (the message names it).
    """
    merged: dict[str, Any] = {}
    for sidecar in applicable_files(path, bids_dir, ".json"):
        try:
            content = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputDataError(f"{sidecar} cannot be read as JSON ({err}); fix or remove the sidecar") from err
        if not isinstance(content, dict):
            raise InputDataError(f"{sidecar} must hold a JSON object; fix or remove the sidecar")
        merged.update(content)
    return merged


def _nearest(path: Path, bids_dir: Path, extension: str) -> Path | None:
    files = applicable_files(path, bids_dir, extension)
    return files[-1] if files else None


# --------------------------------------------------------------------------- #
# filters
# --------------------------------------------------------------------------- #
_SHORT_TO_LONG = dict(ENTITY_ORDER)


def load_bids_filters(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Read and check a ``--bids-filter-file``: ``{"t1w"|"t2w"|"dwi": {entity: value}}``.

    Values are strings, integers or lists of them; ``null`` means "entity absent" and
    ``"*"`` "any value". Short entity names (``acq``, ``rec``, ``dir``) are accepted.

    Parameters
    ----------
    source : str, path-like or mapping
        The JSON file, or its already parsed content.

    Returns
    -------
    dict
        Keys ``T1w``, ``T2w``, ``dwi`` (those given), values entity filters with pybids'
        long entity names and ``None``/``"*"`` kept as is.

    Raises
    ------
    UsageError
        Unreadable file, invalid JSON, unknown query or invalid value (names the file).

    Examples
    --------
    >>> load_bids_filters({"t1w": {"rec": "norm", "run": None}, "dwi": {"acq": "*"}})
    {'T1w': {'reconstruction': 'norm', 'run': None}, 'dwi': {'acquisition': '*'}}
    """
    name = "the BIDS filters"
    if isinstance(source, Mapping):
        content: Any = source
    else:
        name = f"--bids-filter-file {source}"
        try:
            content = json.loads(Path(source).read_text(encoding="utf-8"))
        except OSError as err:
            raise UsageError(f"{name} cannot be read ({err.strerror or err}); check the path") from err
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{name} is not valid JSON ({err}); fix the file") from err
    example = 'e.g. {"t1w": {"reconstruction": "norm"}, "dwi": {"direction": "AP", "run": null}}'
    if not isinstance(content, Mapping):
        raise UsageError(f"{name} must be a JSON object keyed by query (t1w, t2w, dwi), {example}")
    queries = {key.lower(): key for key in BASE_QUERIES}
    out: dict[str, dict[str, Any]] = {}
    for key, filters in content.items():
        query = queries.get(str(key).lower())
        if query is None:
            raise UsageError(f"{name}: unknown query {key!r}; use {', '.join(sorted(queries))}, {example}")
        if not isinstance(filters, Mapping):
            raise UsageError(f"{name}: the value of {key!r} must be an object of entity filters, {example}")
        checked: dict[str, Any] = {}
        for entity, value in filters.items():
            entity = _SHORT_TO_LONG.get(entity, entity)
            items = value if isinstance(value, list) else [value]
            if not items or not all(
                v is None or (isinstance(v, (str, int)) and not isinstance(v, bool)) for v in items
            ):
                raise UsageError(
                    f"{name}: {key}.{entity} = {value!r}; use a string, an integer, a list of them, "
                    'null (entity absent) or "*" (any value)'
                )
            if isinstance(value, list) and any(v is None or v == "*" for v in value):
                raise UsageError(f'{name}: {key}.{entity}: null and "*" cannot be list items; use them alone')
            checked[entity] = value
        out[query] = checked
    return out


def _pybids_filters(filters: Mapping[str, Any]) -> dict[str, Any]:
    from bids.layout import Query

    def convert(value):
        if value is None:
            return Query.NONE
        if value == "*":
            return Query.ANY
        return value

    return {key: convert(value) for key, value in filters.items()}


# --------------------------------------------------------------------------- #
# collection
# --------------------------------------------------------------------------- #
def _shorten(labels: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f", ... ({len(labels)} in all)" if len(labels) > limit else "") if labels else "none"


def collect_inputs(
    bids_dir: str | os.PathLike[str],
    *,
    participant_labels: Iterable[str] | None = None,
    session_labels: Iterable[str] | None = None,
    bids_filters: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    modalities: Sequence[str] = ("T1w", "T2w", "dwi"),
) -> list[SessionInputs]:
    """Collect the images of every selected session.

    Parameters
    ----------
    bids_dir : str or path-like
        Root of the BIDS dataset (checked with :func:`check_bids_dataset`).
    participant_labels, session_labels : iterable of str, optional
        Labels with or without ``sub-``/``ses-``; default all.
    bids_filters : str, path-like or mapping, optional
        A ``--bids-filter-file`` path or its content (see :func:`load_bids_filters`).
    modalities : sequence of str, default ("T1w", "T2w", "dwi")
        The images to collect.

    Returns
    -------
    list of SessionInputs
        Sorted by subject and session; sessions without any of the images are left out
        (and logged).

    Raises
    ------
    UsageError
        Unknown labels (listing those found), a bad filter file, an unknown modality.
    InputDataError
        The dataset has no subjects, or none of the selected sessions has an image.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    root = check_bids_dataset(bids_dir)
    unknown = [m for m in modalities if m not in BASE_QUERIES]
    if unknown:
        raise UsageError(f"unknown modalities {unknown}; use {', '.join(BASE_QUERIES)}")
    filters = load_bids_filters(bids_filters) if bids_filters is not None else {}
    filter_name = f" (with the filters of {bids_filters})" if isinstance(bids_filters, (str, os.PathLike)) else ""
    participants = normalize_labels(participant_labels, "sub")
    sessions_wanted = normalize_labels(session_labels, "ses")

    # In memory only: no database is written inside (or outside) the dataset.
    layout = BIDSLayout(root, validate=False, indexer=BIDSLayoutIndexer(validate=False, index_metadata=False))
    subjects = sorted(layout.get_subjects())
    if not subjects:
        raise InputDataError(f"{root} has no sub-<label> folders with BIDS files; check BIDS_DIR; {_CONTAINER_HINT}")
    if participants is not None:
        missing = [p for p in participants if p not in subjects]
        if missing:
            raise UsageError(
                f"participant label(s) {', '.join(missing)} not found in {root} (found: {_shorten(subjects)}); "
                f"{_CONTAINER_HINT}"
            )
        subjects = participants
    all_sessions = sorted(layout.get_sessions(subject=subjects))
    if sessions_wanted is not None:
        missing = [s for s in sessions_wanted if s not in all_sessions]
        if missing:
            raise UsageError(
                f"session label(s) {', '.join(missing)} not found for the selected participants in {root} "
                f"(found: {_shorten(all_sessions)}); {_CONTAINER_HINT}"
            )

    queries = {}
    for modality in modalities:
        query = {**BASE_QUERIES[modality], **_pybids_filters(filters.get(modality, {}))}
        queries[modality] = query

    found: dict[tuple[str, str | None], dict[str, list[Path]]] = {}
    for modality, query in queries.items():
        kwargs = dict(query, subject=subjects, return_type="filename")
        if sessions_wanted is not None:
            kwargs["session"] = sessions_wanted
        try:
            files = layout.get(**kwargs)
        except (ValueError, TypeError) as err:
            raise UsageError(f"the BIDS filters for {modality}{filter_name} cannot be used: {err}") from err
        for filename in files:
            entities = parse_entities(filename)
            key = (entities["sub"], entities.get("ses"))
            found.setdefault(key, {m: [] for m in modalities})[modality].append(Path(filename))

    # Sessions that exist but have none of the images.
    present = {(s, ses) for s in subjects for ses in (layout.get_sessions(subject=s) or [None])}
    if sessions_wanted is not None:
        present = {k for k in present if k[1] in sessions_wanted}
    for key in sorted(present - set(found), key=lambda k: (k[0], k[1] or "")):
        LOGGER.warning(
            "sub-%s%s: no %s images%s; the session is skipped",
            key[0], f"_ses-{key[1]}" if key[1] else "", "/".join(modalities), filter_name,
        )  # fmt: skip
    if not found:
        raise InputDataError(
            f"no {', '.join(modalities)} images found in {root} for participant(s) {_shorten(subjects)}"
            f"{filter_name}; check the labels, --bids-filter-file and the dataset"
        )
    out = []
    for (subject, session), by_modality in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        dwi_runs = []
        for nifti in sorted(by_modality.get("dwi", [])):
            dwi_runs.append(
                DWIRun(
                    nifti=nifti,
                    bval=_nearest(nifti, root, ".bval"),
                    bvec=_nearest(nifti, root, ".bvec"),
                    sidecar=_nearest(nifti, root, ".json"),
                )
            )
        out.append(
            SessionInputs(
                subject=subject,
                session=session,
                t1w=tuple(sorted(by_modality.get("T1w", []))),
                t2w=tuple(sorted(by_modality.get("T2w", []))),
                dwi=tuple(dwi_runs),
            )
        )
    return out
