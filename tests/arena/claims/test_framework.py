import argparse

import pytest

from attnlab.arena.claims import Claim, Report, Table, get_claim, list_claims, render


def test_every_claim_module_defines_a_claim():
    for c in list_claims():
        assert isinstance(c, Claim) and c.statement and c.paper


def test_unknown_claim_names_close_ones():
    with pytest.raises(ValueError, match="unknown claim"):
        get_claim("no_such_claim")


def test_render_has_command_machine_and_tables():
    claim = Claim(name="demo", paper="A paper", statement="X beats Y.", run=lambda a: None)
    report = Report(verdict="partly", summary="X beats Y on one of two tasks.",
                    tables=[Table("results", ["model", "acc"], [["X", 0.91234], ["Y", 0.5]])], notes=["small"])
    page = render(claim, report, "attnlab reproduce demo", 3.0)
    assert "`attnlab reproduce demo`" in page and "Machine:" in page and "| X | 0.9123 |" in page
    assert "Verdict: partly" in page


def test_bad_verdict_and_ragged_rows_raise():
    with pytest.raises(ValueError, match="verdict"):
        Report(verdict="maybe", summary="")
    with pytest.raises(ValueError, match="cells"):
        Table("t", ["a", "b"], [[1]]).to_markdown()


def test_the_recorded_command_leaves_out_the_output_folder():
    from attnlab.arena.claims import without_out
    assert without_out(["msgnet", "--jobs", "2", "--out", "/tmp/x", "--seeds", "3"]) == ["msgnet", "--jobs", "2",
                                                                                        "--seeds", "3"]
    assert without_out(["softpag", "--out=/tmp/y"]) == ["softpag"]


def test_a_provisional_budget_shows_on_the_verdict_line():
    claim = Claim(name="x", paper="P", statement="S", run=lambda a: None)
    still = "b was still improving (the verdict is provisional) by step 10: 1 at step 8 -> 2 (+1 over the last 25%)."
    flat = "b had flattened by step 10: 1 at step 8 -> 1 (+0 over the last 25%)."
    verdict_line = lambda page: next(l for l in page.splitlines() if l.startswith("**Verdict"))
    page = render(claim, Report(verdict="holds", summary="A beats B.", budget=still), "cmd", 1.0)
    assert verdict_line(page) == ("**Verdict: holds.** Provisional (a curve was still moving at the end of the "
                                  "budget, see Budget). A beats B.")
    page = render(claim, Report(verdict="holds", summary="A beats B.", budget=flat), "cmd", 1.0)
    assert verdict_line(page) == "**Verdict: holds.** A beats B."
    # a summary that already says it is not prefixed twice
    page = render(claim, Report(verdict="partly", summary="Provisional (one seed). A.", budget=still), "cmd", 1.0)
    assert verdict_line(page) == "**Verdict: partly.** Provisional (one seed). A."
