"""Names and dataset-level files of the derivative (output) dataset.

Every file ihf-bids writes is named by :func:`derivative_path`, which keeps the
source file's entities in BIDS order and adds the derivative ones. The files the
app writes (``<out>`` is the output directory):

- ``anat/sub-01_ses-A_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz`` (also T2w),
  ``..._desc-harmonized_T1w.nii.gz`` and ``..._desc-brain_mask.nii.gz``;
- ``anat/sub-01_ses-A_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat``: ANTs affine
  (ITK binary); with SyN also ``..._from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.nii.gz``
  (warp) and ``..._from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.nii.gz`` (inverse warp);
- ``dwi/sub-01_ses-A_dir-AP_space-MNI152NLin2009aSym_res-2_desc-preproc_dwi.nii.gz`` with
  ``.bval``, ``.bvec`` and ``.json``;
- ``dwi/..._res-2_model-tensor_param-fa_desc-preproc_dwimap.nii.gz`` and
  ``..._model-tensor_param-fa_desc-harmonized_dwimap.nii.gz``.

``_xfm`` and ``_dwimap`` files, the ``.bval``/``.bvec`` of preprocessed DWI, reports
(``*.html``, ``figures/``), ``logs/`` and crash folders ``sub-<label>/log/`` are not (yet) part of the BIDS specification; :func:`write_bidsignore` lists them in
``.bidsignore`` so that the validator passes on the output dataset.

Writers are safe when many participant jobs share one output directory: every
file is written to a temporary sibling and renamed into place, and only when it
is missing or its content differs; ``.bidsignore`` only gains the missing lines, the
same in every job.

Examples
--------
>>> derivative_path("out", "sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz",
...                 space="MNI152NLin2009aSym", desc="preproc").as_posix()
'out/sub-01/ses-A/anat/sub-01_ses-A_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz'
>>> derivative_path("out", {"subject": "01", "session": "A", "datatype": "anat"},
...                 from_="T1w", to="MNI152NLin2009aSym", mode="image",
...                 suffix="xfm", extension=".mat").name
'sub-01_ses-A_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..harmonize.checkpoint import write_bytes_atomically

__all__ = [
    "BIDSIGNORE_PATTERNS",
    "BIDS_VERSION",
    "CODE_URL",
    "ENTITY_ORDER",
    "bids_uri",
    "copy_atomically",
    "derivative_path",
    "parse_entities",
    "write_bidsignore",
    "write_citation",
    "write_dataset_description",
    "write_sidecar",
]

#: BIDS version the output dataset declares.
BIDS_VERSION = "1.10.0"
#: Where the code lives (``GeneratedBy[0].CodeURL``).
CODE_URL = "https://github.com/ihf-bids/ihf-bids"
#: Environment variables the container images set (``GeneratedBy[0].Container``).
CONTAINER_TYPE_ENV = "IHF_BIDS_CONTAINER_TYPE"
CONTAINER_TAG_ENV = "IHF_BIDS_CONTAINER_TAG"

#: Entities in the order they appear in file names (BIDS 1.10 schema order; the
#: not-yet-official ``from``, ``to``, ``mode``, ``model`` and ``param`` used by NiPreps
#: and QSIPrep sit between ``den`` and ``label``). Short key -> pybids' long name.
ENTITY_ORDER: dict[str, str] = {
    "sub": "subject",
    "ses": "session",
    "sample": "sample",
    "task": "task",
    "tracksys": "tracksys",
    "acq": "acquisition",
    "nuc": "nucleus",
    "voi": "volume",
    "ce": "ceagent",
    "trc": "tracer",
    "stain": "stain",
    "rec": "reconstruction",
    "dir": "direction",
    "run": "run",
    "mod": "modality",
    "echo": "echo",
    "flip": "flip",
    "inv": "inversion",
    "mt": "mtransfer",
    "part": "part",
    "proc": "processing",
    "hemi": "hemisphere",
    "space": "space",
    "split": "split",
    "recording": "recording",
    "chunk": "chunk",
    "seg": "segmentation",
    "res": "resolution",
    "den": "density",
    "from": "from",
    "to": "to",
    "mode": "mode",
    "model": "model",
    "param": "param",
    "label": "label",
    "desc": "description",
}
_LONG_TO_SHORT = {long: short for short, long in ENTITY_ORDER.items()}
_DATATYPES = frozenset(
    {"anat", "dwi", "func", "fmap", "perf", "beh", "eeg", "meg", "ieeg", "pet", "micr", "nirs", "motion", "mrs", "emg"}
)
# Datatype of a derivative when neither the caller nor the source says.
_SUFFIX_DATATYPE = {
    "T1w": "anat", "T2w": "anat", "FLAIR": "anat", "PDw": "anat", "T2starw": "anat",
    "probseg": "anat", "dseg": "anat", "xfm": "anat",
    "dwi": "dwi", "dwimap": "dwi", "dwiref": "dwi",
}  # fmt: skip
_LABEL = re.compile(r"[A-Za-z0-9]+")
_SUFFIX = re.compile(r"[A-Za-z0-9]+")

#: Lines of the output's ``.bidsignore``: files that are not (yet) in the specification.
#: Checked with bids-validator-deno: directory patterns must not end in "/" (``figures/``
#: does not match ``sub-01/figures``), and derivative DWI may not have ``.bval``/``.bvec``.
#: ``log`` covers NiPreps-style crash folders (``sub-<label>/log/<run>/``); ``group`` holds the
#: group report's figures.
BIDSIGNORE_PATTERNS: tuple[str, ...] = (
    "*.html",
    "logs",
    "log",
    "figures",
    "*_xfm.*",
    "*_dwimap.*",
    "*_dwi.bval",
    "*_dwi.bvec",
    "models",
    "group_*",
    "group",
)


# --------------------------------------------------------------------------- #
# names
# --------------------------------------------------------------------------- #
def copy_atomically(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """Copy ``source`` to ``destination`` through a temporary sibling and a rename.

    A reader (or a job killed half-way) never sees a partial file.
    """
    import shutil

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as handle:
        write_bytes_atomically(destination, lambda out: shutil.copyfileobj(handle, out, 1 << 20))
    return destination


def parse_entities(path: str | os.PathLike[str]) -> dict[str, str]:
    """Entities of a BIDS file name, with short keys, in file-name order.

    The result also holds ``suffix``, ``extension`` and, when the parent directory is
    a BIDS datatype directory, ``datatype``.

    Parameters
    ----------
    path : str or path-like
        A BIDS file name or path.

    Returns
    -------
    dict of str to str

    Raises
    ------
    ValueError
        The name has no ``sub-`` entity or a part that is not ``key-value``.

    Examples
    --------
    >>> parse_entities("sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_dwi.nii.gz")
    {'sub': '01', 'ses': 'A', 'dir': 'AP', 'suffix': 'dwi', 'extension': '.nii.gz', 'datatype': 'dwi'}
    """
    path = Path(path)
    stem, dot, rest = path.name.partition(".")
    parts = stem.split("_")
    if len(parts) < 2 or not parts[0].startswith("sub-"):
        raise ValueError(f"{path.name} is not a BIDS file name (expected sub-<label>_..._<suffix>.<ext>)")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep or not key or not value:
            raise ValueError(f"{path.name}: '{part}' is not a key-value entity")
        entities[key] = value
    entities["suffix"] = parts[-1]
    entities["extension"] = dot + rest
    if path.parent.name in _DATATYPES:
        entities["datatype"] = path.parent.name
    return entities


def _normalise_entities(source: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in source.items():
        if value is None:
            continue
        short = _LONG_TO_SHORT.get(key, key)
        if short == "from_":
            short = "from"
        out[short] = value
    return out


def _label(key: str, value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if isinstance(value, bool) or not _LABEL.fullmatch(text):
        raise ValueError(f"{key}-{text!s}: BIDS labels use letters and digits only")
    return text


#: BIDS datatype folders a derivative may go into (never a path: names are built from these)
DATATYPES = ("anat", "dwi", "func", "fmap", "perf", "figures")


def derivative_path(
    output_dir: str | os.PathLike[str],
    source_file_or_entities: str | os.PathLike[str] | Mapping[str, Any],
    *,
    space: str | None = None,
    res: str | int | None = None,
    desc: str | None = None,
    label: str | None = None,
    model: str | None = None,
    param: str | None = None,
    from_: str | None = None,
    to: str | None = None,
    mode: str | None = None,
    suffix: str | None = None,
    extension: str | None = ".nii.gz",
    datatype: str | None = None,
) -> Path:
    """Path of a derivative file: ``<output_dir>/sub-X[/ses-Y]/<datatype>/<name>``.

    The name keeps the source's entities (``sub``, ``ses``, ``acq``, ``rec``, ``dir``,
    ``run``, ...) and adds the given ones, all in BIDS order.

    Parameters
    ----------
    output_dir : str or path-like
        Root of the derivative dataset.
    source_file_or_entities : str, path-like or mapping
        The file this derivative comes from (a BIDS path), or its entities (short
        keys such as ``sub`` or pybids names such as ``subject``; ``suffix``,
        ``extension`` and ``datatype`` may be included).
    space, res, desc, label, model, param, from_, to, mode : str or int, optional
        Entities to set. ``None`` keeps the source's value (if any); ``""`` removes it.
    suffix : str, optional
        Suffix; default the source's.
    extension : str or None, default ".nii.gz"
        Extension (with or without the leading dot); ``None`` keeps the source's.
    datatype : str, optional
        Datatype directory; default the source's, else inferred from the suffix.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        No subject, an entity the naming does not know, a value with characters
        other than letters and digits, or no datatype.

    Examples
    --------
    >>> src = "/data/sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_dwi.nii.gz"
    >>> dwi = derivative_path("out", src, space="MNI152NLin2009aSym", res=2, desc="preproc")
    >>> dwi.as_posix()
    'out/sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_space-MNI152NLin2009aSym_res-2_desc-preproc_dwi.nii.gz'
    >>> derivative_path("out", dwi, model="tensor", param="fa", suffix="dwimap").name
    'sub-01_ses-A_dir-AP_space-MNI152NLin2009aSym_res-2_model-tensor_param-fa_desc-preproc_dwimap.nii.gz'
    >>> derivative_path("out", dwi, extension=".bval").name
    'sub-01_ses-A_dir-AP_space-MNI152NLin2009aSym_res-2_desc-preproc_dwi.bval'
    >>> derivative_path("out", "sub-01_T1w.nii.gz", space="MNI152NLin2009aSym", desc="brain",
    ...                 suffix="mask").as_posix()
    'out/sub-01/anat/sub-01_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz'
    """
    if isinstance(source_file_or_entities, Mapping):
        entities = _normalise_entities(source_file_or_entities)
    else:
        entities = parse_entities(source_file_or_entities)
    entities = dict(entities)
    src_suffix = entities.pop("suffix", None)
    src_extension = entities.pop("extension", None)
    src_datatype = entities.pop("datatype", None)

    updates = {"space": space, "res": res, "desc": desc, "label": label, "model": model,
               "param": param, "from": from_, "to": to, "mode": mode}  # fmt: skip
    for key, value in updates.items():
        if value is None:
            continue
        if value == "":
            entities.pop(key, None)
        else:
            entities[key] = value

    unknown = sorted(set(entities) - set(ENTITY_ORDER))
    if unknown:
        raise ValueError(f"unknown BIDS entities {unknown} (known: {', '.join(ENTITY_ORDER)})")
    if "sub" not in entities:
        raise ValueError("a derivative needs a subject (sub entity)")
    suffix = suffix if suffix is not None else src_suffix
    if not suffix or not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"invalid or missing suffix {suffix!r}")
    extension = extension if extension is not None else src_extension
    if not extension:
        raise ValueError("missing extension")
    if not extension.startswith("."):
        extension = "." + extension
    datatype = datatype or src_datatype or _SUFFIX_DATATYPE.get(suffix) or _SUFFIX_DATATYPE.get(src_suffix or "")
    if datatype is None:
        raise ValueError(f"cannot tell the datatype directory of a '{suffix}' file; pass datatype=")
    if datatype not in DATATYPES:
        raise ValueError(f"unknown BIDS datatype {datatype!r} (known: {', '.join(DATATYPES)})")

    parts = [f"{key}-{_label(key, entities[key])}" for key in ENTITY_ORDER if key in entities]
    name = "_".join([*parts, suffix]) + extension
    directory = Path(output_dir) / f"sub-{_label('sub', entities['sub'])}"
    if "ses" in entities:
        directory = directory / f"ses-{_label('ses', entities['ses'])}"
    return directory / datatype / name


def _within(path: Path, root: Path) -> Path | None:
    """``path`` relative to ``root`` (lexically, then with symlinks resolved), or None."""
    for p, r in ((Path(os.path.abspath(path)), Path(os.path.abspath(root))), (path.resolve(), root.resolve())):
        try:
            return p.relative_to(r)
        except ValueError:
            continue
    return None


def bids_uri(
    path: str | os.PathLike[str],
    bids_dir: str | os.PathLike[str],
    *,
    output_dir: str | os.PathLike[str] | None = None,
) -> str:
    """BIDS URI of a file: ``bids:raw:<relpath>`` for the input, ``bids::<relpath>`` for outputs.

    Parameters
    ----------
    path : str or path-like
        The file.
    bids_dir : str or path-like
        The input (raw) dataset, named ``raw`` in ``DatasetLinks``.
    output_dir : str or path-like, optional
        The derivative dataset; files inside it get ``bids::`` URIs (checked first, as
        the output may lie in ``bids_dir/derivatives``).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        ``path`` lies in neither dataset.

    Examples
    --------
    >>> bids_uri("/data/sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz", "/data")
    'bids:raw:sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz'
    >>> bids_uri("/data/derivatives/ihf-bids/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz", "/data",
    ...          output_dir="/data/derivatives/ihf-bids")
    'bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz'
    """
    path = Path(path)
    if output_dir is not None:
        rel = _within(path, Path(output_dir))
        if rel is not None:
            return f"bids::{rel.as_posix()}"
    rel = _within(path, Path(bids_dir))
    if rel is None:
        where = f"{bids_dir}" + (f" or {output_dir}" if output_dir is not None else "")
        raise ValueError(f"{path} is not inside {where}: no BIDS URI for it")
    return f"bids:raw:{rel.as_posix()}"


# --------------------------------------------------------------------------- #
# writers
# --------------------------------------------------------------------------- #
def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_text(fields: Mapping[str, Any]) -> str:
    return json.dumps(fields, indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n"


def _write_if_changed(path: Path, text: str) -> bool:
    """Atomically write ``text`` to ``path`` unless it already holds exactly that; True if written."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, lambda handle: handle.write(data))
    return True


