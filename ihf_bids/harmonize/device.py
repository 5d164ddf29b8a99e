"""The one place that decides the compute device."""

from __future__ import annotations

import os

__all__ = ["CPU_BATCH_SIZE", "batch_size_from_memory", "fit_batch_size", "free_gpu_memory", "resolve_device"]


def resolve_device(device: str = "auto") -> str:
    """Turn ``auto``/``cpu``/``cuda[:N]`` into a torch device string.

    Raises
    ------
    ihf_bids.errors.UsageError
        If CUDA is requested explicitly but not available (exit code 2).
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import UsageError

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UsageError(
            f"--device {device} was requested but no CUDA GPU is visible to PyTorch"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
            + "; use --device cpu (or auto), or run the container with GPU access (docker --gpus all, "
            "apptainer --nv)."
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda:") and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
        from ..errors import UsageError

        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                         "use --device cuda (the first one) or a smaller index")
    return device


#: Windows per forward pass on the CPU (and when GPU memory cannot be measured).
CPU_BATCH_SIZE = 8


def batch_size_from_memory(free_bytes: float, per_item_bytes: float, *, fraction: float = 0.8, minimum: int = 1,
                           maximum: int = 512) -> int:
    """How many items of ``per_item_bytes`` fit in ``fraction`` of ``free_bytes``, within [minimum, maximum].

    >>> batch_size_from_memory(10e9, 100e6)                 # 80 % of 10 GB at 100 MB an item
    80
    >>> batch_size_from_memory(10e9, 100e6, maximum=32), batch_size_from_memory(1e6, 100e6)
    (32, 1)
    """
    fit = int(fraction * float(free_bytes) // max(float(per_item_bytes), 1.0))
    return max(minimum, min(maximum, fit))


def free_gpu_memory(device: str) -> int:
    """Bytes a CUDA device can still give this process: free on the device plus torch's unused cache."""
    import torch

    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


def fit_batch_size(device: str, probe, *, default: int, maximum: int, probe_items: int = 2,
                   fraction: float = 0.8) -> int:
    """The batch size for ``device``: ``default`` on the CPU, else what fits in free GPU memory.

    On CUDA, ``probe(n)`` runs the real work on ``n`` items once; the peak memory it allocates
    beyond what was already allocated, divided by ``n``, is taken as the cost of one item
    (fixed costs counted per item make this conservative), and the batch is the number of
    items that fit in ``fraction`` of :func:`free_gpu_memory`, at most ``maximum``. On the CPU
    the probe is never called, so CPU results are those of a fixed batch size.

    >>> fit_batch_size("cpu", probe=None, default=8, maximum=100)
    8
    """
    if not str(device).startswith("cuda"):
        return default
    import torch

    dev = torch.device(device)
    items = max(1, min(probe_items, maximum))
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    probe(items)
    torch.cuda.synchronize(dev)
    per_item = max(torch.cuda.max_memory_allocated(dev) - base, 1) / items
    return batch_size_from_memory(free_gpu_memory(device), per_item, fraction=fraction, maximum=maximum)
