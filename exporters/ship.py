"""Ship a compressed model: write every target's files, choose each int8 scheme by measurement, verify.

The registry (exporters/targets.py) says what each target needs; this module applies it to one
model: which storage is safe (fallbacks and their reasons), which int8 scheme wins on this model
and this CPU, and whether each file computes what its Keras model computes.

`recipe`, `data` and `judge` are read by attribute (recipe: targets, compact_onnx, bench; data:
calibration(), sample(); judge: the task of compressor/config/task.py, which scores a Keras model or an
exported file over the data's batches in the recipe's metric and says whether a value is within
budget), so this package stays free of the pipeline's own types.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.core import inputs, keras
from exporters import candidates, targets
from exporters.benchmark import Artifact
from exporters.latency import measure_interleaved
from exporters.runtimes import open_runner_safely
from exporters.stats import latency_summary
from exporters.verify import MIN_AGREEMENT, verify_file

SAME_SPEED = 0.03  # int8 candidates within 3% of the fastest count as tied: the registry's order decides


@dataclass
class Shipped:
    """The exported files, the Keras model each came from, and what was decided on the way."""

    artifacts: list[Artifact] = field(default_factory=list)
    models: list = field(default_factory=list)            # the Keras model behind each artifact
    quantization: list = field(default_factory=list)      # int8 scheme description per artifact (None: float)
    notes: list[str] = field(default_factory=list)        # fallbacks taken, for the report
    int8: list[dict] = field(default_factory=list)        # one record per int8 target: candidates and choice

    def add(self, artifact: Artifact, model, quantization: str | None = None) -> None:
        self.artifacts.append(artifact)
        self.models.append(model)
        self.quantization.append(quantization)


def misaligned_dense(model, block_height: int) -> list[str]:
    """Sparse Dense kernels whose input width the converter cannot block-encode correctly."""
    return [layer.name for layer in model.layers
            if isinstance(layer, keras.layers.Dense) and layer.kernel.shape[0] % block_height
            and np.mean(layer.kernel.numpy() == 0) >= 0.3]


def _can_encode(model, target: targets.Target, reporter, notes: list[str]) -> bool:
    """Sparse storage unless the model has Dense kernels the target's block encoding would corrupt."""
    height = target.dense_block[0]
    bad = misaligned_dense(model, height)
    if bad:
        notes.append(f"{target.name} file stored dense: Dense input width of {', '.join(bad)} is not a multiple "
                     f"of {height}; {target.fallback('misaligned').reason}; use a weight block matching the "
                     "target or let the align step run")
        reporter.warn(notes[-1])
    return not bad


def export_points(points: dict, recipe, folder: Path, reporter, save_keras) -> dict[str, list[str]]:
    """`--keep-frontier`: each other operating point's Keras file and float file per runtime in
    folder/<point>/ (int8 is left to the shipped point: each int8 scheme costs converter runs).
    `save_keras(model, path)` is the caller's atomic Keras writer (exporters never write Keras files)."""
    written = {}
    for label, model in points.items():
        where = folder / label
        where.mkdir(parents=True, exist_ok=True)
        save_keras(model, where / "pruned.keras")
        files = [where / "pruned.keras"]
        for runtime, _ in targets.runtime_formats(recipe.targets):
            target = targets.float_target(runtime)
            path = where / target.filename("pruned")
            sparse = _can_encode(model, target, reporter, [])
            target.export(model, path, sparse=sparse and bool(getattr(recipe, target.storage_flag or "", True)))
            files.append(path)
        written[label] = [str(p.relative_to(folder.parent)) for p in files]
        reporter.step(f"frontier point {label} written to {where.relative_to(folder.parent)}")
    return written


