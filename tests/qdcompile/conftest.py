import pytest


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """Whole-model tests run the pure-torch reference integer path on CPU (the Triton kernels
    are property-tested against it in tests/kernels; running whole U-Nets in the Triton
    interpreter would take minutes). Tests that want Triton set it themselves."""
    monkeypatch.setenv("QDCOMPILE_KERNELS", "reference")
