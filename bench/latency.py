"""End-to-end speed and memory of quantized diffusion U-Nets vs FP16 (eager and compiled) and torchao.

One run times, on the same U-Net (same random weights, seeded) and the same inputs:

* ``fp-eager``     — FP16 eager (always first: its output is the reference for the SNR column);
* ``fp-compiled``  — FP16 ``torch.compile`` (Inductor, default mode; ``--max-autotune`` adds
  ``mode="max-autotune-no-cudagraphs"``);
* ``torchao-int8`` — torchao int8 dynamic activation + int8 weight (``nn.Linear`` only, as
  torchao does) + ``torch.compile``; reported as unavailable, with the reason, when
  ``import torchao`` fails;
* ``qdiff-w8a8`` / ``qdiff-w4a8`` (``qdiff-w4a4`` on request) — ``qdcompile.calibrate`` with a
  CHEAP calibration (``--calib-samples 2 --calib-steps 4``: speed does not depend on
  calibration quality) then ``torch.compile(unet, backend="qdiff")``;
* ``qdiff-mixed`` — PTQD step-aware mixed precision through ``qdcompile.QuantizedUNet``
  (cheap ``QuantRecipe.mixed()`` calibration): each precision's step is timed and the step
  latency is their mean weighted by the plan; end to end runs the corrected sampler.

Per contender: U-Net step latency (median of ``triton.testing.do_bench`` — CUDA events, L2
flushed — over two independent passes, their spread shows the noise), optional CUDA-graph
replay (``--cuda-graphs``), end-to-end sampling time for ``--e2e-steps`` DDIM steps, weight
bytes of the stored format, resident and peak GPU memory (``max_memory_allocated``, reset per
contender; every contender builds its own fresh model), compile and calibration time, output
SNR vs FP16 eager, a compute floor from the ceilings measured at start (fp16/int8 matmul
rate, copy bandwidth; METHOD.md), and speed-ups vs FP16 compiled and eager. A
``torch.profiler`` breakdown of the compiled models groups CUDA kernel time into qdiff
integer GEMM/conv (our Triton kernels), activation quantization, float GEMM/conv,
attention, norms and elementwise/other. Output: a printed table and
``<out-dir>/latency-<device>-<date>-<tag>.{json,csv,png}`` + ``-profile.txt`` (JSON/CSV are
rewritten after every contender, so a run killed at its time limit keeps what it measured).
nvidia-smi clocks/temperature are read (never set) before and after.

Models: ``sd15`` (UNet2DConditionModel, SD1.5 config, 64² latent; ``--batch 2`` = CFG, 1),
``sdxl`` (128² latent, ``added_cond_kwargs`` text_embeds/time_ids), ``reference`` (the shipped
MNIST model; a tiny random UNet2DModel when its weights are missing), ``tiny``; random weights
built directly on the GPU in FP16. ``--model DIR`` loads a real diffusers checkpoint.

GPU (the device machine has torch/triton/matplotlib but not diffusers or torchao: carry the
wheels in ``build/device-wheels`` — diffusers 0.42.1, importlib_metadata 8.7.0, torchao 0.18.0,
fetched with ``pip download`` as the device README says — with ``carry=["build/device-wheels"]``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/device-wheels/*.whl \
      && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
      && python3 bench/latency.py --models sd15 --batch 2 --out-dir $OUT --budget-s 540 2>&1 | tee $OUT/log.txt

Plan for a 30-minute device lease (one command ≤ 10 min: use ``timeout_s=600``; the run stops
starting contenders when the last one of the same family — eager / Inductor / qdiff — took
longer than the ``--budget-s`` time left, and rewrites its JSON/CSV after every contender):

1. the command above: SD1.5 CFG batch 2 — FP16 eager, FP16 compiled, qdiff W8A8, qdiff W4A8,
   torchao, qdiff mixed (per-precision steps weighted by its plan). Cold Inductor compiles of an SD1.5 U-Net take minutes
   each and the qdiff kernels autotune on first call, so expect 6–10 min;
2. whatever call 1 skipped: ``--contenders fp-eager torchao-int8 --tag sd15-b2-rest`` (say),
   then ``--merge`` the two JSONs here (same device only);
3. if time is left: ``--models sdxl --batch 2`` (``--contenders fp-eager fp-compiled qdiff-w8a8``
   first), ``--models sd15 --batch 1``, ``--cuda-graphs``, ``--max-autotune``.

Copy ``$OUT``'s files into ``bench/results/`` afterwards (``--merge a.json b.json --out-dir
bench/results`` rebuilds CSV/PNG/profile from JSONs).

CPU (what CI can run; CPU timings say nothing about GPU speed)::

    python bench/latency.py --smoke --out-dir /tmp/latency-smoke

Runs from a checkout without installing (see ``bench/size.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from size import ensure_qdcompile_importable  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ensure_qdcompile_importable()
    from qdcompile.commands.bench import add_latency_arguments, latency_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_latency_arguments(parser)
    return latency_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
