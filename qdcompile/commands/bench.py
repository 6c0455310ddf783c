"""``qdcompile bench``: ``size`` (model size and BOPs) and ``latency`` (end-to-end speed)."""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from ..benchmarks.configs import UNET_CONFIGS
from ..benchmarks.latency import CONTENDERS, DEFAULT_CONTENDERS, LatencyOptions, latency_threads, run_latency
from ..benchmarks.size_report import SizeOptions, run_size
from ..devices import resolve_device


def add_size_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=sorted(UNET_CONFIGS), default=None,
                   help="configs (default: ldm4-imagenet sd15 sdxl mnist)")
    p.add_argument("--recipes", nargs="+", choices=["fp32", "fp16", "w8a8", "w4a8", "w4a4"], default=None)
    p.add_argument("--float-fp16", action="store_true", help="price float parameters at FP16 (default FP32)")
    p.add_argument("--no-scales", action="store_true", help="do not count weight/activation scale overhead")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="latent resolution (default: config sample_size)")
    p.add_argument("--json", default=None, help="also write the numbers here")


def add_latency_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=None,
                   help="sd15 | sdxl | reference | tiny (default: sd15 on CUDA, reference on CPU)")
    p.add_argument("--model", dest="model_dir", default=None, help="a diffusers folder (real checkpoint) instead")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default: 2 on CUDA = CFG, 1 on CPU)")
    p.add_argument("--resolution", type=int, default=None, help="latent resolution (default: the config's)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=None,
                   help=f"default: {' '.join(DEFAULT_CONTENDERS)} (fp-eager always runs first: it is the reference)")
    p.add_argument("--max-autotune", action="store_true", help="add fp-compiled-max-autotune (slow compile)")
    p.add_argument("--cuda-graphs", action="store_true", help="also time CUDA-graph replay of each contender")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                   help="auto: channels_last on CUDA (all contenders), contiguous on CPU")
    p.add_argument("--calib-samples", type=int, default=2, help="qdiff calibration samples (speed runs: cheap)")
    p.add_argument("--calib-steps", type=int, default=4, help="qdiff calibration sampling steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per pass (when do_bench is not used)")
    p.add_argument("--rep-ms", type=float, default=1500.0, help="do_bench time budget per pass (ms)")
    p.add_argument("--timing-passes", type=int, default=2, help="independent timing passes (spread = noise)")
    p.add_argument("--e2e-steps", type=int, default=20, help="end-to-end sampling steps (0: skip)")
    p.add_argument("--e2e-repeats", type=int, default=2)
    p.add_argument("--profile", nargs="*", default=None,
                   help="contenders to profile per kernel category (default: fp-compiled qdiff-w8a8 qdiff-w4a8 "
                        "torchao-int8; none: --profile with no names)")
    p.add_argument("--profile-all", action="store_true")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget of the run: a contender is skipped when the last one of its family "
                        "(eager / Inductor / qdiff) took longer than the time left; results are written as they come")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring fp16/int8 matmul and copy ceilings")
    p.add_argument("--cpu-inductor", action="store_true", help="on CPU, also run the Inductor contenders")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for --smoke on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default=None, help="file name suffix (default: the scenarios)")
    p.add_argument("--smoke", action="store_true", help="tiniest run (tiny random UNet2DModel unless --models, batch 1, few repeats, cheapest calibration)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge earlier result files and exit")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``qdcompile bench {latency,size}`` to a ``qdcompile`` sub-parser set."""
    p = subparsers.add_parser("bench", help="benchmarks: end-to-end latency/memory, model size and BOPs")
    sub = p.add_subparsers(dest="bench_command", required=True)
    lat = sub.add_parser("latency", help="U-Net step / sampling latency, memory, compile time vs FP16 and torchao")
    add_latency_arguments(lat)
    size = sub.add_parser("size", help="model size and BOPs of U-Net configs under the recipes")
    add_size_arguments(size)
    p.set_defaults(func=run)
    return p


def options_from_args(cls, args: argparse.Namespace):
    """``cls`` (an options dataclass) from the parsed arguments of the same names."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def size_command(args: argparse.Namespace) -> int:
    return run_size(options_from_args(SizeOptions, args))


def latency_command(args: argparse.Namespace) -> int:
    """The process settings of a latency run, then :func:`run_latency`: on CPU the qdiff backend runs
    its rewritten graph without Inductor (unless ``QDCOMPILE_INDUCTOR`` is set), and torch uses
    :func:`latency_threads` threads."""
    opts = options_from_args(LatencyOptions, args)
    device = resolve_device(opts.device)
    if not device.startswith("cuda") and os.environ.get("QDCOMPILE_INDUCTOR") is None:
        os.environ["QDCOMPILE_INDUCTOR"] = "0"
    threads = latency_threads(opts, device)
    if threads:
        torch.set_num_threads(threads)
    return run_latency(opts)


def run(args) -> int:
    if getattr(args, "bench_command", None) == "size":
        return size_command(args)
    return latency_command(args)
