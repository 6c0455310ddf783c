"""Paired before/after fidelity of one recipe change, at one fixed calibration budget.

Both recipes are the preset ``--preset`` (w4a8, w4a4, w8a8, ...) with the shared ``--budget``
overrides, then ``--before`` / ``--after`` overrides on top (``FIELD=VALUE,...`` as
``qdcompile eval --recipe-set``). Both are calibrated on the same calibration seed, evaluated on the
same FP trajectories and sampled from the same seeds, so every difference is paired:

* **per-layer output error**: each quantized conv/linear fed its FP input (from the FP model on the
  recorded trajectories), relative squared error of its fake-quantized output against its FP output;
  per layer, and the paired mean of ``log10(after/before)`` over layers with its standard error;
* **ε SNR_Q vs FP per step** (PTQD eq. 13, :func:`qdcompile.evaluation.trajectory.step_snr`); the paired mean
  over steps of ``after − before`` dB with its standard error;
* **FID (builtin features) and PSNR vs FP**: ``--num-samples`` images per side from the same seeds;
  ΔFID with the paired bootstrap interval (:func:`qdcompile.evaluation.fid.paired_fid_delta`), per-image
  PSNR vs FP with the paired mean change and standard error (:func:`qdcompile.ptqd.paired_change`).

    python bench/fidelity.py --preset w4a4 --before act_observer=minmax --after act_observer=search --tag search

``--calib-seeds 1,2,3`` repeats the calibration of both sides once per seed (the FP trajectories and
sampling seeds stay fixed) and adds each seed's change with a Student t interval over seeds: the
paired intervals above cover the images drawn, not the calibration's own randomness.

Writes ``bench/results/fidelity-<model>-<date>-<tag>.{md,json}``. Quantized models run as the
fake-quant simulation (the same metadata the integer kernels run; see docs/METHODS.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    from _checkout import use_checkout
except ImportError:   # run as a module
    from bench._checkout import use_checkout

use_checkout()

from qdcompile import QuantRecipe  # noqa: E402
from qdcompile.calibration import calibrate  # noqa: E402
from qdcompile.commands.eval import parse_recipe_set  # noqa: E402
from qdcompile.evaluation.fid import (FeatureSpace, paired_fid_delta, real_cifar10_images,  # noqa: E402
                                      real_mnist_images)
from qdcompile.evaluation.trajectory import step_snr, summarize_snr  # noqa: E402
from qdcompile.io import atomic_write, write_json  # noqa: E402
from qdcompile.metrics import psnr_db  # noqa: E402
from qdcompile.trajectory import TrajectoryRecorder  # noqa: E402
from qdcompile.models import load_model  # noqa: E402
from qdcompile.ptqd import change_verdict, paired_change  # noqa: E402
from qdcompile.sampling import sample  # noqa: E402
from qdcompile.simulate import dequantized_weight, fake_quant_input, simulate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Z95 = 1.96


def build_recipe(preset: str, budget: dict[str, Any], side: dict[str, Any]) -> QuantRecipe:
    base = QuantRecipe.preset(preset)
    return QuantRecipe.from_dict({**base.to_dict(), **budget, **side})


@torch.no_grad()
def each_layer_output(unet, meta, trajectory, visit) -> None:
    """Run the FP ``unet`` over the recorded trajectory; for every quantized layer call
    ``visit(name, module, y_q, y)``: ``y`` the layer's FP output on its FP input, ``y_q`` the
    fake-quantized layer's output on the same input (float32)."""
    modules = dict(unet.named_modules())

    def hook(name, rec):
        w_q = dequantized_weight(rec).float()

        def fn(mod, args, out):
            x = args[0].float()
            xq = fake_quant_input(rec, x)
            b = mod.bias.float() if mod.bias is not None else None
            if isinstance(mod, torch.nn.Conv2d):
                yq = mod._conv_forward(xq, w_q.to(x.device), b)
            else:
                yq = torch.nn.functional.linear(xq, w_q.to(x.device), b)
            visit(name, mod, yq, out.float())
        return fn

    handles = [modules[n].register_forward_hook(hook(n, r)) for n, r in meta.layers.items()]
    try:
        for s in trajectory.steps:
            unet(s.x, s.timestep, **s.kwargs)
    finally:
        for h in handles:
            h.remove()


