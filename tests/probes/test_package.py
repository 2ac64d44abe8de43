"""attnlab.probes is library code: importable with the library alone (it is filled by the probes issue)."""
import importlib


def test_probes_package_imports_and_says_what_it_is_for():
    probes = importlib.import_module("attnlab.probes")
    assert "HuggingFace" in (probes.__doc__ or "")