def export_all(dense, pruned, recipe, out: Path, reporter, judge, flops: tuple[int, int] = (0, 0),
               qat=None) -> Shipped:
    """Dense and pruned float files for every runtime the targets use, then each int8 target's file
    (its scheme judged by `judge`, the task bound to the run's data, whose calibration samples the
    int8 converters read). `flops`: the dense and pruned models' MACs, recorded with each file.
    `qat(model) -> model`: the caller's quantization-aware fine-tune (run at most once, shared by the
    int8 targets), an int8 candidate when no post-training scheme holds the budget."""
    shipped = Shipped()
    dense_flops, pruned_flops = flops
    reporter.step("exporting dense and pruned models for " + ", ".join(recipe.targets))
    for runtime, _ in targets.runtime_formats(recipe.targets):
        target = targets.float_target(runtime)
        dense_path, pruned_path = out / target.filename("dense"), out / target.filename("pruned")
        target.export(dense, dense_path, sparse=False)
        sparse = _can_encode(pruned, target, reporter, shipped.notes)
        if target.storage_flag:
            sparse = sparse and bool(getattr(recipe, target.storage_flag))
        target.export(pruned, pruned_path, sparse=sparse)
        shipped.add(Artifact("dense", runtime, dense_path, dense_flops), dense)
        shipped.add(Artifact("pruned", runtime, pruned_path, pruned_flops), pruned)
    qat = functools.lru_cache(maxsize=1)(qat) if qat is not None else None
    int8 = [t for t in targets.selected(recipe.targets) if t.int8]
    reference = judge.keras(pruned, "budget").value if int8 else None  # once: every int8 target is judged on it
    for target in int8:
        artifact, record, model = choose_int8(target, pruned, recipe, out, reporter, shipped.notes, judge, qat,
                                              reference)
        artifact.flops = pruned_flops
        shipped.add(artifact, model, record["description"])
        shipped.int8.append(record)
    return shipped


def _drop_rejected(target, found: list[dict], final_name: str, notes: list[str], reporter) -> list[dict]:
    """A file the default interpreter rejects is used only when no scheme runs there."""
    usable = [c for c in found if "path" in c]
    default = [c for c in usable if c["resolver"] == "default"]
    if not default or len(default) == len(usable):
        return usable
    for c in usable:
        if c["resolver"] != "default":
            fallback = target.fallback("delegate-rejects-sparse")
            why = c["delegate_note"].split("(", 1)[-1].split(")")[0]
            c["skipped"] = f"{fallback.reason if fallback else 'the default interpreter rejects it'} ({why})"
            notes.append(f"{final_name}: {c['scheme']} not used: {c['skipped']}")
            reporter.warn(notes[-1])
    return default


def _pick(pool: list[dict], max_drop: float, reference: float, drop=lambda ref, value: ref - value) -> dict:
    """The fastest candidate within the budget (near-ties go to the registry's order); if none is
    within it, the best scoring. `drop(reference, value)`: how much worse, in the metric's units."""
    def value(c):
        return c["metric"] if c.get("metric") is not None else c["accuracy"]

    within = [c for c in pool if drop(reference, value(c)) <= max_drop]
    if not within:
        return min(pool, key=lambda c: drop(reference, value(c)))
    best = min(c["p50_ms"] for c in within)
    return next(c for c in within if c["p50_ms"] <= best * (1 + SAME_SPEED))


CHOICE_SECONDS = 6.0  # timing budget of one target's choice: the benchmark step times the shipped files in full
CHOICE_RUNS = 30       # ... but never fewer runs per file than this


