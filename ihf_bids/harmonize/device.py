"""The one place that decides the compute device."""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(device: str = "auto") -> str:
    """Turn ``auto``/``cpu``/``cuda[:N]`` into a torch device string.

    Raises
    ------
    RuntimeError
        If CUDA is requested explicitly but not available.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {device} was requested but no CUDA GPU is visible to PyTorch; "
            "use --device cpu (or auto), or run the container with GPU access (docker --gpus all, "
            "singularity --nv)."
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device
