"""The per-layer "float is faster" decision on sm_90, from kernel facts shipped with the package.

:mod:`.sm90_model` predicts the time of one layer from the facts of the compiled kernel
(registers, shared memory, SASS instructions per K step, epilogue, wait depth).
``bench/sm90_report.py`` reads those facts from the SASS of every kernel variant × candidate tile
compiled for sm_90; the facts the model needs are committed here as ``sm90_facts.json``, so the
backend decides without a compiler or a GPU. One implementation for both users:
:func:`estimate` (used by the report, all modes) and :func:`choose` / :func:`decide` (the pass).

The float choice applies only on compute capability 9.x: on other GPUs (and on the CPU) there are
no facts and the layer runs its integer kernel.

Write the package file from a report's JSON (atomic write)::

    python -m qdcompile.kernels.sm90_choice bench/results/sm90-report-triton3.7.1-after.json --commit <sha>
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .autotune import CANDIDATES, Tile, kept_configs, split_k_for
from .layout import device_weight_bits
from .sm90_model import KernelFacts, LayerShape, best_int8, fp16_seconds

FACTS_PATH = Path(__file__).with_name("sm90_facts.json")
FORMAT = 1
FIELDS = ("registers", "shared_bytes", "loop_instructions", "epilogue_instructions", "wait_depth")
# the codes-in variants the backend runs by default; every candidate tile must have facts for them
REQUIRED = ("gemm:8:codes", "gemm:4:codes", "conv:8:codes", "conv:4:codes", "conv1:8:codes", "conv1:4:codes")
KINDS = ("gemm", "conv", "conv1")

Facts = dict  # variant name → {Tile: KernelFacts}


class FactsError(ValueError):
    """The sm_90 facts file is missing, corrupt, or does not match this package's kernels."""


def tile_of(name: str) -> Tile:
    """``"128x64x64w4s4"`` → ``Tile(128, 64, 64, 4, 4)``."""
    try:
        bm, bn, rest = name.split("x", 2)
        bk, rest = rest.split("w", 1)
        warps, stages = rest.split("s")
        return Tile(int(bm), int(bn), int(bk), int(warps), int(stages))
    except ValueError:
        raise FactsError(f"tile name {name!r} is not BMxBNxBKwWARPSsSTAGES") from None


def facts_by_variant(facts: list[dict], where: str = "facts") -> Facts:
    """``{variant: {Tile: KernelFacts}}`` of ``facts`` (records of ``tests/kernels/sm90_compile.py``,
    ``variant@tile``); records without a K loop (the quantizer) are skipped."""
    out: Facts = {}
    for i, f in enumerate(facts):
        if not isinstance(f, dict) or "@" not in str(f.get("variant", "")):
            if isinstance(f, dict) and isinstance(f.get("variant"), str):
                continue          # "quantize", "gemm:8" without a tile: no model facts
            raise FactsError(f"{where}: record {i} has no 'variant' name")
        if f.get("loop_instructions") is None:
            continue
        variant, _, tile = f["variant"].partition("@")
        t = tile_of(tile)
        missing = [k for k in FIELDS if k != "wait_depth" and not isinstance(f.get(k), int)]
        if missing:
            raise FactsError(f"{where}: {f['variant']}: fields {missing} must be integers")
        wait = f.get("wait_depth")
        out.setdefault(variant, {})[t] = KernelFacts(
            t.block_m, t.block_n, t.block_k, t.num_warps, f["registers"], f["shared_bytes"], f["loop_instructions"],
            f["epilogue_instructions"], int(wait) if wait is not None else 0)
    return out


def _check_complete(by: Facts, where: str) -> None:
    for variant in REQUIRED:
        have = set(by.get(variant, {}))
        lacking = [t for t in CANDIDATES if t not in have]
        if lacking:
            raise FactsError(f"{where}: no facts for {variant} at tiles {[_name(t) for t in lacking]} "
                             "(the autotune candidates changed since the facts were written? regenerate: "
                             "python -m qdcompile.kernels.sm90_choice <report.json> --commit <sha>)")


def _name(t: Tile) -> str:
    return f"{t.block_m}x{t.block_n}x{t.block_k}w{t.num_warps}s{t.num_stages}"


@dataclass(frozen=True)
class ShippedFacts:
    commit: str
    triton: str
    variants: Facts


def load_facts(path: Path | str | None = None) -> ShippedFacts:
    """Read and check a facts file (default: the package's, read once per process)."""
    if path is None:
        return _package_facts()
    return _read(Path(path))


@functools.lru_cache(maxsize=1)
def _package_facts() -> ShippedFacts:
    return _read(FACTS_PATH)


def _read(path: Path) -> ShippedFacts:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FactsError(f"{path}: sm_90 facts file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FactsError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FactsError(f"{path}: expected an sm_90 facts file of format {FORMAT}, got format {got!r}")
    if not isinstance(data.get("facts"), list) or not isinstance(data.get("commit"), str):
        raise FactsError(f"{path}: expected 'facts' (a list) and 'commit' (a string)")
    by = facts_by_variant(data["facts"], str(path))
    _check_complete(by, str(path))
    return ShippedFacts(data["commit"], str(data.get("triton", "")), by)


def write_facts(report: Path | str, out: Path | str, commit: str) -> Path:
    """Write the package facts file ``out`` from a report JSON (``bench/sm90_report.py``); atomic."""
    report, out = Path(report), Path(out)
    try:
        loaded = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FactsError(f"{report}: not a readable report JSON ({e})") from None
    facts = loaded.get("facts") if isinstance(loaded, dict) else loaded
    if not isinstance(facts, list):
        raise FactsError(f"{report}: no 'facts' list")
    kept = [{"variant": f["variant"], **{k: f.get(k) for k in FIELDS}} for f in facts
            if isinstance(f, dict) and "@" in str(f.get("variant", "")) and f.get("loop_instructions") is not None]
    by = facts_by_variant(kept, str(report))
    _check_complete(by, str(report))
    triton = loaded.get("triton", "") if isinstance(loaded, dict) else ""
    doc = {"format": FORMAT, "commit": commit, "triton": triton, "source": report.name, "facts": kept}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(doc, indent=0) + "\n")
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


