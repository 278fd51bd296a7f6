"""The Pareto view: accuracy against measured latency over variants of one recipe (PNG, matplotlib Agg)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor.errors import CompressorError


@dataclass
class Point:
    """One measured variant. Latency in ms (p50 and its confidence interval), accuracy a fraction."""

    name: str
    accuracy: float
    latency_ms: float
    latency_low: float | None = None
    latency_high: float | None = None
    size_bytes: int | None = None


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both axes (at least as accurate and at least as fast, better
    on one), ordered by latency."""
    front = []
    for p in points:
        dominated = any(
            q is not p
            and q.accuracy >= p.accuracy
            and q.latency_ms <= p.latency_ms
            and (q.accuracy > p.accuracy or q.latency_ms < p.latency_ms)
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.latency_ms)


def plot_pareto(points: list[Point], path: Path, *, title: str = "Accuracy vs latency", where: str = "") -> Path:
    """Write a PNG: each variant with its latency CI as a horizontal error bar, the Pareto front as a step line."""
    if not points:
        raise CompressorError("nothing to plot: no variant was measured")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot global state, no display needed (CI, headless machines).
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    front = pareto_front(points)
    on_front = {id(p) for p in front}
    # Variants often tie on accuracy; stagger labels in latency order so neighbours do not overprint.
    offsets = [(6, 5), (6, -13), (6, 15), (6, -23)]
    rank = {id(p): i for i, p in enumerate(sorted(points, key=lambda p: p.latency_ms))}
    for p in points:
        xerr = None
        if p.latency_low is not None and p.latency_high is not None:
            xerr = [[max(p.latency_ms - p.latency_low, 0.0)], [max(p.latency_high - p.latency_ms, 0.0)]]
        color = "tab:blue" if id(p) in on_front else "tab:gray"
        ax.errorbar([p.latency_ms], [p.accuracy * 100], xerr=xerr, fmt="o", color=color, capsize=3)
        label = p.name + (f" ({p.size_bytes / 1e6:.3g} MB)" if p.size_bytes else "")
        ax.annotate(label, (p.latency_ms, p.accuracy * 100), textcoords="offset points",
                    xytext=offsets[rank[id(p)] % len(offsets)], fontsize=8)  # fmt: skip
    if len(front) > 1:
        ax.step([p.latency_ms for p in front], [p.accuracy * 100 for p in front], where="post",
                color="tab:blue", alpha=0.5, label="Pareto front")  # fmt: skip
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # Plain numbers (0.03, 0.1, 0.2) read better than 3×10⁻² on a latency axis.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.15)  # room for the labels
    ax.set_xlabel("latency p50, ms (log scale; bars: 95% CI)" + (f" — {where}" if where else ""))
    ax.set_ylabel("accuracy, held-out (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
