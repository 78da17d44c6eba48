"""The fusion pipeline: load -> baseline -> stages under the accuracy budget -> export -> verify -> bench -> report.

This module only orchestrates; each step lives in its own module.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np

from compressor._tf import keras
from compressor.data import Dataset, check_against_model
from compressor.errors import CompressorError
from compressor.progress import Reporter
from compressor.recipe import Recipe
from compressor.stages.base import StageContext
from compressor.training import accuracy, clone_with_weights, count_params, predictions

BACKOFF_AMOUNTS = (1.0, 0.75, 0.5, 0.25)


OUTPUT_FILES = frozenset({
    "report.json", "report.md", "dense.keras", "dense.tflite", "dense.onnx", "pruned.keras", "pruned.tflite",
    "pruned.onnx", "pruned-int8.tflite", "pruned-int8.onnx", "latency.png", "accuracy_vs_size.png", "layers.png",
})


def _ours(entry: Path) -> bool:
    """A file this tool writes (or its temp file from an interrupted run)."""
    return entry.is_file() and (entry.name in OUTPUT_FILES or entry.name.startswith("."))


def check_out_dir(out: str | Path, force: bool, inputs: tuple = ()) -> Path:
    """Validate --out before any work, without touching it.

    A non-empty folder is refused without --force; with --force only a folder holding nothing but
    this tool's own outputs is accepted, so `--out . --force` can never wipe a user's files.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output '{out}' is a file; pass a folder path to --out")
    for path in inputs:
        if path is not None and Path(path).exists() and Path(path).resolve().is_relative_to(out.resolve()):
            raise CompressorError(f"--out '{out}' contains the input '{path}'; choose a different output folder")
    entries = list(out.iterdir()) if out.exists() else []
    if entries and not force:
        raise CompressorError(f"output folder '{out}' is not empty; pass --force to overwrite it or choose another --out")
    foreign = [e.name for e in entries if not _ours(e)]
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (" …" if len(foreign) > 3 else "")
        raise CompressorError(f"output folder '{out}' holds files compressor did not write ({shown}); "
                              "--force only replaces a previous result: choose another --out")
    return out


