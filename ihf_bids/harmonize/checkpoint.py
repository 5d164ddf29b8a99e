"""Model checkpoints: a state dict plus JSON metadata, verified by sha256, loaded safely.

A model directory holds ``model.pt`` (``torch.save`` of ``{"format", "format_version",
"metadata", "state_dict"}``, loadable with ``weights_only=True``), ``model.json`` (the same
metadata plus the sha256 of ``model.pt`` and of every target profile) and ``profiles/``
(target profiles).

Every file is written into a hidden temporary sibling named after its writer
(``.<name>.<host>.<pid>.<random>.tmp``) and renamed into place, so readers and re-runs never
see part of a file; :func:`remove_stale_temporaries` removes what a killed writer left.
A trained network is published as a whole directory (:func:`replace_directory`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from ..errors import WorkflowBuildError

__all__ = [
    "CheckpointError",
    "load_model",
    "profile_digest",
    "profile_digests",
    "remove_stale_temporaries",
    "replace_directory",
    "save_model",
    "sha256sum",
    "write_bytes_atomically",
]

LOGGER = logging.getLogger("ihf_bids")

FORMAT = "ihf-bids-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
METADATA_FILE = "model.json"
PROFILES_DIR = "profiles"
#: Temporaries of writers on other hosts (whose processes cannot be checked) are removed
#: after this many seconds without a change: no single file takes that long to write.
STALE_AFTER_S = 24 * 3600.0


class CheckpointError(WorkflowBuildError, ValueError):
    """A checkpoint that cannot be used with this version of ihf-bids (exit code 70)."""


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


def _host_label() -> str:
    """This host's name as it appears in temporary names: no dots (so that names parse), at most 40 characters.

    A longer name keeps its start and gets a digest of the whole, so hosts stay apart.
    """
    host = socket.gethostname().replace(".", "-") or "localhost"
    if len(host) > 40:
        host = f"{host[:31]}-{hashlib.sha256(host.encode()).hexdigest()[:8]}"
    return host


#: Characters of the final name kept in a temporary's name (file names are limited to 255 bytes).
_NAME_IN_TEMPORARY = 150


def _temporary_prefix(name: str) -> str:
    """``.<name>.<host>.<pid>.``: the start of a temporary sibling's name (the owner can be checked)."""
    return f".{name[:_NAME_IN_TEMPORARY]}.{_host_label()}.{os.getpid()}."


