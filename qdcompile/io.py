"""Writing output files: atomically, with the permissions of an ordinary file; JSON data.

Every file qdcompile writes (metadata, images, results, checkpoints, weights) goes through
:func:`atomic_write`: the content is written to a temporary file in the target's folder and
moved over the target with ``os.replace`` only once complete, so an interrupted or failed
write never leaves a half-written file and keeps the previous one. ``tempfile`` creates its
files with mode 0600; they are given the mode a plain ``open(path, "w")`` would (0666 less the
process umask) before the move.

:func:`jsonable` turns results into plain JSON data (one convention for non-finite numbers);
:func:`write_json` writes them with :func:`atomic_write`.

:func:`check_writable` tells, before any long work, whether an output file can be written there.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def default_file_mode() -> int:
    """0666 less the process umask (what ``open(path, "w")`` would create)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object] | bytes | str, *,
                 fsync: bool = False) -> Path:
    """Write ``path`` atomically. ``write`` is the content (bytes or text), or a function that
    writes the file whose name it is given (e.g. ``lambda tmp: torch.save(obj, tmp)``).
    ``fsync``: flush the content to disk before the move (files worth hours of work)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if callable(write):
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(write.encode() if isinstance(write, str) else write)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def jsonable(v: Any) -> Any:
    """Plain JSON data from ``v``: dicts (keys as strings), lists for lists and tuples, strings,
    booleans, integers and finite floats as they are; NaN → ``None``, ±inf → ``"inf"`` /
    ``"-inf"``; anything else (paths, dtypes, numpy integers, …) → ``str(v)``. The result
    serialises with ``json.dumps(..., allow_nan=False)``."""
    if isinstance(v, dict):
        return {(k if isinstance(k, str) else str(k)): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return str(v)


def json_text(data: Any, indent: int | None = 2) -> str:
    """``data`` as JSON text (through :func:`jsonable`, keys in their order), ending in a newline."""
    return json.dumps(jsonable(data), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (:func:`json_text`) to ``path`` atomically."""
    return atomic_write(path, json_text(data, indent))


def _check_folder(folder: Path, target: Path, what: str) -> None:
    """``folder`` (created later if missing) can hold ``target``: its nearest existing ancestor is
    a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {str(target)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(target)!r}: no permission to write in {str(existing)!r}")


def check_writable(path: str | os.PathLike, what: str = "output file") -> Path:
    """Raise ``ValueError`` (clear, one line) when a file cannot be written at ``path``: it names an
    existing folder, its folder is a file, or its folder is not writable. Call it before the work
    whose result goes there."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing folder; give a file name (e.g. {str(path / 'out')!r})")
    _check_folder(path.parent, path, what)
    return path


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Like :func:`check_writable`, for a folder that will be created (if needed) and written into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing file, not a folder")
    _check_folder(path, path, what)
    return path
