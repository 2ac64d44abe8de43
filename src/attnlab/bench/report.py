"""The rows of `attnlab bench` and how they are shown: JSON fields, the rich table, the plot.

A row reports median times and, against the baseline, the median over rounds of the two modules'
paired time ratio; GFLOP/s from the FLOPs the memory job counted and the median times.
rich and matplotlib are imported by the functions that print and plot.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from attnlab._io import fmt, save_figure


def median(samples: list[float] | None) -> float | None:
    return statistics.median(samples) if samples else None


def iqr(samples: list[float] | None) -> float | None:
    if not samples or len(samples) < 2:
        return None
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[2] - q[0]


def paired_ratio(samples: list[float] | None, base: list[float] | None) -> float | None:
    """Median over rounds of this module's time over the baseline's time in the same round.

    The two were measured moments apart, so load that comes and goes on a shared machine cancels
    within each pair; on a quiet machine this is close to the ratio of the median times.
    """
    if not samples or not base or len(samples) != len(base):
        return None
    return statistics.median([a / b for a, b in zip(samples, base)])


def gflops(flops: float | None, ms: float | None) -> float | None:
    return flops / (ms * 1e-3) / 1e9 if flops and ms else None


def row(name: str, shape: dict[str, Any], timing: dict[str, Any], memory: dict[str, Any],
         base: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    ok = timing.get("status") == "ok"
    fwd, fwd_bwd = (timing["fwd_ms"], timing["fwd_bwd_ms"]) if ok else (None, None)
    flops_fwd, flops_bwd = memory.get("flops_fwd"), memory.get("flops_bwd")
    row = {"mechanism": name, "is_baseline": name == common["baseline"], **shape, **common,
           "status": "ok" if ok else "skipped", "reason": None if ok else timing.get("reason", "not measured"),
           "repeats": len(fwd) if fwd else 0,
           "fwd_ms": median(fwd), "fwd_bwd_ms": median(fwd_bwd),
           "fwd_ms_iqr": iqr(fwd), "fwd_bwd_ms_iqr": iqr(fwd_bwd),
           "fwd_ratio": paired_ratio(fwd, base.get("fwd_ms")),
           "fwd_bwd_ratio": paired_ratio(fwd_bwd, base.get("fwd_bwd_ms")),
           "flops_fwd": flops_fwd, "flops_bwd": flops_bwd, "flops_source": memory.get("flops_source")}
    row["fwd_gflops"] = gflops(flops_fwd, row["fwd_ms"])
    row["fwd_bwd_gflops"] = gflops(flops_fwd + flops_bwd if flops_fwd is not None and flops_bwd is not None
                                    else None, row["fwd_bwd_ms"])
    row["peak_mem_mb"] = memory.get("peak_mem_mb")
    row["mem_method"] = memory.get("mem_method")
    row["notes"] = [memory["reason"]] if ok and memory.get("reason") else []
    return row


def rows(measured: dict[str, Any], entries: list[str], seq_lens: list[int], *, batch: int, heads: int,
         head_dim: int, common: dict[str, Any], options: dict[str, dict[str, Any]],
         pre_skipped: dict[str, str]) -> list[dict[str, Any]]:
    """One row per (N, entry), from `harness.measure`'s result; `pre_skipped` {name: reason} were
    not measured. `common`: baseline, dtype, causal, device, env, shared by every row."""
    timings, warmups, memories = measured["timings"], measured["warmups"], measured["memories"]
    out = []
    for n in seq_lens:
        shape = {"batch": batch, "seq_len": n, "heads": heads, "head_dim": head_dim, "dim": heads * head_dim}
        base = timings[n].get(common["baseline"], {})
        base = base if base.get("status") == "ok" else {}
        for name in entries:
            timing = ({"status": "skipped", "reason": pre_skipped[name]} if name in pre_skipped
                      else timings[n].get(name, {}))
            r = row(name, shape, timing, memories.get((n, name), {}), base, common)
            r["options"] = options.get(name, {})
            r["warmup"] = warmups.get(n)
            out.append(r)
    return out


def print_table(rows: list[dict[str, Any]], title: str, console) -> None:
    from rich.table import Table
    table = Table(title=title)
    for col in ("mechanism", "N", "fwd ms", "x base", "fwd+bwd ms", "x base", "GFLOP/s", "peak MB", "note"):
        table.add_column(col, justify="left" if col in ("mechanism", "note") else "right")
    last_n = None
    for r in rows:
        if last_n is not None and r["seq_len"] != last_n:
            table.add_section()
        last_n = r["seq_len"]
        if r["status"] != "ok":
            note = f"skipped: {r['reason']}"
        else:
            note = "; ".join((["baseline"] if r["is_baseline"] else []) + r["notes"])
        table.add_row(r["mechanism"], str(r["seq_len"]), fmt(r["fwd_ms"], ".2f"), fmt(r["fwd_ratio"], ".3f"),
                      fmt(r["fwd_bwd_ms"], ".2f"), fmt(r["fwd_bwd_ratio"], ".3f"),
                      fmt(r["fwd_bwd_gflops"], ".1f"), fmt(r["peak_mem_mb"], ".1f"), note,
                      style="dim" if r["status"] != "ok" else None)
    console.print(table)
    console.print("times: medians; x base: median over rounds of time / baseline's time in the same round; "
                  "GFLOP/s and peak MB: forward+backward", style="dim", highlight=False)


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(8.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend is
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab20"].colors[::2] + matplotlib.colormaps["tab20"].colors[1::2]
    markers = "osD^v<>PX*"
    lines = 0
    for name in dict.fromkeys(r["mechanism"] for r in rows):
        mine = [r for r in rows if r["mechanism"] == name]
        pts = sorted((r["seq_len"], r["fwd_bwd_ms"]) for r in mine if r["status"] == "ok")
        if not pts:
            continue
        if mine[0]["is_baseline"]:
            style = dict(color="black", linestyle="--", marker="o", zorder=3, label=f"{name} (baseline)")
        else:
            style = dict(color=colors[lines % len(colors)], marker=markers[lines % len(markers)], label=name)
            lines += 1
        ax.plot([n for n, _ in pts], [t for _, t in pts], **style)
    if ax.lines:
        seq_lens = sorted({r["seq_len"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seq_lens, [str(n) for n in seq_lens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no successful measurements", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward + backward, median ms")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
