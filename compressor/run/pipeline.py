"""The fusion pipeline: load -> baseline -> stages under the budget -> export -> verify -> bench -> report.

This module only orchestrates; each step lives in its own module. The budget is counted in the
recipe's metric (top-1 accuracy by default, compressor/config/task.py) on the validation split, else the
test split, streamed batch by batch.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np

from compressor.train import distribute
from compressor.core._tf import keras
from compressor.data.checks import check_model
from compressor.data.sources import Dataset, check_against_model
from compressor.core.errors import CompressorError
from compressor.run.progress import Reporter
from compressor.config.recipe import Recipe
from compressor.stages.base import StageContext
from compressor.config.task import Task, context_task, resolve
from compressor.train.training import clone_with_weights, count_params
from exporters import ship

BACKOFF_AMOUNTS = (1.0, 0.75, 0.5, 0.25)
VERIFY_SAMPLES = 2000  # test samples every exported file is compared with Keras on (the first ones)


def _stage_module(name: str):
    """Stages are modules named after the recipe's stage names; each exposes `apply`."""
    return importlib.import_module(f"compressor.stages.{name}")


def _quality(task: Task, value: float) -> dict:
    """A stage record's quality fields: `accuracy_after` stays for classification, `metric_after` always."""
    return {"accuracy_after": value if task.is_accuracy else None, "metric_after": value}


def run_stages(model: keras.Model, recipe: Recipe, data: Dataset, reporter: Reporter,
               baseline_accuracy: float, task: Task | None = None, points: dict | None = None,
               checkpoint=None, resumed=None) -> tuple[keras.Model, list[dict]]:
    """Apply the recipe's stages in order; a stage that crosses the budget is retried with less.
    `baseline_accuracy`: the dense model's metric on the budget split (`task`'s; default top-1 accuracy).
    `points` (when given) collects the search's other frontier models, label -> model. Each finished
    stage is saved to `checkpoint` (compressor.run.checkpoint); `resumed` continues after its last one."""
    task = task or context_task(StageContext(recipe=recipe, data=data))
    ctx = StageContext(recipe=recipe, data=data, epoch_progress=reporter.epoch_callback, log=reporter.step,
                       baseline_accuracy=baseline_accuracy, task=task, dense_model=model, teacher=model)
    records, current, first = [], model, 0
    if resumed is not None:
        records, current, first = list(resumed.records), resumed.model, resumed.done
        if points is not None:
            points.update(resumed.points)
        reporter.step(f"resuming after stage {first}/{len(recipe.stages)} ({', '.join(r['name'] for r in records)})")
    for index, cfg in enumerate(recipe.stages):
        if index < first:
            continue
        module = _stage_module(cfg.name)
        params_before, nonzero_before = count_params(current)
        start = time.perf_counter()
        chosen, tried = None, []
        for amount in BACKOFF_AMOUNTS:
            keras.utils.set_random_seed(recipe.seed + index)
            reporter.step(f"stage {index + 1}/{len(recipe.stages)} {cfg.name} (amount {amount:.0%})")
            outcome = module.apply(current, cfg, ctx, amount=amount)
            acc = task.keras(outcome.model).value
            drop = task.drop(baseline_accuracy, acc)
            tried.append({"amount": amount, "accuracy": acc if task.is_accuracy else None, "metric": acc, "drop": drop})
            if drop <= task.budget:
                chosen = (amount, outcome, acc)
                break
            if outcome.details.get("removed", None) == 0:
                break  # nothing was removed, so a smaller amount cannot do better: skip the stage
            reporter.step(f"{cfg.name}: {task.name} drop {_amount(task, drop)} exceeds the {task.budget_text()} budget; "
                          "backing off")
        notes = []
        if chosen is None:
            why = ("it removed nothing and its fine-tuning alone" if tried[-1]["amount"] == 1.0
                   else "every amount it tried")
            notes.append(f"{cfg.name}: {why} crossed the {task.budget_text()} budget; stage skipped")
            reporter.warn(notes[-1])
            outcome_model, amount, details = current, 0.0, {}
            acc = task.keras(current).value
        else:
            amount, outcome, acc = chosen
            outcome_model, details = outcome.model, outcome.details
            if points is not None:
                points.update(outcome.points)
            notes.extend(outcome.notes)
            if amount < 1.0:
                notes.append(f"{cfg.name}: backed off to {amount:.0%} of the recipe's amount to stay within budget")
        params_after, nonzero_after = count_params(outcome_model)
        records.append({
            "name": cfg.name, "params_before": params_before, "params_after": params_after,
            "nonzero_before": nonzero_before, "nonzero_after": nonzero_after,
            **_quality(task, acc), "seconds": round(time.perf_counter() - start, 2),
            "amount": amount, "tried": tried, "details": details, "notes": notes,
        })
        current = outcome_model
        if checkpoint is not None:
            checkpoint.save(index + 1, current, records, points)
    keras.utils.set_random_seed(recipe.seed + len(recipe.stages))  # the same state whether resumed or not
    current = _align_blocks(current, recipe, ctx, reporter, records, model, baseline_accuracy)
    return current, records


