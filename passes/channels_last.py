"""Graph pass: run the conv path channels-last end to end, converting once at graph entry and exit.

The integer implicit-GEMM conv reads each pixel's channels as one contiguous vector (16-byte
async copies) only when its input is channels-last (NHWC in memory); an NCHW input drops it
to scalar 2-byte loads. Users pass NCHW latents, and every op in between (GroupNorm, SiLU,
residual adds, the quantized convs themselves, which write channels-last) preserves the
memory format, so one conversion where the NCHW tensor enters the graph and one where a
4-D result leaves it keep the whole U-Net channels-last.

:func:`channels_last_pass` (``GraphModule → GraphModule``, counts its hits):

* every 4-D placeholder that is contiguous NCHW (per ``node.meta["val"]`` / ``["example_value"]``,
  or ``example_inputs``) and reaches a conv gets ``x.contiguous(memory_format=torch.channels_last)``
  right after it (a no-op at run time for an input that is already channels-last);
* every 4-D graph output computed from a converted input gets ``.contiguous()`` (NCHW) before
  it is returned, so callers see the layout they passed in.

Placeholders already channels-last, non-4-D inputs and graphs without a conv are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

_CONV_FUNCTIONS = {torch.conv2d, torch.nn.functional.conv2d, torch.ops.aten.convolution.default,
                   torch.ops.aten.conv2d.default}


@dataclass
class ChannelsLastStats:
    inputs_converted: int = 0
    outputs_converted: int = 0


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), torch.nn.Conv2d)
    if node.op == "call_function":
        if node.target in _CONV_FUNCTIONS:
            return True
        name = getattr(node.target, "name", lambda: "")
        qualified = name() if callable(name) else str(name)
        return "qconv2d" in qualified       # torch.ops.qdiff.qconv2d / qconv2d_split (any overload)
    return False


def _value(node: fx.Node):
    for key in ("val", "example_value", "tensor_meta"):
        if node.meta.get(key) is not None:
            return node.meta[key]
    return None


def _downstream(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _nchw_4d(value) -> bool:
    """A 4-D tensor (or ShapeProp ``TensorMetadata``) laid out NCHW-contiguous, not channels-last."""
    if hasattr(value, "memory_format") and hasattr(value, "shape"):          # TensorMetadata
        return len(value.shape) == 4 and value.memory_format == torch.contiguous_format
    return (isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_contiguous()
            and not (value.shape[1] > 1 and value.is_contiguous(memory_format=torch.channels_last)))


def _four_d(value) -> bool:
    return value is not None and len(getattr(value, "shape", ())) == 4


def _is_weight(gm: fx.GraphModule, ph: fx.Node, example_inputs, i: int) -> bool:
    """A parameter (Dynamo passes module weights as graph inputs) or a conv's weight operand:
    converting it would copy the weight on every call."""
    if example_inputs is not None and i < len(example_inputs) and isinstance(example_inputs[i], torch.nn.Parameter):
        return True
    return any(_is_conv(gm, u) and u.op == "call_function" and len(u.args) > 1 and u.args[1] is ph for u in ph.users)


def channels_last_pass(gm: fx.GraphModule, example_inputs=None) -> tuple[fx.GraphModule, ChannelsLastStats]:
    """Convert NCHW conv-path inputs to channels-last at graph entry and 4-D outputs back at exit."""
    stats = ChannelsLastStats()
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    converted_from: set[fx.Node] = set()
    for i, ph in enumerate(placeholders):
        value = _value(ph)
        if value is None and example_inputs is not None and i < len(example_inputs):
            value = example_inputs[i]
        if not _nchw_4d(value) or _is_weight(gm, ph, example_inputs, i):
            continue
        reach = _downstream(ph)
        if not any(_is_conv(gm, n) for n in reach):
            continue
        users = list(ph.users)
        with graph.inserting_after(ph):
            cl = graph.call_method("contiguous", (ph,), {"memory_format": torch.channels_last})
        if isinstance(value, torch.Tensor):
            cl.meta["val"] = value.contiguous(memory_format=torch.channels_last)
        for user in users:
            user.replace_input_with(ph, cl)
        converted_from |= _downstream(cl) | {cl}
        stats.inputs_converted += 1
    if stats.inputs_converted:
        out = next(n for n in reversed(graph.nodes) if n.op == "output")

        def back(arg):
            if isinstance(arg, fx.Node) and arg in converted_from:
                value = _value(arg)
                if value is None or _four_d(value):
                    with graph.inserting_before(out):
                        node = graph.call_method("contiguous", (arg,))
                    if isinstance(value, torch.Tensor):
                        node.meta["val"] = value.contiguous()
                    stats.outputs_converted += 1
                    return node
            return arg

        out.args = (fx.node.map_arg(out.args[0], back),)
    graph.lint()
    gm.recompile()
    return gm, stats