def choose_int8(target, pruned, recipe, out: Path, reporter, notes: list[str], judge,
                qat=None, reference: float | None = None) -> tuple[Artifact, dict, object]:
    """Measure the target's int8 schemes on this model at batch 1 and keep the fastest within budget
    (`judge`: the task bound to the run's data, which scores and calibrates the candidates; `qat`: the
    quantization-aware fine-tune, tried when no post-training scheme holds the budget). Returns the
    file, its record and the Keras model it computes (the fine-tuned one for `qat`). `reference`: the
    pruned model's score on the budget split, when the caller has it."""
    final = out / target.filename("pruned-int8")
    encode = _can_encode(pruned, target, reporter, notes)
    reference = judge.keras(pruned, "budget").value if reference is None else reference
    found = candidates.build(target, pruned, out, encode, judge, reference, qat)
    try:
        pool = _drop_rejected(target, found, final.name, notes, reporter)
        float_path = out / targets.float_target(target.runtime).filename("pruned")
        float_runner, _, _ = open_runner_safely(float_path)
        runners = {c["scheme"]: c["runner"] for c in pool} | {"float": float_runner}
        sample = inputs.each(judge.data.sample("budget", 1)[0], lambda a: np.asarray(a, np.float32))
        runs, warmup = _choice_runs(runners, sample, recipe.bench)
        reporter.step(f"{target.name}: timing {len(pool)} int8 scheme(s) against {float_path.name} at batch 1 "
                      f"({runs} runs each)")
        times = measure_interleaved(runners, sample, runs, warmup, block=recipe.bench.block)
        for c in pool:
            c["p50_ms"] = latency_summary(times[c["scheme"]])["p50"]
        chosen = _pick(pool, judge.budget, reference, judge.drop)
        os.replace(chosen["path"], final)
    finally:
        for c in found:
            if "path" in c:
                Path(c["path"]).unlink(missing_ok=True)
    float_p50 = latency_summary(times["float"])["p50"]
    record = _record(target, recipe, judge, final, chosen, found, reference, float_path.name, float_p50)
    reporter.step(f"{target.name}: chose {chosen['scheme']} ("
                  + ", ".join(f"{c['scheme']} {c['p50_ms']:.4f} ms" for c in pool) + f"; float {float_p50:.4f} ms)")
    artifact = Artifact("pruned-int8", target.runtime, final, resolver=chosen["resolver"],
                        notes=[chosen["delegate_note"]] if chosen["delegate_note"] else [])
    return artifact, record, chosen["model"]