def _amount(task: Task, value: float) -> str:
    return f"{value:.2%}" if task.is_accuracy else f"{value:.4g}"


STRUCTURED = ("activation", "cluster", "sparse_opt")


def _align_blocks(model, recipe: Recipe, ctx: StageContext, reporter: Reporter, records: list[dict],
                  dense: keras.Model, baseline: float):
    """After structured removal, round narrowed widths and block-align Dense inputs (stages/align.py).

    Rounding costs a few more units, so it is checked against the budget like a stage and dropped
    if it crosses it; block alignment is kept regardless, because without it the TFLite file would
    be stored dense.
    """
    from compressor.graph import surgery
    from compressor.stages import align

    names = [s.name for s in recipe.stages]
    if not any(n in STRUCTURED for n in names):
        return model
    block_height = recipe.dense_block()[0] if "weight" in names else 1
    before = surgery.prunable_layers(dense)
    now = surgery.prunable_layers(model)
    narrowed = {name for name, units in now.items() if before.get(name, units) != units}
    start = time.perf_counter()
    params_before, nonzero_before = count_params(model)
    for round_to in dict.fromkeys((recipe.unit_multiple(), 1)):
        outcome = align.apply(model, ctx, block_height, round_to=round_to, narrowed=narrowed)
        acc = ctx.task.keras(outcome.model).value
        if ctx.task.within(baseline, acc) or round_to == 1:
            break
        reporter.step(f"align: rounding widths to {round_to} crosses the budget; aligning blocks only")
    if not outcome.details.get("removed"):
        return model
    reporter.step(outcome.notes[0])
    params_after, nonzero_after = count_params(outcome.model)
    records.append({
        "name": "align", "params_before": params_before, "params_after": params_after,
        "nonzero_before": nonzero_before, "nonzero_after": nonzero_after, **_quality(ctx.task, acc),
        "seconds": round(time.perf_counter() - start, 2), "amount": 1.0, "tried": [],
        "details": outcome.details, "notes": outcome.notes,
    })
    return outcome.model


