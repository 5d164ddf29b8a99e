"""Run the BIDS validator (``bids-validator-deno``, offline) and read its JSON report.

The validator is the ``bids-validator-deno`` package from PyPI; its executable is
looked up next to the running Python, then on ``PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputDataError, UsageError

__all__ = ["ValidationIssue", "ValidationReport", "find_validator", "validate_dataset"]

VALIDATOR = "bids-validator-deno"
_SKIP_HINT = "rerun with --skip-bids-validation to skip the check"


@dataclass(frozen=True)
class ValidationIssue:
    """One issue of the validator's report.

    Attributes
    ----------
    code : str
        Issue code, e.g. ``NOT_INCLUDED``.
    severity : str
        ``error`` or ``warning``.
    location : str or None
        Dataset-relative path, starting with ``/``.
    message : str
        The field at fault (``subCode``) and the first line of the explanation.

    Examples
    --------
    >>> str(ValidationIssue("NOT_INCLUDED", "error", "/MANIFEST.tsv", "not a BIDS file"))
    'NOT_INCLUDED /MANIFEST.tsv: not a BIDS file'
    """

    code: str
    severity: str
    location: str | None
    message: str = ""

    def __str__(self) -> str:
        text = self.code + (f" {self.location}" if self.location else "")
        return text + (f": {self.message}" if self.message else "")


@dataclass(frozen=True)
class ValidationReport:
    """The validator's findings on one dataset.

    Attributes
    ----------
    path : pathlib.Path
        The dataset.
    errors, warnings : tuple of ValidationIssue
    summary : dict
        The validator's summary (``subjects``, ``sessions``, ``dataTypes``, ...).
    returncode : int
        Exit status of the validator.
    """

    path: Path
    errors: tuple[ValidationIssue, ...] = ()
    warnings: tuple[ValidationIssue, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)
    returncode: int = 0

    @property
    def ok(self) -> bool:
        """True when there is no error."""
        return not self.errors

    def format_errors(self, limit: int = 5) -> str:
        """The first ``limit`` errors, one per line."""
        lines = [f"  - {_shorten(str(issue))}" for issue in self.errors[:limit]]
        if len(self.errors) > limit:
            lines.append(f"  ... and {len(self.errors) - limit} more")
        return "\n".join(lines)


def _shorten(text: str, width: int = 240) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def find_validator() -> str | None:
    """Path of the ``bids-validator-deno`` executable, or None when it is not installed."""
    local = Path(sys.executable).with_name(VALIDATOR)
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(VALIDATOR)


def _issue(raw: dict[str, Any], code_messages: dict[str, str]) -> ValidationIssue:
    detail = raw.get("issueMessage") or code_messages.get(raw.get("code", ""), "")
    detail = next((line.strip() for line in str(detail).splitlines() if line.strip()), "")
    sub = raw.get("subCode")
    message = f"{sub}: {detail}" if sub and detail else (sub or detail)
    return ValidationIssue(
        code=str(raw.get("code", "UNKNOWN")),
        severity=str(raw.get("severity", "error")),
        location=raw.get("location"),
        message=message,
    )


def _other_subject(location: str | None, keep: set[str]) -> bool:
    if not location or not location.startswith("/sub-"):
        return False
    label = location[len("/sub-") :].split("/", 1)[0].split("_", 1)[0]
    return label not in keep


def validate_dataset(
    path: str | os.PathLike[str],
    *,
    derivative: bool = False,
    participant_labels: Iterable[str] | None = None,
    raise_on_error: bool | None = None,
) -> ValidationReport:
    """Validate a BIDS dataset with ``bids-validator-deno``.

    Parameters
    ----------
    path : str or path-like
        Dataset root.
    derivative : bool, default False
        ``True`` for ihf-bids' own output dataset: errors are returned, not raised.
    participant_labels : iterable of str, optional
        Ignore issues located in other subjects' folders (a broken subject the user
        did not select does not stop the run).
    raise_on_error : bool, optional
        Raise :class:`~ihf_bids.errors.InputDataError` on errors; default ``not derivative``.

    Returns
    -------
    ValidationReport

    Raises
    ------
    InputDataError
        Errors in the dataset (when raising); the message lists the first ones and the
        hint ``--skip-bids-validation``.
    UsageError
        The validator is not installed, cannot run, or gives no report.
    """
    root = Path(path)
    exe = find_validator()
    if exe is None:
        raise UsageError(f"{VALIDATOR} is not installed (pip install {VALIDATOR}); install it or {_SKIP_HINT}")
    env = {**os.environ, "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
    try:
        run = subprocess.run(
            [exe, "--format", "json", "--no-color", os.fspath(root)],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
    except OSError as err:
        raise UsageError(f"{exe} cannot be run ({err}); reinstall {VALIDATOR} or {_SKIP_HINT}") from err
    try:
        report = json.loads(run.stdout)
        issues = report["issues"]["issues"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        tail = (run.stderr or run.stdout or "").strip()[-800:]
        raise UsageError(f"{VALIDATOR} gave no report on {root} (exit {run.returncode}): {tail}; {_SKIP_HINT}") from err
    code_messages = report["issues"].get("codeMessages", {}) or {}
    keep = None
    if participant_labels is not None:
        keep = {str(label).removeprefix("sub-") for label in participant_labels}
    errors, warnings = [], []
    ignored = 0
    for raw in issues:
        if keep is not None and _other_subject(raw.get("location"), keep):
            ignored += 1
            continue
        issue = _issue(raw, code_messages)
        (errors if issue.severity == "error" else warnings).append(issue)
    result = ValidationReport(
        path=root,
        errors=tuple(errors),
        warnings=tuple(warnings),
        summary=report.get("summary", {}) or {},
        returncode=run.returncode,
    )
    if raise_on_error is None:
        raise_on_error = not derivative
    if raise_on_error and errors:
        if keep is None:
            scope = (f"{VALIDATOR} checks the whole dataset, every participant included, not only those "
                     "selected with --participant-label")
        else:
            scope = (f"{VALIDATOR} checked the whole dataset; {ignored} issue(s) in participants not selected "
                     "were ignored")
        raise InputDataError(
            f"{root} is not a valid BIDS dataset ({len(errors)} error(s) from {VALIDATOR}):\n"
            f"{result.format_errors()}\n"
            f"({scope}.) Fix the dataset (a .bidsignore file at its root hides files that are not BIDS), "
            f"or {_SKIP_HINT}."
        )
    return result
