import pytest


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """Whole-model tests run the pure-torch reference integer path on CPU (the Triton kernels
    are property-tested against it in tests/kernels; running whole U-Nets in the Triton
    interpreter would take minutes). Tests that want Triton set it themselves."""
    monkeypatch.setenv("QDCOMPILE_KERNELS", "reference")


@pytest.fixture(scope="session")
def metadata_files(tmp_path_factory):
    """``{kind: (unet, path)}``: real metadata files of the three kinds (see tests/metadata_files.py)."""
    from metadata_files import KINDS, calibrated_file

    folder = tmp_path_factory.mktemp("qdiff-files")
    return {kind: calibrated_file(kind, folder) for kind in KINDS}
