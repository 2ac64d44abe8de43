"""The `attnlab` command: list, info, bench, reproduce, train, arena."""
from __future__ import annotations

import argparse
import sys


def _cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from attnlab.docs import causal_cell
    from attnlab.registry import list_specs
    filters = {}
    if args.layout:
        filters["layout"] = args.layout
    # One line per mechanism at any width: every column shown keeps its cells whole; the paper's
    # title takes what is left, cut with an ellipsis, or is left out below 8 characters; on a
    # terminal too narrow for the rest, "exact" and then "year" go too (`attnlab info NAME`
    # shows everything).
    yes = lambda b: "yes" if b else "-"  # noqa: E731
    heads = ["name", "layout", "year", "exact", "causal", "mask", "cache", "provenance"]
    rows = [[s.name, s.layout, str(s.year), yes(s.exact), causal_cell(s), yes(s.attn_mask),
             yes(s.kv_cache), s.provenance or "-"] for s in list_specs(**filters)]
    papers = [s.paper for s in list_specs(**filters)]
    console = Console()

    def width() -> int:
        return sum(max(len(h), *(len(r[i]) for r in rows)) + 2 for i, h in enumerate(heads)) if rows else 0

    for optional in ("exact", "year"):
        if width() < console.width:
            break
        i = heads.index(optional)
        heads.pop(i)
        for r in rows:
            r.pop(i)
    room = console.width - width() - 1
    table = Table(title="attnlab mechanisms", box=None, pad_edge=False, padding=(0, 1))
    for col in heads:
        table.add_column(col, no_wrap=True)
    if room >= 8:
        table.add_column("paper", no_wrap=True, overflow="ellipsis", max_width=room)
    for row, paper in zip(rows, papers):
        table.add_row(*(row + [paper] if room >= 8 else row))
    console.print(table)
    return 0


def _cmd_info(args) -> int:
    import dataclasses
    import inspect

    from rich.console import Console
    from rich.table import Table

    from attnlab.registry import get_spec
    try:
        spec = get_spec(args.name)
    except ValueError as e:
        print(f"attnlab info: {e}", file=sys.stderr)
        return 2
    console = Console()
    table = Table(title=f"{spec.name}: {spec.paper} ({spec.year})", show_header=False)
    for f in dataclasses.fields(spec):
        if f.name not in ("cls", "provenance", "source"):   # those two get their own lines below
            value = getattr(spec, f.name)
            table.add_row(f.name, str(dict(value) if f.name == "test_kwargs" else value))
    table.add_row("class", f"{spec.cls.__module__}.{spec.cls.__qualname__}")
    console.print(table)
    # Where the formula comes from (registry.PROVENANCES), in full: never cut by the table width.
    console.print(f"provenance: {spec.provenance or '-'}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"source: {spec.source or '-'}", markup=False, highlight=False, soft_wrap=True)
    options = Table(title="options (attnlab.create(name, dim, num_heads, **options))")
    options.add_column("option")
    options.add_column("default")
    for name, p in spec.options().items():
        options.add_row(name, "required" if p.default is inspect.Parameter.empty else repr(p.default))
    console.print(options)
    describe = getattr(spec.cls, "describe", None)  # optional hook: extra lines (e.g. measured values)
    if callable(describe):
        for line in describe():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    doc = inspect.getdoc(sys.modules[spec.cls.__module__])
    if doc:
        console.print(doc, markup=False, highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from attnlab.bench import cli as bench

    parser = argparse.ArgumentParser(prog="attnlab", description="Attention mechanisms behind one interface.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="table of the registered mechanisms")
    p.add_argument("--layout", help="only this layout (seq, 2d, 3d, cross, pool)")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("info", help="one mechanism's spec and options")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="time and memory of mechanisms against a baseline in the same run")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    from attnlab.arena import claims
    p = sub.add_parser("reproduce", help="reproduce a paper's claim at small scale; writes docs/claims/NAME.md")
    claims.add_arguments(p)
    p.set_defaults(func=claims.main, takes_extra=True)
    from attnlab.train import cli as train
    p = sub.add_parser("train", help="train a task's model built from mechanisms; resumable, torchrun-ready")
    train.add_arguments(p)
    p.set_defaults(func=train.main)
    from attnlab.train import forecast
    p = sub.add_parser("forecast", help="train and test a forecaster (MSGNet, DLinear) on a CSV in the ETT format")
    forecast.add_arguments(p)
    p.set_defaults(func=forecast.main)
    from attnlab.probes import cli as probe
    p = sub.add_parser("probe", help="look inside a real pretrained model (offline): attention sinks, head importance")
    probe.add_arguments(p)
    p.set_defaults(func=probe.main)
    from attnlab.arena import leaderboard
    p = sub.add_parser("arena", help="train every sequence mechanism on a task, time it, and rank it (leaderboard)")
    leaderboard.add_arguments(p)
    p.set_defaults(func=leaderboard.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    from attnlab._extras import MissingExtra, require
    try:
        require("lab", "rich", "matplotlib", "safetensors", what="the attnlab command line")
    except MissingExtra as e:
        print(f"attnlab: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "takes_extra", False):
        return args.func(args, extra)       # a claim's own options are parsed by the claim
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
