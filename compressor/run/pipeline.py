"""The fusion pipeline: load -> baseline -> stages under the budget -> export -> verify -> bench -> report.

This module only orchestrates; each step lives in its own module. The budget is counted in the
recipe's metric (top-1 accuracy by default, compressor/config/task.py) on the validation split, else the
test split, streamed batch by batch. Everything a step reads is the `Run` (compressor/run/context.py).
"""
from __future__ import annotations

import time
from pathlib import Path

from compressor.config.recipe import Recipe
from compressor.core._tf import keras
from compressor.core.errors import CompressorError
from compressor.data.protocol import DataSource
from compressor.run import report
from compressor.run.context import Run
from compressor.run.progress import Reporter
from compressor.stages import STAGES, StageContext, StageOutcome, StageSpec, align
from compressor.train import distribute
from compressor.train.training import count_params
from exporters import ship

BACKOFF_AMOUNTS = (1.0, 0.75, 0.5, 0.25)
VERIFY_SAMPLES = 2000  # test samples every exported file is compared with Keras on (the first ones) ...
VERIFY_MACS = 6e10     # ... fewer for a large model, down to VERIFY_MIN: about this many multiply-adds per file
VERIFY_MIN = 200       # (MobileNetV2 at 224 px, 0.3 GMACs: 200 samples; a lost weight shows on any of them)


def compress(model: keras.Model, data: DataSource, recipe: Recipe, out: str | Path, *, source: str = "model",
             reporter: Reporter | None = None, load_notes: list[str] | None = None, checkpoint=None,
             resume: bool = False) -> dict:
    """Run the whole pipeline on an in-memory tf_keras model; returns the report dict (also written).
    With a `checkpoint` every finished stage is saved; `resume` continues after the last saved one."""
    from compressor.graph.flops import model_macs
    from compressor.load.model_io import save_model_atomic
    from exporters.report import write_reports

    resumed = checkpoint.load() if resume else None
    out = Path(out)  # the folder being built (compressor.run.outdir swaps it into place when complete)
    out.mkdir(parents=True, exist_ok=True)
    run = Run.build(model, data, recipe, reporter, checkpoint)
    pruned, records = run_stages(run, resumed)
    if not distribute.is_chief():  # its share of the training is done; export and benchmarks are the chief's
        return report.worker_report(run, records)
    save_model_atomic(pruned, out / "pruned.keras")
    frontier_files = ship.export_points(run.points or {}, recipe, out / "frontier", run.reporter, save_model_atomic)
    shipped = ship.export_all(run.dense, pruned, recipe, out, run.reporter, run.task,
                              flops=(model_macs(run.dense), model_macs(pruned)), qat=_qat(run))
    x_check = run.data.sample("test", verify_samples(model_macs(run.dense)))[0]
    verification = ship.verify_all(shipped, x_check, run.reporter, run.task)
    results, correct = _benchmark(run, shipped.artifacts, x_check)
    body = report.assemble(run, pruned, records, shipped, verification, results, frontier_files, source, load_notes)
    write_reports(body, out, correct)
    run.reporter.step("report written (report.md, report.json)")
    failed = [v for v in verification if not v["ok"]]
    if failed:
        names = ", ".join(f"{v['file']} ({v['problem']})" for v in failed)
        raise CompressorError(f"verification failed for {names}; see {out / 'report.json'}")
    return body


