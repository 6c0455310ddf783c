"""Symmetric vs asymmetric 4-bit weight grids on the MNIST reference model, per layer.

Issue 20, item 1: Q-Diffusion quantizes weights per output channel on an asymmetric grid
(unsigned codes, integer zero point per channel) with an 80-ratio clipping search scored by
mean |error|^2.4 (``weight_observer="qdiff-mse"``); qdcompile's earlier W4 default was the
symmetric grid with a 36-ratio squared-error search (``weight_observer="mse"``). For every 4-bit
conv/linear of ``qdcompile.reference_model("mnist")`` this reports

* the weight's relative MSE ``‖Ŵ − W‖² / ‖W‖²`` with min-max ranges, after each grid's search,
  and after the same short AdaRound run (``calibrate``, ``method="qdiffusion"``);
* the layer output's relative MSE ``‖f(x; Ŵ) − f(x; W)‖² / ‖f(x; W)‖²`` (bias included) on the
  float model's inputs to that layer over the calibration set, for the same weights.

Both calibrations are weight-only (``act_bits=None``, no split) so the weight grid is the only
difference; they share the calibration set (same seed), the AdaRound budget and seed. The first
and last layers (``keep_8bit``) stay symmetric 8-bit in both and are not reported.

    python bench/weight_grid.py --out bench/results/weight-grid-20261203
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-300))


def _layer_out(module, op: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if op == "linear":
        return F.linear(x, weight, module.bias)
    return F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation, module.groups)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=8, help="calibration trajectories")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the calibration trajectories")
    p.add_argument("--calib-steps", type=int, default=5, help="steps kept per trajectory")
    p.add_argument("--recon-iters", type=int, default=100, help="AdaRound steps per block (both grids)")
    p.add_argument("--batch", type=int, default=16, help="reconstruction batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=None, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)

    from qdcompile import QuantRecipe, calibrate, reference_model
    from qdcompile.calibration import collect_calibration_set, layer_bits, weight_grid_fn
    from qdcompile.kernels.quantizers import dequantize_weight, quantize_weight
    from qdcompile.layers import conv_linear_layers
    from qdcompile.simulate import dequantized_weight

    torch.manual_seed(args.seed)
    unet, sched = reference_model("mnist")
    common = dict(act_bits=None, split=False, recon_iters=args.recon_iters, act_lsq_iters=0,
                  recon_batch_size=args.batch)
    recipes = {"symmetric/mse": QuantRecipe.w4a8(weight_grid="symmetric", weight_observer="mse", **common),
               "asymmetric/qdiff-mse": QuantRecipe.w4a8(**common)}
    minmax = {"symmetric/minmax": QuantRecipe.w4a8(weight_grid="symmetric", weight_observer="minmax", **common),
              "asymmetric/minmax": QuantRecipe.w4a8(weight_observer="minmax", **common)}
    kw = dict(num_samples=args.samples, num_inference_steps=args.steps, num_calib_steps=args.calib_steps,
              batch_size=args.batch, seed=args.seed, progress=False)

    # the float model's inputs to every layer on the calibration set (the set calibrate() collects)
    layers = conv_linear_layers(unet)
    names = [n for n in layers if layer_bits(n, recipes["symmetric/mse"])[0] == 4]
    calib = collect_calibration_set(unet, sched, num_samples=args.samples, num_inference_steps=args.steps,
                                    num_calib_steps=args.calib_steps, batch_size=args.batch, seed=args.seed,
                                    progress=False)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [layers[n][0].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach()))
             for n in names]
    with torch.no_grad():
        for x, t, ckw in calib.batches(torch.device("cpu"), torch.float32):
            unet(x, t, **ckw)
    for h in hooks:
        h.remove()

    def measure(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        out = {}
        with torch.no_grad():
            for n in names:
                module, op = layers[n]
                w = module.weight.detach().float()
                num = den = 0.0
                for x in inputs[n]:
                    ref = _layer_out(module, op, x, w)
                    num += float((_layer_out(module, op, x, weights[n]) - ref).double().pow(2).sum())
                    den += float(ref.double().pow(2).sum())
                out[n] = {"weight": _rel(weights[n], w), "output": num / den}
        return out

    def searched(recipe) -> dict[str, torch.Tensor]:
        grid = weight_grid_fn(recipe)
        res = {}
        for n in names:
            w = layers[n][0].weight.detach().float()
            s, z = grid(w, 4)
            res[n] = dequantize_weight(quantize_weight(w, s, 4, zero_point=z), s, z)
        return res

    results: dict[str, dict] = {}
    timings = {}
    for key, recipe in minmax.items():
        results[key] = {"min-max": measure(searched(recipe))}
    for key, recipe in recipes.items():
        results[key] = {"search": measure(searched(recipe))}
        t0 = time.time()
        print(f"calibrating {key} ...", file=sys.stderr, flush=True)
        meta = calibrate(unet, sched, recipe, attach=False, **kw)
        timings[key] = time.time() - t0
        print(f"  {timings[key]:.0f} s", file=sys.stderr, flush=True)
        results[key]["adaround"] = measure({n: dequantized_weight(meta.layers[n]).float() for n in names})
        assert all(meta.layers[n].asymmetric == (recipe.weight_grid != "symmetric") for n in names)

    def ratios(stage: str, metric: str) -> list[float]:
        return [results["symmetric/mse"][stage][n][metric] / results["asymmetric/qdiff-mse"][stage][n][metric]
                for n in names]

    def geo(v):
        return math.exp(sum(math.log(x) for x in v) / len(v))

    summary = {}
    for stage in ("search", "adaround"):
        for metric in ("weight", "output"):
            r = ratios(stage, metric)
            summary[f"{stage}/{metric}"] = {"geomean_sym_over_asym": geo(r), "min": min(r), "max": max(r),
                                            "layers_asym_better": sum(x > 1 for x in r), "layers": len(r)}
    mm = [results["symmetric/minmax"]["min-max"][n]["weight"] / results["asymmetric/minmax"]["min-max"][n]["weight"]
          for n in names]
    summary["min-max/weight"] = {"geomean_sym_over_asym": geo(mm), "min": min(mm), "max": max(mm),
                                 "layers_asym_better": sum(x > 1 for x in mm), "layers": len(mm)}

    command = "python bench/weight_grid.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"command": command, "args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
           "layers": names, "results": results, "summary": summary, "calibration_seconds": timings}
    lines = ["# Weight grid at W4: symmetric/mse vs asymmetric/qdiff-mse (MNIST reference model)", "",
             f"Command: `{command}`", "",
             f"Calibration: {args.samples} trajectories × {args.calib_steps} of {args.steps} steps, weight-only W4 "
             f"(activations float, no split), AdaRound {args.recon_iters} steps per block (batch {args.batch}, "
             f"seed {args.seed}), same calibration set for both grids. Layer outputs on the float model's inputs "
             "to each layer over the calibration set. Relative MSE = ‖error‖² / ‖reference‖². "
             f"Calibration time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".", "",
             "## Summary (ratio symmetric / asymmetric; > 1: the asymmetric grid has less error)", "",
             "| stage / metric | geomean | min | max | layers where asymmetric is better |", "|---|---|---|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v['geomean_sym_over_asym']:.3f} | {v['min']:.3f} | {v['max']:.3f} | "
                     f"{v['layers_asym_better']} / {v['layers']} |")
    lines += ["", "## Per layer (relative MSE)", "",
              "| layer | W min-max sym | W min-max asym | W search sym | W search asym | W AdaRound sym | "
              "W AdaRound asym | out search sym | out search asym | out AdaRound sym | out AdaRound asym |",
              "|---|" + "---|" * 10]
    S, A = results["symmetric/mse"], results["asymmetric/qdiff-mse"]
    for n in names:
        cells = [results["symmetric/minmax"]["min-max"][n]["weight"], results["asymmetric/minmax"]["min-max"][n]["weight"],
                 S["search"][n]["weight"], A["search"][n]["weight"], S["adaround"][n]["weight"],
                 A["adaround"][n]["weight"], S["search"][n]["output"], A["search"][n]["output"],
                 S["adaround"][n]["output"], A["adaround"][n]["output"]]
        lines.append(f"| {n} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(doc, indent=1))
        Path(args.out + ".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
