"""Model size and BOPs of diffusion U-Net configs under the quantization recipes.

Counts, on the ``meta`` device (no weights, no arithmetic), the parameters of every
conv/linear layer and every other parameter by role, and the MACs of one U-Net evaluation
(hooks on conv/linear; attention matmuls ``QKᵀ``/``AV`` counted apart, always float), then
prices them under a recipe: quantized weights at the recipe's bits (``keep_8bit`` layers at
8; int4 packed two per byte), everything else — biases, norms, embeddings, layers the
kernels cannot run — at FP32 (or FP16 with ``--float-fp16``), plus the per-channel weight
scales and per-tensor activation scale/zero-point (``--no-scales`` leaves them out).
``BOPs = MACs · b_w · b_a``. Sizes in MB = 10^6 bytes (and MiB).

It also reproduces PTQD's Table 2 model sizes for LDM-4 ImageNet (1603.35 / 430.06 /
234.51 MB): see ``qdcompile.benchmarks.ptqd_table.ptqd_table2`` for the accounting convention that
matches (U-Net only, MB = 10^6, GroupNorm not counted, time-embedding projections kept in
FP32) and how close the alternatives get.

    python bench/size.py                                   # LDM-4, SD1.5, SDXL, MNIST; fp32/fp16/w8a8/w4a8/w4a4
    python bench/size.py --models sd15 --recipes fp16 w8a8 --float-fp16 --json bench/results/size-sd15.json

Runs from a checkout without installing (``qdcompile.kernels``/``.passes`` are mapped to
``kernels/``/``passes/`` when the package is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_qdcompile_importable() -> None:
    """Import ``qdcompile`` from this checkout even when it is not pip-installed: the
    package maps ``qdcompile.kernels`` → ``kernels/`` and ``qdcompile.passes`` → ``passes/``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import qdcompile  # noqa: F401

    for sub in ("kernels", "passes"):
        full = f"qdcompile.{sub}"
        if full in sys.modules or importlib.util.find_spec(full) is not None:
            continue
        spec = importlib.util.spec_from_file_location(full, ROOT / sub / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(sys.modules["qdcompile"], sub, module)


def main(argv: list[str] | None = None) -> int:
    ensure_qdcompile_importable()
    from qdcompile.commands.bench import add_size_arguments, size_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(parser)
    return size_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
