"""Device names, default dtypes and synchronisation: the one place the tools resolve them."""

from __future__ import annotations

import torch


def resolve_device(name: str, flag: str = "--device") -> str:
    """``"auto"`` → ``"cuda"`` when CUDA is available, else ``"cpu"``; a CUDA device where there is
    none raises ``ValueError`` naming ``flag``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: CUDA is not available on this machine")
    return name


def default_dtype(device: str) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