def write_sidecar(path: str | os.PathLike[str], fields: Mapping[str, Any]) -> Path:
    """Write a JSON sidecar atomically, keys sorted; return its path.

    Parameters
    ----------
    path : str or path-like
        The ``.json`` file, or the data file it describes (its extension is replaced).
    fields : mapping
        JSON-serialisable metadata (paths and numpy values are converted; NaN refused).

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_name(path.name.partition(".")[0] + ".json")
    _write_if_changed(path, _json_text(fields))
    return path


def _file_uri(path: str | os.PathLike[str]) -> str:
    return Path(os.path.abspath(path)).as_uri()


def write_dataset_description(
    output_dir: str | os.PathLike[str],
    *,
    bids_dir: str | os.PathLike[str],
    version: str,
    container: Mapping[str, str] | None = None,
) -> Path:
    """Write ``dataset_description.json`` of the derivative dataset; return its path.

    Parameters
    ----------
    output_dir : str or path-like
        Root of the derivative dataset (created if missing).
    bids_dir : str or path-like
        The input dataset: ``SourceDatasets`` and ``DatasetLinks.raw`` (for the
        ``bids:raw:`` URIs in sidecars) point to it.
    version : str
        ihf-bids version.
    container : mapping, optional
        ``{"Type": ..., "Tag": ...}``; default from the environment variables
        ``IHF_BIDS_CONTAINER_TYPE`` and ``IHF_BIDS_CONTAINER_TAG`` set in the images.

    Returns
    -------
    pathlib.Path
    """
    if container is None and os.environ.get(CONTAINER_TYPE_ENV):
        container = {"Type": os.environ[CONTAINER_TYPE_ENV]}
        if os.environ.get(CONTAINER_TAG_ENV):
            container["Tag"] = os.environ[CONTAINER_TAG_ENV]
    generated = {"Name": "ihf-bids", "Version": str(version), "CodeURL": CODE_URL}
    if container:
        generated["Container"] = dict(container)
    raw = _file_uri(bids_dir)
    description = {
        "Name": "ihf-bids: harmonized MRI derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [{"URL": raw}],
        "DatasetLinks": {"raw": raw},
        "HowToAcknowledge": "Please cite the works listed in logs/CITATION.md.",
    }
    path = Path(output_dir) / "dataset_description.json"
    _write_if_changed(path, _json_text(description))
    return path


def write_bidsignore(output_dir: str | os.PathLike[str]) -> Path:
    """Write ``.bidsignore`` listing :data:`BIDSIGNORE_PATTERNS`; return its path.

    Lines already in an existing file are kept; missing patterns are appended.
    """
    path = Path(output_dir) / ".bidsignore"
    try:
        lines = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        lines = []
    missing = [pattern for pattern in BIDSIGNORE_PATTERNS if pattern not in lines]
    if missing:  # concurrent writers all add the same lines: the result is the same
        _write_if_changed(path, "\n".join([*[line for line in lines if line], *missing]) + "\n")
    return path


def write_citation(output_dir: str | os.PathLike[str], text: str) -> Path:
    """Write ``logs/CITATION.md`` (boilerplate of the methods); return its path."""
    if not text.endswith("\n"):
        text += "\n"
    path = Path(output_dir) / "logs" / "CITATION.md"
    _write_if_changed(path, text)
    return path
