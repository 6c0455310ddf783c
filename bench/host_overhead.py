"""Host (Python) time per quantized layer call, everything but the kernel launch itself.

Runs on a CPU: the Triton launch is replaced by a no-op, so what is timed is the work done on
the host between two kernel launches. Per layer kind (SD 1.5 channel counts, fp16; the activation size does not change host work):

* ``custom_op``: the path every compiled graph took before Fast path 1 — Inductor's wrapper
  calls ``torch.ops.qdiff.qconv2d/qlinear`` per layer: custom-op dispatch, validation, fp32
  quantizer constants, launch set-up (float input, quantize on load);
* ``custom_op_codes``: the same op fed int8 codes (producer-side quantization), still dispatched
  per call — what the CPU/interpreter route does now;
* ``launcher_body``: the launcher's own host work (validation, constants, grid) — on CUDA this
  now runs ONCE, while AOTAutograd traces the op into a ``wrap_triton`` launch; per call,
  Inductor's generated wrapper launches the kernel directly (see
  ``tests/passes/test_producer_quant.py::test_ops_become_inductor_launched_triton_kernels_on_cuda``),
  and with ``mode="reduce-overhead"`` a CUDA graph replays the whole step with no per-layer host
  work at all. The per-launch cost of Inductor's wrapper line itself needs a GPU to time
  (``bench/gpu_check.sh``'s profiler).

Median over repeats of the mean over many calls (``time.perf_counter_ns``). Writes
``bench/results/host-overhead-<date>.json`` and ``.md``::

    python bench/host_overhead.py [--calls 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the Triton route on CPU tensors (launches are stubbed below; nothing is interpreted)
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["QDCOMPILE_KERNELS"] = "triton"

import torch  # noqa: E402

from qdcompile.io import atomic_write  # noqa: E402
from qdcompile.kernels import ops, qconv, qgemm  # noqa: E402
from qdcompile.kernels.layout import QPart, prepare_weight  # noqa: E402


class _NoLaunch:
    """Stands in for a jitted kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _layers():
    gen = torch.Generator().manual_seed(0)

    def weight(n, k_shape):
        q = torch.randint(-127, 128, (n, *k_shape), generator=gen, dtype=torch.int8)
        pw = prepare_weight(q, 8)
        return pw, torch.rand(n, generator=gen) * 0.01 + 1e-3

    pw_l, s_l = weight(320, (320,))
    pw_c, s_c = weight(320, (320, 3, 3))
    # small activations: host work does not depend on their size (only the shapes' arithmetic)
    x_l = torch.randn(2, 16, 320, generator=gen).half()
    x_c = torch.randn(2, 320, 4, 4, generator=gen).half().contiguous(memory_format=torch.channels_last)
    codes_l = torch.randint(-128, 128, x_l.shape, generator=gen, dtype=torch.int8)
    codes_c = torch.randint(-128, 128, x_c.shape, generator=gen, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(320, generator=gen)
    geom = ([3, 3], [1, 1], [1, 1])
    lin = lambda x, **kw: torch.ops.qdiff.qlinear(x, pw_l.w, pw_l.rowsum, s_l, 0.02, 131, 8, 8, bias, **kw)  # noqa: E731
    conv = lambda x, **kw: torch.ops.qdiff.qconv2d(x, pw_c.w, pw_c.rowsum, s_c, 0.02, 131, 8, 8, *geom, bias,  # noqa: E731
                                                     **kw)
    lin_part = QPart(codes_l, pw_l.w, pw_l.rowsum, s_l, 0.02, 131, 8)
    conv_part = QPart(codes_c, pw_c.w, pw_c.rowsum, s_c, 0.02, 131, 8)
    stub = lambda k: k  # noqa: E731  (kernel_wrapper: the body as traced, launch stubbed)
    return {
        "qlinear 320->320": {
            "custom_op": lambda: lin(x_l),
            "custom_op_codes": lambda: lin(codes_l, out_dtype=torch.float16),
            "launcher_body": lambda: ops.run_qgemm([lin_part], 8, bias, None, torch.float16, stub),
        },
        "qconv2d 320->320 3x3": {
            "custom_op": lambda: conv(x_c),
            "custom_op_codes": lambda: conv(codes_c, out_dtype=torch.float16),
            "launcher_body": lambda: ops.run_qconv2d([conv_part], 8, *geom, bias, None, torch.float16, stub),
        },
    }


def _time_us(fn, calls: int, repeats: int) -> float:
    for _ in range(50):
        fn()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return statistics.median(means)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    for module in (qgemm, qconv):          # every jitted kernel the launchers start
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                setattr(module, name, _NoLaunch())
    torch.set_num_threads(1)
    rows = []
    for layer, variants in _layers().items():
        row = {"layer": layer}
        for name, fn in variants.items():
            row[name] = _time_us(fn, args.calls, args.repeats)
        rows.append(row)
        print(f"{layer}: " + ", ".join(f"{k} {v:.1f} us" for k, v in row.items() if k != "layer"), flush=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {"command": " ".join(["python", "bench/host_overhead.py", *(argv or sys.argv[1:])]),
            "date": stamp, "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "calls": args.calls, "repeats": args.repeats}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / f"host-overhead-{stamp}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Host time per quantized layer call (CPU, launch stubbed) — {stamp}", "",
             f"`{meta['command']}` · torch {meta['torch']} · {meta['cpu']} · median of {args.repeats} × "
             f"{args.calls} calls", "",
             "| layer | custom op, float in (before) | custom op, codes in | launcher body (now once, at trace) |",
             "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['custom_op']:.1f} µs | {r['custom_op_codes']:.1f} µs | {r['launcher_body']:.1f} µs |"
              for r in rows]
    lines += ["", "On CUDA the compiled graph no longer calls the custom op: the op is traced into a `wrap_triton` "
              "launch, so per call only Inductor's wrapper line remains (GPU-only to time), and with "
              "`mode=\"reduce-overhead\"` the CUDA graph replays the step with no host work per layer."]
    atomic_write(args.out / f"host-overhead-{stamp}.md", "\n".join(lines) + "\n")
    print(f"wrote {args.out}/host-overhead-{stamp}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
