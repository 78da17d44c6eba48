"""The report of a run: report.json's body assembled from the run, the stage records, the shipped
files, their verification and their benchmark (exporters/report.py writes it as report.json and
report.md). Assembly reads the layer table, surgery's reasons and the files themselves, which
`exporters` may not import, so it lives here, beside the pipeline that calls it.
"""
from __future__ import annotations

import numpy as np

from compressor.core._tf import keras
from compressor.data.sources import Dataset
from compressor.run import goal
from compressor.train import distribute
from compressor.train.training import count_params


def assemble(run, pruned: keras.Model, records: list[dict], shipped, verification: list[dict], results: list[dict],
             frontier_files: dict[str, list[str]], source: str = "model", load_notes: list[str] | None = None) -> dict:
    """report.json's body (CONTRACTS.md fixes its fields)."""
    from exporters import ship
    from exporters.benchmark import machine_info

    task, data, model = run.task, run.data, run.model
    params, _ = count_params(model)
    search = search_results(records, frontier_files)
    goal_check, goal_notes = goal.check(run.recipe, results, search.get("frontier", []), _search_notes(records), task)
    return {
        "tool_version": _version(),
        "machine": machine_info(),
        "model": {"source": source, "input_shape": [None, *model.input_shape[1:]], "params": params,
                  "load_notes": list(load_notes or [])},
        "data": {"name": data.name, **data.sizes(), "budget_split": "x_val" if data.has_val else "x_test",
                 "streamed": not isinstance(data, Dataset)},
        "recipe": run.recipe.model_dump(mode="json"),
        "unit_multiple": run.recipe.unit_multiple(),  # round_units as applied on this machine
        "metric": task.describe(),
        "baseline": {"accuracy": run.baseline.value if task.is_accuracy else None,
                     "metric": {"value": run.baseline.value, "per_output": run.baseline.per_output,
                                "budget_split": run.budget_baseline}},
        "stages": records,
        "layers": _layer_table(run.dense, pruned),
        "results": results,
        "verification": verification,
        "execution": _execution_table(shipped.artifacts),
        "int8": shipped.int8,
        "int8_notes": ship.int8_verdicts(results, shipped.int8),  # shown in report.md and the CLI summary
        "baseline_notes": undertrained_baseline(task, run.budget_baseline, records),  # likewise
        "target_notes": shipped.notes,
        "distribute": distribute.describe(),
        "goal_check": goal_check,  # the shipped file against a speed goal (None: no goal)
        "goal_notes": goal_notes,  # one line when the shipped file misses it; report.md and the summary show it
        **search,
    }


def _search_notes(records: list[dict]) -> list[str]:
    return next((r["notes"] for r in records if r["name"] == "search"), [])


def worker_report(run, records: list[dict]) -> dict:
    """A non-chief worker's share: its training is done; export and benchmarks are the chief's."""
    return {"distribute": distribute.describe(), "baseline": {"metric": {"value": run.baseline.value}},
            "stages": records}


UNDERTRAINED_GAIN = 5  # stages beating the dense model by this many budgets: the budget guards nothing


def undertrained_baseline(task, baseline: float, records: list[dict]) -> list[str]:
    """One line when the stages' own fine-tunes lifted the metric far above the dense model's.
    The budget counts from the dense model, so a search may then ship a model that gave most of that
    gain back for speed: within budget, yet worse than a stage the run already had. The fix is the
    user's (train the dense model to convergence), so the run says so instead of hiding it."""
    scored = [(r["metric_after"], r["name"]) for r in records if r.get("metric_after") is not None]
    if not scored:
        return []
    best, stage = min(scored, key=lambda pair: task.drop(baseline, pair[0]))
    if -task.drop(baseline, best) <= UNDERTRAINED_GAIN * task.budget:
        return []
    return [f"the dense model looks undertrained: this run's fine-tunes raised {task.name} from {baseline:.4f} to "
            f"{best:.4f} (after {stage}), but the budget counts from the dense model, so any {task.name} "
            f"{'down' if task.direction == 'higher' else 'up'} to {task.limit(baseline):.4f} passes "
            f"(shipped: {scored[-1][0]:.4f}); train the dense model longer, then compress it"]


def search_results(stage_records: list[dict], files: dict[str, list[str]]) -> dict:
    """The search stage's operating points and latency-model check, lifted to report.json's top level;
    each kept point's row names its files (relative to the output folder)."""
    from compressor.stages.search import point_label

    search = next((r for r in stage_records if r["name"] == "search" and r["details"].get("frontier")), None)
    if search is None:
        return {}
    frontier = search["details"]["frontier"]
    for i, row in enumerate(frontier):
        row["point"] = point_label(i, row)
        if row["point"] in files:
            row["files"] = files[row["point"]]
        elif i == search["details"].get("chosen"):
            row["files"] = ["pruned.keras"]  # the shipped point: the top-level files
    return {"frontier": frontier, "latency_model": search["details"].get("latency_model", [])}


def _execution_table(artifacts) -> list[dict]:
    """Per weight tensor of every file: how it is stored and whether the sparse kernel runs on it,
    read from the file itself (the same decoding `compressor inspect` shows)."""
    from exporters.inspect import inspect_file

    rows = []
    for art in artifacts:
        if art.variant == "dense":
            continue
        for t in inspect_file(art.path)["tensors"]:
            if len(t["shape"]) < 2:
                continue
            rows.append({"file": art.path.name, "tensor": t["name"], "shape": t["shape"], "dtype": t["dtype"],
                         "sparsity": t["sparsity"], "storage": t["storage"], "block": t["block"],
                         "sparse_kernel": t["sparse_kernel"], "note": t["note"]})
    return rows


def _layer_table(dense: keras.Model, pruned: keras.Model) -> list[dict]:
    """Units and kernel sparsity per producer layer, before and after, and why a layer could not shrink."""
    from compressor.graph.surgery import shrink_reasons
    from compressor.layers import handler_for

    reasons = shrink_reasons(dense)
    rows = []
    for layer in dense.layers:
        handler = handler_for(layer, exact=False)
        if handler is None or _kernels(layer) is None:
            continue
        try:
            after = pruned.get_layer(layer.name)
        except ValueError:
            after = None
        k0, k1 = _kernels(layer), (_kernels(after) if after is not None else None)
        units = handler.units(layer)
        rows.append({
            "layer": layer.name, "type": type(layer).__name__,
            "units_before": int(units if units is not None else k0.shape[-1]),
            "units_after": 0 if after is None else int(handler.units(after) if units is not None else k1.shape[-1]),
            "sparsity_before": float(np.mean(k0 == 0)),
            "sparsity_after": float(np.mean(k1 == 0)) if k1 is not None else 1.0,
            "params_before": int(k0.size), "params_after": int(k1.size) if k1 is not None else 0,
            **reasons.get(layer.name, {"coupled_with": [], "kept_because": "its width follows its input"}),
        })
    return rows


def _kernels(layer) -> np.ndarray | None:
    """Every kernel (rank >= 2 weight) of the layer, flattened into one array (None if it has none)."""
    kernels = [w.numpy().ravel() for w in layer.weights if len(w.shape) >= 2]
    return np.concatenate(kernels) if kernels else None


def _version() -> str:
    from compressor import __version__

    return __version__
