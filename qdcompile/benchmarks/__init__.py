"""Benchmarks (modules: :mod:`.configs`, :mod:`.census`, :mod:`.size`, :mod:`.ptqd_table`,
:mod:`.size_report`, :mod:`.latency`) shared by ``bench/size.py``, ``bench/latency.py`` and ``qdcompile bench``.

Two parts:

* **Size and BOPs accounting** (no weights needed: models are built on the ``meta``
  device). :func:`census` runs one forward pass with hooks and records, per conv/linear
  layer, its parameters and MACs, the MACs of every attention matmul (``QKᵀ`` and ``AV``,
  counted separately and always as float) and every other parameter by role (norms,
  embeddings, …). :func:`model_size` and :func:`bops` then price a census under a
  :class:`~qdcompile.QuantRecipe`: quantized weights at the recipe's bits (``keep_8bit``
  layers at 8), every other parameter — biases, norms, embeddings, layers the kernels
  cannot run — at FP32 or FP16, plus (optionally) the per-output-channel weight scales
  and per-tensor activation scale/zero-point the integer kernels read. ``BOPs = MACs ·
  b_w · b_a`` (PTQD §5.1, following Bayesian Bits' definition).
  :func:`ptqd_table2` reproduces the model sizes of PTQD's Table 2 (LDM-4 ImageNet); see
  its docstring for the accounting convention that matches and how close it gets.

* **End-to-end latency** (:func:`run_latency`, the ``latency`` mode of
  ``qdcompile bench``): one run times several contenders on the same U-Net and inputs —
  float eager, float ``torch.compile`` (Inductor), torchao int8 dynamic quantization,
  qdiff W8A8 / W4A8 — and writes a table, JSON, CSV, a PNG bar chart and a per-op
  (kernel-category) profile of the compiled models under ``bench/results/``.

On a CPU everything runs (the qdiff layers take the pure-torch reference path), but CPU
timings say nothing about GPU speed.
"""
