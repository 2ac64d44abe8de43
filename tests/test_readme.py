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


def _section_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of every table row between `heading` and the next heading."""
    body = text.split(heading, 1)[1]
    body = body[:min((body.index(h) for h in ("\n## ", "\n### ") if h in body), default=len(body))]
    rows = [line for line in body.splitlines() if line.startswith("|") and not line.startswith("| ---")]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows[1:]]      # minus the header


def test_claims_table_has_one_row_per_page_with_its_verdict():
    """Every docs/claims/NAME.json has exactly one README row, and the row starts with the page's verdict
    (the run's, not an edited one); the seed-network table keeps its five columns."""
    import json

    text = (ROOT / "README.md").read_text()
    rows = _section_rows(text, "### Paper claims: `attnlab reproduce`")
    by_name: dict[str, list[list[str]]] = {}
    for cells in rows:
        assert len(cells) == 3, f"claims table row has {len(cells)} cells, expected 3: {cells[:2]}"
        name = cells[0].split("]")[0].lstrip("[")
        assert cells[0] == f"[{name}](docs/claims/{name}.md)", cells[0]
        by_name.setdefault(name, []).append(cells)
    pages = sorted(p.stem for p in (ROOT / "docs" / "claims").glob("*.json"))
    assert sorted(by_name) == pages
    for name in pages:
        assert len(by_name[name]) == 1, f"{name} has {len(by_name[name])} rows in the claims table"
        page = json.loads((ROOT / "docs" / "claims" / f"{name}.json").read_text())
        md = (ROOT / "docs" / "claims" / f"{name}.md").read_text()
        assert f"**Verdict: {page['verdict']}.**" in md, name
        assert by_name[name][0][2].startswith(page["verdict"]), (name, page["verdict"], by_name[name][0][2][:40])
        verdict_line = next(line for line in md.splitlines() if line.startswith("**Verdict"))
        if "provisional" in verdict_line.lower():
            assert "provisional" in by_name[name][0][2], f"{name}: the page is provisional, its README row does not say so"
    for cells in _section_rows(text, "## Seed networks: `attnlab.models`"):
        assert len(cells) == 5, f"seed-network row has {len(cells)} cells, expected 5: {cells[:1]}"
        if cells[4] != "-":
            assert cells[4].split("]")[0].lstrip("[") in pages, cells[4]


def test_readme_python_examples_run():
    """The README's ```python blocks run as written, in order, in one namespace (only `tokens` and
    `prompt`, which the text leaves to the reader, are given), and the cached decode equals the full
    causal forward as its comment says."""
    import re

    import torch

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    torch.manual_seed(0)
    namespace = {"tokens": torch.randint(0, 65, (2, 33)), "prompt": torch.randint(0, 65, (1, 5))}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    full = namespace["attn"](namespace["x"][:, :8], is_causal=True)
    torch.testing.assert_close(torch.cat(namespace["steps"], 1), full, atol=1e-5, rtol=1e-4)
    assert namespace["out"].shape == (1, 105)
    assert namespace["logits"].shape == (2, 32, 65) and torch.isfinite(namespace["loss"])
