"""Test-session setup shared by every test folder (kernel-related only; keep it minimal).

Without CUDA the Triton kernels run on the CPU under the Triton interpreter, and the
``torch.ops.qdiff`` ops are routed to them, so the whole suite exercises the real kernels.
Both variables must be set before anything imports ``triton`` or ``qdcompile.kernels``
(the interpreter switch is read when a kernel is decorated), hence at import time here.
An explicit setting in the environment wins (e.g. ``QDCOMPILE_KERNELS=reference``).

Tests that need the pure-torch path regardless (slow end-to-end checks) can call the
``*_reference`` functions directly or use the :func:`reference_kernels` fixture.
"""

import os
from pathlib import Path


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("QDCOMPILE_KERNELS", "triton")

import pytest  # noqa: E402


def _exact_interpreter_fma() -> None:
    """Triton's interpreter before 3.8 computes ``tl.fma`` on fp32 as a multiply then an add (two
    roundings); the GPU's FMA rounds once, and the quantizer's exact-division refinement
    (kernels/quantize.py) relies on that. Give the interpreter a correctly rounded fp32 fma
    (product exact in float64, sum rounded to odd, then to fp32), so the kernel tests check the
    arithmetic the hardware does. Triton >= 3.8 does this itself."""
    try:
        import inspect

        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    original = builder.create_fma
    if "fma_fp32" in inspect.getsource(original):
        return

    def fma_fp32(x, y, z):
        x, y, z = np.broadcast_arrays(x, y, z)
        p = x.astype(np.float64) * y.astype(np.float64)      # exact: two 24-bit significands
        zz = z.astype(np.float64)
        s = p + zz
        bb = s - p
        err = (p - (s - bb)) + (zz - bb)                      # TwoSum: the exact rounding error of s
        odd = (s.view(np.int64) & 1) == 1
        fix = np.isfinite(s) & (err != 0) & ~odd              # round to odd: nudge toward the exact sum
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)

    def create_fma(self, x, y, z):
        if z.data.dtype == np.float32:
            return interpreter.TensorHandle(fma_fp32(x.data, y.data, z.data), z.dtype.scalar)
        return original(self, x, y, z)

    builder.create_fma = create_fma


if os.environ.get("TRITON_INTERPRET") == "1":
    _exact_interpreter_fma()


@pytest.fixture(autouse=True)
def _inductor_only_where_marked(request, monkeypatch):
    """Inductor's CPU build (C++ code generation and compilation) is most of a whole-model test's
    time: tests/passes/test_instances.py took 511 s with it and 82 s without on a loaded 2-core
    machine. So the rewritten graph runs without Inductor (``QDCOMPILE_INDUCTOR=0``: the same
    integer ops and the same aten quantizer ops, run eagerly), except in tests marked
    ``@pytest.mark.inductor`` — those that check what only Inductor does (the quantizer fused into
    its producer, whole U-Nets through Inductor's lowering, the README's demo command)."""
    if request.node.get_closest_marker("inductor") is None:
        monkeypatch.setenv("QDCOMPILE_INDUCTOR", "0")


@pytest.fixture
def reference_kernels(monkeypatch):
    """Route ``torch.ops.qdiff.*`` to the pure-torch reference for one test."""
    monkeypatch.setenv("QDCOMPILE_KERNELS", "reference")


# Whole-model test folders: they run the pure-torch reference integer path on CPU (the Triton
# kernels are property-tested against it in tests/kernels; running whole U-Nets in the Triton
# interpreter would take minutes). Tests there that want Triton set it themselves.
_REFERENCE_FOLDERS = tuple(Path(__file__).resolve().parent / name for name in ("passes", "qdcompile"))


@pytest.fixture(autouse=True)
def _reference_kernels_for_whole_models(request, monkeypatch):
    path = Path(str(request.node.path)).resolve()
    if any(path.is_relative_to(folder) for folder in _REFERENCE_FOLDERS):
        monkeypatch.setenv("QDCOMPILE_KERNELS", "reference")


@pytest.fixture(scope="session")
def metadata_files(tmp_path_factory):
    """``{kind: (unet, path)}``: real metadata files of the three kinds (see tests/metadata_files.py)."""
    from metadata_files import KINDS, calibrated_file

    folder = tmp_path_factory.mktemp("qdiff-files")
    return {kind: calibrated_file(kind, folder) for kind in KINDS}


@pytest.fixture(scope="session")
def previous_format(tmp_path_factory):
    """``(unet, format-5 path, current-format path)`` of one symmetric-grid PTQD calibration (see
    tests/metadata_files.py): the files the older-format readers are tested on."""
    from metadata_files import previous_format_file

    return previous_format_file(tmp_path_factory.mktemp("qdiff-v5"))



@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: on 2-core CI machines a second thread competes with Inductor's
    compile workers and makes small convs 10-70x slower (measured here)."""
    import torch

    torch.set_num_threads(1)


def pytest_report_header(config):
    """Which Triton the kernel tests run on (CI pins the one torch 2.13's CUDA build uses)."""
    try:
        import triton
    except ImportError:
        return "triton: not installed (kernel tests skip)"
    return f"triton: {triton.__version__}"