def layer_errors(unet, meta, trajectory) -> dict[str, float]:
    """Per quantized layer: ``||y_q − y||² / ||y||²`` summed over the trajectory, where ``y`` is the
    layer's FP output on its FP input and ``y_q`` the fake-quantized layer's output on the same input."""
    acc = {n: [0.0, 0.0] for n in meta.layers}

    def visit(name, mod, yq, y):
        acc[name][0] += float((yq - y).pow(2).sum())
        acc[name][1] += float(y.pow(2).sum())

    each_layer_output(unet, meta, trajectory, visit)
    return {n: (e / max(sig, 1e-30)) for n, (e, sig) in acc.items()}


def _interval(mean: float, se: float) -> list[float]:
    return [mean - Z95 * se, mean + Z95 * se]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    unet, scheduler = load_model(args.model)
    unet.eval()
    budget = dict(parse_recipe_set(args.budget))
    sides = {"before": dict(parse_recipe_set(args.before)), "after": dict(parse_recipe_set(args.after))}
    recipes = {k: build_recipe(args.preset, budget, v) for k, v in sides.items()}
    if recipes["before"] == recipes["after"]:
        raise SystemExit("--before and --after give the same recipe: nothing to compare")
    differ = {k for k, v in recipes["before"].to_dict().items() if recipes["after"].to_dict()[k] != v}
    if differ <= {"act_lsq_schedule", "act_lsq_iters", "act_lsq_lr"} and recipes["before"].method == "rtn":
        raise SystemExit(f"--before and --after differ only in {sorted(differ)}, which method='rtn' does not use "
                         "(no LSQ): add method=qdiffusion to --budget")

    def draw(model):
        return sample(model, scheduler, num_images=args.num_samples, num_inference_steps=args.steps,
                      generator=torch.Generator().manual_seed(args.seed), progress=False).float().cpu()

    recorder = TrajectoryRecorder(min(args.snr_samples, args.num_samples))
    fp = sample(unet, scheduler, num_images=args.num_samples, num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(args.seed), progress=False,
                callback=recorder).float().cpu()
    trajectory = recorder.finish(unet)
    seeds = args.calib_seeds or [args.seed + 1]

    out: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "model": args.model, "preset": args.preset,
        "budget": budget, "before": sides["before"], "after": sides["after"],
        "calibration": {"num_samples": args.calib_samples, "num_inference_steps": args.steps,
                        "num_calib_steps": args.calib_steps, "seed": seeds[0], "seeds": seeds},
        "num_samples": args.num_samples, "steps": args.steps, "sampling_seed": args.seed,
        "snr_samples": recorder.count, "recipes": {k: r.to_dict() for k, r in recipes.items()}, "replicates": []}
    space = real_f = None
    if args.fid:
        real = real_mnist_images(args.real_samples) if args.model == "mnist" else real_cifar10_images()
        if real is None:
            out["fid_note"] = "no real image set for this model: FID skipped"
        else:
            space = FeatureSpace(real, extractor="mnist" if args.model == "mnist" else "cifar10", backend="builtin")
            real_f = space.features(real)
            out["fid_fp"] = space(fp)["fid"]
            out["fid_features"] = space.describe()
    try:
        for seed in seeds:
            rep = {"calibration_seed": seed, "sides": {}}
            samples, snr, layers = {}, {}, {}
            for side, recipe in recipes.items():
                t0 = time.perf_counter()
                meta = calibrate(copy.deepcopy(unet), scheduler, recipe, num_samples=args.calib_samples,
                                 num_inference_steps=args.steps, num_calib_steps=args.calib_steps, seed=seed,
                                 progress=False, attach=False)
                calib_s = time.perf_counter() - t0
                entry: dict[str, Any] = {}
                if args.save_metadata:
                    entry["metadata_file"] = str(meta.save(
                        Path(args.save_metadata) / f"{args.model}-{args.tag}-{side}-calib{seed}.qdiff"))
                layers[side] = layer_errors(unet, meta, trajectory)
                q = copy.deepcopy(unet)
                with simulate(q, meta):
                    snr[side] = step_snr(trajectory, q, scheduler)
                    samples[side] = draw(q)
                rep["sides"][side] = {**entry, "calibration_s": calib_s, **summarize_snr(snr[side]),
                                      "psnr_vs_fp_db": psnr_db(fp, samples[side]),
                                      "snr_steps": [s.to_dict() for s in snr[side]], "layer_rel_error": layers[side]}
                if space is not None:
                    rep["sides"][side]["fid"] = space(samples[side])["fid"]
                print(f"calibration seed {seed}, {side}: calibrated in {calib_s:.1f}s, mean SNR_Q "
                      f"{rep['sides'][side]['mean_snr_q_db']:.2f} dB, PSNR vs FP "
                      f"{rep['sides'][side]['psnr_vs_fp_db']:.2f} dB", flush=True)
            rep["paired"] = paired_stats(layers, snr, samples, fp)
            if space is not None:
                rep["paired"]["fid"] = paired_fid_delta(space.features(samples["after"]),
                                                        space.features(samples["before"]), real_f, seed=args.seed)
            out["replicates"].append(rep)
    finally:
        if space is not None:
            space.close()
    # the first calibration seed's comparison keeps the single-run layout; the spread over seeds is separate
    out["sides"], out["paired"] = out["replicates"][0]["sides"], out["replicates"][0]["paired"]
    if len(seeds) > 1:
        out["across_seeds"] = across_seeds(out["replicates"])
    return out


