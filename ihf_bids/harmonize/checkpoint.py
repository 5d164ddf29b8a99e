"""Model checkpoints: a state dict plus JSON metadata, verified by sha256, loaded safely.

A model directory holds ``model.pt`` (``torch.save`` of ``{"format", "format_version",
"metadata", "state_dict"}``, loadable with ``weights_only=True``), ``model.json`` (the same
metadata plus the sha256 of ``model.pt``) and ``profiles/`` (target profiles).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["CheckpointError", "load_model", "save_model", "sha256sum", "write_bytes_atomically"]

FORMAT = "ihf-bids-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
METADATA_FILE = "model.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this version of ihf-bids."""


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _current_umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 when it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_bytes_atomically(path: Path, writer) -> None:
    """Write ``path`` through ``writer(handle)`` into a temporary sibling, then rename it.

    The file gets the usual permissions (0666 less the umask), not the private mode of a
    temporary file, so that group members and container users can read the outputs.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model, directory: str | Path, metadata: dict) -> Path:
    """Write ``model.pt`` and ``model.json`` into ``directory``; return the directory.

    ``metadata`` must be JSON-serialisable; the architecture and package version are added.
    """
    import torch

    from .. import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        **metadata,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "architecture": model.config.to_dict(),
    }
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": json.dumps(meta, sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    model_path = directory / MODEL_FILE
    write_bytes_atomically(model_path, lambda handle: torch.save(payload, handle))
    meta["sha256"] = sha256sum(model_path)
    meta["model_file"] = MODEL_FILE
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_bytes_atomically(directory / METADATA_FILE, lambda handle: handle.write(text.encode()))
    return directory


def load_model(path: str | Path, *, expected_sha256: str | None = None, map_location: str = "cpu"):
    """Load a model directory (or its ``model.pt``); return ``(model, metadata)``.

    The file's sha256 is checked against ``expected_sha256`` or, when not given, against
    the ``model.json`` beside it; the payload is read with ``weights_only=True``.

    Raises
    ------
    CheckpointError
        Missing files, hash mismatch, corrupt file, another format or an architecture that
        does not fit this version of the code; the message says which and what to do.
    """
    import torch

    from ..model.flow import FlowConfig, IHFHarmony

    path = Path(path)
    model_path = path / MODEL_FILE if path.is_dir() else path
    if not model_path.is_file():
        raise CheckpointError(
            f"no model checkpoint at {model_path}; train one with 'ihf-bids BIDS_DIR OUT group --train' "
            "or pass --model pointing to a model directory"
        )
    meta_path = model_path.with_name(METADATA_FILE)
    if expected_sha256 is None and meta_path.is_file():
        try:
            expected_sha256 = json.loads(meta_path.read_text()).get("sha256")
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{meta_path} is not valid JSON ({err}); restore it from the model's source") from err
    if expected_sha256 is None:
        raise CheckpointError(f"{model_path}: no sha256 to verify against ({meta_path} missing)")
    actual = sha256sum(model_path)
    if actual != expected_sha256:
        raise CheckpointError(
            f"{model_path} does not match its recorded sha256 (expected {expected_sha256[:12]}..., "
            f"got {actual[:12]}...): the file is corrupt or was replaced; copy the model again"
        )
    try:
        payload = torch.load(model_path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"{model_path} could not be read as a checkpoint ({err.__class__.__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{model_path} is not an ihf-bids checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{model_path} has checkpoint format {payload.get('format_version')}, this ihf-bids reads "
            f"format {FORMAT_VERSION}; use the ihf-bids version that wrote it or retrain"
        )
    metadata = json.loads(payload["metadata"])
    metadata["sha256"] = actual
    try:
        model = IHFHarmony(FlowConfig.from_dict(metadata["architecture"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"{model_path} was written for another architecture (written by ihf-bids "
            f"{metadata.get('package_version', '?')}): {str(err).splitlines()[0]}; retrain or use a matching version"
        ) from err
    model.eval()
    return model, metadata
