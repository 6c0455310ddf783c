"""FX pass: rewrite ``conv2d`` / ``linear`` calls of a Dynamo graph to ``torch.ops.qdiff`` ops.

For each call whose weight is bound to a quantization record (see :mod:`.registry`):

* weights are prepared once here (reordered, int4-packed, row-summed) and become graph
  constants; the call becomes ``qdiff.qconv2d`` / ``qdiff.qlinear`` with the record's
  activation quantizer;
* producer-side quantization (default): the activation quantizer is written into the graph
  as ordinary pointwise ops (``clamp(round(x / Δ) + Z, 0, 2^b − 1) − 2^(b−1)`` → int8), once
  per distinct (tensor, quantizer), so Inductor fuses it into the kernel that produces the
  activation (GroupNorm+SiLU, LayerNorm, GEGLU, residual adds), which then stores signed 8-bit
  codes; the integer op takes the codes and the float dtype (``out_dtype``). Otherwise
  (``producer_quant=False``) the op takes the float input and quantizes on load;
* a shortcut-split record whose input is ``cat([a, b], dim=1)`` becomes the ``*_split`` op
  fed by ``a`` and ``b`` directly (the concatenation is not read);
* a weight-only record (``act_bits`` None) keeps the float op with the dequantized weight;
* ``prefer_float`` (default): on sm_90 a layer the static model predicts faster in FP16 than on
  its integer kernel (:mod:`qdcompile.kernels.sm90_choice`, at the traced ``M``) keeps the float
  op, reported as such — except a layer with a PTQD output correction (the correction lives in
  the integer kernel's epilogue: in float it would be dropped);
* anything else stays float, with the reason recorded for the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from ..kernels import ops as qops
from ..kernels import sm90_choice
from ..kernels.layout import device_weight_bits, prepare_weight
from ..kernels.quantizers import dequantize_weight
from .registry import Binding, Decision, active_precision, lookup

logger = logging.getLogger(__name__)

CONV_TARGETS = {torch.conv2d, torch.nn.functional.conv2d, torch.ops.aten.conv2d.default}
LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default}
_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_LINEAR_PARAMS = ("input", "weight", "bias")


@dataclass
class RewriteStats:
    conv2d: int = 0
    linear: int = 0
    split: int = 0
    weight_only: int = 0
    fallback: dict[str, str] = field(default_factory=dict)   # layer (or graph weight) → reason
    float_faster: int = 0    # of the fallbacks: kept float because the sm_90 model says float is faster

    @property
    def rewritten(self) -> int:
        return self.conv2d + self.linear


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _call_args(node: fx.Node, params: tuple[str, ...], defaults: dict) -> dict:
    args = dict(zip(params, node.args))
    args.update(node.kwargs)
    for k, v in defaults.items():
        args.setdefault(k, v)
    return args


class _TensorLookup:
    """The real tensor behind a graph input or attribute (weights are graph inputs under Dynamo)."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self.examples = list(example_inputs)

    def __call__(self, node) -> torch.Tensor | None:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, torch.Tensor) else None
        if node.op != "placeholder":
            return None
        i = self.index.get(node)
        example = self.examples[i] if i is not None and i < len(self.examples) else None
        if isinstance(example, torch.Tensor) and not isinstance(example, FakeTensor):
            return example
        # Called with fake inputs: Dynamo's record of the real tensor it traced.
        grapharg = node.meta.get("grapharg")
        real = getattr(grapharg, "example", None) if grapharg is not None else None
        return real if isinstance(real, torch.Tensor) else None


