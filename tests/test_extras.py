"""Optional extras: a missing one is named in the error, and the library works without the lab."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from attnlab._extras import EXTRAS, MissingExtra, missing, optional_import, require

# Run `body` in a fresh interpreter in which the named top-level modules cannot be imported.
BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = set({blocked!r})
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, Blocker())
    import importlib.util
    _find = importlib.util.find_spec
    def find_spec(name, package=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return _find(name, package)
    importlib.util.find_spec = find_spec
""")


def run_without(blocked: list[str], body: str) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=blocked) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_lab_extra_is_installed_for_the_test_suite():
    assert missing("lab") == []


def test_require_names_the_extra_and_the_missing_distribution():
    with pytest.raises(MissingExtra, match=r"attnlab\[lab\].*missing: no_such_module_xyz.*pip install 'attnlab\[lab\]'"):
        require("lab", "no_such_module_xyz", what="this test")
    with pytest.raises(ValueError, match="unknown extra 'gpu'.*lab, hf"):
        missing("gpu")


def test_optional_import_turns_a_missing_module_into_the_extra_error():
    assert optional_import("json", "lab", what="x").dumps(1) == "1"
    with pytest.raises(MissingExtra, match=r"plotting needs the attnlab\[lab\] extra"):
        optional_import("no_such_module_xyz", "lab", what="plotting")


def test_every_extra_module_maps_to_a_distribution_in_pyproject():
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = {name: {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in deps}
                for name, deps in project["optional-dependencies"].items()}
    for extra, modules in EXTRAS.items():
        assert set(modules.values()) == declared[extra], extra
    assert {d.split(">")[0].strip() for d in project["dependencies"]} == {"torch", "numpy"}


def test_the_library_runs_without_the_lab_extra():
    done = run_without(list(EXTRAS["lab"]) + list(EXTRAS["hf"]), """
        import torch, attnlab
        for spec in attnlab.list_specs(layout="seq"):
            m = attnlab.create(spec.name, dim=32, num_heads=4, **spec.test_kwargs).eval()
            assert m(torch.randn(1, 5, 32)).shape == (1, 5, 32), spec.name
        print("ok", len(attnlab.list_specs()))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


def test_the_cli_without_the_lab_extra_says_which_extra_to_install():
    done = run_without(["rich"], """
        import sys
        from attnlab.cli import main
        sys.exit(main(["list"]))
    """)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "attnlab[lab]" in done.stderr and "rich" in done.stderr
    assert "Traceback" not in done.stderr
