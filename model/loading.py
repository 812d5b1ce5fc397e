"""Reading checkpoints safely and loading them strictly.

Every failure names the file and, where it applies, the keys: a missing or truncated file, a pickle
that holds anything but plain tensors (``torch.load(weights_only=True)`` always), a wrapper instead of a
bare state dict, missing / unexpected keys, wrong shapes. The official DC-HT loader (transformers
``AutoModel``) silently leaves missing weights random; this one refuses.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

M = TypeVar("M", bound=nn.Module)
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


class LoadError(ValueError):
    """A checkpoint could not be used; the message names the file and what is wrong with it."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A bare ``{name: tensor}`` dict from a ``.safetensors`` or pickled ``.bin``/``.pt``/``.pth`` file."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise LoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(
            f"{path}: refused: the pickle holds objects other than plain tensors ({first})"
        ) from e
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise LoadError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            hint = " (a wrapper: save the inner state dict itself)" if isinstance(value, dict) else ""
            raise LoadError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor{hint}")
    return obj


def find_weights(directory: str | Path) -> Path:
    """The weights file of a component directory: model.safetensors first, then pytorch_model.bin."""
    directory = Path(directory)
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise LoadError(f"{directory}: no weights file (expected one of {list(WEIGHT_NAMES)})")


def state_dict_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_keys(
    expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], source: str | Path
) -> None:
    """Raise LoadError naming every missing, unexpected and wrongly shaped key (the first 10 of each)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:10])}{more}")
    if problems:
        raise LoadError(f"{source}: does not match the model: " + "; ".join(problems))


def load_strict(module: M, state: dict[str, torch.Tensor], source: str | Path) -> M:
    """Check keys and shapes against ``module`` (which may live on the meta device), then load by assignment."""
    check_keys(state_dict_shapes(module), state, source)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, fp16 on CUDA (the official inference dtype)."""
    return torch.float16 if device.type == "cuda" else torch.float32


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The model's dtype from its name or a ``torch.dtype``; ValueError for any other than these three.

    A torch.dtype used to pass unchecked: torch.int8 failed inside ``nn.Module.to`` with a TypeError, and
    torch.float64 ran a precision nothing here is checked in.
    """
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(
                f"dtype={name} is not supported; expected torch.float32, torch.float16 or torch.bfloat16"
            )
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def parse_device(device: str | torch.device) -> torch.device:
    """The device to load onto: ``auto`` resolved, and ValueError naming it when it is no device name or
    this machine lacks it (torch itself answered "cuda" on a CPU-only build with an AssertionError only
    at the first tensor moved, and "gpu" with a RuntimeError listing its internal device types)."""
    from dcar.model.devices import device_problem, resolve_device

    name = resolve_device(device) if isinstance(device, str) else device
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a device; expected auto, cpu, cuda, cuda:N or mps"
        ) from None
    problem = device_problem(str(dev))
    if problem:
        raise ValueError(f"device={device!r}: {problem}")
    return dev
