"""Offline dataset loaders.

The project never downloads data. Datasets live in a shared data directory,
by default ``<project root>/../shared/data`` (``/work/shared/data`` when the
repository is checked out at ``/work/main``). Set ``QDCOMPILE_DATA_DIR`` to
point somewhere else.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["data_dir", "load_mnist", "load_cifar10"]

_ENV_VAR = "QDCOMPILE_DATA_DIR"
_PROJECT_ROOT = Path(__file__).resolve().parent.parent

# idx magic numbers: two zero bytes, dtype code 0x08 (uint8), number of dims.
_IDX_UBYTE_IMAGES = 0x00000803
_IDX_UBYTE_LABELS = 0x00000801


def data_dir() -> Path:
    """Return the directory that holds the offline datasets.

    ``$QDCOMPILE_DATA_DIR`` wins if set; otherwise ``<project root>/../shared/data``.
    Raises ``FileNotFoundError`` (naming the places looked at) if it does not exist.
    """
    env = os.environ.get(_ENV_VAR)
    path = Path(env).expanduser() if env else _PROJECT_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        source = f"${_ENV_VAR}" if env else f"default location (set ${_ENV_VAR} to override)"
        raise FileNotFoundError(f"dataset directory not found: {path} (from {source})")
    return path


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read a gzip-compressed uint8 idx file and return its array."""
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file not found: {path}")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad idx magic number 0x{found:08x}, expected 0x{magic:08x}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header_len != expected:
        raise ValueError(
            f"{path}: payload has {len(raw) - header_len} bytes, header shape {shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def load_mnist(split: str = "t10k") -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST from ``data_dir()/mnist`` in the original gzip'd idx format.

    Args:
        split: file prefix, ``"t10k"`` (test set, the only one shipped) or ``"train"``.

    Returns:
        ``(images, labels)``: uint8 tensor ``[N, 28, 28]`` and int64 tensor ``[N]``.
    """
    root = data_dir() / "mnist"
    images = _read_idx(root / f"{split}-images-idx3-ubyte.gz", _IDX_UBYTE_IMAGES, 3)
    labels = _read_idx(root / f"{split}-labels-idx1-ubyte.gz", _IDX_UBYTE_LABELS, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_cifar10(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from ``data_dir()/cifar10`` as uint8 ``[N, 3, 32, 32]`` and int64 labels.

    * ``"train"``: the lossless prefix of the training batches (5,085 images) plus the JPEG
      (quality 75) test images 1017–9999 — what the reference DDPM is trained on;
    * ``"heldout"``: the first 1,017 test images, lossless, never trained on (FID/KID's real set).
    """
    root = data_dir() / "cifar10"
    lossless, jpeg = root / "train_prefix_lossless.npz", root / "test_jpeg_q75.npz"
    for f in (lossless, jpeg):
        if not f.is_file():
            raise FileNotFoundError(f"CIFAR-10 file not found: {f}")
    with np.load(lossless) as d:
        x_train, y_train, x_test, y_test = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    if split == "heldout":
        x, y = x_test, y_test
    elif split == "train":
        with np.load(jpeg) as d:
            start = x_test.shape[0]
            x = np.concatenate([x_train, d["x"][start:]])
            y = np.concatenate([y_train, d["y"][start:]])
    else:
        raise ValueError(f"CIFAR-10 split must be 'train' or 'heldout', got {split!r}")
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64))
