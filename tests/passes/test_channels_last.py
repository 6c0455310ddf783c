"""passes.channels_last: NCHW graph inputs that reach a conv are converted to channels-last once
at entry, 4-D outputs back to NCHW once at exit; every conv then sees a channels-last input."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from qdcompile.passes.channels_last import channels_last_pass


class _Block(nn.Module):
    """conv → GroupNorm → SiLU → conv, residual add, a 1×1 conv on a concat, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.skip = nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x, emb):
        h = self.conv2(F.silu(self.norm(self.conv1(x))))
        h = h + self.skip(torch.cat([h, x], dim=1))
        return h, self.head(emb) + h.mean(dim=(2, 3))[:, :3]


def _traced(x, emb):
    gm = torch.fx.symbolic_trace(_Block().eval())
    ShapeProp(gm).propagate(x, emb)
    return gm


def _conv_inputs(gm, x, emb):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for m in gm.modules()
             if isinstance(m, nn.Conv2d)]
    out = gm(x, emb)
    for h in hooks:
        h.remove()
    return seen, out


def test_nchw_input_runs_channels_last_and_returns_nchw():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 7, generator=gen)
    emb = torch.randn(2, 8, generator=gen)
    gm = _traced(x, emb)
    ref = gm(x, emb)
    gm, stats = channels_last_pass(gm)
    assert (stats.inputs_converted, stats.outputs_converted) == (1, 1)   # x in, h out (emb untouched)
    seen, out = _conv_inputs(gm, x, emb)
    assert len(seen) == 3 and all(t.is_contiguous(memory_format=torch.channels_last) for t in seen)
    assert out[0].is_contiguous() and out[0].shape == ref[0].shape
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


def test_channels_last_input_and_graphs_without_conv_are_left_alone():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 8, generator=gen)
    gm = _traced(x, emb)
    n_nodes = len(gm.graph.nodes)
    gm, stats = channels_last_pass(gm)
    assert (stats.inputs_converted, stats.outputs_converted) == (0, 0) and len(gm.graph.nodes) == n_nodes

    plain = torch.fx.symbolic_trace(lambda a: torch.relu(a) * 2)
    a = torch.randn(1, 3, 4, 4, generator=gen)
    plain, stats = channels_last_pass(plain, example_inputs=[a])
    assert stats.inputs_converted == 0
    assert torch.equal(plain(a), torch.relu(a) * 2)


def test_conv_weights_passed_as_graph_inputs_are_not_converted():
    """Under Dynamo module weights are graph inputs (4-D, NCHW-contiguous, reaching a conv): the pass
    must not copy them to channels-last on every call; only the activation is converted."""
    graphs = []

    def spy(gm, example_inputs):
        _, stats = channels_last_pass(gm, example_inputs)
        graphs.append((gm, stats))
        return gm.forward

    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        out = torch.compile(lambda t: F.conv2d(t, conv.weight, conv.bias, padding=1), backend=spy)(x)
    gm, stats = graphs[0]
    assert stats.inputs_converted == 1 and stats.outputs_converted == 1
    converted = [n.args[0] for n in gm.graph.nodes if n.op == "call_method" and n.kwargs.get("memory_format")]
    assert len(converted) == 1 and converted[0].meta["example_value"].shape == x.shape
    assert out.is_contiguous() and torch.allclose(out, conv(x), rtol=1e-5, atol=1e-6)
