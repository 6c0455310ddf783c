"""Fuzz the metadata loader with mutated real files of the three kinds (W8A8; W4A8 with split
layers; mixed precision with PTQD statistics).

Each mutation either raises :class:`MetadataError` or loads exactly what the file says:

* raw mutations (a flipped byte anywhere, a flipped byte of the header, truncation, an edited
  JSON field or tensor with the checksums left as they were): the loaded content must equal
  the original file's;
* resealed mutations (a JSON field or tensor set to a hostile value, checksums recomputed, as a
  deliberate edit would): a load must reproduce the edited file exactly when saved again (no
  value read as something else) and hold finite numbers only.

Any other exception, or a load that differs, fails. A larger run (counts per category)::

    python tests/qdcompile/test_metadata_fuzz.py --n 1200
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import qdcompile
from qdcompile import MetadataError

HOSTILE = [float("inf"), float("-inf"), float("nan"), -1, -1.0, 0, 0.0, 1e30, 12.7, True, False, None, "inf", "8",
           [], {}, [1, 2], 10 ** 40, 2 ** 63, -(2 ** 100), "", "conv2d", 1e-300]
TENSOR_VALUES = [float("inf"), float("nan"), 0.0, -1.0, 1e30, 127, -128, 3]


def _leaves(obj, path=()):
    """Every leaf (and every container) of a JSON value, with its path."""
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))


def _set_path(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _json_edit(header: dict, rng: random.Random) -> str:
    """Set a random field (weighted towards what the loader consumes) to a hostile value, or drop it."""
    paths = [p for p in _leaves(header) if p]
    useful = [p for p in paths if p[0] in ("layers", "noise", "act_variants", "precision_plan", "recipe", "model",
                                           "noise_layer", "noise_space", "corrections", "layer_order")]
    path = rng.choice(useful if rng.random() < 0.85 else paths)
    if rng.random() < 0.1 and isinstance(path[-1], str):
        parent = header
        for k in path[:-1]:
            parent = parent[k]
        parent.pop(path[-1])
        return f"drop {list(path)}"
    value = rng.choice(HOSTILE)
    _set_path(header, path, value)
    return f"{list(path)} = {value!r}"


def _tensor_edit(tensors: dict, rng: random.Random) -> str:
    key = rng.choice(sorted(tensors))
    t = tensors[key].clone()
    how = rng.randrange(5)
    if how == 0 and t.numel():
        flat = t.reshape(-1)
        value = rng.choice(TENSOR_VALUES)
        flat[rng.randrange(flat.numel())] = value if t.is_floating_point() else int(max(-128, min(127, value)))
        what = f"one entry = {value}"
    elif how == 1:
        t = t.reshape(-1) if rng.random() < 0.5 else t.reshape(-1)[:1].reshape(())
        what = f"shape {list(t.shape)}"
    elif how == 2:
        t = torch.zeros_like(t)
        what = "zeros"
    elif how == 3:
        t = t.to(rng.choice([torch.int16, torch.float64, torch.uint8, torch.float16, torch.int8, torch.float32]))
        what = f"dtype {t.dtype}"
    else:
        tensors.pop(key)
        return f"drop tensor {key}"
    tensors[key] = t
    return f"tensor {key}: {what}"


def _canonical(meta) -> tuple[str, dict]:
    """What a loaded metadata object says, as (header JSON, tensors), by saving it again."""
    from metadata_files import read_parts

    with tempfile.TemporaryDirectory() as d:
        _, header, tensors = read_parts(meta.save(Path(d) / "m.qdiff"))
    header.pop("qdcompile_version", None)
    return json.dumps(header, sort_keys=True), tensors


def _numbers_as_floats(v):
    """JSON value with every number a float (1 and 1.0 say the same), booleans kept apart."""
    if isinstance(v, dict):
        return {k: _numbers_as_floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_numbers_as_floats(x) for x in v]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return ("number", float(v) if abs(v) <= 2 ** 53 or isinstance(v, float) else str(v))
    return v


def _same(a: tuple[str, dict], b: tuple[str, dict]) -> bool:
    return _numbers_as_floats(json.loads(a[0])) == _numbers_as_floats(json.loads(b[0])) and a[1].keys() == b[1].keys() and all(
        a[1][k].dtype == b[1][k].dtype and torch.equal(a[1][k], b[1][k]) for k in a[1])


def _all_finite(header: dict) -> bool:
    def ok(v):
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, dict):
            return all(ok(x) for x in v.values())
        if isinstance(v, list):
            return all(ok(x) for x in v)
        return True
    return all(ok(header.get(k)) for k in ("layers", "noise", "act_variants", "recipe", "precision_plan"))


def fuzz_once(path: Path, original, rng: random.Random, work: Path) -> tuple[str, str]:
    """One mutation of ``path``: ``(mutation, outcome)``, outcome one of "MetadataError", "unchanged"
    (raw), "faithful" (resealed), "other exception: ...", "silent change"."""
    from metadata_files import read_parts, write_parts

    out = work / "mutated.qdiff"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    kind = rng.choice(["byte", "header-byte", "truncate", "json", "tensor", "json-resealed", "tensor-resealed"])
    expect, what = None, kind
    if kind in ("byte", "header-byte", "truncate"):
        buf = bytearray(data)
        if kind == "truncate":
            buf = buf[:rng.randrange(len(buf))]
        else:
            lo, hi = (8, 8 + header_len) if kind == "header-byte" else (0, len(buf))
            buf[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        out.write_bytes(bytes(buf))
    else:
        file_meta, header, tensors = read_parts(path)
        what = _json_edit(header, rng) if kind.startswith("json") else _tensor_edit(tensors, rng)
        reseal = kind.endswith("resealed")
        write_parts(out, file_meta, header, tensors, reseal=reseal)
        if reseal:
            header.pop("qdcompile_version", None)
            expect = (json.dumps(header, sort_keys=True), {k: v.contiguous() for k, v in tensors.items()})
    try:
        loaded = qdcompile.load_metadata(out)
    except MetadataError:
        return kind, "MetadataError"
    except Exception as e:  # noqa: BLE001 - the point of the test
        return kind, f"other exception: {type(e).__name__}: {e} ({what})"
    got = _canonical(loaded)
    if expect is None:
        return kind, "unchanged" if _same(got, original) else f"silent change: {what}"
    faithful = _same(got, expect) and _all_finite(json.loads(got[0]))
    return kind, "faithful" if faithful else f"silent change: {what}"


def run_fuzz(files: dict[str, Path], n: int, seed: int = 0) -> tuple[Counter, list]:
    """``(counts per (file kind, mutation, outcome), failures)`` of ``n`` mutated files."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    failures = []
    originals = {kind: _canonical(qdcompile.load_metadata(p)) for kind, p in files.items()}
    with tempfile.TemporaryDirectory() as d:
        for i in range(n):
            kind = list(files)[i % len(files)]
            mutation, outcome = fuzz_once(files[kind], originals[kind], rng, Path(d))
            counts[(kind, mutation, outcome.split(":")[0])] += 1
            if outcome.startswith(("other", "silent")):
                failures.append((kind, mutation, outcome))
    return counts, failures


