"""The `attnlab` command: list, info, bench, reproduce, train, arena."""
from __future__ import annotations

import argparse
import sys


def _cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from attnlab.registry import list_specs
    filters = {}
    if args.layout:
        filters["layout"] = args.layout
    table = Table(title="attnlab mechanisms")
    table.add_column("name", no_wrap=True)   # names are what users copy: never wrapped
    for col in ("paper", "year", "layout", "time", "memory", "exact", "causal", "mask", "cache"):
        table.add_column(col)
    table.add_column("provenance", no_wrap=True)  # official-code / paper / reconstruction
    for s in list_specs(**filters):
        yes = lambda b: "yes" if b else "-"  # noqa: E731
        table.add_row(s.name, s.paper, str(s.year), s.layout, s.time, s.memory, yes(s.exact),
                      yes(s.causal), yes(s.attn_mask), yes(s.kv_cache), s.provenance or "-")
    Console().print(table)
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
    from attnlab.bench import harness as bench

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
    from attnlab.arena import leaderboard
    p = sub.add_parser("arena", help="train every sequence mechanism on a task, time it, and rank it (leaderboard)")
    leaderboard.add_arguments(p)
    p.set_defaults(func=leaderboard.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "takes_extra", False):
        return args.func(args, extra)       # a claim's own options are parsed by the claim
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
