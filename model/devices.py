"""Which device a name means on this machine, and why it cannot be used: one answer for the CLI and the server.

torch is imported inside the functions: the CLI refuses bad flags before it pays for importing torch.
"""

from __future__ import annotations


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else unchanged."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_problem(device: str) -> str | None:
    """Why ``device`` (resolved, e.g. ``cuda:1``) cannot be used by this torch, or None when it can."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"{device} is not available (no CUDA device, or a CPU-only torch); use cpu or auto"
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            return f"{device} does not exist: this machine has {count} CUDA device(s)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "mps is not available on this machine; use cpu or auto"
    return None
