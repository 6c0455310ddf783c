"""Trace the ``qdiff`` GEMM/conv ops on *fake* CUDA tensors the way ``torch.compile`` does
(AOTAutograd's functional tracing), without a GPU, and print what the traced graph calls.

Run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels Inductor would launch)::

    python tests/passes/fake_cuda_trace.py

Prints JSON: per op, the call targets of the traced forward graph and the Triton kernels
wrapped in ``triton_kernel_wrapper_*`` nodes. Used by ``test_producer_quant.py``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["QDCOMPILE_KERNELS"] = "auto"

import torch  # noqa: E402
import triton  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import qdcompile.kernels.ops  # noqa: E402,F401  (registers torch.ops.qdiff)


def cuda_like(t: torch.Tensor) -> torch.Tensor:
    """A (fake) CUDA tensor of ``t``'s shape, dtype and layout; call inside FakeTensorMode."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


def trace(fn, *args) -> dict:
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    with FakeTensorMode(allow_non_fake_inputs=True):
        args = [cuda_like(a) if torch.is_tensor(a) else a for a in args]
        try:
            with torch.no_grad():
                aot_function(fn, fw_compiler=spy)(*args)
        except RuntimeError:
            # Without a CUDA driver Triton's mutation analysis cannot run, so every kernel argument
            # counts as mutated and the runtime wrapper then fails copying into fake CUDA inputs;
            # the traced graph (all this reads) is complete by then.
            if not graphs:
                raise
    targets, kernels = [], []
    for node in graphs[0].graph.nodes:
        if node.op != "call_function":
            continue
        targets.append(str(node.target))
        if "triton_kernel_wrapper" in str(node.target):
            k = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            while not isinstance(k, triton.runtime.jit.JITFunction):
                k = k.fn
            kernels.append(k.fn.__name__)
    return {"targets": targets, "kernels": kernels}


def main() -> int:
    n, k, c = 64, 96, 32
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    wc = torch.randint(-127, 128, (n, 9 * c), dtype=torch.int8)
    rs, rsc = w8.int().sum(1, dtype=torch.int32), wc.int().sum(1, dtype=torch.int32)
    tapsum = wc.int().view(n, 9, c).sum(2, dtype=torch.int32).t().contiguous()
    s = torch.rand(n) + 0.5
    codes = torch.randint(-128, 128, (4, 16, k), dtype=torch.int8)
    conv_codes = torch.randint(-128, 128, (2, c, 8, 8), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    out = {
        "qlinear": trace(lambda x, w, r, sc: torch.ops.qdiff.qlinear(x, w, r, sc, 0.02, 131, 8, 8,
                                                                      out_dtype=torch.float16), codes, w8, rs, s),
        "qconv2d": trace(lambda x, w, r, sc, ts: torch.ops.qdiff.qconv2d(x, w, r, sc, 0.02, 131, 8, 8, [3, 3], [1, 1],
                                                                          [1, 1], None, None, ts, out_dtype=torch.float16),
                         conv_codes, wc, rsc, s, tapsum),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
