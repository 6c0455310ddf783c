"""Across-calibration replicates of a quality comparison: is a ΔFID systematic or one draw's luck?

One ``bench/quality.py`` run compares configurations on the same seeds with one calibration; its
paired bootstrap interval covers the sampling noise of that run, not the calibration draw (a
different calibration set gives a different quantized model, whose accidental errors may help or
hurt). Run it once per ``--seed`` (which moves both the samples and the calibration set), then:

    python bench/replicates.py RUN.json [RUN.json ...] [--config ptqd] [--vs ptqd-raw] [--out FILE.md]

prints, per run, FID of FP / the reference row / the row, the paired ΔFID and Δ colour W2 with
their intervals, FID against FP's samples and the noise space the calibration chose; then the mean
of each difference over runs ± its standard error across runs (the calibration-to-calibration
spread) and in how many runs the interval lies above / below 0.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence


def _row(run: dict[str, Any], key: str) -> dict[str, Any]:
    for r in run["configs"]:
        if r["key"] == key:
            if r.get("status") != "ok":
                raise SystemExit(f"{run['command']}: configuration {key!r} did not run ({r.get('status')})")
            return r
    raise SystemExit(f"{run['command']}: no configuration {key!r} (has {[r['key'] for r in run['configs']]})")


def _delta(row: dict[str, Any], field: str, vs: str) -> dict[str, Any] | None:
    return next((d for d in row.get(field, []) if d["vs"] == vs), None)


def _fmt_delta(d: dict[str, Any] | None) -> str:
    return "—" if d is None else f"{d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


def _mean_se(xs: Sequence[float]) -> str:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:+.2f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:+.2f} ± {sd / math.sqrt(len(xs)):.2f}"


def _sides(ds: Sequence[dict[str, Any] | None]) -> str:
    ds = [d for d in ds if d is not None]
    above = sum(d["ci95"][0] > 0 for d in ds)
    below = sum(d["ci95"][1] < 0 for d in ds)
    return f"{above} above 0, {below} below 0, {len(ds) - above - below} contain 0"


def summarize(runs: Sequence[dict[str, Any]], config: str, vs: str) -> str:
    first = runs[0]
    lines = [f"# Replicates: {first['model']}, `{config}` vs `{vs}` and FP, {len(runs)} calibrations", "",
             f"qdcompile {first['qdcompile_version']} · torch {first['torch_version']} · {first['device']}", "",
             "Runs (one calibration and one set of sample seeds each):", ""]
    lines += [f"* `{r['command']}` ({r['date']})" for r in runs]
    lines += ["", f"| seed | FID FP | FID {vs} | FID {config} | ΔFID {config} − {vs} | ΔFID {vs} − FP | "
                  f"ΔFID {config} − FP | Δ colour W2 {config} − {vs} | FID vs FP samples ({vs} → {config}) | "
                  "noise space |", "|" + "---|" * 10]
    cols: dict[str, list] = {"cv": [], "vf": [], "cf": [], "w2": [], "w2vf": [], "w2cf": []}
    for run in runs:
        fp, ref, row = _row(run, "fp"), _row(run, vs), _row(run, config)
        d = {"cv": _delta(row, "fid_delta", vs), "vf": _delta(ref, "fid_delta", "fp"),
             "cf": _delta(row, "fid_delta", "fp"), "w2": _delta(row, "colour_delta", vs),
             "w2vf": _delta(ref, "colour_delta", "fp"), "w2cf": _delta(row, "colour_delta", "fp")}
        for k, v in d.items():
            cols[k].append(v)
        lines.append(f"| {run['options']['seed']} | {fp['fid']:.3f} | {ref['fid']:.3f} | {row['fid']:.3f} | "
                     f"{_fmt_delta(d['cv'])} | {_fmt_delta(d['vf'])} | {_fmt_delta(d['cf'])} | {_fmt_delta(d['w2'])} | "
                     f"{ref.get('fid_vs_fp_samples', float('nan')):.3f} → {row.get('fid_vs_fp_samples', float('nan')):.3f}"
                     f" | {row.get('noise_space', '—')} |")
    names = {"cv": f"ΔFID {config} − {vs}", "vf": f"ΔFID {vs} − FP", "cf": f"ΔFID {config} − FP",
             "w2": f"Δ colour W2 {config} − {vs}", "w2vf": f"Δ colour W2 {vs} − FP",
             "w2cf": f"Δ colour W2 {config} − FP"}
    lines += ["", "Across calibrations (mean ± standard error over runs; each run's 95% interval is a paired "
                  "bootstrap over its samples):", ""]
    for k, name in names.items():
        ds = [d for d in cols[k] if d is not None]
        if ds:
            lines.append(f"* {name}: {_mean_se([d['delta'] for d in ds])}; intervals: {_sides(ds)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="quality-*.json files of bench/quality.py, one per --seed")
    ap.add_argument("--config", default="ptqd", help="the configuration compared")
    ap.add_argument("--vs", default="ptqd-raw", help="the reference configuration (besides FP)")
    ap.add_argument("--out", default=None, help="also write the markdown here (atomically)")
    a = ap.parse_args(argv)
    runs = [json.loads(Path(p).read_text()) for p in a.runs]
    models = {r["model"] for r in runs}
    if len(models) > 1:
        raise SystemExit(f"runs of different models: {sorted(models)}")
    runs.sort(key=lambda r: r["options"]["seed"])
    text = summarize(runs, a.config, a.vs)
    print(text)
    if a.out:
        from qdcompile.io import atomic_write

        atomic_write(a.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