def compress(model: keras.Model, data: Dataset, recipe: Recipe, out: str | Path, *, source: str = "model",
             reporter: Reporter | None = None, load_notes: list[str] | None = None, checkpoint=None,
             resume: bool = False) -> dict:
    """Run the whole pipeline on an in-memory tf_keras model; returns the report dict (also written).
    With a `checkpoint` every finished stage is saved; `resume` continues after the last saved one."""
    from compressor.graph.flops import model_macs
    from exporters.benchmark import machine_info, run_benchmark
    from exporters.report import write_reports
    from compressor.load.model_io import save_model_atomic

    reporter = reporter or Reporter()
    resumed = checkpoint.load() if resume else None
    out = Path(out)  # the folder being built (compressor.run.outdir swaps it into place when complete)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(recipe.seed)
    check_model(model)  # several inputs, zero-width layers, nothing to prune, NaN/Inf weights: one line
    task = resolve(recipe, model)
    check_against_model(data, tuple(model.input_shape[1:]), task=task)
    for note in getattr(data, "notes", ()):  # what loading the data replaced (an empty x_calib, ...)
        reporter.warn(note)
    task.data = data
    dense = clone_with_weights(model)  # the caller's model object is never touched
    baseline = task.keras(dense, "test")
    reporter.step(f"dense baseline: test {task.name} {baseline.value:.4f}")
    budget_baseline = task.keras(dense).value if data.has_val else baseline.value

    points = {} if recipe.keep_frontier else None
    pruned, stage_records = run_stages(dense, recipe, data, reporter, budget_baseline, task, points,
                                       checkpoint, resumed)
    if not distribute.is_chief():  # its share of the training is done; export and benchmarks are the chief's
        return {"distribute": distribute.describe(), "baseline": {"metric": {"value": baseline.value}},
                "stages": stage_records}
    save_model_atomic(pruned, out / "pruned.keras")
    frontier_files = ship.export_points(points or {}, recipe, out / "frontier", reporter, save_model_atomic)
    shipped = ship.export_all(dense, pruned, recipe, data, out, reporter, flops=(model_macs(dense), model_macs(pruned)),
                              judge=task)
    x_check = data.sample("test", VERIFY_SAMPLES)[0]
    verification = ship.verify_all(shipped, x_check, reporter)
    execution = _execution_table(shipped.artifacts)
    reporter.step(f"benchmarking {len(shipped.artifacts)} files ({recipe.bench.runs} timed runs each, interleaved)")
    results, correct = run_benchmark(shipped.artifacts, task, x_check, recipe.bench.runs,
                                     recipe.bench.warmup, recipe.bench.threads, recipe.bench.batch, reporter,
                                     block=recipe.bench.block)
    int8_notes = ship.int8_verdicts(results, shipped.int8)  # shown in report.md and the CLI summary
    baseline_notes = undertrained_baseline(task, budget_baseline, stage_records)  # likewise
    params, _ = count_params(model)
    report = {
        "tool_version": _version(),
        "machine": machine_info(),
        "model": {"source": source, "input_shape": [None, *model.input_shape[1:]], "params": params,
                  "load_notes": list(load_notes or [])},
        "data": {"name": data.name, **data.sizes(), "budget_split": "x_val" if data.has_val else "x_test",
                 "streamed": not isinstance(data, Dataset)},
        "recipe": recipe.model_dump(mode="json"),
        "unit_multiple": recipe.unit_multiple(),  # round_units as applied on this machine
        "metric": task.describe(),
        "baseline": {"accuracy": baseline.value if task.is_accuracy else None,
                     "metric": {"value": baseline.value, "per_output": baseline.per_output, "budget_split": budget_baseline}},
        "stages": stage_records,
        "layers": _layer_table(dense, pruned),
        "results": results,
        "verification": verification,
        "execution": execution,
        "int8": shipped.int8,
        "int8_notes": int8_notes,
        "baseline_notes": baseline_notes,
        "target_notes": shipped.notes,
        "distribute": distribute.describe(),
        **_search_results(stage_records, frontier_files),
    }
    write_reports(report, out, correct)
    reporter.step("report written (report.md, report.json)")
    failed = [v for v in verification if not v["ok"]]
    if failed:
        names = ", ".join(f"{v['file']} ({v['problem']})" for v in failed)
        raise CompressorError(f"verification failed for {names}; see {out / 'report.json'}")
    return report


UNDERTRAINED_GAIN = 5  # stages beating the dense model by this many budgets: the budget guards nothing


def undertrained_baseline(task: Task, baseline: float, records: list[dict]) -> list[str]:
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
            f"{'down' if task.direction == 'higher' else 'up'} to {task.limit(baseline):.4f} passes (shipped: {scored[-1][0]:.4f}); "
            "train the dense model longer, then compress it"]


def _search_results(stage_records: list[dict], files: dict[str, list[str]]) -> dict:
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
    from compressor.layers import handler_for
    from compressor.graph.surgery import shrink_reasons

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
            "sparsity_before": float(np.mean(k0 == 0)), "sparsity_after": float(np.mean(k1 == 0)) if k1 is not None else 1.0,
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