def _const(gm: fx.GraphModule, graph: fx.Graph, before: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    attr = f"_qdiff_{name.replace('.', '_')}"
    i = 0
    while hasattr(gm, f"{attr}_{i}"):
        i += 1
    attr = f"{attr}_{i}"
    gm.register_buffer(attr, value)
    _declare_source(gm, attr)
    with graph.inserting_before(before):
        return graph.get_attr(attr)


def _declare_source(gm: fx.GraphModule, attr: str) -> None:
    """Dynamo graphs map every module buffer to the source it was read from (AOTAutograd
    asserts it); our constants were created here, so they get a constant source of their own."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[attr] = ConstantSource(f"qdiff_constant_{attr}")


@dataclass
class _Part:
    """One prepared input part of a quantized layer (device tensors + its activation quantizer)."""

    w: torch.Tensor
    rowsum: torch.Tensor
    scale: torch.Tensor
    tapsum: torch.Tensor | None
    act_scale: float
    act_zero_point: int
    act_bits: int


def _rows(node: fx.Node, op: str) -> int:
    """GEMM rows of the layer's call (tokens of a linear, ``B·OH·OW`` of a conv), from its output."""
    value = node.meta.get("example_value")
    if value is None:
        return 0
    return value.numel() // max(1, value.shape[1 if op == "conv2d" else -1])


def _prepared(binding: Binding, rec, device: torch.device, op: str, m_hint: int) -> tuple[list[_Part], int]:
    """Prepared parts of ``rec`` (one of ``binding``'s records) on ``device`` and the weight bits the
    kernel runs with (:func:`device_weight_bits`: 4-bit codes of compute-bound layers go to the device
    as int8, the file stays 4-bit). Weight tensors are built once per device and shared by every
    precision's record."""
    key = (str(device), "weights")
    if key not in binding.prepared:
        raw = ([(p.weight_q, p.weight_scale, p.weight_zero_point) for p in rec.split] if rec.split
               else [(rec.weight_q, rec.weight_scale, rec.weight_zero_point)])
        n, k = rec.weight_q.shape[0], rec.weight_q[0].numel()
        bits = device_weight_bits(op, n, k, m_hint, rec.weight_bits, asymmetric=rec.asymmetric)
        weights = []
        for wq, ws, wz in raw:
            pw = prepare_weight(wq, rec.weight_bits, device_bits=bits, zero_point=wz)
            tapsum = pw.tapsum.to(device) if pw.tapsum is not None else None
            weights.append((pw.w.to(device), pw.rowsum.to(device), ws.float().to(device), tapsum))
        binding.prepared[key] = (weights, bits)
    weights, bits = binding.prepared[key]
    return [_Part(*w, float(a.act_scale), int(a.act_zero_point), int(a.act_bits))
            for w, a in zip(weights, rec.act_quants())], bits


def _split_inputs(x, rec, channel_dim: int) -> tuple[fx.Node, fx.Node] | str:
    """The two concat inputs feeding a split layer, or the reason they cannot be used."""
    cat_targets = {torch.cat, torch.concat, torch.ops.aten.cat.default}
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target in cat_targets):
        return "split metadata, but the layer input is not a torch.cat"
    tensors = x.args[0] if x.args else x.kwargs.get("tensors")
    cat_dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    if len(tensors) != 2 or len(rec.split) != 2:
        return f"split metadata has {len(rec.split)} parts, the concat has {len(tensors)} inputs (2 supported)"
    value = x.meta.get("example_value")
    if value is None:
        return "no shape information on the concat"
    ndim = value.dim()
    if cat_dim % ndim != channel_dim % ndim:
        return f"concat along dim {cat_dim}, the layer's channel dim is {channel_dim % ndim}"
    for t, part in zip(tensors, rec.split):
        ev = t.meta.get("example_value") if isinstance(t, fx.Node) else None
        if ev is None or ev.shape[channel_dim] != part.channels:
            got = None if ev is None else ev.shape[channel_dim]
            return f"concat part has {got} channels, metadata part has {part.channels}"
    return tensors[0], tensors[1]


_VIEW_TARGETS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute, torch.permute,
                 torch.Tensor.transpose, torch.transpose, torch.Tensor.contiguous, torch.Tensor.flatten, torch.flatten,
                 torch.Tensor.unflatten, torch.Tensor.to, "view", "reshape", "permute", "transpose", "contiguous",
                 "flatten", "unflatten", "to"}
# Producers Inductor cannot fuse a pointwise consumer into (extern kernels / library calls).
_EXTERN_PRODUCERS = ("conv", "linear", "matmul", "bmm", "baddbmm", "addmm", "mm", "scaled_dot_product_attention",
                     "qdiff", "interpolate", "cat")


def _producer(node: fx.Node) -> fx.Node:
    """The node that computes ``node``'s values, looking through views and copies."""
    while node.op in ("call_function", "call_method") and node.target in _VIEW_TARGETS and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _where_quantized(x: fx.Node) -> str:
    """For the report: where this layer's input gets quantized on the compiled path."""
    prod = _producer(x)
    if prod.op in ("placeholder", "get_attr"):
        return "input quantized by its own pass (graph input)"
    name = getattr(prod.target, "__name__", str(prod.target))
    stack = prod.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    where = f"{name}" + (f" in {module}" if module else "")
    if any(e in name for e in _EXTERN_PRODUCERS):
        return f"input quantized by its own pass after {where} (library kernel)"
    return f"input quantized in its producer ({where})"


