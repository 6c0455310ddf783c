"""The ``qdiff`` torch.compile backend: our rewrite first, then Inductor for the rest.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(unet, backend="qdiff")`` works without importing qdcompile. The graph's
conv/linear calls whose weights were bound by ``qdcompile.attach`` run the integer kernels;
everything else (norms, attention, activations) is compiled by Inductor exactly as the FP
``torch.compile`` baseline is.

``QDCOMPILE_INDUCTOR=0`` skips Inductor and runs the rewritten graph eagerly (debugging).
"""

from __future__ import annotations

import logging
import os

from .quantize_layers import RewriteStats, rewrite_quantized_layers

logger = logging.getLogger(__name__)

_last_stats: list[RewriteStats] = []


def last_rewrite_stats() -> RewriteStats | None:
    """Counts of the most recent graph rewrite (for tests and the report)."""
    return _last_stats[-1] if _last_stats else None


def qdiff_backend(gm, example_inputs, **kwargs):
    stats = rewrite_quantized_layers(gm, example_inputs)
    _last_stats[:] = [stats]
    if stats.rewritten == 0:
        logger.warning("qdiff backend: no conv2d/linear in this graph has qdcompile metadata attached "
                       "(call qdcompile.calibrate or qdcompile.attach before compiling); compiling in float")
    logger.info("qdiff backend: %d conv2d + %d linear rewritten (%d split), %d left in float",
                stats.conv2d, stats.linear, stats.split, len(stats.fallback))
    if os.environ.get("QDCOMPILE_INDUCTOR", "1") == "0":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
