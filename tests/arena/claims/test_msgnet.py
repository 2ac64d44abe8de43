"""`attnlab reproduce msgnet --quick`: every row trained and tested on the real ETTh1 split, the paper's
numbers beside them, the verdict following its rule, the forecast figure written."""
import math

import pytest

from attnlab.arena.claims import claim_args, render

try:
    from attnlab.tasks.ett import find_csv
    find_csv()
except FileNotFoundError:
    pytest.skip("ETTh1.csv not found", allow_module_level=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    claim, args = claim_args("msgnet", quick=True, out=tmp_path_factory.mktemp("msgnet"))
    return claim, args, claim.run(args)


def test_quick_report_rows_and_verdict(quick):
    claim, args, report = quick
    test = report.data["test"]
    assert set(test) == {"dlinear@24", "msgnet@24", "msgnet, official batch-averaged periods@24",
                         "msgnet with moh in its blocks@24"}
    for key, rows in test.items():
        assert len(rows) == 1 and all(math.isfinite(r["mse"]) and r["mse"] > 0 for r in rows), key
    # horizon 24 is not in the paper's table: nothing can be counted as reproduced
    assert report.verdict == "does not hold" and report.data["reproduced"] == {"24": False}
    assert report.data["params"]["msgnet with moh in its blocks@24"] != report.data["params"]["msgnet@24"]
    assert report.figures and report.figures[0].is_file()
    assert render(claim, report, "attnlab reproduce msgnet", 1.0).count("| 24 |") == 1
    assert len(report.tables) == 2 and report.tables[0].headers[3] == "paper MSGNet"