def paired_stats(layers, snr, samples, fp) -> dict[str, Any]:
    """Paired after − before changes of one calibration seed: per-layer log error ratio, ε SNR_Q per
    step, PSNR vs FP per image (each mean with its standard error and a 95% interval)."""
    names = sorted(set(layers["before"]) & set(layers["after"]))
    ratio = torch.tensor([math.log10(max(layers["after"][n], 1e-30) / max(layers["before"][n], 1e-30))
                          for n in names], dtype=torch.float64)
    d, se = paired_change(ratio, torch.zeros_like(ratio))
    paired: dict[str, Any] = {"layer_log10_error_ratio": {"mean": d, "se": se, "ci95": _interval(d, se),
                                                          "layers": len(names),
                                                          "lower_after": int((ratio < 0).sum())}}
    a = torch.tensor([s.snr_q_db for s in snr["after"]], dtype=torch.float64)
    b = torch.tensor([s.snr_q_db for s in snr["before"]], dtype=torch.float64)
    d, se = paired_change(a, b)
    paired["snr_q_db"] = {"mean": d, "se": se, "ci95": _interval(d, se), "steps": a.numel(),
                          "higher_after": int((a > b).sum())}
    per_image = {k: torch.tensor([psnr_db(fp[i:i + 1], v[i:i + 1]) for i in range(fp.shape[0])], dtype=torch.float64)
                 for k, v in samples.items()}
    finite = torch.isfinite(per_image["after"]) & torch.isfinite(per_image["before"])
    d, se = paired_change(per_image["after"][finite], per_image["before"][finite])
    paired["psnr_vs_fp_db"] = {"mean": d, "se": se, "ci95": _interval(d, se), "images": int(finite.sum()),
                               "verdict_lower_is_worse": change_verdict(-d, se)}
    return paired


# two-sided 95% Student t quantiles by degrees of freedom (1 … 10; larger → normal)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def across_seeds(replicates: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the after − before change of each calibration seed, their mean and a 95% Student t
    interval over seeds: the spread a single calibration's paired interval does not show."""
    out: dict[str, Any] = {}
    for key in ("snr_q_db", "psnr_vs_fp_db", "fid", "layer_log10_error_ratio"):
        if not all(key in r["paired"] for r in replicates):
            continue
        vals = torch.tensor([r["paired"][key].get("mean", r["paired"][key].get("delta")) for r in replicates],
                            dtype=torch.float64)
        n = vals.numel()
        mean, se = float(vals.mean()), float(vals.std() / math.sqrt(n))
        t = T95.get(n - 1, Z95)
        out[key] = {"per_seed": vals.tolist(), "mean": mean, "se": se, "ci95": [mean - t * se, mean + t * se],
                    "positive": int((vals > 0).sum()), "seeds": n}
    return out


def _fmt_iv(p: dict[str, Any], spec: str = "{:+.3f}") -> str:
    lo, hi = p["ci95"]
    return f"{spec.format(p.get('mean', p.get('delta')))} [{spec.format(lo)}, {spec.format(hi)}]"


