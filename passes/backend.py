"""The ``qdiff`` torch.compile backend: our rewrite first, then Inductor for the rest.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(unet, backend="qdiff")`` works without importing qdcompile. The graph's
conv/linear calls whose weights were bound by ``qdcompile.attach`` run the integer kernels;
everything else (norms, attention, activations) is compiled by Inductor exactly as the FP
``torch.compile`` baseline is.

Dynamo passes module weights as graph inputs and reuses one compiled graph for every
instance of a module class with the same shapes; the rewrite bakes one model's quantized
weights into the graph. So the compiled callable checks (by identity, cheaply) that the
weights it is called with are the ones it was specialised for, and specialises again for
another model instance (its own metadata, or float when it has none), or when the model's
metadata was re-attached since (the old graph baked in the old metadata).

Step-aware mixed precision: the graph is specialised per activation precision too (see
``registry.precision``). Dynamo sees one graph and one backend; the precision is chosen at
call time here, so switching precision between denoising steps never recompiles once each
precision has run once. :func:`compile_count` counts our compilations (tests, the sampler).

Options (``torch.compile(unet, backend="qdiff", mode=..., options={...})``):

* ``mode="reduce-overhead"``: Inductor's CUDA graphs capture the whole compiled step, one
  graph per activation precision (Triton autotuning runs in the warm-up calls, before
  capture). Per-step PTQD correction buffers are written in place before each replay.
* ``options={"producer_quant": False}``: quantize on load inside the integer kernels instead
  of in the activation's producer (the default; see :mod:`.quantize_layers`).
* ``options={"prefer_float": False}``: on sm_90 (compute capability 9.x) a layer the static
  model (:mod:`qdcompile.kernels.sm90_choice`, facts shipped with the package) predicts faster in
  FP16 than on its integer kernel stays float by default (the report says so per layer; never a
  layer with a PTQD output correction); this runs every supported layer on its integer kernel.
* ``options={"channels_last": False}``: on CUDA the conv path runs channels-last end to end by
  default (NCHW inputs converted once at graph entry, outputs back at exit,
  :mod:`.channels_last`); this turns it off.
* Other entries of ``options`` are Inductor config patches, as with ``backend="inductor"``.

The graph is compiled with Inductor's eager-numerics switches for division rounding and
low-precision casts, so the quantizer Inductor fuses into a producer computes exactly the
reference codes (``RN(x/Δ)`` of the activation as rounded to its dtype).

Graphs with integer ops are inference only (the ops have no autograd formula): they are
compiled as inference graphs and always run without autograd, so a caller that forgot
``torch.no_grad()`` still gets its result; a ``backward`` through them raises
:data:`INFERENCE_ONLY`. A graph that fails to compile marks its layers' decisions as failed, so
``qdcompile.report`` does not claim integer kernels that never ran.

``QDCOMPILE_INDUCTOR=0`` skips Inductor and runs the rewritten graph eagerly (debugging).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .channels_last import channels_last_pass
from .quantize_layers import CONV_TARGETS, LINEAR_TARGETS, RewriteStats, rewrite_quantized_layers
from .registry import Decision, active_precision, generation, lookup

logger = logging.getLogger(__name__)

_last_stats: list[RewriteStats] = []
_compiles = [0]


def compile_count() -> int:
    """How many graph variants the qdiff backend has compiled in this process."""
    return _compiles[0]


def last_rewrite_stats() -> RewriteStats | None:
    """Counts of the most recent graph rewrite (for tests and the report)."""
    return _last_stats[-1] if _last_stats else None


def _weight_input_indices(gm: fx.GraphModule) -> list[int]:
    """Positions of the graph inputs that are conv/linear weights."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    idx = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and (node.target in CONV_TARGETS or node.target in LINEAR_TARGETS):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(w, fx.Node) and w in placeholders:
                idx.add(placeholders[w])
    return sorted(idx)


_MODES = {None: {}, "default": {}, "reduce-overhead": {"triton.cudagraphs": True},
          "max-autotune": {"max_autotune": True, "triton.cudagraphs": True},
          "max-autotune-no-cudagraphs": {"max_autotune": True}}
# the fused quantizer must round like the reference: IEEE division (Triton's `/` is approximate)
# and the activation rounded to its own dtype before it is quantized
_EXACT = {"eager_numerics.division_rounding": True, "emulate_precision_casts": True}


@dataclass(frozen=True)
class _Settings:
    producer_quant: bool = True
    channels_last: bool = True
    prefer_float: bool = True
    patches: dict = field(default_factory=lambda: dict(_EXACT))


def _settings(mode, options) -> _Settings:
    """Our options and Inductor's config patches from ``torch.compile``'s mode and options."""
    if mode not in _MODES:
        raise ValueError(f"qdiff backend: mode={mode!r} is not one of {[m for m in _MODES if m]}")
    options = dict(options or {})
    ours = {name: options.pop(name, True) for name in ("producer_quant", "channels_last", "prefer_float")}
    for name, value in ours.items():
        if not isinstance(value, bool):
            raise TypeError(f"qdiff backend: options[{name!r}] must be True or False, got {value!r}")
    return _Settings(**ours, patches={**_MODES[mode], **options, **_EXACT})


