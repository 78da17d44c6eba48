"""The search stage's frontier: the task's metric (accuracy by default) vs measured p50 latency per
runtime, as a chart and a table.

Input is the search stage's `details` (frontier rows with `metric` (older rows: `accuracy`),
`measured_ms`, `dense_ms`, `start_ms`, `within_budget`, `widths`); the dense model (before any stage)
is marked and every point's speedup is shown over it, and over the start (the model the stages left).
`details["metric"]["name"]`, when present, labels the axis.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import NullFormatter

from exporters.plots import _RUNTIME_MARKERS, _color, _empty, _new_figure, _save

__all__ = ["plot_frontier", "frontier_table"]


def plot_frontier(details: dict, path, dense_accuracy: float | None = None) -> Path:
    """One series per runtime (log latency axis); hollow markers = points over the accuracy budget."""
    rows = details.get("frontier") or []
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    measured = [r for r in rows if r.get("measured_ms")]
    if not measured:
        _empty(ax, "no frontier points were measured")
        return _save(fig, path)
    runtimes = sorted({rt for r in measured for rt in r["measured_ms"]})
    for rt in runtimes:
        color, marker = _color(rt), _RUNTIME_MARKERS.get(rt, "o")
        pts = sorted((r["measured_ms"][rt], _value(r), r["within_budget"]) for r in measured if rt in r["measured_ms"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=1, alpha=0.6)
        for ms, acc, ok in pts:
            ax.scatter([ms], [acc], color=color if ok else "none", edgecolors=color, marker=marker, zorder=3)
        dense_ms = measured[0].get("dense_ms", {}).get(rt)
        if dense_ms is not None and dense_accuracy is not None:
            ax.scatter([dense_ms], [dense_accuracy], color=color, marker="*", s=160, zorder=4,
                       edgecolors="black", label=f"{rt} dense")
        start_ms = measured[0].get("start_ms", {}).get(rt)
        if start_ms is not None and start_ms != dense_ms:
            ax.axvline(start_ms, color=color, linestyle=":", linewidth=1, label=f"{rt} search start (after the stages)")
        ax.plot([], [], color=color, marker=marker, label=f"{rt} search points")
    ax.scatter([], [], color="none", edgecolors="gray", label="over the budget")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap on a short range
    ax.set_xlabel("p50 latency (ms, batch %d, measured)" % details.get("goal", {}).get("batch", 1))
    ax.set_ylabel(f"{_name(details)} (budget split)")
    ax.set_title(f"{_name(details)} vs latency: search frontier")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def frontier_table(details: dict, dense_accuracy: float | None = None) -> str:
    """Markdown: one row per operating point, measured and predicted p50 and speedup per runtime."""
    rows = details.get("frontier") or []
    if not rows:
        return "_no frontier points_\n"
    runtimes = sorted({rt for r in rows for rt in r.get("predicted_ms", {})})
    head = ["point", "goal", _name(details), "within budget"]
    for rt in runtimes:
        head += [f"{rt} p50 ms (pred.)", f"{rt} speedup vs dense (vs start)"]
    head.append("widths")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense_ms, start_ms = rows[0].get("dense_ms") or {}, rows[0].get("start_ms") or {}
    if dense_ms:
        cells = ["dense", "-", f"{dense_accuracy:.4f}" if dense_accuracy is not None else "-", "-"]
        for rt in runtimes:
            cells += [f"{dense_ms.get(rt, float('nan')):.4f}", "1.00x"]
        lines.append("| " + " | ".join(cells + ["-"]) + " |")
    if start_ms and start_ms != dense_ms:  # the model the earlier stages left, where the search began
        cells = ["start", "-", "-", "-"]
        for rt in runtimes:
            cells += [f"{start_ms.get(rt, float('nan')):.4f}", f"{_ratio(dense_ms, start_ms, rt)} (1.00x)"]
        lines.append("| " + " | ".join(cells + ["-"]) + " |")
    chosen = details.get("chosen")
    for i, r in enumerate(rows):
        shipped = i == chosen or r.get("files") == ["pruned.keras"]  # report.json marks it by its files
        label = f"**{i}** (shipped)" if shipped else str(i)
        cells = [label, f"{r['goal_speedup']:.2f}x", f"{_value(r):.4f}", "yes" if r["within_budget"] else "no"]
        for rt in runtimes:
            meas = r.get("measured_ms", {}).get(rt)
            pred = r.get("predicted_ms", {}).get(rt)
            cells.append(f"{meas:.4f} ({pred:.4f})" if meas is not None else f"- ({pred:.4f})")
            speed = r.get("measured_speedup", {}).get(rt)
            cells.append(f"{_ratio(dense_ms, r.get('measured_ms', {}), rt)} ({speed:.2f}x)" if speed is not None
                         else "-")
        cells.append(", ".join(f"{k} {v}" for k, v in r.get("widths", {}).items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _value(row: dict) -> float:
    return row["metric"] if row.get("metric") is not None else row["accuracy"]


def _name(details: dict) -> str:
    return (details.get("metric") or {}).get("name", "accuracy")


def _ratio(base: dict, other: dict, runtime: str) -> str:
    """base / other p50 on one runtime as "N.NNx", "-" when either was not measured."""
    if base.get(runtime) and other.get(runtime):
        return f"{base[runtime] / other[runtime]:.2f}x"
    return "-"
