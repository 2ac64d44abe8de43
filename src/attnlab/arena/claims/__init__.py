"""Paper claims reproduced at small scale: `attnlab reproduce NAME` writes docs/claims/NAME.md.

A claim is one module of this package that defines `CLAIM = Claim(...)`:

    CLAIM = Claim(name="icl_regression", paper="...", statement="...",
                  add_arguments=add_arguments,   # argparse options with defaults = the documented run
                  run=run)                        # run(args) -> Report

`run` trains/measures and returns a `Report` (tables, notes, a verdict: "holds", "partly" or
"does not hold", and any figure files). The command line is recorded in the report with the
machine, so every table in docs/claims says how to regenerate it. `--quick` must give a run
of a few seconds with the same code path: the tests use it.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import importlib
import os
import pkgutil
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from attnlab._io import write_text

VERDICTS = ("holds", "partly", "does not hold")


@dataclass
class Table:
    caption: str
    headers: Sequence[str]
    rows: list[Sequence[Any]]

    def to_markdown(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.4g}"
            return str(v)
        lines = [f"**{self.caption}**", "", "| " + " | ".join(self.headers) + " |",
                 "| " + " | ".join("---" for _ in self.headers) + " |"]
        for row in self.rows:
            if len(row) != len(self.headers):
                raise ValueError(f"table {self.caption!r}: row {row!r} has {len(row)} cells, "
                                 f"expected {len(self.headers)}")
            lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
        return "\n".join(lines)


@dataclass
class Report:
    verdict: str                                   # one of VERDICTS
    summary: str                                   # one paragraph: what was found
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # setup, deviations from the paper, caveats
    figures: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers (saved as JSON beside the page)
    # Which training budget the run used and why it is enough: the baseline's curve has
    # flattened (say by how much over the last part), or it has not and the verdict is provisional.
    budget: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str
    statement: str                                 # the claim being tested, in one or two sentences
    run: Callable[[argparse.Namespace], Report]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    url: str = ""


def machine() -> str:
    import torch
    from attnlab._env import cpu_model
    cpu = cpu_model()
    try:                       # how busy the machine was when the page was written: timings depend on it
        load = f", load average {os.getloadavg()[2]:.1f} (15 min)"
    except (OSError, AttributeError):
        load = ""
    return (f"{cpu}, {os.cpu_count()} cores{load}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def verdict_summary(report: Report) -> str:
    """The summary as the verdict line shows it: a run whose Budget calls the verdict provisional says so
    on the verdict line too, where a claim's own summary does not already."""
    if "verdict is provisional" in report.budget and "provisional" not in report.summary.lower():
        return "Provisional (a curve was still moving at the end of the budget, see Budget). " + report.summary
    return report.summary


def render(claim: Claim, report: Report, command: str, seconds: float) -> str:
    date = datetime.date.today().isoformat()
    parts = [f"# {claim.paper}", "",
             f"**Claim.** {claim.statement}", "",
             f"**Verdict: {report.verdict}.** {verdict_summary(report)}", "",
             f"Reproduce: `{command}`  ", f"Machine: {machine()}; {seconds:.0f} s; {date}.", ""]
    if claim.url:
        parts += [f"Paper: {claim.url}", ""]
    if report.budget:
        parts += [f"**Budget.** {report.budget}", ""]
    for t in report.tables:
        parts += [t.to_markdown(), ""]
    for fig in report.figures:
        parts += [f"![{fig.stem}]({fig.name})", ""]
    if report.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(parts)


_CLAIMS: dict[str, Claim] = {}


def list_claims() -> list[Claim]:
    if not _CLAIMS:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                module = importlib.import_module(f"{__name__}.{info.name}")
                claim = getattr(module, "CLAIM", None)
                if not isinstance(claim, Claim):
                    raise TypeError(f"{module.__name__} must define CLAIM = Claim(...)")
                if claim.name != info.name:
                    raise ValueError(f"{module.__name__}: CLAIM.name {claim.name!r} must equal the module name")
                _CLAIMS[claim.name] = claim
    return [_CLAIMS[k] for k in sorted(_CLAIMS)]


def get_claim(name: str) -> Claim:
    names = [c.name for c in list_claims()]
    if name not in _CLAIMS:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown claim {name!r}{hint} (known: {', '.join(names)})")
    return _CLAIMS[name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="claim to reproduce (omit to list them)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run of the same code (smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for NAME.md, NAME.json and figures (default docs/claims; "
                             "--quick runs default to a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)


def without_out(argv: Sequence[str]) -> list[str]:
    """The command line minus `--out DIR` / `--out=DIR`: the page's command regenerates the page where
    it is kept (docs/claims), wherever this run wrote it."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return kept


def claim_args(name: str, argv: Sequence[str] = (), *, quick: bool = False, out: Path | None = None,
               seed: int = 0) -> tuple[Claim, argparse.Namespace]:
    """(claim, its parsed options) as `attnlab reproduce NAME ARGV` would build them, for calling
    `claim.run(args)` from Python (tests, notebooks)."""
    claim = get_claim(name)
    parser = argparse.ArgumentParser(prog=f"attnlab reproduce {claim.name}")
    claim.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.name, args.quick, args.out, args.seed = claim.name, quick, out, seed
    return claim, args


def main(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    import json
    import tempfile
    import time

    if args.name is None:
        for c in list_claims():
            print(f"{c.name:24s} {c.paper}")
        return 0
    try:
        claim = get_claim(args.name)
    except ValueError as e:
        print(f"attnlab reproduce: {e}", file=sys.stderr)
        return 2
    sub = argparse.ArgumentParser(prog=f"attnlab reproduce {claim.name}")
    claim.add_arguments(sub)
    opts = sub.parse_args(list(extra))
    for k, v in vars(args).items():
        setattr(opts, k, v)
    out = args.out or (Path(tempfile.mkdtemp(prefix=f"attnlab-{claim.name}-")) if args.quick
                       else Path("docs/claims"))
    out.mkdir(parents=True, exist_ok=True)
    opts.out = out
    start = time.perf_counter()
    report = claim.run(opts)
    seconds = time.perf_counter() - start
    command = "attnlab reproduce " + " ".join(shlex.quote(a) for a in without_out(sys.argv[2:])) \
        if sys.argv[1:2] == ["reproduce"] else f"attnlab reproduce {claim.name}"
    page = render(claim, report, command, seconds)
    write_text(out / f"{claim.name}.md", page)
    write_text(out / f"{claim.name}.json", json.dumps(
        {"claim": claim.name, "verdict": report.verdict, "command": command, "machine": machine(),
         "seconds": seconds, "budget": report.budget, "options": {k: str(v) for k, v in vars(opts).items()},
         "data": report.data},
        indent=1, default=str))
    print(page)
    print(f"wrote {out / (claim.name + '.md')}")
    return 0


__all__ = ["Claim", "Report", "Table", "VERDICTS", "list_claims", "get_claim", "render", "machine"]
