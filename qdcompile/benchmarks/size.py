"""Model size and BOPs of a census under a :class:`~qdcompile.QuantRecipe` (``BOPs = MACs · b_w · b_a``,
PTQD §5.1), and the size table of ``qdcompile bench size``."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

from .census import Census, LayerInfo

MB = 1e6          # the papers' "MB": 10^6 bytes (PTQD's Table 2 only matches with this)


MIB = 2 ** 20


def layer_precision(layer: LayerInfo, recipe) -> tuple[int | None, int | None, str]:
    """``(weight_bits, act_bits, why)`` a recipe gives a layer; ``None`` bits mean float.

    Mirrors calibration: layers the kernels cannot run and ``skip`` matches stay float;
    ``keep_8bit`` matches get W8 (A8 when the recipe quantizes activations).
    """
    if recipe is None:
        return None, None, "float model"
    if layer.unsupported is not None:
        return None, None, layer.unsupported
    if any(fnmatch.fnmatchcase(layer.name, p) for p in recipe.skip):
        return None, None, "skipped by the recipe"
    if any(fnmatch.fnmatchcase(layer.name, p) for p in recipe.keep_8bit):
        return 8, (8 if recipe.act_bits is not None else None), "keep_8bit"
    return recipe.weight_bits, recipe.act_bits, "quantized"


@dataclass
class SizeReport:
    """Bytes of a model under a recipe (see :func:`model_size`)."""

    recipe: str
    float_bytes: int
    count_scales: bool
    params: dict[str, int]          # quantized / quantized_8bit / float_layers / bias / <role>… -> parameters
    bytes: dict[str, float]         # weights_q, scales, float_weights, bias, other -> bytes
    runtime_bytes: float            # kernel-side buffers not counted above (Σq_w row sums, int32)

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def mb(self) -> float:
        return self.total_bytes / MB

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_bytes"], d["total_params"], d["MB"], d["MiB"] = (self.total_bytes, self.total_params, self.mb,
                                                                   self.total_bytes / MIB)
        return d


def model_size(c: Census, recipe=None, float_bytes: int = 4, count_scales: bool = True,
               ops: tuple[str, ...] | None = None) -> SizeReport:
    """Storage of the U-Net of census ``c`` under ``recipe`` (``None``: all float).

    * quantized conv/linear weights: ``b_w`` bits each (int4 packed two per byte along K);
    * ``keep_8bit`` layers: 8 bits;
    * everything else — biases (also of quantized layers: the epilogue adds them in float),
      norms, embeddings, skipped or non-quantizable layers — ``float_bytes`` per parameter;
    * ``count_scales``: + per-output-channel weight scale (fp32) per quantized layer, and
      its per-tensor activation scale (fp32) + zero point (int32), and on the asymmetric 4-bit
      grid (``recipe.weight_grid``) a per-output-channel weight zero point (one byte: codes
      0 … 15). The kernels' weight row
      sums (int32 per output channel) are reported apart as ``runtime_bytes``.
    * ``ops`` restricts quantization to these op kinds (torchao-style ``("linear",)``).
    """
    params = {"quantized": 0, "quantized_8bit": 0, "float_layers": 0, "bias": 0}
    nbytes = {"weights_q": 0.0, "scales": 0.0, "float_weights": 0.0, "bias": 0.0, "other": 0.0}
    runtime = 0.0
    for layer in c.layers:
        wb, ab, _ = layer_precision(layer, recipe)
        if ops is not None and layer.op not in ops:
            wb = ab = None
        params["bias"] += layer.bias_params
        nbytes["bias"] += layer.bias_params * float_bytes
        if wb is None:
            params["float_layers"] += layer.weight_params
            nbytes["float_weights"] += layer.weight_params * float_bytes
            continue
        params["quantized_8bit" if (wb == 8 and recipe is not None and recipe.weight_bits != 8) else "quantized"] += \
            layer.weight_params
        k = layer.weight_params // max(layer.out_channels, 1)
        nbytes["weights_q"] += layer.out_channels * math.ceil(k * wb / 8)
        if count_scales:
            nbytes["scales"] += 4 * layer.out_channels + (8 if ab is not None else 0)
            if recipe.asymmetric_weights(wb):
                nbytes["scales"] += layer.out_channels
        runtime += 4 * layer.out_channels
    for role, n in c.other_params.items():
        params[role] = params.get(role, 0) + n
        nbytes["other"] += n * float_bytes
    name = "fp32" if recipe is None and float_bytes == 4 else "fp16" if recipe is None else recipe.name
    return SizeReport(name, float_bytes, count_scales, params, nbytes, runtime)


def bops(c: Census, recipe=None, float_bits: int = 32, ops: tuple[str, ...] | None = None) -> dict[str, float]:
    """Bit operations of one U-Net evaluation: ``Σ MACs · b_w · b_a`` over conv/linear layers
    (float layers at ``float_bits``², weight-only layers at ``b_w · float_bits``), and, apart,
    the attention matmuls, always float (``attention``)."""
    layer_bops = 0.0
    for layer in c.layers:
        wb, ab, _ = layer_precision(layer, recipe)
        if ops is not None and layer.op not in ops:
            wb = ab = None
        layer_bops += layer.macs * (wb or float_bits) * (ab or float_bits)
    attention = c.attn_macs * float_bits * float_bits
    return {"layers": layer_bops, "attention": attention, "total": layer_bops + attention}


def format_rows(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format)."""
    head = [h for _, h, _ in cols]
    body = []
    for r in rows:
        line = []
        for k, _, f in cols:
            v = r.get(k)
            line.append("—" if v is None else (format(v, f) if f and isinstance(v, (int, float)) else str(v)))
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(out)