# ---------------------------------------------------------------- model of one layer

def variant_name(kind: str, bits: int, split: bool, codes: bool, by: Facts) -> str:
    """The kernel variant a layer runs (split facts missing: the 1-part kernel's)."""
    name = f"{kind}:{bits}" + (":codes" if codes else "") + (":split" if split else "")
    if name in by:
        return name
    name = f"{kind}:{bits}" + (":codes" if codes else "")
    if name in by:
        return name
    return f"{'gemm' if kind == 'gemm' else 'conv'}:{bits}" + (":codes" if codes else "")


@dataclass(frozen=True)
class Estimate:
    fp16_s: float
    int_s: float
    config: str
    split_k: int
    device_bits: int
    variant: str
    kept: tuple      # the tiles the autotuner keeps for this problem (with facts)

    @property
    def float_faster(self) -> bool:
        """:func:`.sm90_model.prefer_float`'s rule on the times already estimated."""
        return self.fp16_s < self.int_s


def estimate(kind: str, s: LayerShape, weight_bits: int, by: Facts, split: bool = False, codes: bool = True,
             split_k_on: bool = True, device_int8: bool = True) -> Estimate:
    """FP16 and best integer time of one layer (``kind``: gemm / conv / conv1) as the backend runs it:
    device weight bits of :func:`device_weight_bits`, the autotuner's kept tiles, the launcher's split-K."""
    if kind not in KINDS:
        raise ValueError(f"sm90 estimate: kind must be one of {KINDS}, got {kind!r}")
    bits = device_weight_bits("linear" if kind == "gemm" else "conv2d", s.n, s.k, s.m, weight_bits) \
        if device_int8 else weight_bits
    variant = variant_name(kind, bits, split, codes, by)
    if variant not in by:
        raise FactsError(f"no sm_90 facts for kernel variant {variant}")
    kept = {_name(t): by[variant][t] for t in kept_configs(s.m, s.n, s.k, split) if t in by[variant]}
    kept = kept or {_name(t): f for t, f in by[variant].items()}     # facts of other tiles only
    sk = 1 if split or not split_k_on else split_k_for(s.m, s.n, s.k)
    t, cfg = best_int8(s, kept, bits, sk)
    return Estimate(fp16_seconds(s), t, cfg, sk, bits, variant, tuple(kept))


def layer_shape(op: str, weight_shape, m: int, act_elems: int | None = None) -> tuple[str, LayerShape]:
    """``(kind, LayerShape)`` of a conv2d / linear with ``weight_shape`` and ``m`` GEMM rows;
    ``act_elems``: elements of the input (default ``m·K``)."""
    n = int(weight_shape[0])
    k = 1
    for d in weight_shape[1:]:
        k *= int(d)
    if op == "linear":
        kind = "gemm"
    elif op == "conv2d":
        kind = "conv" if int(weight_shape[2]) * int(weight_shape[3]) > 1 else "conv1"
    else:
        raise ValueError(f"sm90 layer_shape: op must be 'conv2d' or 'linear', got {op!r}")
    return kind, LayerShape(int(m), n, k, int(act_elems) if act_elems is not None else int(m) * k)


def device_capability(device) -> tuple[int, int] | None:
    """Compute capability of ``device`` (None off CUDA). Tests patch this (CPU has no GPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


@dataclass(frozen=True)
class Choice:
    choice: str        # "float" | "int"
    reason: str        # for the report


def decide(op: str, weight_shape, m: int, weight_bits: int, capability, act_elems: int | None = None,
           split: bool = False, codes: bool = True) -> Choice:
    """:func:`choose` with the reason the report shows."""
    if capability is None or int(capability[0]) != 9:
        where = "this device" if capability is None else f"sm_{capability[0]}{capability[1]}"
        return Choice("int", f"no static speed model for {where} (sm_90 only): integer kernel")
    kind, s = layer_shape(op, weight_shape, m, act_elems)
    e = estimate(kind, s, weight_bits, load_facts().variants, split=split, codes=codes)
    times = f"FP16 {e.fp16_s * 1e6:.1f} µs vs integer {e.int_s * 1e6:.1f} µs at M={s.m}"
    if e.float_faster:
        return Choice("float", f"float faster on sm_90 (static model): {times}")
    return Choice("int", f"integer faster on sm_90 (static model): {times}")


def choose(op: str, weight_shape, m: int, weight_bits: int, capability, act_elems: int | None = None,
           split: bool = False, codes: bool = True) -> str:
    """``"float"`` where the static sm_90 model predicts the FP16 library kernel faster than the best
    integer kernel for this layer (``op`` conv2d / linear, ``weight_shape``, ``m`` GEMM rows); else
    ``"int"``, always ``"int"`` off compute capability 9.x (no facts there)."""
    return decide(op, weight_shape, m, weight_bits, capability, act_elems, split, codes).choice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the package's sm_90 facts from a bench/sm90_report.py JSON")
    parser.add_argument("report", type=Path)
    parser.add_argument("--commit", required=True, help="the commit whose kernels the report compiled")
    parser.add_argument("--out", type=Path, default=FACTS_PATH)
    args = parser.parse_args(argv)
    try:
        out = write_facts(args.report, args.out, args.commit)
    except FactsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
