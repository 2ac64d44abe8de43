"""`attnlab list` and `attnlab info`: what a user sees in the shell (bench has tests/arena)."""
import subprocess
import sys

import pytest

from attnlab import cli
from attnlab.registry import list_specs


def test_list_shows_every_mechanism(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in list_specs():
        assert spec.name in out


def test_list_filters_by_layout(capsys):
    assert cli.main(["list", "--layout", "2d"]) == 0
    out = capsys.readouterr().out
    assert "halo2d" in out and "mhsa" not in out


def test_info_shows_spec_options_and_notes(capsys):
    assert cli.main(["info", "moh"]) == 0
    out = capsys.readouterr().out
    assert "MoH: Multi-Head Attention as Mixture-of-Head Attention" in out
    assert "top_k" in out and "shared_heads" in out       # constructor options
    assert "Deviations" in out                             # the file header's notes


def test_info_unknown_name_suggests_close_names(capsys):
    assert cli.main(["info", "mosh"]) == 2
    assert "did you mean 'moh'" in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "attnlab", "list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "mhsa" in done.stdout


def test_missing_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_list_has_a_provenance_column(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")                  # wide enough that no cell is cut
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "provenance" in out
    for spec in list_specs():
        row = next(line for line in out.splitlines() if line.startswith(spec.name + " "))
        assert (spec.provenance or "-") in row, row


def test_info_shows_provenance_and_source_lines(capsys):
    assert cli.main(["info", "selective"]) == 0
    out = capsys.readouterr().out
    spec = list_specs(name="selective")[0]
    assert f"provenance: {spec.provenance}" in out
    assert f"source: {spec.source}" in out                 # in full, not cut by a table cell


@pytest.mark.parametrize("columns", [80, 120, 250])
def test_list_is_one_line_per_mechanism_at_any_width(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= columns for line in lines), max(lines, key=len)
    header = next(line for line in lines if line.startswith("name ")).split()
    # Below the width of every column, "exact" and then "year" are left out, never cut.
    assert header[:2] == ["name", "layout"] and "provenance" in header
    assert "year" in header or columns < 90, header
    for spec in list_specs():
        row = [line for line in lines if line.startswith(spec.name + " ")]
        assert len(row) == 1, (spec.name, lines)
        cells = row[0].split()
        assert cells[1] == spec.layout and (spec.provenance or "-") in cells
        if "year" in header:
            assert cells[header.index("year")] == str(spec.year)
