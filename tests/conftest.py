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


@pytest.fixture
def reference_kernels(monkeypatch):
    """Route ``torch.ops.qdiff.*`` to the pure-torch reference for one test."""
    monkeypatch.setenv("QDCOMPILE_KERNELS", "reference")



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