def verify_samples(macs: int) -> int:
    """How many test samples each file is verified on: VERIFY_SAMPLES, fewer for a model of many MACs."""
    return int(min(VERIFY_SAMPLES, max(VERIFY_MIN, VERIFY_MACS // max(macs, 1))))


def _qat(run: Run):
    """The quantization-aware fine-tune the exporter tries when post-training int8 misses the budget:
    the run's training data, loss and batch size (compressor/train/qat.py)."""
    def fine_tune(model):
        from compressor.train import qat

        run.reporter.step("post-training int8 missed the budget: quantization-aware fine-tune "
                          f"({qat.EPOCHS} epoch)")
        progress = run.reporter.epoch_callback("quantization-aware fine-tune", qat.EPOCHS)
        return qat.fine_tune(model, run.data, run.task, run.recipe, progress)
    return fine_tune


def _benchmark(run: Run, artifacts, x_check):
    from exporters.benchmark import run_benchmark

    bench = run.recipe.bench
    run.reporter.step(f"benchmarking {len(artifacts)} files ({bench.runs} timed runs each, interleaved)")
    return run_benchmark(artifacts, run.task, x_check, bench.runs, bench.warmup, bench.threads, bench.batch,
                         run.reporter, block=bench.block)


def run_stages(run: Run, resumed=None) -> tuple[keras.Model, list[dict]]:
    """Apply the recipe's stages in order (a stage that crosses the budget is retried with less),
    then align the widths when a structured stage ran. Each finished stage is saved to the run's
    checkpoint (compressor.run.checkpoint); `resumed` continues after its last one."""
    ctx = run.context()
    records, current, first = [], run.dense, 0
    if resumed is not None:
        records, current, first = list(resumed.records), resumed.model, resumed.done
        if run.points is not None:
            run.points.update(resumed.points)
        run.reporter.step(f"resuming after stage {first}/{len(run.recipe.stages)} "
                          f"({', '.join(r['name'] for r in records)})")
    for index, cfg in enumerate(run.recipe.stages):
        if index >= first:
            current = _run_stage(run, ctx, STAGES.lookup(cfg.name), cfg, current, records, index)
            if run.checkpoint is not None:
                run.checkpoint.save(index + 1, current, records, run.points)
    keras.utils.set_random_seed(run.recipe.seed + len(run.recipe.stages))  # the same state whether resumed or not
    cfg = align.config_for(run.recipe, run.dense, current)
    if cfg is not None:
        current = _run_stage(run, ctx, STAGES.lookup(cfg.name), cfg, current, records)
    return current, records


def _run_stage(run: Run, ctx: StageContext, spec: StageSpec, cfg, current, records: list[dict],
               index: int | None = None):
    """One stage on `current`: its record appended to `records`, the model it leaves returned. A step
    the pipeline adds (no backoff) is kept as it is, and recorded only when it removed something."""
    before, start = count_params(current), time.perf_counter()
    if spec.backoff:
        outcome, amount, tried = _backed_off(run, ctx, spec, cfg, current, index)
        notes = _backoff_notes(run, cfg.name, amount, tried)
        if outcome is None:  # skipped: the model stays as it was
            outcome = StageOutcome(current, metric=run.task.keras(current).value)
        elif run.points is not None:
            run.points.update(outcome.points)
        notes = list(outcome.notes) + notes
    else:
        outcome, amount, tried = spec.apply(current, cfg, ctx), 1.0, []
        if not outcome.details.get("removed"):
            return current
        run.reporter.step(outcome.notes[0])
        notes = outcome.notes
    metric = outcome.metric if outcome.metric is not None else run.task.keras(outcome.model).value
    records.append(stage_record(cfg.name, before, count_params(outcome.model), run.task, metric,
                                time.perf_counter() - start, amount, tried, outcome.details, notes))
    return outcome.model


def _backed_off(run: Run, ctx: StageContext, spec: StageSpec, cfg, current, index: int):
    """(outcome, amount, tried) at the first amount whose model stays within the budget, its metric
    set; (None, 0.0, tried) when none does."""
    task, tried = run.task, []
    for amount in BACKOFF_AMOUNTS:
        keras.utils.set_random_seed(run.recipe.seed + index)
        run.reporter.step(f"stage {index + 1}/{len(run.recipe.stages)} {cfg.name} (amount {amount:.0%})")
        outcome = spec.apply(current, cfg, ctx, amount=amount)
        metric = task.keras(outcome.model).value
        drop = task.drop(run.budget_baseline, metric)
        tried.append({"amount": amount, "accuracy": metric if task.is_accuracy else None, "metric": metric,
                      "drop": drop})
        if drop <= task.budget:
            outcome.metric = metric
            return outcome, amount, tried
        if outcome.details.get("removed", None) == 0:
            break  # nothing was removed, so a smaller amount cannot do better: skip the stage
        run.reporter.step(f"{cfg.name}: {task.name} drop {_amount(task, drop)} exceeds the {task.budget_text()} "
                          "budget; backing off")
    return None, 0.0, tried


def _backoff_notes(run: Run, name: str, amount: float, tried: list[dict]) -> list[str]:
    """What the backoff did: the stage skipped (also warned) or run at less than the recipe's amount."""
    if amount == 0.0:
        why = "it removed nothing and its fine-tuning alone" if tried[-1]["amount"] == 1.0 else "every amount it tried"
        note = f"{name}: {why} crossed the {run.task.budget_text()} budget; stage skipped"
        run.reporter.warn(note)
        return [note]
    if amount < 1.0:
        return [f"{name}: backed off to {amount:.0%} of the recipe's amount to stay within budget"]
    return []


def stage_record(name: str, before: tuple[int, int], after: tuple[int, int], task, metric: float, seconds: float,
                 amount: float, tried: list[dict], details: dict, notes: list[str]) -> dict:
    """The one shape of a stage's entry in report.json's `stages` (and the checkpoint's records)."""
    return {
        "name": name, "params_before": before[0], "params_after": after[0],
        "nonzero_before": before[1], "nonzero_after": after[1],
        "accuracy_after": metric if task.is_accuracy else None, "metric_after": metric,
        "seconds": round(seconds, 2), "amount": amount, "tried": tried, "details": details, "notes": notes,
    }


def _amount(task, value: float) -> str:
    return f"{value:.2%}" if task.is_accuracy else f"{value:.4g}"
