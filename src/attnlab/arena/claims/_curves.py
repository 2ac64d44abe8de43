"""Learning curves for claim pages: every claim shows its baseline learning, beside a known point.

    fig = curve_figure(out / "NAME_curves.png", {"mhsa": [(step, value), ...], ...},
                       references={"bigram counts": 2.48}, ylabel="val loss (nats/char)")
    budget = flattening("mhsa", curve, higher_is_better=False)   # a sentence for Report.budget

A curve is a list of (step, value) pairs; a label may hold several seeds' curves (a list of
curves), drawn thin, with their mean drawn thick. References are horizontal dashed lines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from attnlab._io import save_figure

Curve = Sequence[tuple[float, float]]


def _is_curve(c) -> bool:
    return len(c) > 0 and isinstance(c[0], (tuple, list)) and len(c[0]) == 2 and \
        not isinstance(c[0][0], (tuple, list))


def _as_seeds(curves) -> list[list[tuple[float, float]]]:
    if _is_curve(curves):
        return [[(float(a), float(b)) for a, b in curves]]
    return [[(float(a), float(b)) for a, b in c] for c in curves if len(c)]


def mean_curve(curves) -> list[tuple[float, float]]:
    """Pointwise mean over seeds' curves at the steps all of them share."""
    seeds = _as_seeds(curves)
    if not seeds:
        return []
    shared = set(s for s, _ in seeds[0])
    for c in seeds[1:]:
        shared &= set(s for s, _ in c)
    by_seed = [dict(c) for c in seeds]
    return [(s, sum(d[s] for d in by_seed) / len(by_seed)) for s in sorted(shared)]


def curve_figure(path: Path, curves: dict[str, object], *, references: dict[str, float] | None = None,
                 ylabel: str, title: str = "", xlabel: str = "step", logy: bool = False) -> Path:
    """Write a PNG of `curves` ({label: curve or [curve per seed]}) with reference lines; returns path."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("curve_figure needs at least one curve")
    colors = matplotlib.colormaps["tab10"].colors
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, c) in enumerate(curves.items()):
        seeds = _as_seeds(c)
        color = colors[i % len(colors)]
        if len(seeds) > 1:
            for s in seeds:
                ax.plot(*zip(*s), color=color, alpha=0.3, linewidth=0.8)
        mean = mean_curve(seeds)
        if mean:
            ax.plot(*zip(*mean), color=color, linewidth=1.8,
                    label=label + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""))
    for j, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color="0.35", linestyle=("--", ":", "-.")[j % 3], linewidth=1.0, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def flattening(label: str, curves, *, higher_is_better: bool, tail: float = 0.25,
               threshold: float | None = None, unit: str = "step",
               still_improving: str = "was still improving (the verdict is provisional)") -> str:
    """One sentence on whether `curves` (mean over seeds) had flattened by the end of the budget.

    Compares the last point with the point `tail` of the way back from the end: the change over
    the last quarter of the steps by default. `threshold` (in the metric's units) decides the word.
    `unit` names the x axis ("step", "log2 n"); `still_improving` is the phrase for a curve that
    had not flattened (a claim about a fixed budget, not convergence, says why that is fine).
    """
    mean = mean_curve(curves)
    if len(mean) < 3:
        return f"{label}: too few evaluations to judge whether the curve flattened."
    last_step, last = mean[-1]
    back = last_step - tail * (last_step - mean[0][0])
    ref_step, ref = min(mean, key=lambda p: abs(p[0] - back))
    change = last - ref
    gain = change if higher_is_better else -change
    if threshold is None:
        threshold = 0.01 * max(abs(last), 1e-12)
    state = "had flattened" if gain <= threshold else still_improving
    return (f"{label} {state} by {unit} {last_step:g}: {ref:.4g} at {unit} {ref_step:g} -> {last:.4g} "
            f"({change:+.3g} over the last {tail:.0%} of the range).")
