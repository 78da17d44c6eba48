"""report.json (the contract in CONTRACTS.md), report.md (side-by-side tables) and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exporters.files import jsonable, write_text_atomic


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def dense_row(results: list[dict], row: dict) -> dict | None:
    """The dense baseline measured beside `row`: same runtime, batch and threads."""
    return next((d for d in results if d["variant"] == "dense" and d["runtime"] == row["runtime"]
                 and d["batch"] == row["batch"] and d["threads"] == row["threads"]), None)


def quality(row: dict) -> float:
    """A result row's metric value (older rows: accuracy)."""
    return row["metric"]["value"] if row.get("metric") else row["accuracy"]


def metric_drop(base: dict, row: dict) -> float:
    """How much worse `row` scores than `base` in the metric's units (negative: better)."""
    higher = (row.get("metric") or {}).get("direction", "higher") == "higher"
    return quality(base) - quality(row) if higher else quality(row) - quality(base)


def comparisons(results: list[dict], correct: dict[str, np.ndarray], max_drop: float) -> list[dict]:
    """Each non-dense row against the dense row of the same runtime, batch and threads, with the
    paired (McNemar) verdict on the budget where it applies (per-sample correctness of single-output
    classification in `correct`); every task gets the drop in its metric."""
    from exporters.stats import within_budget

    rows = []
    for r in results:
        base = dense_row(results, r)
        if r["variant"] == "dense" or base is None:
            continue
        paired = (within_budget(correct[base["file"]], correct[r["file"]], max_drop)
                  if base["file"] in correct and r["file"] in correct else None)
        drop = metric_drop(base, r)
        rows.append({
            "variant": r["variant"], "runtime": r["runtime"], "batch": r["batch"], "threads": r["threads"],
            "speedup_p50": base["latency_ms"]["p50"] / r["latency_ms"]["p50"] if r["latency_ms"]["p50"] else None,
            "size_ratio_gzip": base["gzip_bytes"] / r["gzip_bytes"] if r["gzip_bytes"] else None,
            "size_ratio_raw": base["size_bytes"] / r["size_bytes"] if r["size_bytes"] else None,
            "ideal_speedup": base["flops"] / r["flops"] if r["flops"] else None,
            "accuracy_drop": base["accuracy"] - r["accuracy"] if r.get("accuracy") is not None else None,
            "metric_drop": drop, "within_budget": drop <= max_drop,
            "paired_test": paired,
        })
    return rows


def _header(report: dict) -> list[str]:
    """Title, machine, and the baseline with the budget in the metric's units."""
    lines = [f"# Compression report: {report['model']['source']}", ""]
    m = report["machine"]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; "
              + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
              + (f"; ISA: {' '.join(m['isa'])}" if m.get("isa") else ""), ""]
    metric = _metric(report)
    budget = (f"accuracy budget: {metric['budget'] * 100:.1f} points" if report["baseline"].get("accuracy") is not None
              else f"budget: {metric['budget']:g} {metric['name']} ({metric['direction']} is better)")
    on = f" (output '{metric['output']}')" if len(metric.get("per_output") or []) > 1 else ""
    lines += [f"Dense baseline test {metric['name']}{on}: **{_baseline(report):.4f}**; targets: "
              f"{', '.join(report['recipe']['targets'])}; {budget}{_multiple(report)}.", ""]
    said = report.get("goal_notes", []) + report.get("baseline_notes", [])
    return lines + [f"**Note: {line}**" for line in said] + ([""] if said else [])


def _multiple(report: dict) -> str:
    if not report.get("unit_multiple"):
        return ""
    auto = (" (round_units auto: the targets' channel block on this CPU)"
            if report["recipe"].get("round_units") == "auto" else "")
    return f"; narrowed widths kept at multiples of {report['unit_multiple']}{auto}"


def render_markdown(report: dict, plots: list[str]) -> str:
    lines = _header(report)
    lines += _results_section(report)
    lines += _int8_section(report)
    lines += _comparisons_section(report)
    lines += _stages_section(report)
    lines += _weight_choices(report)
    lines += _depth_section(report)
    lines += _layers_section(report)
    lines += _verification_section(report)
    lines += _execution_section(report)
    lines += _frontier_section(report)
    notes = [n for r in report["results"] for n in r.get("notes", [])] + report.get("target_notes", [])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "Latency: interleaved runs in one process after warm-up; compare ratios, not absolute times.", ""]
    return "\n".join(lines)


def _accuracy_task(report: dict) -> bool:
    return report["baseline"].get("accuracy") is not None


