"""Probe: how much of a quantized model's end-to-end error is a per-layer, per-channel constant?

For each metadata file: every quantized layer's output error ``y_q − y`` (fake-quantized layer vs
FP layer, both on the FP input, :func:`fidelity.each_layer_output`) is averaged per output channel
over FP trajectories drawn from ``--est-seed``; that mean is subtracted from the layer's float bias
(empirical bias correction: a float bias the epilogue already adds, so no kernel cost). The model
with and without the folded corrections is then evaluated on *other* FP trajectories and samples
(seed ``--seed``): ε SNR_Q per step (mean dB), PSNR vs FP and FID (builtin) of ``--num-samples``
images, paired on the same seeds.

    python bench/bias_probe.py --model cifar10 run-before.qdiff run-after.qdiff --tag w4a8

Metadata files come from ``bench/fidelity.py --save-metadata DIR`` (or ``qdcompile calibrate``)
for the same model and step count. This is a research probe, not a recipe option: the correction
is estimated on FP inputs and averaged over all timesteps.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

import torch

try:
    from _checkout import use_checkout
    from fidelity import each_layer_output, write_results
except ImportError:   # run as a module
    from bench._checkout import use_checkout
    from bench.fidelity import each_layer_output, write_results

use_checkout()

from qdcompile.evaluation.fid import FeatureSpace, real_cifar10_images, real_mnist_images  # noqa: E402
from qdcompile.evaluation.trajectory import step_snr, summarize_snr  # noqa: E402
from qdcompile.metadata import load_metadata  # noqa: E402
from qdcompile.metrics import psnr_db  # noqa: E402
from qdcompile.models import load_model  # noqa: E402
from qdcompile.sampling import sample  # noqa: E402
from qdcompile.simulate import simulate  # noqa: E402
from qdcompile.trajectory import TrajectoryRecorder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def channel_mean_errors(unet, meta, trajectory) -> dict[str, torch.Tensor]:
    """Per quantized layer, the mean of ``y_q − y`` per output channel (dim 1 of a conv output,
    the last dim of a linear's) over the trajectory; float64 ``[N]``."""
    acc: dict[str, list] = {}

    def visit(name, mod, yq, y):
        e = (yq - y).double()
        ch = 1 if isinstance(mod, torch.nn.Conv2d) else e.dim() - 1
        a = acc.setdefault(name, [0.0, 0])
        a[0] = a[0] + e.sum(dim=[d for d in range(e.dim()) if d != ch])
        a[1] += e.numel() // e.shape[ch]

    each_layer_output(unet, meta, trajectory, visit)
    return {n: s / count for n, (s, count) in acc.items()}


@torch.no_grad()
def fold_bias(unet, corrections: dict[str, torch.Tensor]) -> None:
    """Subtract each layer's mean output error from its bias (a zero bias where it had none)."""
    modules = dict(unet.named_modules())
    for name, c in corrections.items():
        m = modules[name]
        c = c.to(m.weight.dtype)
        if m.bias is None:
            m.bias = torch.nn.Parameter(-c, requires_grad=False)
        else:
            m.bias -= c


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    unet, scheduler = load_model(args.model)
    unet.eval()

    def trajectory(seed: int, n: int, keep: int):
        rec = TrajectoryRecorder(keep)
        images = sample(unet, scheduler, num_images=n, num_inference_steps=args.steps,
                        generator=torch.Generator().manual_seed(seed), progress=False, callback=rec).float().cpu()
        return rec.finish(unet), images

    est, _ = trajectory(args.est_seed, args.est_samples, args.est_samples)
    ev, fp = trajectory(args.seed, args.num_samples, min(args.snr_samples, args.num_samples))
    real = real_mnist_images(2000) if args.model == "mnist" else real_cifar10_images()
    space = None if real is None else FeatureSpace(real, extractor=args.model, backend="builtin")
    out: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "model": args.model,
                           "steps": args.steps, "est_seed": args.est_seed, "est_samples": args.est_samples,
                           "seed": args.seed, "num_samples": args.num_samples, "files": []}
    try:
        if space is not None:
            out["fid_fp"] = space(fp)["fid"]
        for f in args.metadata:
            meta = load_metadata(f)
            corrections = channel_mean_errors(unet, meta, est)
            row: dict[str, Any] = {"file": Path(f).name}
            for label in ("plain", "bias_corrected"):
                q = copy.deepcopy(unet)
                if label == "bias_corrected":
                    fold_bias(q, corrections)
                with simulate(q, meta):
                    snr = summarize_snr(step_snr(ev, q, scheduler))
                    images = sample(q, scheduler, num_images=args.num_samples, num_inference_steps=args.steps,
                                    generator=torch.Generator().manual_seed(args.seed), progress=False).float().cpu()
                row[label] = {"mean_snr_q_db": snr["mean_snr_q_db"], "psnr_vs_fp_db": psnr_db(fp, images),
                              "fid": space(images)["fid"] if space is not None else None}
            print(f"{row['file']}: " + "; ".join(f"{k} SNR_Q {v['mean_snr_q_db']:.2f} dB, PSNR {v['psnr_vs_fp_db']:.2f} dB"
                                                  + (f", FID {v['fid']:.2f}" if v["fid"] is not None else "")
                                                  for k, v in row.items() if k != "file"), flush=True)
            out["files"].append(row)
    finally:
        if space is not None:
            space.close()
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Per-layer bias probe: {r['model']}", "", f"`{r['command']}` — {r['date']}", "",
             f"Corrections estimated on {r['est_samples']} FP trajectories (seed {r['est_seed']}), evaluated on "
             f"{r['num_samples']} samples x {r['steps']} steps from seed {r['seed']} (FID builtin; FP "
             f"{r.get('fid_fp', float('nan')):.2f}).", "",
             "| metadata | ε SNR_Q dB plain → corrected | PSNR vs FP dB | FID |", "|---|---|---|---|"]
    for row in r["files"]:
        a, b = row["plain"], row["bias_corrected"]
        fid = "—" if a["fid"] is None else f"{a['fid']:.2f} → {b['fid']:.2f}"
        lines.append(f"| {row['file']} | {a['mean_snr_q_db']:.2f} → {b['mean_snr_q_db']:.2f} | "
                     f"{a['psnr_vs_fp_db']:.2f} → {b['psnr_vs_fp_db']:.2f} | {fid} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metadata", nargs="+")
    p.add_argument("--model", default="mnist", choices=("mnist", "cifar10"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--est-seed", type=int, default=100)
    p.add_argument("--est-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--snr-samples", type=int, default=8)
    p.add_argument("--tag", default="run")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    r = run(args)
    md = markdown(r)
    stem = write_results(args.out_dir, f"bias-probe-{args.model}", args.tag, r, md)
    print(md)
    print(f"wrote {stem}.md / .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
