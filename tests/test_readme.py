"""The README's mechanism table is what list_specs() generates, and its commands exist."""
from pathlib import Path

from attnlab.docs import mechanism_table, table_in
from attnlab.registry import list_specs

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_matches_registry():
    text = (ROOT / "README.md").read_text()
    assert table_in(text) == mechanism_table(), "README table is stale: run `python -m attnlab.docs README.md`"


def test_table_has_one_row_per_spec():
    rows = [r for r in mechanism_table().splitlines()[2:]]
    assert [r.split("|")[1].strip().strip("`") for r in rows] == [s.name for s in list_specs()]


def test_readme_commands_are_make_targets():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("arena", "bench", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