def _results_section(report: dict) -> list[str]:
    results, metric = report["results"], _metric(report)
    outputs = len(metric.get("per_output") or [None])
    column = ("accuracy (95% CI)" if _accuracy_task(report) and outputs == 1
              else f"{metric['name']}" + (" (every output's metric)" if outputs > 1 else ""))
    lines = ["## Side by side (batch 1, 1 thread unless noted)", "",
             f"| variant | runtime | file | {column} | p50 ms | p90 ms | p99 ms | speedup p50 | size | gzip | "
             "gzip ratio | params | non-zero | MACs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = dense_row(results, r) or r
        lat = r["latency_ms"]
        tag = "" if (r["batch"], r["threads"]) == (1, 1) else f" (b{r['batch']}, t{r['threads']})"
        lines.append(
            f"| {r['variant']}{tag} | {r['runtime']} | {r['file']} | {_quality_cell(r)} | "
            f"{lat['p50']:.4f} | {lat['p90']:.4f} | {lat['p99']:.4f} | "
            f"{_ratio(base['latency_ms']['p50'], lat['p50'])} | "
            f"{r['size_bytes']:,} | {r['gzip_bytes']:,} | {_ratio(base['gzip_bytes'], r['gzip_bytes'])} | "
            f"{r['params']:,} | {r['nonzero_params']:,} | {r['flops']:,} |")
    return lines


def _comparisons_section(report: dict) -> list[str]:
    comps, accuracy_task = report.get("comparisons", []), _accuracy_task(report)
    if not comps:
        return []
    lines = ["", "## Against the dense baseline", "",
             "| variant | runtime | batch | threads | speedup p50 | ideal (structural MAC ratio) | of ideal | "
             "gzip smaller | " + ("accuracy drop (points)" if accuracy_task else f"{_metric(report)['name']} drop")
             + " | McNemar p | budget |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        frac = (c["speedup_p50"] / c["ideal_speedup"]) if c["speedup_p50"] and c["ideal_speedup"] else None
        p = c["paired_test"]["p_value"] if c["paired_test"] else None
        verdict = (c["paired_test"]["verdict"].replace("_", " ") if c["paired_test"]
                   else "within" if c.get("within_budget") else "over")
        drop = f"{c['accuracy_drop'] * 100:+.2f}" if accuracy_task else f"{c['metric_drop']:+.4g}"
        lines.append(
            f"| {c['variant']} | {c['runtime']} | {c['batch']} | {c['threads']} | {c['speedup_p50']:.2f}x | "
            f"{c['ideal_speedup']:.2f}x | {'' if frac is None else f'{frac:.0%}'} | {c['size_ratio_gzip']:.2f}x | "
            f"{drop} | {'' if p is None else f'{p:.3f}'} | {verdict} |")
    return lines


def _stages_section(report: dict) -> list[str]:
    lines = ["", "## Stages", "", f"| stage | amount | params before | params after | non-zero after | "
             f"{_metric(report)['name']} after | seconds | notes |", "|---|---|---|---|---|---|---|---|"]
    for s in report["stages"]:
        after = s.get("metric_after", s.get("accuracy_after"))
        lines.append(f"| {s['name']} | {s['amount']:.0%} | {s['params_before']:,} | {s['params_after']:,} | "
                     f"{s['nonzero_after']:,} | {after:.4f} | {s['seconds']:.1f} | {'; '.join(s['notes'])} |")
    return lines


def _layers_section(report: dict) -> list[str]:
    lines = ["", "## Layers", "", "| layer | type | units before | units after | sparsity before | sparsity after | "
             "kernel params before | after | shrinks with | kept because |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["layers"]:
        lines.append(f"| {row['layer']} | {row['type']} | {row['units_before']} | {row['units_after']} | "
                     f"{row['sparsity_before']:.1%} | {row['sparsity_after']:.1%} | {row['params_before']:,} | "
                     f"{row['params_after']:,} | {', '.join(row.get('coupled_with', [])) or '–'} | "
                     f"{row.get('kept_because') or '–'} |")
    return lines


def _verification_section(report: dict) -> list[str]:
    lines = ["", "## Verification", "", "| file | max abs diff | prediction agreement | zeros expected | "
             "zeros in file | ok |", "|---|---|---|---|---|---|"]
    for v in report["verification"]:
        ok = (f"ok ({v['note']})" if v.get("note") else "ok") if v["ok"] else f"FAILED: {v.get('problem', '')}"
        lines.append(f"| {v['file']} | {v['max_abs_diff']:.2e} | {v['prediction_agreement']:.2%} | "
                     f"{v['zeros_expected']:,} | {v['zeros_in_file']:,} | {ok} |")
    return lines


def _execution_section(report: dict) -> list[str]:
    if not report.get("execution"):
        return []
    lines = ["", "## How each pruned weight is stored and run (read back from the files)", "",
             "| file | tensor | shape | dtype | sparsity | storage | sparse kernel runs | note |",
             "|---|---|---|---|---|---|---|---|"]
    for e in report["execution"]:
        storage = e["storage"] + (f" {e['block'][0]}x{e['block'][1]}" if e.get("block") else "")
        runs = {True: "yes", False: "no", None: "n/a"}[e["sparse_kernel"]]
        name = e["tensor"] if len(e["tensor"]) <= 48 else "…" + e["tensor"][-47:]
        lines.append(f"| {e['file']} | {name} | {'x'.join(map(str, e['shape']))} | {e['dtype']} | "
                     f"{e['sparsity']:.1%} | {storage} | {runs} | {e['note']} |")
    return lines


def _frontier_section(report: dict) -> list[str]:
    if not report.get("frontier"):
        return []
    from exporters.frontier_plot import frontier_table

    return ["", "## Frontier (search stage: operating points, measured on each runtime)", "",
            frontier_table(report, _baseline(report)), "",
            "Latency model, predicted vs measured p50 (error): " + ", ".join(
                f"{m['runtime']} {m['model']} {m['error_pct']:+.1f}%" for m in report.get("latency_model", []))]


def _metric(report: dict) -> dict:
    """The report's metric (name, direction, budget); reports written before metrics: accuracy."""
    return report.get("metric") or {"name": "accuracy", "direction": "higher",
                                     "budget": report.get("recipe", {}).get("max_accuracy_drop", 0.01)}


def _baseline(report: dict) -> float:
    metric = report["baseline"].get("metric")
    return metric["value"] if metric else report["baseline"]["accuracy"]


def _quality_cell(r: dict) -> str:
    """Accuracy with its Wilson interval, or the metric (every output's, for multi-output models)."""
    ci = r.get("accuracy_ci95")
    if r.get("accuracy") is not None and ci:
        return f"{r['accuracy']:.4f} ({ci[0]:.3f}-{ci[1]:.3f})"
    per = (r.get("metric") or {}).get("per_output") or []
    if len(per) > 1:
        return ", ".join(f"{p['output']} {p['metric']} {p['value']:.4f}" for p in per)
    return f"{quality(r):.4f}"


def _weight_choices(report: dict) -> list[str]:
    """Per kernel the weight stage left without zeros, and why (zeros there would buy size only)."""
    rows = [(name, reason) for s in report["stages"] if s["name"] == "weight"
            for name, reason in s["details"].get("left_dense", {}).items()]
    if not rows:
        return []
    return ["", "## Weight stage: kernels left without zeros", "", "| layer | why |", "|---|---|",
            *[f"| {name} | {reason} |" for name, reason in rows]]


def _depth_section(report: dict) -> list[str]:
    """Per residual block the depth stage removed: its branch layers, score and MACs saved."""
    rows = [b for s in report["stages"] if s["name"] == "depth" for b in s["details"].get("removed_blocks", [])]
    if not rows:
        return []
    return ["", "## Depth stage: residual blocks removed (output of the Add = its skip input)", "",
            "| Add | branch layers | output KL without it alone | relative branch norm | MACs removed |",
            "|---|---|---|---|---|",
            *[f"| {b['add']} | {len(b['layers'])} ({b['layers'][0]} … {b['layers'][-1]}) | {b['output_kl']:+.4f} | "
              f"{b['branch_norm']:.3f} | {b['macs']:,} |" for b in rows]]


def _int8_section(report: dict) -> list[str]:
    """Which int8 scheme each runtime got, the measured candidates, and a line when int8 is no faster."""
    records = report.get("int8") or []
    if not records:
        return []
    lines = ["", "## int8 schemes (measured on this model at batch 1)", ""]
    lines += [f"**{line}**" for line in report.get("int8_notes", [])]
    if report.get("int8_notes"):
        lines.append("")
    lines += [f"| target | scheme | {_metric(report)['name']} (budget split) | p50 ms | chosen | note |",
              "|---|---|---|---|---|---|"]
    for rec in records:
        for c in rec["candidates"]:
            value = c.get("metric", c.get("accuracy"))
            acc = "" if value is None else f"{value:.4f}"
            p50 = "" if c.get("p50_ms") is None else f"{c['p50_ms']:.4f}"
            lines.append(f"| {rec['target']} | {c['scheme']} | {acc} | {p50} | "
                         f"{'yes' if c['scheme'] == rec['chosen'] else ''} | {c.get('skipped') or ''} |")
        reference = rec.get("reference_metric", rec.get("reference_accuracy"))
        lines.append(f"| {rec['target']} | float ({rec['float_file']}) | {reference:.4f} (Keras) | "
                     f"{rec['float_p50_ms']:.4f} | | reference |")
    return lines


def write_reports(report: dict, out: Path, correct: dict[str, np.ndarray]) -> None:
    from exporters.plots import plot_accuracy_vs_size, plot_latency, plot_layers

    report["comparisons"] = comparisons(report["results"], correct, _metric(report)["budget"])
    plots = [
        plot_latency(report["results"], out / "latency.png"),
        plot_accuracy_vs_size(report["results"], out / "accuracy_vs_size.png"),
        plot_layers(report["layers"], out / "layers.png"),
    ]
    if report.get("frontier"):
        from exporters.frontier_plot import plot_frontier

        plots.append(plot_frontier(report, out / "frontier.png", _baseline(report)))
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=jsonable))
    write_text_atomic(out / "report.md", render_markdown(report, [str(p) for p in plots]))