def _choice_runs(runners: dict, sample: np.ndarray, bench) -> tuple[int, int]:
    """(runs, warm-up) that fit CHOICE_SECONDS, within the recipe's bench settings: telling the schemes
    apart needs far fewer calls than the published benchmark (ResNet50 at 224 in onnxruntime: 138 ms
    a round of float and int8, 48 s for 300 runs)."""
    start = time.perf_counter()
    for runner in runners.values():
        runner.set_input(sample)
        runner.invoke()
    per_round = max(time.perf_counter() - start, 1e-6)
    runs = int(min(bench.runs, max(CHOICE_RUNS, CHOICE_SECONDS / per_round)))
    return runs, min(bench.warmup, max(1, runs // 10))


def _record(target, recipe, judge, final: Path, chosen: dict, found: list[dict], reference: float,
            float_file: str, float_p50: float) -> dict:
    """The int8 record of report.json: the choice, the reference and every candidate (built or skipped)."""
    return {
        "target": target.name, "runtime": target.runtime, "file": final.name, "chosen": chosen["scheme"],
        "description": f"{chosen['scheme']}: {chosen['description']}",
        "reference_accuracy": reference if judge.is_accuracy else None, "reference_metric": reference,
        "metric": judge.name, "max_accuracy_drop": recipe.max_accuracy_drop, "budget": judge.budget,
        "float_file": float_file, "float_p50_ms": float_p50,
        "within_budget": bool(judge.drop(reference, chosen["metric"]) <= judge.budget),
        "chosen_metric": chosen["metric"],
        "candidates": [{k: c.get(k)
                        for k in ("scheme", "accuracy", "metric", "p50_ms", "resolver", "skipped", "storage")}
                       for c in found],
    }


def verify_all(shipped: Shipped, x_check: np.ndarray, reporter, judge=None) -> list[dict]:
    """One verification row per file, each against the Keras model it was exported from, on the
    samples `x_check` (every output of a multi-output model, matched by name; a binary output of the
    `judge`'s task by its thresholded class)."""
    thresholds = None if judge is None else [judge.threshold(i) if judge.binary(i) else None
                                             for i in range(len(judge.output_names))]
    reporter.step("verifying every exported file")
    expected = {}
    rows = []
    records = {rec["file"]: rec for rec in shipped.int8}
    for art, model, quantization in zip(shipped.artifacts, shipped.models, shipped.quantization):
        if id(model) not in expected:
            out = model.predict(x_check, batch_size=256, verbose=0)
            expected[id(model)] = list(out) if isinstance(out, (list, tuple)) else out
        runner, art.resolver, note = open_runner_safely(art.path)
        if note and note not in art.notes:
            art.notes.append(note)
            reporter.warn(note)
        rec = records.get(Path(art.path).name, {})
        row = verify_file(art.path, runner, model, expected[id(model)], x_check, quantized=quantization,
                          accuracy_held=rec.get("within_budget", False),  # int8 score measured within budget
                          thresholds=thresholds)
        if rec and not rec["within_budget"] and row["prediction_agreement"] < MIN_AGREEMENT:
            row["problem"] += f"; {over_budget(rec)}"  # the cause a user can act on
        rows.append(row)
    return rows


def over_budget(rec: dict) -> str:
    """Why an int8 file ships outside the budget, and what the user can change."""
    knob = "max_accuracy_drop" if rec["metric"] == "accuracy" else "max_metric_drop"
    return (f"no {rec['runtime']} int8 scheme held the {rec['metric']} budget: the best, {rec['chosen']}, scored "
            f"{rec['chosen_metric']:.4f} against the float model's {rec['reference_metric']:.4f} (budget "
            f"{rec['budget']:g}); raise {knob} or leave {rec['target']} out of the recipe's targets")


def qat_line(rec: dict) -> str:
    """Why an int8 file comes from a quantization-aware fine-tune: every post-training scheme missed."""
    post = [c for c in rec["candidates"] if c.get("metric") is not None and c["scheme"] != "qat"]
    best = min(post, key=lambda c: abs(rec["reference_metric"] - c["metric"]), default=None)  # all fell short
    missed = (f"the best post-training scheme, {best['scheme']}, scored {best['metric']:.4f}" if best
              else "no post-training scheme was built")
    return (f"{rec['file']}: post-training int8 missed the {rec['metric']} budget ({missed} against the float "
            f"model's {rec['reference_metric']:.4f}); shipped from a quantization-aware fine-tune, which scored "
            f"{rec['chosen_metric']:.4f}")


def int8_verdicts(results: list[dict], records: list[dict]) -> list[str]:
    """One line per runtime whose int8 file is not faster than its pruned float file at batch 1, 1 thread
    (such a file buys size, not speed, and the report must not present it as an improvement), and one
    per runtime where no int8 scheme stayed within the budget."""
    lines = [over_budget(rec) for rec in records if not rec.get("within_budget", True)]
    lines += [qat_line(rec) for rec in records if rec.get("chosen") == "qat"]
    for rec in records:
        rows = {r["variant"]: r for r in results
                if r["runtime"] == rec["runtime"] and r["batch"] == 1 and r["threads"] == 1}
        int8, flt = rows.get("pruned-int8"), rows.get("pruned")
        if int8 is None or flt is None:
            continue
        a, b = int8["latency_ms"]["p50"], flt["latency_ms"]["p50"]
        rec["int8_p50_ms"], rec["float_p50_ms_bench"], rec["faster_than_float"] = a, b, a < b
        if a >= b:
            lines.append(f"{int8['file']} is not faster than {flt['file']} at batch 1 ({a:.4f} vs {b:.4f} ms p50, "
                         f"scheme {rec['chosen']}): int8 buys size here, not speed")
    return lines


def float_verdicts(results: list[dict]) -> list[str]:
    """One line per runtime whose shipped float file is slower than its dense one at batch 1, 1 thread:
    the compression bought size or accuracy there, not speed, and the summary must say so."""
    lines = []
    rows = {(r["variant"], r["runtime"]): r for r in results if r["batch"] == 1 and r["threads"] == 1}
    for (variant, runtime), row in rows.items():
        dense = rows.get(("dense", runtime))
        if variant != "pruned" or dense is None:
            continue
        a, b = row["latency_ms"]["p50"], dense["latency_ms"]["p50"]
        if a > b:
            lines.append(f"{row['file']} is slower than {dense['file']} at batch 1 ({a:.4f} vs {b:.4f} ms p50, "
                         f"{b / a:.2f}x): the pruned float file buys size here, not speed")
    return lines
