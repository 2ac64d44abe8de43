"""tests/ mirrors src/attnlab: one test folder per package, one test file per mechanism file.

- every package under src/attnlab has a folder under tests/ and every test folder names a
  package (tests/data and tests/mechanisms/contracts are the two that hold no package's tests);
- tests/mechanisms is flat: each src/attnlab/mechanisms/<name>.py has tests/mechanisms/
  test_<name>.py, and each test_<x>.py there belongs to a mechanism file (test_<name>_<more>.py
  for a second file), so removing a mechanism is deleting one file and one test.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC, TESTS = ROOT / "src" / "attnlab", ROOT / "tests"
NOT_A_PACKAGE = {Path("data"), Path("mechanisms/contracts")}


def _packages():
    return {p.parent.relative_to(SRC) for p in SRC.rglob("__init__.py") if p.parent != SRC
            and "csrc" not in p.parts}


def _test_dirs():
    return {p.relative_to(TESTS) for p in TESTS.rglob("*") if p.is_dir() and p.name != "__pycache__"
            and not p.name.startswith(".")}


def test_every_package_has_a_test_folder():
    assert Path("mechanisms") in _packages()
    missing = sorted(str(p) for p in _packages() - _test_dirs())
    assert not missing, f"packages without a folder under tests/: {missing}"


def test_every_test_folder_mirrors_a_package():
    stray = sorted(str(p) for p in _test_dirs() - _packages() - NOT_A_PACKAGE
                   if not any(p.is_relative_to(n) for n in NOT_A_PACKAGE))
    assert not stray, f"test folders with no src/attnlab package of that name: {stray}"


def _mechanism_modules():
    return sorted(p.stem for p in (SRC / "mechanisms").glob("*.py") if not p.name.startswith("_"))


def test_every_mechanism_file_has_its_test_file():
    names = _mechanism_modules()
    assert "mhsa" in names
    missing = [f"tests/mechanisms/test_{n}.py" for n in names
               if not (TESTS / "mechanisms" / f"test_{n}.py").exists()]
    assert not missing, f"mechanism files without their test file: {missing}"


def test_every_mechanism_test_file_belongs_to_a_mechanism_file():
    names = _mechanism_modules()
    orphans = [p.name for p in sorted((TESTS / "mechanisms").glob("test_*.py"))
               if not any(p.stem == f"test_{n}" or p.stem.startswith(f"test_{n}_") for n in names)]
    assert not orphans, (f"tests/mechanisms holds one test file per mechanism file; these belong to "
                         f"none (suites over every mechanism go to tests/mechanisms/contracts/): {orphans}")