def test_fuzzed_files_load_faithfully_or_raise_metadata_error(metadata_files):
    counts, failures = run_fuzz({kind: path for kind, (_, path) in metadata_files.items()}, n=90, seed=18)
    assert not failures, failures[:5]
    outcomes = Counter()
    for (_, _, outcome), c in counts.items():
        outcomes[outcome] += c
    assert sum(outcomes.values()) == 90 and outcomes["MetadataError"] > 45
    assert set(k for k, _, _ in counts) == {"w8a8", "w4a8-split", "mixed-ptqd"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200, help="mutated files in all (split evenly over the 3 kinds)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import os
    import sys

    os.environ.setdefault("QDCOMPILE_KERNELS", "reference")
    sys.path.append(str(Path(__file__).resolve().parents[1]))   # tests/: tiny_models, metadata_files
    from metadata_files import KINDS, calibrated_file

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        files = {kind: calibrated_file(kind, Path(d))[1] for kind in KINDS}
        counts, failures = run_fuzz(files, a.n, a.seed)
    total = Counter()
    for (kind, mutation, outcome), c in sorted(counts.items()):
        total[outcome] += c
        print(f"{kind:11s} {mutation:16s} {outcome:18s} {c}")
    print("total:", dict(total))
    for f in failures[:20]:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
