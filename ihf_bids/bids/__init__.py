"""BIDS input and output: find the inputs, tell the sites, name and describe the outputs.

- :func:`collect_inputs` returns a :class:`SessionInputs` per session (T1w, T2w, DWI runs);
  :func:`check_bids_dataset` and :func:`check_output_paths` check the paths given to the app.
- :func:`find_sites` tells each session's site (``sessions.tsv``, ``participants.tsv`` or
  sidecars).
- :func:`derivative_path` names every output file; :func:`write_dataset_description`,
  :func:`write_bidsignore`, :func:`write_citation` and :func:`write_sidecar` write the
  dataset-level files and sidecars (safe with many concurrent participant jobs).
- :func:`validate_dataset` runs ``bids-validator-deno``.
"""

from __future__ import annotations

from .derivatives import (
    BIDSIGNORE_PATTERNS,
    bids_uri,
    copy_atomically,
    derivative_path,
    parse_entities,
    write_bidsignore,
    write_citation,
    write_dataset_description,
    write_sidecar,
)
from .layout import (
    DWIRun,
    SessionInputs,
    check_bids_dataset,
    check_output_paths,
    collect_inputs,
    load_bids_filters,
    load_metadata,
    normalize_labels,
)
from .sites import SITE_SOURCES, find_sites, sanitize_label
from .validation import ValidationIssue, ValidationReport, find_validator, validate_dataset

__all__ = [
    "copy_atomically",
    "BIDSIGNORE_PATTERNS",
    "SITE_SOURCES",
    "DWIRun",
    "SessionInputs",
    "ValidationIssue",
    "ValidationReport",
    "bids_uri",
    "check_bids_dataset",
    "check_output_paths",
    "collect_inputs",
    "derivative_path",
    "find_sites",
    "find_validator",
    "load_bids_filters",
    "load_metadata",
    "normalize_labels",
    "parse_entities",
    "sanitize_label",
    "validate_dataset",
    "write_bidsignore",
    "write_citation",
    "write_dataset_description",
    "write_sidecar",
]