INFERENCE_ONLY = ("qdcompile: quantized models are inference only (the integer kernels have no gradient); "
                  "train or fine-tune the float model, and call the compiled model under torch.no_grad() or "
                  "torch.inference_mode() to skip building an autograd graph")


class _NoBackward(torch.autograd.Function):
    """Identity on the output of an integer graph; its backward raises :data:`INFERENCE_ONLY`."""

    @staticmethod
    def forward(ctx, anchor, out):
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(INFERENCE_ONLY)


def _inference_only(fn):
    """``fn`` run without autograd; with grad mode on and inputs that need grad, the float outputs
    carry a backward that raises :data:`INFERENCE_ONLY` instead of silently detaching."""
    def run(*args):
        with torch.no_grad():
            out = fn(*args)
        anchor = next((a for a in args if isinstance(a, torch.Tensor) and a.requires_grad), None)
        if anchor is None or not torch.is_grad_enabled():
            return out

        def guard(o):
            return _NoBackward.apply(anchor, o) if isinstance(o, torch.Tensor) and o.is_floating_point() else o

        return type(out)(guard(o) for o in out) if isinstance(out, (list, tuple)) else guard(out)

    return run


def _mark_failed(bindings, error: BaseException) -> None:
    """The layers of a graph that did not compile: never ran on integer kernels (for the report)."""
    reason = f"compilation failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    for b in bindings:
        d = b.decisions.get(b.name)
        if d is not None and d.quantized:
            b.decisions[b.name] = Decision(d.op, "failed", reason)


def _lower(gm: fx.GraphModule, example_inputs, patches: dict):
    if os.environ.get("QDCOMPILE_INDUCTOR", "1") == "0":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches)


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)


def _compile(gm: fx.GraphModule, example_inputs, settings: _Settings = _Settings()):
    _compiles[0] += 1
    bindings = [b for b in (lookup(example_inputs[i]) for i in _weight_input_indices(gm)) if b is not None]
    stats = rewrite_quantized_layers(gm, example_inputs, producer_quant=settings.producer_quant,
                                     prefer_float=settings.prefer_float)
    if settings.channels_last and stats.conv2d and _on_cuda(example_inputs):
        # the integer conv reads NHWC vectors: one conversion at graph entry/exit instead of scalar loads
        channels_last_pass(gm, example_inputs)
    _last_stats[:] = [stats]
    if stats.rewritten == 0:
        logger.warning("qdiff backend: no conv2d/linear in this graph has qdcompile metadata attached "
                       "(call qdcompile.calibrate or qdcompile.attach before compiling); compiling in float")
    logger.info("qdiff backend: %d conv2d + %d linear rewritten (%d split), %d left in float",
                stats.conv2d, stats.linear, stats.split, len(stats.fallback))
    if stats.rewritten == 0:
        return _lower(gm, example_inputs, settings.patches)
    try:
        with torch.no_grad():   # an inference graph: the integer ops have no backward
            return _inference_only(_lower(gm, example_inputs, settings.patches))
    except Exception as e:
        _mark_failed(bindings, e)
        raise


class _Variant:
    """One compiled specialisation: the weights and bindings it baked in, and its precision."""

    def __init__(self, weights: list, precision, fn):
        self.weights, self.precision, self.fn = weights, precision, fn
        self.bindings = [lookup(w) for w in weights]
        self.generation = generation()

    def serves(self, args, weight_idx, precision) -> bool:
        if self.precision != precision or not all(args[i] is w for i, w in zip(weight_idx, self.weights)):
            return False
        if self.generation != generation():   # something was attached/detached since: still ours?
            if any(lookup(w) is not b for w, b in zip(self.weights, self.bindings)):
                return False
            self.generation = generation()
        return True


def qdiff_backend(gm: fx.GraphModule, example_inputs, mode=None, options=None):
    settings = _settings(mode, options)
    weight_idx = _weight_input_indices(gm)
    pristine = copy.deepcopy(gm) if weight_idx else None
    first = _compile(gm, example_inputs, settings)
    if not weight_idx:
        return first
    variants = [_Variant([example_inputs[i] for i in weight_idx], active_precision(), first)]

    def run(*args):
        bits = active_precision()
        for v in variants:
            if v.serves(args, weight_idx, bits):
                return v.fn(*args)
        weights = [args[i] for i in weight_idx]
        # a variant for the same weights and precision whose metadata was replaced is stale
        variants[:] = [v for v in variants if not (v.precision == bits and all(a is b for a, b in zip(v.weights, weights)))]
        logger.info("qdiff backend: specialising the graph for %s",
                    f"activation precision A{bits}" if bits is not None else "this model's weights and metadata")
        fn = _compile(copy.deepcopy(pristine), list(args), settings)
        variants.append(_Variant(weights, bits, fn))
        return fn(*args)

    return run