def write_bytes_atomically(path: Path, writer: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``writer(handle)`` into a temporary sibling, then rename it.

    The sibling is ``.<name>.<host>.<pid>.<random>.tmp``, so that
    :func:`remove_stale_temporaries` can tell a killed writer's leftovers from a live
    writer's file. The file gets the usual permissions (0666 less the umask), not the
    private mode of a temporary file, so that group members and container users can read
    the outputs.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_temporary(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a temporary named by :func:`_temporary_prefix`; None for other names.

    Examples
    --------
    >>> _parse_temporary(".model.pt.node-1.4242.k2j_x9aa.tmp")
    ('node-1', 4242)
    >>> _parse_temporary(".model.pt.abc123.tmp") is None, _parse_temporary("model.pt") is None
    (True, True)
    """
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[: -len(".tmp")].rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit() or len(parts[0]) < 2:
        return None
    return parts[1], int(parts[2])


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a reused pid counts as alive: nothing is removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _candidate_temporaries(root: Path, subjects: Iterable[str] | None) -> Iterable[Path]:
    """Hidden ``*.tmp`` entries under ``root`` (only the given subjects' folders when listed)."""
    if subjects is None:
        tops = [root]
    else:
        tops = [root / name for name in ("logs", "models")]
        tops += [root / f"sub-{s.removeprefix('sub-')}" for s in subjects]
        yield from (p for p in root.glob(".*.tmp"))  # the top level itself, not its sub-folders
    for top in tops:
        if not top.is_dir():
            continue
        for folder, dirs, files in os.walk(top):
            for name in [*files, *dirs]:
                if name.startswith(".") and name.endswith(".tmp"):
                    yield Path(folder) / name
            dirs[:] = [d for d in dirs if not (d.startswith(".") and d.endswith(".tmp"))]


def remove_stale_temporaries(root: str | os.PathLike[str], *, subjects: Iterable[str] | None = None,
                             stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove what killed writers left in ``root``: ``.<name>.<host>.<pid>.<random>.tmp`` entries.

    A temporary of this host is removed when its process no longer exists; one of another
    host (or one without a host and pid, written by an older version) only when it has not
    changed for ``stale_after_s`` seconds. A live writer's file is never touched. Run it at
    the start of every participant and group run.

    Parameters
    ----------
    root : path-like
        The output directory.
    subjects : iterable of str, optional
        Look only in these participants' folders (``01`` or ``sub-01``), ``logs/``, ``models/``
        and the top level, instead of the whole tree (a participant job of a large cohort).
    stale_after_s : float
        Age after which any temporary is removed.

    Returns
    -------
    list of Path
        What was removed.
    """
    root = Path(root)
    host, now, removed = _host_label(), time.time(), []
    for path in _candidate_temporaries(root, subjects):
        owner = _parse_temporary(path.name)
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue  # its writer renamed it in the meantime
        if owner is not None and owner[0] == host:
            stale = not _process_alive(owner[1])
        else:
            stale = age > stale_after_s
        if not stale:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        LOGGER.info("removed %d temporary file(s) left by interrupted runs in %s", len(removed), root)
    return removed


def _exchange(source: Path, destination: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(destination), rename_exchange)
    return result == 0


def replace_directory(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """Move the finished directory ``source`` to ``destination``, replacing what was there.

    ``source`` is first parked beside ``destination`` under a temporary name (what a killed
    run leaves there is removed by :func:`remove_stale_temporaries`). Where the file system
    can (Linux), the two are then exchanged in one step, so a reader finds either the old or
    the new directory, never a mix; elsewhere the old one is first moved aside (a reader may
    then briefly find none). ``source`` and ``destination`` must be on one file system. The
    old directory is deleted.
    """
    source, destination = Path(source), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)

    def parking_place() -> Path:
        return Path(tempfile.mkdtemp(dir=destination.parent, prefix=_temporary_prefix(destination.name),
                                     suffix=".tmp"))

    incoming = parking_place()
    os.replace(source, incoming)  # a directory may replace an empty one
    if destination.is_dir() and _exchange(incoming, destination):
        shutil.rmtree(incoming)  # the old version, now parked
        return destination
    old = parking_place() if destination.exists() else None
    try:
        if old is not None:
            os.replace(destination, old)
        try:
            os.replace(incoming, destination)
        except BaseException:
            if old is not None:
                os.replace(old, destination)
            raise
    finally:
        for folder in (old, incoming):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    return destination


def profile_digest(profile) -> str:
    """sha256 of a :class:`~.profile.TargetProfile`'s content (labels, scale, embeddings).

    The content, not the ``.npz`` file: the file's bytes carry zip time stamps, so the digest
    of the same profile written twice would differ.
    """
    import numpy as np

    digest = hashlib.sha256()
    labels = [profile.site, profile.modality, float(profile.intensity_scale), int(profile.n_volumes),
              list(profile.sources), list(profile.embeddings.shape)]
    digest.update(json.dumps(labels).encode())
    digest.update(np.ascontiguousarray(profile.embeddings, dtype=np.float32).tobytes())
    return digest.hexdigest()


def profile_digests(directory: str | os.PathLike[str]) -> dict[str, str]:
    """:func:`profile_digest` of every target profile (``profiles/*_profile.npz``) of a checkpoint directory."""
    from .profile import TargetProfile

    folder = Path(directory) / PROFILES_DIR
    return {p.name: profile_digest(TargetProfile.load(p)) for p in sorted(folder.glob("*_profile.npz"))}


def save_model(model, directory: str | Path, metadata: dict) -> Path:
    """Write ``model.pt`` and ``model.json`` into ``directory``; return the directory.

    ``metadata`` must be JSON-serialisable; the architecture, the package version and the
    sha256 of the profiles already in ``directory/profiles`` are added (readers check that
    network and profiles belong together), and ``model.json`` also gets the sha256 of
    ``model.pt``. ``model.json`` is written last.
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
        "profiles_sha256": profile_digests(directory),
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
        raise CheckpointError(f"{model_path}: no sha256 to verify against ({meta_path} missing); a model is "
                              "only used after its hash is checked: copy the whole model directory again")
    # Read once: the bytes verified are the bytes loaded, even if the file is replaced meanwhile.
    try:
        data = model_path.read_bytes()
    except FileNotFoundError as err:
        raise CheckpointError(f"{model_path} disappeared while it was read (a model being republished?); "
                              "run again once 'group --train' has finished") from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise CheckpointError(
            f"{model_path} does not match its recorded sha256 (expected {expected_sha256[:12]}..., "
            f"got {actual[:12]}...): the file is corrupt or was replaced; copy the model again"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{model_path} could not be read safely as a checkpoint ({err.__class__.__name__}: {first}); the "
            "file is damaged or not an ihf-bids model (only tensors are loaded, never code): copy the model "
            "again or retrain") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{model_path} is not an ihf-bids checkpoint; pass --model a directory written "
                              "by 'ihf-bids ... group --train'")
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
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
        raise CheckpointError(
            f"{model_path} was written for another architecture (written by ihf-bids "
            f"{metadata.get('package_version', '?')}): {detail[:200]}; retrain or use a matching version"
        ) from err
    model.eval()
    return model, metadata
