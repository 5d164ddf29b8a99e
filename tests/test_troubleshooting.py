"""docs/troubleshooting.md lists every message the app reports.

The package source is read with :mod:`ast` (nothing is imported, so this is fast). For each
message the app can report, the longest literal piece of its text must appear in the
troubleshooting page, so a new error (or a reworded one) fails here until it is documented:

- every ``raise X(...)`` where X is one of the app's error classes (exit codes 2, 65, 70);
- every ``raise argparse.ArgumentTypeError(...)`` in ``ihf_bids/cli/`` (exit code 2);
- the ``raise ValueError/RuntimeError(...)`` of a few modules whose messages do reach the
  user (as usage errors, wrapped into an input data error, or as the last line of a crash
  report): :data:`EXTRA_RAISES`;
- the warnings and errors logged by the app (``LOGGER.warning/error``, ``warnings.warn``).

A message's literal pieces are its string constants and the constant parts of its f-strings,
joined through ``+`` and ``a if c else b``. The page is compared with its backticks removed and
its whitespace collapsed; ``%s``-style placeholders split a log format into pieces.
"""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ihf_bids"
DOC = ROOT / "docs" / "troubleshooting.md"

#: the app's error classes (ihf_bids/errors.py, harmonize/checkpoint.py, train/loop.py, preproc/registration.py)
APP_ERRORS = {"UsageError", "InputDataError", "WorkflowBuildError", "CheckpointError", "TrainPresetError",
              "RegistrationError"}
#: other exceptions whose messages reach the user, by module
EXTRA_RAISES = {
    # read_plugin_file: re-raised as argparse.ArgumentTypeError(str(err)), exit code 2
    "ihf_bids/cli/plugin.py": {"ValueError"},
    # evaluate_cohort: wrapped by qc/group.py as "the group evaluation cannot run: ...", exit code 65
    "ihf_bids/qc/evaluation.py": {"ValueError"},
    # --target-reference on another grid: the last line of a harmonization crash report, exit code 1
    "ihf_bids/harmonize/files.py": {"ValueError"},
    # an unreadable target profile: re-raised as CheckpointError(str(error)), exit code 70
    "ihf_bids/harmonize/profile.py": {"ValueError"},
    # registration failures: the last line of a crash report, exit code 1
    "ihf_bids/preproc/anat.py": {"RuntimeError"},
    "ihf_bids/preproc/registration.py": {"RuntimeError"},
    # group --train (torchrun, training volumes): "unexpected error: ...", exit code 1
    "ihf_bids/train/distributed.py": {"ValueError", "RuntimeError"},
    "ihf_bids/train/data.py": {"ValueError"},
}
#: separate command-line tools, documented elsewhere (docs/phantom.md)
NOT_THE_APP = ("ihf_bids/phantom/", "ihf_bids/demo.py")
#: pieces shorter than this say too little to look for: such a message needs an entry in
#: NO_LITERAL_TEXT, except a log format, whose pieces are then looked for in order
MIN_PIECE = 12
#: messages without a literal piece of MIN_PIECE characters, as (module, the message's source):
#: each is documented through the messages it passes on.
NO_LITERAL_TEXT = {
    # the ValueErrors of read_plugin_file (scanned through EXTRA_RAISES)
    ("ihf_bids/cli/plugin.py", "str(err)"),
    # the CheckpointErrors of load_model or the ValueErrors of TargetProfile.load (both scanned)
    ("ihf_bids/harmonize/files.py", "str(error)"),
    # run.py's catch-all: logs the message of an error that already says what to do
    ("ihf_bids/cli/run.py", "'%s'"),
}

_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-+ #0]*\d*(?:\.\d+)?[sdifgr%]")
_ENDS = string.whitespace + string.punctuation


def _pieces(node: ast.AST) -> list[str]:
    """The literal text of a message expression (constants, f-string text, ``+``, ``if/else``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _pieces(node.left) + _pieces(node.right)
    if isinstance(node, ast.IfExp):
        return _pieces(node.body) + _pieces(node.orelse)
    return []


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _messages(path: Path, rel: str):
    """``(line, kind, source, pieces)`` of every user-facing message in one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            kind = _name(node.exc.func)
            wanted = kind in APP_ERRORS or kind in EXTRA_RAISES.get(rel, ()) or (
                kind == "ArgumentTypeError" and rel.startswith("ihf_bids/cli/"))
            if wanted:
                yield node.lineno, kind, node.exc.args[0], _pieces(node.exc.args[0])
        elif isinstance(node, ast.Call) and node.args and (
            (_name(node.func) in ("warning", "error") and _name(getattr(node.func, "value", None)) != "parser")
            or (_name(node.func) == "warn" and _name(getattr(node.func, "value", None)) == "warnings")
        ):
            yield node.lineno, f"log {_name(node.func)}", node.args[0], _pieces(node.args[0])


def _all_messages():
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(NOT_THE_APP):
            continue
        out += [(rel, *message) for message in _messages(path, rel)]
    return out


def _normalize(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def _longest(pieces: list[str], kind: str) -> str:
    if kind.startswith("log"):  # a %-format: its placeholders are not literal text
        pieces = [part for piece in pieces for part in _PLACEHOLDER.split(piece)]
    return max((_normalize(p).strip(_ENDS) for p in pieces), key=len, default="")


def _format_matches(pieces: list[str], doc: str) -> bool:
    """A short log format (``'%s failed on %s:'``): its pieces in order, any text for each placeholder."""
    parts = _PLACEHOLDER.split(_normalize("".join(pieces)))
    return re.search(".+?".join(re.escape(p) for p in parts), doc) is not None


MESSAGES = _all_messages()


def test_the_scan_finds_the_messages():
    """A sanity check of the scan itself: every error class and the log lines are found."""
    kinds = {kind for _, _, kind, _, _ in MESSAGES}
    assert APP_ERRORS | {"ArgumentTypeError", "log warning", "log error"} <= kinds
    assert len(MESSAGES) > 150


def test_every_message_is_in_troubleshooting_md():
    doc = _normalize(DOC.read_text(encoding="utf-8"))
    missing, unchecked = [], []
    for rel, line, kind, node, pieces in MESSAGES:
        piece = _longest(pieces, kind)
        if len(piece) < MIN_PIECE:
            if kind.startswith("log") and len("".join(pieces).strip(_ENDS)) >= MIN_PIECE:
                if not _format_matches(pieces, doc):
                    missing.append(f"{rel}:{line} {kind}: {''.join(pieces)!r}")
            elif (rel, ast.unparse(node)) not in NO_LITERAL_TEXT:
                unchecked.append(f"{rel}:{line} {kind}({ast.unparse(node)})")
            continue
        if piece not in doc:
            missing.append(f"{rel}:{line} {kind}: {piece!r}")
    assert not unchecked, (f"messages without a literal piece of {MIN_PIECE} characters; give them one, or list "
                           "them in NO_LITERAL_TEXT:\n") + "\n".join(unchecked)
    assert not missing, ("messages missing from docs/troubleshooting.md (add each, with its exit code, "
                         "cause and fix):\n") + "\n".join(missing)


@pytest.mark.parametrize("piece", ["nothing was processed", "This is a bug in ihf-bids", "failed on"])
def test_the_page_explains_how_errors_look(piece):
    assert piece in _normalize(DOC.read_text(encoding="utf-8"))
