"""Group level: one table per modality of what the participant runs recorded."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..templates import TEMPLATE_SPACE

__all__ = ["collect_group_rows", "write_group_tables"]

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

    rows = []
    suffix = _SUFFIXES[modality]
    for path in sorted(output_dir.glob(f"sub-*/**/*_space-{TEMPLATE_SPACE}*_{suffix}.nii.gz")):
        entities = parse_entities(path)
        sidecar = Path(str(path)[: -len(".nii.gz")] + ".json")
        fields = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        row = {"file": str(path.relative_to(output_dir)), **{k: v for k, v in entities.items() if k != "space"}}
        flat: dict = {}
        _flatten("", {k: v for k, v in fields.items() if k != "Sources"}, flat)
        row.update(flat)
        rows.append(row)
    return rows


def write_group_tables(output_dir: Path) -> list[Path]:
    """Write ``group_<modality>.tsv`` for each modality with outputs; return the paths."""
    from ..harmonize.checkpoint import write_bytes_atomically

    written = []
    for modality in _SUFFIXES:
        rows = collect_group_rows(output_dir, modality)
        if not rows:
            continue
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, delimiter="\t", lineterminator="\n", restval="n/a")
        writer.writeheader()
        writer.writerows(rows)
        path = output_dir / f"group_{modality}.tsv"
        write_bytes_atomically(path, lambda handle, text=buffer.getvalue(): handle.write(text.encode()))
        written.append(path)
    return written