def prepare_out_dir(out: str | Path, force: bool, inputs: tuple = ()) -> Path:
    """Check (see check_out_dir), then remove the previous result's files and create the folder."""
    out = check_out_dir(out, force, inputs)
    if out.exists():
        for entry in out.iterdir():
            entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def remove_if_empty(out: str | Path) -> None:
    """A failed run that wrote nothing leaves no empty folder behind."""
    out = Path(out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _stage_module(name: str):
    """Stages are modules named after the recipe's stage names; each exposes `apply`."""
    return importlib.import_module(f"compressor.stages.{name}")


def run_stages(model: keras.Model, recipe: Recipe, data: Dataset, reporter: Reporter,
               baseline_accuracy: float) -> tuple[keras.Model, list[dict]]:
    """Apply the recipe's stages in order; a stage that crosses the budget is retried with less."""
    budget_x, budget_y = _budget_split(data)
    ctx = StageContext(recipe=recipe, data=data, log=reporter.step, epoch_progress=reporter.epoch_callback,
                       baseline_accuracy=baseline_accuracy)
    records = []
    current = model
    for index, cfg in enumerate(recipe.stages):
        module = _stage_module(cfg.name)
        params_before, nonzero_before = count_params(current)
        start = time.perf_counter()
        chosen, tried = None, []
        for amount in BACKOFF_AMOUNTS:
            keras.utils.set_random_seed(recipe.seed + index)
            reporter.step(f"stage {index + 1}/{len(recipe.stages)} {cfg.name} (amount {amount:.0%})")
            outcome = module.apply(current, cfg, ctx, amount=amount)
            acc = accuracy(outcome.model, budget_x, budget_y)
            drop = baseline_accuracy - acc
            tried.append({"amount": amount, "accuracy": acc, "drop": drop})
            if drop <= recipe.max_accuracy_drop:
                chosen = (amount, outcome, acc)
                break
            if outcome.details.get("removed", None) == 0:
                break  # nothing was removed, so a smaller amount cannot do better: skip the stage
            reporter.step(f"{cfg.name}: accuracy drop {drop:.2%} exceeds budget {recipe.max_accuracy_drop:.2%}; backing off")
        notes = []
        if chosen is None:
            why = ("it removed nothing and its fine-tuning alone" if tried[-1]["amount"] == 1.0
                   else "every amount it tried")
            notes.append(f"{cfg.name}: {why} crossed the {recipe.max_accuracy_drop:.2%} budget; stage skipped")
            reporter.warn(notes[-1])
            outcome_model, amount, details = current, 0.0, {}
            acc = accuracy(current, budget_x, budget_y)
        else:
            amount, outcome, acc = chosen
            outcome_model, details = outcome.model, outcome.details
            notes.extend(outcome.notes)
            if amount < 1.0:
                notes.append(f"{cfg.name}: backed off to {amount:.0%} of the recipe's amount to stay within budget")
        params_after, nonzero_after = count_params(outcome_model)
        records.append({
            "name": cfg.name, "params_before": params_before, "params_after": params_after,
            "nonzero_before": nonzero_before, "nonzero_after": nonzero_after,
            "accuracy_after": acc, "seconds": round(time.perf_counter() - start, 2),
            "amount": amount, "tried": tried, "details": details, "notes": notes,
        })
        current = outcome_model
    current = _align_blocks(current, recipe, ctx, reporter, records, model, baseline_accuracy)
    return current, records


STRUCTURED = ("activation", "cluster", "sparse_opt")


def _align_blocks(model, recipe: Recipe, ctx: StageContext, reporter: Reporter, records: list[dict],
                  dense: keras.Model, baseline: float):
    """After structured removal, round narrowed widths and block-align Dense inputs (stages/align.py).

    Rounding costs a few more units, so it is checked against the budget like a stage and dropped
    if it crosses it; block alignment is kept regardless, because without it the TFLite file would
    be stored dense.
    """
    from compressor import surgery
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
    for round_to in dict.fromkeys((recipe.round_units, 1)):
        outcome = align.apply(model, ctx, block_height, round_to=round_to, narrowed=narrowed)
        acc = accuracy(outcome.model, *_budget_split(ctx.data))
        if baseline - acc <= recipe.max_accuracy_drop or round_to == 1:
            break
        reporter.step(f"align: rounding widths to {round_to} crosses the budget; aligning blocks only")
    if not outcome.details.get("removed"):
        return model
    reporter.step(outcome.notes[0])
    params_after, nonzero_after = count_params(outcome.model)
    records.append({
        "name": "align", "params_before": params_before, "params_after": params_after,
        "nonzero_before": nonzero_before, "nonzero_after": nonzero_after, "accuracy_after": acc,
        "seconds": round(time.perf_counter() - start, 2), "amount": 1.0, "tried": [],
        "details": outcome.details, "notes": outcome.notes,
    })
    return outcome.model


def compress(model: keras.Model, data: Dataset, recipe: Recipe, out: str | Path, *, source: str = "model",
             reporter: Reporter | None = None, load_notes: list[str] | None = None) -> dict:
    """Run the whole pipeline on an in-memory tf_keras model; returns the report dict (also written)."""
    from exporters import onnx_export, tflite_export
    from exporters.benchmark import Artifact, machine_info, run_benchmark
    from exporters.flops import model_macs
    from exporters.report import write_reports
    from exporters.verify import verify_file
    from compressor.model_io import save_model_atomic

    reporter = reporter or Reporter()
    out = Path(out)  # the caller has checked it with prepare_out_dir before any work started
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(recipe.seed)
    check_against_model(data, tuple(model.input_shape[1:]), int(np.prod(model.output_shape[1:])))
    dense = clone_with_weights(model)  # the caller's model object is never touched
    baseline_acc = accuracy(dense, data.x_test, data.y_test)
    reporter.step(f"dense baseline: test accuracy {baseline_acc:.4f}")

    pruned, stage_records = run_stages(dense, recipe, data, reporter,
                                       accuracy(dense, *(_budget_split(data))))
    save_model_atomic(pruned, out / "pruned.keras")

    reporter.step("exporting dense and pruned models for " + ", ".join(recipe.targets))
    artifacts: list[tuple[Artifact, keras.Model, str | None]] = []  # (file, its Keras model, int8 scheme)
    target_notes: list[str] = []
    dense_flops, pruned_flops = model_macs(dense), model_macs(pruned)
    if any(t.startswith("tflite") for t in recipe.targets):
        tflite_export.export_float(dense, out / "dense.tflite", sparse=False)
        encode = _tflite_can_encode(pruned, 4, reporter, target_notes)
        tflite_export.export_float(pruned, out / "pruned.tflite", sparse=encode)
        artifacts.append((Artifact("dense", "tflite", out / "dense.tflite", dense_flops), dense, None))
        artifacts.append((Artifact("pruned", "tflite", out / "pruned.tflite", pruned_flops), pruned, None))
    if any(t.startswith("onnxruntime") for t in recipe.targets):
        onnx_export.export_float(dense, out / "dense.onnx", compact=False)
        onnx_export.export_float(pruned, out / "pruned.onnx", compact=recipe.compact_onnx)
        artifacts.append((Artifact("dense", "onnxruntime", out / "dense.onnx", dense_flops), dense, None))
        artifacts.append((Artifact("pruned", "onnxruntime", out / "pruned.onnx", pruned_flops), pruned, None))
    if "tflite-int8" in recipe.targets:
        encode = _tflite_can_encode(pruned, 16, reporter, target_notes)
        _export_tflite_int8_that_runs(pruned, out / "pruned-int8.tflite", data, encode, reporter, target_notes)
        artifacts.append((Artifact("pruned-int8", "tflite", out / "pruned-int8.tflite", pruned_flops), pruned, "tflite"))
    if "onnxruntime-int8" in recipe.targets:
        scheme = _export_onnx_int8(pruned, out, data)
        artifacts.append((Artifact("pruned-int8", "onnxruntime", out / "pruned-int8.onnx", pruned_flops), pruned, scheme))

    reporter.step("verifying every exported file")
    x_check = data.x_test
    expected = {id(dense): predictions(dense, x_check), id(pruned): predictions(pruned, x_check)}
    verification = []
    for art, km, quantized in artifacts:
        runner, resolver_note = _open_safely(art)
        if resolver_note:
            art.notes.append(resolver_note)
            reporter.warn(resolver_note)
        verification.append(verify_file(art.path, runner, km, expected[id(km)], x_check, quantized=quantized))
    failed = [v for v in verification if not v["ok"]]
    execution = _execution_table([a for a, _, _ in artifacts])

    reporter.step(f"benchmarking {len(artifacts)} files ({recipe.bench.runs} timed runs each, interleaved)")
    results, correct = run_benchmark([a for a, _, _ in artifacts], data.x_test, data.y_test, recipe.bench.runs,
                                     recipe.bench.warmup, recipe.bench.threads, recipe.bench.batch, reporter)
    params, _ = count_params(model)
    report = {
        "tool_version": _version(),
        "machine": machine_info(),
        "model": {"source": source, "input_shape": [None, *model.input_shape[1:]], "params": params,
                  "load_notes": list(load_notes or [])},
        "data": {"name": data.name, "train": len(data.x_train), "test": len(data.x_test),
                 "budget_split": "x_val" if data.x_val is not None else "x_test"},
        "recipe": recipe.model_dump(mode="json"),
        "baseline": {"accuracy": baseline_acc},
        "stages": stage_records,
        "layers": _layer_table(dense, pruned),
        "results": results,
        "verification": verification,
        "execution": execution,
        "target_notes": target_notes,
    }
    write_reports(report, out, correct)
    reporter.step(f"report written to {out / 'report.md'}")
    if failed:
        names = ", ".join(f"{v['file']} ({v['problem']})" for v in failed)
        raise CompressorError(f"verification failed for {names}; see {out / 'report.json'}")
    return report


def _budget_split(data: Dataset):
    return (data.x_val, data.y_val) if data.x_val is not None else (data.x_test, data.y_test)


def _export_onnx_int8(pruned: keras.Model, out: Path, data: Dataset) -> str:
    """Quantize from an uncompacted float export; dynamic for MatMul models, static QDQ for conv models."""
    from exporters import onnx_export

    has_conv = any(isinstance(l, (keras.layers.Conv2D, keras.layers.Conv1D)) for l in pruned.layers)
    plain = out / ".pruned-float-for-int8.onnx"
    try:
        onnx_export.export_float(pruned, plain, compact=False)
        mode = "static" if has_conv else "dynamic"
        onnx_export.export_int8(plain, out / "pruned-int8.onnx", data.x_calib, mode=mode)
    finally:
        plain.unlink(missing_ok=True)
    return f"onnxruntime-{mode}"


def _open_safely(art):
    """Open as a user would; a file the default delegate rejects is measured with the builtin resolver."""
    from exporters.runtimes import open_runner_safely

    runner, art.resolver, note = open_runner_safely(art.path)
    return runner, note


def _export_tflite_int8_that_runs(model, path: Path, data: Dataset, encode: bool, reporter: Reporter,
                                  notes: list[str]) -> None:
    """int8 sparse tensors XNNPACK cannot take (conv kernels, non-(16, 1) patterns) crash the default
    LiteRT interpreter (DESIGN fact 4). A user must never meet that: such a file is rewritten with
    dense storage, which the default interpreter runs, and the report says so."""
    from exporters import tflite_export
    from exporters.runtimes import open_runner_safely

    tflite_export.export_int8(model, path, data.x_calib, sparse=encode)
    if not encode:
        return
    _, resolver, why = open_runner_safely(path)
    if resolver == "default":
        return
    tflite_export.export_int8(model, path, data.x_calib, sparse=False)
    notes.append(f"{path.name}: stored with dense int8 tensors because the sparse encoding is rejected by the "
                 f"default XNNPACK delegate ({why.split('(', 1)[-1].split(')')[0]}); zeros are still stored, "
                 "gzip shrinks them, and the file runs in the default interpreter")
    reporter.warn(notes[-1])


def _tflite_can_encode(model, block_height: int, reporter: Reporter, notes: list[str]) -> bool:
    """Sparse encoding corrupts Dense kernels whose input width is not a multiple of the block
    (see stages/align.py); such a model is written with dense storage instead, and the report says so."""
    from compressor.stages.align import misaligned_dense

    bad = misaligned_dense(model, block_height)
    if bad:
        notes.append(f"TFLite {'int8' if block_height == 16 else 'float'} file stored dense: Dense input width of "
                     f"{', '.join(bad)} is not a multiple of {block_height}, which the converter's block encoding "
                     "gets wrong; use a weight block matching the target or let the align step run")
        reporter.warn(notes[-1])
    return not bad


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
    from compressor.surgery import shrink_reasons

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
