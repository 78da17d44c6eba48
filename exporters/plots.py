"""PNG charts for the report.

Uses matplotlib's object API (Figure + Agg canvas) rather than pyplot: no global backend or
figure state, so it is safe on headless machines and when called repeatedly in one process.
Files are written atomically (temp file in the same folder, then os.replace) so a crash never
leaves a half-written PNG where the report expects a finished one.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from exporters import targets
from exporters.files import write_bytes_atomic

__all__ = ["plot_latency", "plot_accuracy_vs_size", "plot_layers"]

_DPI = 110
# one colour and marker per runtime, in the registry's order (exporters/targets.py)
_RUNTIME_COLORS = dict(zip(targets.RUNTIMES, ("tab:blue", "tab:orange", "tab:green", "tab:purple")))
_RUNTIME_MARKERS = dict(zip(targets.RUNTIMES, ("o", "s", "D", "v")))


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    """Render in memory, then write atomically (temp file beside `path`, then rename)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return write_bytes_atomic(path, buffer.getvalue())


def _color(runtime: str) -> str:
    return _RUNTIME_COLORS.get(runtime, "tab:gray")


def _empty(ax, message: str) -> None:
    """Say why a chart is blank instead of failing the whole report."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _select(results, batch, threads) -> list[dict]:
    """Rows at the given batch/threads (None = any); rows lacking the keys count as 1/1."""
    rows = []
    for r in results:
        if batch is not None and r.get("batch", 1) != batch:
            continue
        if threads is not None and r.get("threads", 1) != threads:
            continue
        rows.append(r)
    return rows


def plot_latency(results: list[dict], path, batch: int | None = 1,
                 threads: int | None = 1) -> Path:
    """Bar per (variant, runtime) at p50, whisker up to p90 (tail latency matters on device).

    Defaults to batch 1 / 1 thread so variants are compared like for like; pass None to
    include every configuration (labels then carry batch and threads).
    """
    rows = [r for r in _select(results, batch, threads)
            if (r.get("latency_ms") or {}).get("p50") is not None]
    fig = _new_figure(max(5.0, 0.9 * len(rows) + 2.0), 4.0)
    ax = fig.add_subplot()
    if not rows:
        _empty(ax, "no latency results to plot")
        return _save(fig, path)

    show_cfg = batch is None or threads is None
    labels, p50, p90, colors = [], [], [], []
    for r in rows:
        lat = r["latency_ms"]
        label = f"{r.get('variant', '?')}\n{r.get('runtime', '?')}"
        if show_cfg:
            label += f"\nb{r.get('batch', 1)} t{r.get('threads', 1)}"
        labels.append(label)
        p50.append(float(lat["p50"]))
        p90.append(float(lat.get("p90", lat["p50"])))
        colors.append(_color(r.get("runtime", "")))
    x = np.arange(len(rows))
    p50_arr, p90_arr = np.array(p50), np.array(p90)
    ax.bar(x, p50_arr, color=colors, width=0.6)
    ax.errorbar(x, p50_arr, yerr=[np.zeros_like(p50_arr), np.maximum(p90_arr - p50_arr, 0)],
                fmt="none", ecolor="black", capsize=4)
    ax.scatter(x, p90_arr, marker="_", s=200, color="black", zorder=3)
    for xi, v in zip(x, p50_arr):  # value inside the bar, clear of the whisker
        ax.annotate(f"{v:.3g}", (xi, v / 2), ha="center", va="center", fontsize=7,
                    color="white", fontweight="bold")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("latency (ms)")
    cfg = "" if show_cfg else f" (batch {batch}, {threads} thread{'s' if threads != 1 else ''})"
    ax.set_title(f"Inference latency, p50 bar, p90 whisker{cfg}")
    ax.set_ylim(0, float(max(p90_arr.max(), p50_arr.max())) * 1.2)  # headroom for legend
    # Bars are coloured by runtime, so the legend explains colours, not series.
    handles = [Patch(color=_color(rt), label=f"{rt} p50")
               for rt in dict.fromkeys(r.get("runtime", "") for r in rows)]
    handles.append(Line2D([], [], color="black", marker="_", markersize=12, label="p90"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, ncols=len(handles))
    return _save(fig, path)


def plot_accuracy_vs_size(results: list[dict], path) -> Path:
    """Accuracy (or the recipe's metric) against gzip size (log scale): the trade-off pruning is meant to win.

    gzip size rather than raw size because zeros only shrink a file once compressed. Rows for
    other batch sizes/threads repeat the same point, so each (variant, runtime) is drawn once.
    """
    seen, points = set(), []
    name = next(((r.get("metric") or {}).get("name") for r in results if r.get("accuracy") is None
                 and r.get("metric")), None) or "accuracy"
    for r in results:
        key = (r.get("variant"), r.get("runtime"))
        size = r.get("gzip_bytes")
        acc = r.get("accuracy") if name == "accuracy" else r["metric"]["value"]
        if key in seen or size is None or acc is None or size <= 0:
            continue
        seen.add(key)
        points.append((key, float(size), float(acc)))

    fig = _new_figure(6.0, 4.2)
    ax = fig.add_subplot()
    if not points:
        _empty(ax, f"no rows with gzip_bytes and {name}")
        return _save(fig, path)

    # The same variant on two runtimes sits at nearly the same spot, so each runtime's labels
    # go on a different side of the point (runtime itself is in the marker and legend).
    runtimes = sorted({k[1] or "" for k, _, _ in points})
    for i, runtime in enumerate(runtimes):
        sel = [(k, s, a) for k, s, a in points if (k[1] or "") == runtime]
        ax.scatter([s for _, s, _ in sel], [a for _, _, a in sel], color=_color(runtime),
                   marker=_RUNTIME_MARKERS.get(runtime, "^"), s=45, label=runtime or "?",
                   zorder=3)
        above = i % 2 == 0
        for (variant, _), s, a in sel:
            ax.annotate(f"{variant}/{runtime}", (s, a), xytext=(5, 6 if above else -6),
                        textcoords="offset points", fontsize=7,
                        va="bottom" if above else "top", color=_color(runtime))
    ax.set_xscale("log")
    ax.margins(y=0.15)  # keep labels above/below the extreme points inside the axes
    sizes = np.array([s for _, s, _ in points])
    ax.set_xlim(sizes.min() / 1.6, sizes.max() * 1.6)  # room for labels, also for one point
    ax.set_xlabel("gzip size (bytes, log scale)")
    ax.set_ylabel(f"test {name}")
    ax.set_title(f"{name} vs compressed size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layers(layers: list[dict], path) -> Path:
    """Per-layer widths and sparsity before/after pruning, in two stacked panels.

    Width shows structural (unit/filter) pruning, sparsity shows weight pruning; a fusion
    recipe does both, and neither panel alone tells the story. Sparsity is a fraction 0..1,
    drawn as a percentage.
    """
    fig = _new_figure(max(6.0, 0.7 * len(layers) + 2.0), 6.0)
    ax_w, ax_s = fig.subplots(2, 1, sharex=True)
    if not layers:
        _empty(ax_w, "no layers")
        _empty(ax_s, "no layers")
        return _save(fig, path)

    names = [str(r.get("layer", i)) for i, r in enumerate(layers)]
    x = np.arange(len(layers))
    w = 0.38

    def col(key):
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in layers])

    ax_w.bar(x - w / 2, col("units_before"), w, label="before", color="tab:gray")
    ax_w.bar(x + w / 2, col("units_after"), w, label="after", color="tab:green")
    ax_w.set_ylabel("units / filters")
    ax_w.set_title("Layer width")
    ax_w.legend(fontsize=8)

    ax_s.bar(x - w / 2, 100 * col("sparsity_before"), w, label="before", color="tab:gray")
    ax_s.bar(x + w / 2, 100 * col("sparsity_after"), w, label="after", color="tab:red")
    ax_s.set_ylabel("zero weights (%)")
    ax_s.set_ylim(0, 100)
    ax_s.set_title("Weight sparsity")
    ax_s.legend(fontsize=8)
    ax_s.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right"
                    if len(names) > 4 else "center", fontsize=8)
    return _save(fig, path)
