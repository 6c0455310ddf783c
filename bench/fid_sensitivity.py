"""What the project's FID can and cannot see: known perturbations applied to the FP samples.

``qdcompile eval`` on a pixel-space reference model writes, per quantized row, its colour shift
against FP (the per-channel mean difference in 8-bit levels). This script re-draws the FP samples
of such a run (same model, seed, sample count and steps, so FP's FID must equal the run's), then
applies perturbations of known size and reports each one's FID (same features, same real images)
with a paired-bootstrap ΔFID against unperturbed FP, and its colour W2:

* the colour cast of one quantized row of the run (default the uncorrected PTQD row), and twice it;
* a grey shift of +25 levels; contrast × 0.9 around mid-grey; a 3×3 box blur; Gaussian noise of
  8 levels.

If a perturbation a viewer sees at once leaves FID unchanged, FID cannot judge a correction that
removes it. Writes ``fid-sensitivity-<model>-<stamp>.md`` and ``.json`` to ``--out``.

    python bench/fid_sensitivity.py bench/results/quality-cifar10-ptqd512-ablation-20261122-080353.json

CPU: about as long as sampling FP in the run (512 CIFAR-10 samples x 50 steps: ~4 min on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qdcompile.io import atomic_write  # noqa: E402
from qdcompile.evaluation.fid import FeatureSpace, paired_fid_delta, real_cifar10_images, real_mnist_images  # noqa: E402
from qdcompile.evaluation.metrics import colour_moments, colour_w2, format_colour_shift  # noqa: E402


def perturbations(fp: torch.Tensor, cast_levels: list[float]) -> dict[str, torch.Tensor]:
    """Named perturbed copies of ``fp`` (images in [0, 1]); ``cast_levels``: one shift per channel."""
    cast = torch.tensor(cast_levels, dtype=fp.dtype).view(1, -1, 1, 1) / 255.0
    gen = torch.Generator().manual_seed(0)
    return {
        "FP": fp,
        "FP + the row's colour cast": (fp + cast).clamp(0, 1),
        "FP + twice that cast": (fp + 2 * cast).clamp(0, 1),
        "FP + 25 levels grey": (fp + 25 / 255).clamp(0, 1),
        "FP, contrast x 0.9": (fp - 0.5) * 0.9 + 0.5,
        "FP, 3x3 box blur": torch.nn.functional.avg_pool2d(fp, 3, 1, 1, count_include_pad=False),
        "FP + noise, 8 levels": (fp + 8 / 255 * torch.randn(fp.shape, generator=gen, dtype=fp.dtype)).clamp(0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="quality JSON written by qdcompile eval / bench/quality.py (builtin FID backend)")
    p.add_argument("--row", default="ptqd-raw", help="configuration whose colour cast is applied (default ptqd-raw)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--boots", type=int, default=200)
    args = p.parse_args(argv)

    import qdcompile
    from qdcompile.sampling import sample

    run = json.loads(Path(args.run).read_text())
    o = run["options"]
    rows = {r["key"]: r for r in run["configs"]}
    if args.row not in rows or not rows[args.row].get("colour_shift_vs_fp"):
        sys.exit(f"{args.run}: no row {args.row!r} with a colour_shift_vs_fp (rows: {', '.join(rows)}); "
                 "re-run qdcompile eval with this version")
    if "fp" not in rows or rows["fp"].get("fid") is None or run["fid"].get("backend") != "builtin":
        sys.exit(f"{args.run}: needs an FP row with FID from the builtin backend")
    unet, scheduler = qdcompile.reference_model(o["model"])
    mnist = unet.config.in_channels == 1
    real = real_mnist_images(o["real_samples"]) if mnist else real_cifar10_images()
    space = FeatureSpace(real, extractor="mnist" if mnist else "cifar10", backend="builtin",
                         kid_subsets=o["kid_subsets"], seed=2020)
    fp = sample(unet, scheduler, num_images=o["num_samples"], num_inference_steps=o["steps"],
                generator=torch.Generator().manual_seed(o["seed"]), batch_size=o["batch_size"], progress=False,
                to_image=True).float().cpu()
    fid_fp = space(fp)["fid"]
    if abs(fid_fp - rows["fp"]["fid"]) > 1e-6 * max(1.0, rows["fp"]["fid"]):
        sys.exit(f"re-drawn FP samples give FID {fid_fp:.6f}, the run says {rows['fp']['fid']:.6f}: not the same "
                 "samples (other model weights or qdcompile version?)")
    cast = rows[args.row]["colour_shift_vs_fp"]
    feats_fp = space.features(fp)
    table = []
    for name, images in perturbations(fp, cast).items():
        f = space.features(images)
        d = paired_fid_delta(f, feats_fp, space._real_features, boots=args.boots)
        table.append({"perturbation": name, "fid": space(images)["fid"], "delta_fid_vs_fp": d["delta"],
                      "ci95": d["ci95"], "colour_w2": colour_w2(colour_moments(images), space._real_colour)})

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    cast_txt = format_colour_shift(cast)
    lines = [f"# FID sensitivity: {o['model']}, FP samples of `{Path(args.run).name}` perturbed", "",
             f"{stamp} · torch {torch.__version__} · `bench/fid_sensitivity.py {' '.join(argv or sys.argv[1:])}`", "",
             f"{o['num_samples']} FP samples × {o['steps']} steps (seed {o['seed']}; FID {fid_fp:.3f}, equal to the "
             f"run's), features `{space.name}` against {real.shape[0]} real images. The row's cast "
             f"({rows[args.row]['label'].strip()}): {cast_txt} levels per channel. ΔFID: paired bootstrap, "
             f"{args.boots} resamples, 95% interval.", "",
             "| perturbation | FID | ΔFID vs FP | colour W2 |", "|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['perturbation']} | {r['fid']:.3f} | {r['delta_fid_vs_fp']:+.3f} "
                     f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {r['colour_w2']:.2f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    base = out / f"fid-sensitivity-{o['model']}-{stamp}"
    atomic_write(base.with_suffix(".md"), text.encode())
    atomic_write(base.with_suffix(".json"), json.dumps({"run": args.run, "row": args.row, "cast_levels": cast,
                                                          "fp_fid": fid_fp, "rows": table}, indent=2).encode())
    print(text)
    print(f"wrote {base}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