def markdown(r: dict[str, Any]) -> str:
    b, a, p = r["sides"]["before"], r["sides"]["after"], r["paired"]
    lines = [f"# Fidelity: {r['model']} {r['preset']}, before {r['before']} vs after {r['after']}", "",
             f"`{r['command']}` — {r['date']}", "",
             f"Budget (both): {r['budget'] or 'preset defaults'}; calibration {r['calibration']}; "
             f"{r['num_samples']} samples x {r['steps']} steps from seed {r['calibration']['seed'] - 1}; "
             f"SNR on {r['snr_samples']} FP trajectories. Intervals: 95% (paired).", "",
             "| metric | before | after | after − before [95% CI] |", "|---|---|---|---|"]
    lines.append(f"| mean ε SNR_Q dB | {b['mean_snr_q_db']:.2f} | {a['mean_snr_q_db']:.2f} | "
                 f"{_fmt_iv(p['snr_q_db'])} (higher after at {p['snr_q_db']['higher_after']}/{p['snr_q_db']['steps']} steps) |")
    lines.append(f"| min ε SNR_Q dB (step) | {b['min_snr_q_db']:.2f} ({b['min_snr_q_step']}) | "
                 f"{a['min_snr_q_db']:.2f} ({a['min_snr_q_step']}) | |")
    lines.append(f"| PSNR vs FP dB | {b['psnr_vs_fp_db']:.2f} | {a['psnr_vs_fp_db']:.2f} | "
                 f"{_fmt_iv(p['psnr_vs_fp_db'])} (per image) |")
    if "fid" in p:
        lines.append(f"| FID (builtin; FP {r['fid_fp']:.3f}) | {b['fid']:.3f} | {a['fid']:.3f} | {_fmt_iv(p['fid'])} |")
    lg = p["layer_log10_error_ratio"]
    lines.append(f"| per-layer output error, mean log10(after/before) | | | {_fmt_iv(lg)} "
                 f"(lower after in {lg['lower_after']}/{lg['layers']} layers) |")
    lines.append(f"| calibration s | {b['calibration_s']:.1f} | {a['calibration_s']:.1f} | |")
    if "across_seeds" in r:
        names = {"snr_q_db": "mean ε SNR_Q dB", "psnr_vs_fp_db": "PSNR vs FP dB", "fid": "FID (builtin)",
                 "layer_log10_error_ratio": "per-layer error, mean log10(after/before)"}
        seeds = r["calibration"]["seeds"]
        lines += ["", f"## Across calibration seeds {seeds}", "",
                  "Each seed calibrates both sides afresh (same FP trajectories, same sampling seeds); the table above "
                  f"is seed {seeds[0]}. Interval: 95% Student t over seeds.", "",
                  "| metric | after − before per seed | mean [95% CI] | seeds with after − before > 0 |",
                  "|---|---|---|---|"]
        for key, v in r["across_seeds"].items():
            per = ", ".join(f"{x:+.3f}" for x in v["per_seed"])
            lines.append(f"| {names[key]} | {per} | {_fmt_iv(v)} | {v['positive']}/{v['seeds']} |")
    lines += ["", "## Per-layer relative output error (FP input, fake-quantized layer)", "",
              "| layer | before | after |", "|---|---|---|"]
    for n in sorted(b["layer_rel_error"]):
        lines.append(f"| {n} | {b['layer_rel_error'][n]:.3e} | {a['layer_rel_error'].get(n, float('nan')):.3e} |")
    lines += ["", "## ε SNR_Q dB per step", "", "| step | t | before | after |", "|---|---|---|---|"]
    for sb, sa in zip(b["snr_steps"], a["snr_steps"]):
        lines.append(f"| {sb['step']} | {sb['timestep']} | {sb['snr_q_db']:.2f} | {sa['snr_q_db']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, prefix: str, tag: str, result: dict[str, Any], md: str) -> Path:
    """Write ``<out_dir>/<prefix>-<date>-<tag>.{json,md}`` atomically; return the common stem."""
    stem = Path(out_dir) / f"{prefix}-{_dt.date.today():%Y%m%d}-{tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), result, indent=1)
    atomic_write(stem.with_suffix(".md"), md)
    return stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist", choices=("mnist", "cifar10"))
    p.add_argument("--preset", default="w4a8")
    p.add_argument("--budget", default="recon_iters=40,act_lsq_iters=20", metavar="FIELD=VALUE,...",
                   help="overrides for both sides (the fixed calibration budget)")
    p.add_argument("--before", default="", metavar="FIELD=VALUE,...")
    p.add_argument("--after", default="", metavar="FIELD=VALUE,...")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-steps", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--snr-samples", type=int, default=8)
    p.add_argument("--real-samples", type=int, default=2000)
    p.add_argument("--no-fid", dest="fid", action="store_false")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (calibration: --calib-seeds, default seed+1)")
    p.add_argument("--calib-seeds", type=lambda v: [int(x) for x in v.split(",")], default=None, metavar="S,S,...",
                   help="calibrate both sides once per seed (same FP trajectories and sampling seeds) and report "
                        "the change's spread over calibration seeds")
    p.add_argument("--tag", default="run")
    p.add_argument("--save-metadata", metavar="DIR", default=None,
                   help="also write each side's metadata file here (for later per-layer analysis)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    r = run(args)
    md = markdown(r)
    stem = write_results(args.out_dir, f"fidelity-{args.model}", args.tag, r, md)
    print(md.split("## Per-layer")[0])
    print(f"wrote {stem}.md / .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
