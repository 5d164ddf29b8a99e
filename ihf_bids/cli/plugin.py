"""``--use-plugin FILE``: how nipype runs the participant workflow (docs/clusters.md).

The file (YAML or JSON, the format fMRIPrep and other NiPreps read) names a nipype execution
plugin and its arguments; ready ones are in ``pipelines/nipype/``::

    plugin: MultiProc
    plugin_args:
      n_procs: 8
      memory_gb: 32

Without the option the app runs MultiProc with ``--nprocs`` processes (Linear with one).
Only the standard library is imported at module level (the parser imports this module).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["plugin_file", "read_plugin_file", "run_settings"]

#: nipype's execution plugins (nipype.pipeline.plugins), by the name the ``plugin`` key takes.
KNOWN_PLUGINS = ("Linear", "MultiProc", "LegacyMultiProc", "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS",
                 "PBSGraph", "LSF", "Condor", "DAGMan", "OAR", "IPython")


def read_plugin_file(path: str | Path) -> dict:
    """Read and check a plugin file; return ``{"plugin": NAME, "plugin_args": {...}}``.

    Raises
    ------
    ValueError
        Unreadable, not a mapping, an unknown plugin or keys other than plugin/plugin_args.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    else:
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is a dependency
            raise ValueError(f"reading {path} needs PyYAML (pip install pyyaml), or write it as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("plugin"), str):
        raise ValueError(f"{path} must be a mapping with a 'plugin' name (e.g. 'plugin: MultiProc')")
    unknown = set(data) - {"plugin", "plugin_args"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a plugin file has 'plugin' and 'plugin_args'")
    if data["plugin"] not in KNOWN_PLUGINS:
        raise ValueError(f"{path}: unknown nipype plugin {data['plugin']!r}; one of {', '.join(KNOWN_PLUGINS)}")
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"{path}: 'plugin_args' must be a mapping")
    return {"plugin": data["plugin"], "plugin_args": dict(args)}


def plugin_file(text: str) -> dict:
    """An argparse type: a checked plugin file (errors become usage errors, exit code 2)."""
    path = Path(text).expanduser().absolute()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} does not exist or is not a file")
    try:
        settings = read_plugin_file(path)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    settings["file"] = str(path)
    return settings


#: Seconds between two polls of a batch scheduler by nipype (each poll queries every queued job).
SCHEDULER_POLL_SECONDS = 5.0


def run_settings(settings: dict, *, nprocs: int, mem_gb: float | None = None) -> tuple[dict, dict]:
    """``workflow.run`` keyword arguments and nipype ``execution`` settings for a plugin file.

    MultiProc gets the app's defaults where the file leaves them out: ``n_procs`` from
    ``--nprocs``, ``memory_gb`` from ``--mem``, workers started with spawn (see
    docs/app-design.md, Scheduling) and no failure when a node asks for more than is free.
    Batch-scheduler plugins are polled every :data:`SCHEDULER_POLL_SECONDS` rather than the
    app's 0.1 s, which suits local processes but not ``squeue``.

    >>> run_settings({"plugin": "MultiProc", "plugin_args": {"n_procs": 4}}, nprocs=2)[0]["plugin_args"]["n_procs"]
    4
    >>> run_settings({"plugin": "SLURM", "plugin_args": {"sbatch_args": "-p short"}}, nprocs=2)
    ({'plugin': 'SLURM', 'plugin_args': {'sbatch_args': '-p short'}}, {'poll_sleep_duration': 5.0})
    """
    plugin = settings["plugin"]
    args = dict(settings.get("plugin_args") or {})
    execution = {}
    if plugin == "MultiProc":
        args.setdefault("n_procs", nprocs)
        args.setdefault("raise_insufficient", False)
        args.setdefault("mp_context", "spawn")
        if mem_gb:
            args.setdefault("memory_gb", mem_gb)
    elif plugin not in ("Linear", "LegacyMultiProc", "IPython"):
        execution["poll_sleep_duration"] = SCHEDULER_POLL_SECONDS
        # nipype's scheduler plugins query the queue for $LOGNAME, which batch jobs and
        # containers do not always set.
        import getpass
        import os

        os.environ.setdefault("LOGNAME", getpass.getuser())
    return {"plugin": plugin, "plugin_args": args}, execution