class _ProducerQuant:
    """Inserts each activation quantizer into the graph once per (tensor, quantizer)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.codes: dict[tuple, fx.Node] = {}

    def __call__(self, x: fx.Node, before: fx.Node, scale: float, zero_point: int, bits: int) -> fx.Node:
        key = (x, float(scale), int(zero_point), int(bits))
        if key not in self.codes:
            self.codes[key] = self._insert(x, before, *key[1:])
        return self.codes[key]

    def _insert(self, x: fx.Node, before: fx.Node, scale: float, zero_point: int, bits: int) -> fx.Node:
        aten = torch.ops.aten
        shift, qmax = 1 << (bits - 1), (1 << bits) - 1
        g = self.graph
        # exactly the reference quantizer: RN(float32(x) / float32(Δ)), round half to even, + Z, clamp;
        # then the signed shift (integers: exact in float32). Δ is an fp32 value (metadata stores fp32).
        with g.inserting_before(before):
            xf = g.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
            q = g.call_function(aten.div.Tensor, (xf, float(scale)))
            q = g.call_function(aten.round.default, (q,))
            q = g.call_function(aten.add.Tensor, (q, float(zero_point - shift)))
            q = g.call_function(aten.clamp.default, (q, float(-shift), float(qmax - shift)))
            q = g.call_function(aten._to_copy.default, (q,), {"dtype": torch.int8})
        value = x.meta.get("example_value")
        if value is not None:
            q.meta["example_value"] = torch.empty_like(value, dtype=torch.int8)
        return q


def _float_choice(node: fx.Node, op: str, x, weight: torch.Tensor, rec, producer_quant: bool,
                  capability) -> sm90_choice.Choice:
    """The static float-vs-integer choice for one layer at its traced shape (compile time).
    Asymmetric 4-bit layers run the int8 kernel (codes minus zero points, :func:`prepare_weight`),
    so the model times them as 8-bit weights."""
    bits = 8 if rec.asymmetric else rec.weight_bits
    if capability is None or capability[0] != 9:
        return sm90_choice.decide(op, weight.shape, 0, bits, capability)
    m = _rows(node, op)
    value = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    if m == 0 or value is None:
        return sm90_choice.Choice("int", "no traced shape for the sm_90 static model: integer kernel")
    act = value.numel() if op == "conv2d" else None
    return sm90_choice.decide(op, weight.shape, m, bits, capability, act_elems=act,
                              split=bool(rec.split), codes=producer_quant)


def rewrite_quantized_layers(gm: fx.GraphModule, example_inputs, producer_quant: bool = True,
                             prefer_float: bool = True) -> RewriteStats:
    """Rewrite the bound conv2d/linear calls of ``gm`` in place; return the counts.

    ``producer_quant``: quantize activations in the graph (fused into their producers by
    Inductor) and feed codes to the integer ops; else the ops quantize on load.
    ``prefer_float``: keep the layers float that the sm_90 static model predicts faster in FP16
    (on compute capability 9.x only; never a layer with a PTQD correction)."""
    stats = RewriteStats()
    graph = gm.graph
    tensor_of = _TensorLookup(gm, example_inputs)
    quantize = _ProducerQuant(graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in CONV_TARGETS:
            op, args = "conv2d", _call_args(node, _CONV_PARAMS, _CONV_DEFAULTS)
        elif node.target in LINEAR_TARGETS:
            op, args = "linear", _call_args(node, _LINEAR_PARAMS, {"bias": None})
        else:
            continue
        weight = tensor_of(args["weight"])
        binding = lookup(weight) if weight is not None else None
        if binding is None:
            stats.fallback[str(getattr(args["weight"], "name", args["weight"]))] = "no quantization record bound to this weight"
            continue
        rec = binding.record_for(active_precision())
        reason = _unsupported(op, args, weight)
        if reason is None and rec.op != op:
            reason = f"metadata says {rec.op}, the graph calls {op}"
        if reason is not None:
            binding.decisions[binding.name] = Decision(op, "float", reason)
            stats.fallback[binding.name] = reason
            continue
        if rec.act_bits is None and not rec.split:
            deq = dequantize_weight(rec.weight_q, rec.weight_scale, rec.weight_zero_point).to(weight.device, weight.dtype)
            node.replace_input_with(args["weight"], _const(gm, graph, node, binding.name, deq))
            binding.decisions[binding.name] = Decision(op, "float", "weight-only record: float op on the dequantized weight")
            stats.weight_only += 1
            continue
        inputs: list[fx.Node] = [args["input"]]
        if rec.split:
            got = _split_inputs(args["input"], rec, channel_dim=1 if op == "conv2d" else -1)
            if isinstance(got, str):
                binding.decisions[binding.name] = Decision(op, "float", got)
                stats.fallback[binding.name] = got
                continue
            inputs = list(got)
        choice_note = ""
        if prefer_float:
            capability = sm90_choice.device_capability(weight.device)
            choice = _float_choice(node, op, args["input"], weight, rec, producer_quant, capability)
            if choice.choice == "float" and binding.correction is None:
                binding.decisions[binding.name] = Decision(op, "float", choice.reason)
                stats.fallback[binding.name] = choice.reason
                stats.float_faster += 1
                continue
            if capability is not None:   # on a GPU: say what was chosen and why
                choice_note = choice.reason
                if choice.choice == "float":
                    choice_note += "; kept integer: PTQD output correction in the kernel epilogue"
        parts, weight_bits = _prepared(binding, rec, weight.device, op, _rows(node, op))
        extra = {}
        if binding.correction is not None and len(parts) == 1:
            # PTQD correction in the epilogue: per-step scale and bias-correction buffers
            scale_buf, shift_buf = binding.correction.buffers(weight.device)
            parts = [replace(parts[0], scale=scale_buf)]
            extra["bias_correction"] = _const(gm, graph, node, f"{binding.name}.correction", shift_buf)
        consts = [[_const(gm, graph, node, f"{binding.name}.{what}{i}", t)
                   for what, t in (("w", p.w), ("rs", p.rowsum), ("s", p.scale))] for i, p in enumerate(parts)]
        where = ""
        if producer_quant:
            where = "; ".join(_where_quantized(x) for x in inputs)
            extra["out_dtype"] = _dtype_of(args["input"], weight)
            inputs = [quantize(x, node, p.act_scale, p.act_zero_point, p.act_bits) for x, p in zip(inputs, parts)]
            if op == "conv2d":   # per-tap weight sums: codes-in convs zero-fill padding and correct in the epilogue
                names = ["w_tapsum"] if len(parts) == 1 else ["w_tapsum1", "w_tapsum2"]
                extra.update({name: _const(gm, graph, node, f"{binding.name}.ts{i}", p.tapsum)
                              for i, (name, p) in enumerate(zip(names, parts))})
        acts = [(p.act_scale, p.act_zero_point, p.act_bits) for p in parts]
        if len(parts) == 1:
            qargs = [inputs[0], *consts[0], *acts[0], weight_bits]
        else:
            (w1, rs1, s1), (w2, rs2, s2) = consts
            qargs = [inputs[0], inputs[1], w1, w2, rs1, rs2, s1, s2, acts[0][0], acts[1][0], acts[0][1], acts[1][1],
                     acts[0][2], acts[1][2], weight_bits]
        suffix = "_split" if len(parts) == 2 else ""
        if op == "conv2d":
            kh, kw = weight.shape[2], weight.shape[3]
            qargs += [[kh, kw], _pair(args["stride"]), _pair(args["padding"])]
            target = getattr(torch.ops.qdiff, "qconv2d" + suffix).default
            stats.conv2d += 1
        else:
            target = getattr(torch.ops.qdiff, "qlinear" + suffix).default
            stats.linear += 1
        stats.split += len(parts) == 2
        with graph.inserting_before(node):
            new = graph.call_function(target, tuple(qargs), {"bias": args["bias"], **extra})
        # same output as the float call: keep its shape info (a later split concat reads it)
        new.meta.update({k: v for k, v in node.meta.items()
                         if k in ("stack_trace", "nn_module_stack", "source_fn_stack", "example_value", "val")})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        mode = qops.kernel_mode(weight.device)
        notes = [where or "input quantized on load, in the kernel"]
        if rec.asymmetric:
            notes.append(f"asymmetric W{rec.weight_bits} codes minus zero points held as int{weight_bits} on the device "
                         "(zero point subtracted once at compile time)")
        elif weight_bits != rec.weight_bits:
            notes.append(f"W{rec.weight_bits} codes held as int{weight_bits} on the device (compute-bound layer: "
                         "no int4 MMA on the GPU, unpacked once at compile time)")
        if choice_note:
            notes.append(choice_note)
        binding.decisions[binding.name] = Decision(op, f"qdiff.{target._schema.name.split('::')[1]} [{mode}]",
                                                   "; ".join(notes))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return stats


def _dtype_of(x, weight: torch.Tensor) -> torch.dtype:
    value = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    return value.dtype if value is not None else weight.dtype


def _unsupported(op: str, args: dict, weight: torch.Tensor) -> str | None:
    if op == "linear":
        return None if weight.dim() == 2 else f"linear weight of shape {list(weight.shape)}"
    if weight.dim() != 4:
        return f"conv2d weight of shape {list(weight.shape)}"
    if args["groups"] != 1:
        return f"groups={args['groups']} (kernel supports groups=1)"
    if _pair(args["dilation"]) != [1, 1]:
        return f"dilation={args['dilation']} (kernel supports dilation 1)"
    if isinstance(args["padding"], str):
        return f"padding={args['padding']!r} (kernel needs explicit padding)"
    if not all(isinstance(v, int) for v in (*_pair(args["stride"]), *_pair(args["padding"]))):
        return "non-constant stride/padding"
    return None
