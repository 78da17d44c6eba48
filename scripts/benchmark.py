"""Regenerate docs/BENCHMARKS.md, docs/benchmarks.json and docs/benchmarks_headline.md.

    python scripts/benchmark.py [--out docs] [--quick]

For each reference model (scripts/models.py, trained on the embedded mnist5k with a fixed seed)
four variants are built and then timed side by side:

  dense        the trained model, exported as is (TFLite float, ONNX via tf2onnx)
  tfmot-peer   plain tfmot as its guide shows: prune_low_magnitude on the whole model,
               PolynomialDecay 50% -> 80% over 2 epochs, UpdatePruningStep, strip_pruning,
               TFLite with EXPERIMENTAL_SPARSITY, ONNX via tf2onnx
  fusion       this tool's default recipe, through compressor.api.compress (its pruned.* files)
  fusion-int8  the same run's pruned-int8.* files, when the recipe exports them

Artifacts are built first; timing comes after all training, so TensorFlow is idle while files
run. All files of one runtime are timed interleaved in this process (dense, peer, fusion, int8,
dense, …) at fixed threads and batch size, after warm-up. `--quick` is a smoke test (two models,
few runs) and by default writes to artifacts/benchmarks-quick so it never replaces the docs.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402

import models as suite  # noqa: E402  (scripts/models.py)
import provenance  # noqa: E402  (scripts/provenance.py)
from compressor.core._tf import keras  # noqa: E402
from exporters import targets as registry  # noqa: E402
from exporters.latency import BLOCK  # noqa: E402

VARIANTS = ("dense", "dense-int8", "tfmot-peer", "fusion-fixed", "fusion", "fusion-int8", "fusion-distill")
RUNTIMES = {rt: fmt.extensions[0] for rt, fmt in registry.runtime_formats(registry.NAMES)}
BATCHES = (1, 32)
THREADS = (1, 2)
SEED = 0
PEER = {"initial_sparsity": 0.5, "final_sparsity": 0.8, "epochs": 2, "batch_size": 32}


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    runs: dict        # batch -> timed rounds
    warmup: dict      # batch -> untimed runs per file
    batches: tuple[int, ...] = BATCHES
    threads: tuple[int, ...] = THREADS
    fusions: tuple[str, ...] = ("fusion-fixed", "fusion")  # compressor runs per model
    bench: dict | None = None  # the fusion runs' own `bench:` settings (None: the default recipe's)
    reuse: bool = False  # take the trained models and finished runs an earlier run left in --work


FULL = Settings(tuple(suite.MODELS), {1: 2000, 32: 300}, {1: 200, 32: 30})
QUICK = Settings(("mlp-128", "cnn"), {1: 30, 32: 10}, {1: 5, 32: 2})
# Deployment size: MobileNetV2 at --size on mnist5k resized and on the cluttered task; the default recipe
# alone (a 20-40 min run each), its own report timed at batch 1 only (the files do not depend on it).
DEPLOYMENT = Settings((), {1: 600}, {1: 30}, (1,), (1,), ("fusion",), {"batch": [1], "threads": [1]})
LATENCY = Settings((), {1: 600}, {1: 30}, (1,), (1,), ())
SPECS: dict = dict(suite.MODELS)  # every model this run may build, by name (the --rows sets add theirs)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------ build

def tfmot_peer(dense, ds, seed: int):
    """Plain tfmot as its pruning guide runs it; returns (stripped model, sparsity per pruned kernel).

    Faithful to the guide except two settings, both in the peer's favour: the default
    `frequency=100` would prune only at step 0 on a 4,000-sample set (tfmot's schedules prune every
    `frequency` steps) and leave
    the peer at 50%, so it prunes every step; and batch 32 (as the baseline was trained) instead of
    the guide's 128, which leaves 58 steps on 3,600 samples (small CNN: 91.1% vs 97.7% accuracy).
    """
    import tensorflow_model_optimization as tfmot

    from compressor.train.training import clone_with_weights, compile_for_training

    keras.utils.set_random_seed(seed)
    base = clone_with_weights(dense)  # prune_low_magnitude wraps layers in place: train a clone
    train_n = int(len(ds.x_train) * 0.9)  # the guide holds out 10% for validation
    end_step = math.ceil(train_n / PEER["batch_size"]) * PEER["epochs"]
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=PEER["initial_sparsity"], final_sparsity=PEER["final_sparsity"],
        begin_step=0, end_step=end_step - 1, frequency=1)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(base, pruning_schedule=schedule)
    compile_for_training(wrapped, 1e-3)
    wrapped.fit(ds.x_train, ds.y_train, batch_size=PEER["batch_size"], epochs=PEER["epochs"], validation_split=0.1,
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], verbose=0)
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    reached = {}
    for layer in stripped.layers:
        for w in layer.weights:
            if len(w.shape) >= 2 and "kernel" in w.name:
                reached[w.name] = float(np.mean(w.numpy() == 0))
    return stripped, reached


def overall_sparsity(model) -> float:
    """Zero fraction over every kernel (rank >= 2 weight), weighted by size."""
    from compressor.core import kernel_zeros

    zeros, size = kernel_zeros(model)
    return zeros / size if size else 0.0


def macs(model) -> dict:
    from compressor.graph.flops import model_macs

    return {"macs": model_macs(model), "macs_nonzero": model_macs(model, nonzero_only=True)}


def _trained(spec, data, saved: Path, reuse: bool):
    """The dense baseline: trained with the fixed seed and saved beside its files, or with --reuse
    the one an earlier run on this --work saved."""
    from compressor.load.model_io import load_model

    if reuse and saved.is_file():
        log(f"reusing {saved} from --work")
        return load_model(saved).model
    dense = suite.train(spec, data, seed=SEED)
    dense.save(saved)
    return dense


def _peer(dense, ds, saved: Path, reuse: bool):
    """The tfmot peer and its per-kernel sparsity, built (and saved) or with --reuse read back."""
    from compressor.load.model_io import load_model

    if not (reuse and saved.is_file()):
        peer, reached = tfmot_peer(dense, ds, SEED)
        peer.save(saved)
        return peer, reached
    peer = load_model(saved).model
    return peer, {w.name: float(np.mean(w.numpy() == 0)) for layer in peer.layers for w in layer.weights
                  if len(w.shape) >= 2 and "kernel" in w.name}


def build(spec, data, work: Path, settings: Settings = FULL) -> dict:
    """Train the model and make every variant's files; a failing variant is recorded, not fatal."""
    if spec.data is None:
        return build_latency_only(spec, work)
    folder = work / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    ds = suite.dataset_for(spec, data)
    entry = {"name": spec.name, "title": spec.title, "input_shape": list(spec.input_shape), "data": spec.data,
             "train_epochs": spec.epochs, "files": {}, "macs": {}, "errors": {}, "seconds": {}}
    t = time.perf_counter()
    dense = _trained(spec, data, folder / "dense.keras", settings.reuse)
    entry["params"] = int(dense.count_params())
    entry["keras_accuracy"] = suite.test_accuracy(dense, spec, data)
    entry["seconds"]["train"] = round(time.perf_counter() - t, 1)
    log(f"{spec.name}: trained {spec.epochs} epochs, keras test accuracy {entry['keras_accuracy']:.4f}")

    t = time.perf_counter()
    entry["files"]["dense"] = {rt: folder / f"dense{ext}" for rt, ext in RUNTIMES.items()}
    for rt, path in entry["files"]["dense"].items():
        registry.float_target(rt).export(dense, path, sparse=False)
    entry["macs"]["dense"] = macs(dense)

    try:
        peer, reached = _peer(dense, ds, folder / "tfmot-peer.keras", settings.reuse)
        entry["files"]["tfmot-peer"] = {rt: folder / f"tfmot-peer{ext}" for rt, ext in RUNTIMES.items()}
        for rt, path in entry["files"]["tfmot-peer"].items():
            # the peer as tfmot users ship it: sparse-encoded LiteRT file, plain ONNX
            registry.float_target(rt).export(peer, path, sparse=registry.float_target(rt).storage_flag is None)
        entry["macs"]["tfmot-peer"] = macs(peer)
        entry["peer_sparsity"] = {"overall": overall_sparsity(peer), "kernels": reached}
        log(f"{spec.name}: tfmot peer at {entry['peer_sparsity']['overall']:.0%} overall kernel sparsity")
    except Exception as exc:
        entry["errors"]["tfmot-peer failed"] = _one_line(exc)
        log(f"{spec.name}: tfmot peer FAILED: {_one_line(exc)}")
    entry["seconds"]["tfmot-peer"] = round(time.perf_counter() - t, 1)

    for variant in settings.fusions + (("fusion-distill",) if DISTILL else ()):
        t = time.perf_counter()
        _fusion(entry, dense, ds, folder / variant, variant, settings.bench, settings.reuse)
        entry["seconds"][variant] = round(time.perf_counter() - t, 1)
    keras.backend.clear_session()
    return entry


# ------------------------------------------------------------------------------------ measure

def fixed_recipe():
    """The default recipe without its search stage: the fixed per-stage amounts the search replaced."""
    from compressor.config.recipe import default_recipe

    recipe = default_recipe()
    return recipe.model_copy(update={"stages": [st for st in recipe.stages if st.name != "search"]})


def build_latency_only(spec, work: Path) -> dict:
    """An untrained model's dense float and int8 files, for latency rows (no accuracy: nothing was learned)."""
    folder = work / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(SEED)
    model = spec.build()
    calibration = np.random.default_rng(SEED).random((32, *spec.input_shape), dtype=np.float32)
    entry = {"name": spec.name, "title": spec.title, "input_shape": list(spec.input_shape), "data": None,
             "train_epochs": 0, "params": int(model.count_params()), "keras_accuracy": None,
             "files": {"dense": {}, "dense-int8": {}}, "macs": {}, "errors": {}, "seconds": {}}
    for runtime, ext in RUNTIMES.items():
        for variant, name in (("dense", runtime), ("dense-int8", f"{runtime}-int8")):
            t = time.perf_counter()
            path = folder / f"{variant}{ext}"
            try:
                registry.target(name).export(model, path, calibration=calibration, sparse=False)
                entry["files"][variant][runtime] = path
            except Exception as exc:
                entry["errors"][f"{variant} {runtime} failed"] = _one_line(exc)
            entry["seconds"][f"export {variant}{ext}"] = round(time.perf_counter() - t, 1)
            log(f"{spec.name}: {path.name} in {entry['seconds'][f'export {variant}{ext}']}s")
    entry["macs"]["dense"] = entry["macs"]["dense-int8"] = macs(model)
    keras.backend.clear_session()
    return entry


def _recipe(variant: str, bench: dict | None):
    """The variant's recipe (default, fixed or distilled), with the run's own report timed as `bench` says."""
    from compressor.config.recipe import default_recipe

    recipe = {"fusion": default_recipe, "fusion-fixed": fixed_recipe, "fusion-distill": distill_recipe}[variant]()
    return recipe if bench is None else recipe.model_copy(update={"bench": recipe.bench.model_copy(update=bench)})


def distill_recipe():
    """The default recipe with distillation from the dense model in every fine-tune (`distill: {enabled: true}`)."""
    from compressor.config.recipe import Distill, default_recipe

    return default_recipe().model_copy(update={"distill": Distill(enabled=True)})


STAGE_KEYS = {"fusion": "stages", "fusion-fixed": "fixed_stages", "fusion-distill": "distill_stages"}


def _compressed(entry: dict, dense, ds, out: Path, variant: str, recipe) -> dict:
    """compressor.api.compress's report; a failed verification is flagged, its files still timed."""
    from compressor.api import compress
    from compressor.core.errors import CompressorError

    try:
        return compress(dense, ds, out, recipe=recipe, force=True, quiet=True)
    except CompressorError as exc:
        # The pipeline writes every file and report.json before it refuses a failed verification;
        # those files are still timed, and the page flags them with the verification problem.
        if not str(exc).startswith("verification failed") or not (out / "report.json").is_file():
            raise
        entry["errors"][f"{variant} verification"] = str(exc).split("; see ")[0]
        log(f"{entry['name']}: {variant} verification failed; timing its files anyway, flagged: {exc}")
        return json.loads((out / "report.json").read_text())


def _fusion(entry: dict, dense, ds, out: Path, variant: str, bench: dict | None = None, reuse: bool = False) -> None:
    """One compressor run: `fusion` = the default recipe (goal-less search), `fusion-fixed` = without
    the search, `fusion-distill` = the default recipe distilled (`--distill`); files, stages and the
    frontier are recorded, a failure is recorded, not fatal."""
    from compressor.load.model_io import load_model
    from compressor.train.training import count_params

    default = variant == "fusion"
    try:
        recipe = None if default and bench is None else _recipe(variant, bench)
        if reuse and (out / "report.json").is_file():  # an earlier run on this --work finished it
            report = json.loads((out / "report.json").read_text())
            log(f"{entry['name']}: {variant} reused from --work")
        else:
            report = _compressed(entry, dense, ds, out, variant, recipe)
        entry["files"][variant] = {rt: out / f"pruned{ext}" for rt, ext in RUNTIMES.items()}
        int8 = {rt: out / f"pruned-int8{ext}" for rt, ext in RUNTIMES.items() if (out / f"pruned-int8{ext}").is_file()}
        if int8 and default:
            entry["files"]["fusion-int8"] = int8
        key = STAGE_KEYS[variant]
        entry[key] = [{k: s.get(k) for k in ("name", "amount", "params_before", "params_after", "nonzero_after",
                                             "accuracy_after", "seconds", "notes")} for s in report["stages"]]
        entry.setdefault("verification", []).extend(
            {k: v.get(k) for k in ("file", "ok", "max_abs_diff", "prediction_agreement")}
            for v in report["verification"])
        if default:
            entry["frontier"] = report.get("frontier", [])
            entry["latency_model"] = report.get("latency_model", [])
        if variant == "fusion-distill":
            entry["distill_frontier"] = report.get("frontier", [])
        log(f"{entry['name']}: {variant} done ({', '.join(s['name'] for s in report['stages'])})")
    except Exception as exc:
        entry["errors"][f"{variant} failed"] = _one_line(exc)
        log(f"{entry['name']}: {variant} FAILED: {_one_line(exc)}")
        traceback.print_exc()
    if variant in entry["files"]:
        try:  # MACs need the pruned Keras model; its files are benchmarked even if it cannot be reloaded
            pruned = load_model(out / "pruned.keras").model
            entry["macs"][variant] = macs(pruned)
            if default:
                entry["macs"]["fusion-int8"] = entry["macs"][variant]
                entry["fusion_kernel_sparsity"] = overall_sparsity(pruned)
                entry["fusion_params"] = count_params(pruned)
        except Exception as exc:
            entry["errors"][f"{variant} MACs unavailable"] = _one_line(exc)


def static_metrics(entry: dict, x: np.ndarray, y: np.ndarray | None) -> dict:
    """Accuracy (+ Wilson CI), sizes and stored weights of every file; correctness kept for McNemar
    (`y` None: a latency-only model, not scored)."""
    from compressor.cli.bench import fit_samples
    from exporters.benchmark import correctness, file_params
    from exporters.files import gzip_size
    from exporters.runtimes import open_runner_safely
    from exporters.stats import accuracy_interval

    out = {}
    verified = {Path(v["file"]).name: v["ok"] for v in entry.get("verification", [])}
    for variant, by_runtime in entry["files"].items():
        for runtime, path in by_runtime.items():
            runner, resolver, note = open_runner_safely(path, 1)
            ok = None if y is None else correctness(runner, fit_samples(x, runner.input_shape, "data", path), y, path)
            try:
                params, nonzero = file_params(path)
            except Exception as exc:  # read-back is best effort here; the pipeline verifies its own files
                params = nonzero = None
                note = (note + "; " if note else "") + f"weights not read back: {_one_line(exc)}"
            out[(variant, runtime)] = {
                "file": str(path), "resolver": resolver, "correct": ok,
                "accuracy": None if ok is None else float(ok.mean()),
                "accuracy_ci95": None if ok is None else list(accuracy_interval(ok)), "size_bytes": path.stat().st_size,
                "gzip_bytes": gzip_size(path), "params": params, "nonzero_params": nonzero,
                "notes": [note] if note else [],
                "verified": verified.get(path.name, True) if variant.startswith("fusion") else None,
            }
    return out


def time_runtime(entry: dict, static: dict, runtime: str, x: np.ndarray, settings: Settings) -> list[dict]:
    """Interleaved timings of every variant of one runtime, for each thread count and batch size."""
    from exporters.latency import measure_both
    from exporters.runtimes import open_runner

    variants = [v for v in VARIANTS if (v, runtime) in static]
    timings = []
    for threads in settings.threads:
        for batch in settings.batches:
            runners = {v: open_runner(static[(v, runtime)]["file"], threads=threads,
                                      resolver=static[(v, runtime)]["resolver"]) for v in variants}
            shape = runners[variants[0]].input_shape
            xb = np.resize(x[:batch], (batch, *x.shape[1:])).reshape((batch, *shape)).astype(np.float32)
            t = time.perf_counter()
            times, served = measure_both(runners, xb, settings.runs[batch], settings.warmup[batch])
            log(f"{entry['name']} {runtime} t{threads} b{batch}: {len(variants)} files x {settings.runs[batch]} rounds "
                f"in {time.perf_counter() - t:.1f}s")
            timings.append({"runtime": runtime, "threads": threads, "batch": batch, "times": times,
                            "served": served, "warmup": settings.warmup[batch]})
    return timings


def measure(entry: dict, data, settings: Settings) -> None:
    """Fill entry['rows'] and entry['comparisons'] from the files built for this model."""
    from exporters.stats import latency_summary, mcnemar, ratio_summary, throughput

    spec = SPECS[entry["name"]]
    if spec.data is None:  # latency only: fixed-seed inputs, nothing scored
        x, y = np.random.default_rng(SEED).random((8, *spec.input_shape), dtype=np.float32), None
    else:
        shaped = suite.dataset_for(spec, data)  # 784, 28x28 rows, 32x32x3 or SIZExSIZEx3
        x, y = shaped.x_test, shaped.y_test
    static = static_metrics(entry, x, y)
    rows, comps = [], []
    for runtime in RUNTIMES:
        if ("dense", runtime) not in static:
            continue
        for timing in time_runtime(entry, static, runtime, x, settings):
            times, served, batch, threads = timing["times"], timing["served"], timing["batch"], timing["threads"]
            for variant, samples in times.items():
                s = static[(variant, runtime)]
                paired = (mcnemar(static[("dense", runtime)]["correct"], s["correct"])
                          if variant != "dense" and y is not None else None)
                rows.append({
                    "model": entry["name"], "variant": variant, "runtime": runtime, "batch": batch, "threads": threads,
                    "file": Path(s["file"]).relative_to(WORK_ROOT).as_posix(), "resolver": s["resolver"],
                    "latency_ms": {**latency_summary(samples), "warmup": timing["warmup"]},
                    "latency_ms_served": {**latency_summary(served[variant]), "warmup": timing["warmup"]},
                    "throughput_per_s": throughput(samples, batch),
                    **{k: s[k] for k in ("accuracy", "accuracy_ci95", "size_bytes", "gzip_bytes", "params",
                                         "nonzero_params", "notes", "verified")},
                    "mcnemar_vs_dense": paired,
                    **entry["macs"].get(variant, {"macs": None, "macs_nonzero": None}),
                })
            for variant in VARIANTS[1:]:
                for base in ("dense", "tfmot-peer"):
                    if variant == base or variant not in times or base not in times:
                        continue
                    row = compare(entry, static, runtime, batch, threads, variant, base,
                                  ratio_summary(times[base], times[variant]), mcnemar)
                    ratio = ratio_summary(served[base], served[variant])
                    row["speedup_served"] = {"median": ratio["median"], "p10": ratio["p10"], "p90": ratio["p90"],
                                             "ci95": [ratio["ci95_low"], ratio["ci95_high"]],
                                             "rounds": ratio["rounds"]}
                    comps.append(row)
    entry["rows"], entry["comparisons"] = rows, comps


def compare(entry, static, runtime, batch, threads, variant, base, ratio, mcnemar) -> dict:
    """One variant against one baseline: speedup from per-round ratios, size ratios, accuracy,
    and the ideal speedup from MACs (dense MACs / the variant's non-zero and structural MACs)."""
    a, b = static[(base, runtime)], static[(variant, runtime)]
    m_base, m_var = entry["macs"].get(base, {}), entry["macs"].get(variant, {})
    row = {
        "model": entry["name"], "runtime": runtime, "batch": batch, "threads": threads,
        "variant": variant, "baseline": base,
        "speedup": {"median": ratio["median"], "p10": ratio["p10"], "p90": ratio["p90"],
                    "ci95": [ratio["ci95_low"], ratio["ci95_high"]], "rounds": ratio["rounds"]},
        "gzip_ratio": a["gzip_bytes"] / b["gzip_bytes"], "size_ratio": a["size_bytes"] / b["size_bytes"],
        "accuracy_delta": None if a["correct"] is None else b["accuracy"] - a["accuracy"],
        "mcnemar": None if a["correct"] is None else mcnemar(a["correct"], b["correct"]),
        "ideal_nonzero": None, "of_ideal_nonzero": None, "ideal_structural": None, "of_ideal_structural": None,
    }
    if base == "dense" and m_base.get("macs") and m_var.get("macs"):
        for kind, key in (("nonzero", "macs_nonzero"), ("structural", "macs")):
            ideal = m_base["macs"] / m_var[key] if m_var[key] else None
            row[f"ideal_{kind}"] = ideal
            row[f"of_ideal_{kind}"] = ratio["median"] / ideal if ideal else None
    return row


# ------------------------------------------------------------------------------------ render

def _f(value, fmt: str, missing: str = "–") -> str:
    return missing if value is None else format(value, fmt)


def _label(row) -> str:
    """Variant name, flagged when LiteRT needed the builtin ops or the pipeline's verification failed."""
    tags = [] if row["resolver"] == "default" else ["builtin ops"]
    if row.get("verified") is False:
        tags.append("verification failed")
    return row["variant"] + (f" ({', '.join(tags)})" if tags else "")


def _x(value) -> str:
    return _f(value, ".2f") + ("x" if value is not None else "")


def _acc(row) -> str:
    if row.get("accuracy") is None:
        return "–"
    lo, hi = row["accuracy_ci95"]
    return f"{row['accuracy']:.3f} ± {(hi - lo) / 2:.3f}"


def _speed(c, key: str = "speedup") -> str:
    """The median per-round speedup with its 95% CI; `speedup_served` for the served timing."""
    if not c or not c.get(key):
        return "–"
    lo, hi = c[key]["ci95"]
    ci = f" ({lo:.2f}–{hi:.2f})" if lo is not None else ""
    return f"{c[key]['median']:.2f}x{ci}"


def _served(row) -> str:
    served = row.get("latency_ms_served")
    return f"{served['p50']:.4f}" if served else "–"


def _find(items, **keys):
    return next((i for i in items if all(i.get(k) == v for k, v in keys.items())), None)


def headline_table(results: dict) -> str:
    lines = ["| model | runtime | variant | speedup vs dense | speedup vs tfmot | gzip smaller vs dense | "
             "gzip smaller vs tfmot | "
             "accuracy ± 95% CI (dense) |",
             "|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        for runtime in RUNTIMES:
            dense = _find(m.get("rows", []), variant="dense", runtime=runtime, batch=1, threads=1)
            for variant in ("fusion-fixed", "fusion", "fusion-int8"):
                row = _find(m.get("rows", []), variant=variant, runtime=runtime, batch=1, threads=1)
                if row is None or dense is None:
                    continue
                vd = _find(m["comparisons"], variant=variant, baseline="dense", runtime=runtime, batch=1, threads=1)
                vt = _find(m["comparisons"], variant=variant, baseline="tfmot-peer", runtime=runtime, batch=1,
                           threads=1)
                vs_peer = (_speed(vt), f"{vt['gzip_ratio']:.1f}x") if vt else ("–", "–")
                lines.append(
                    f"| {m['name']} | {runtime} | {_label(row)} | {_speed(vd)} | {vs_peer[0]} | "
                    f"{vd['gzip_ratio']:.1f}x | {vs_peer[1]} | {_acc(row)} ({_acc(dense)}) |")
    return "\n".join(lines)


def deployment_table(results: dict) -> str:
    """The models at deployment size (not the 28-32 px suite), batch 1, 1 thread: both timings."""
    lines = ["| model | data | runtime | variant | p50 ms call (dense) | speedup call vs dense | "
             "p50 ms served (dense) | speedup served vs dense | speedup call vs tfmot | gzip smaller | "
             "accuracy ± 95% CI (dense) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        if m["name"] in suite.MODELS:
            continue
        for runtime in RUNTIMES:
            dense = _find(m.get("rows", []), variant="dense", runtime=runtime, batch=1, threads=1)
            for variant in VARIANTS[1:]:
                row = _find(m.get("rows", []), variant=variant, runtime=runtime, batch=1, threads=1)
                if row is None or dense is None or variant == "tfmot-peer":
                    continue
                vd = _find(m["comparisons"], variant=variant, baseline="dense", runtime=runtime, batch=1, threads=1)
                vt = _find(m["comparisons"], variant=variant, baseline="tfmot-peer", runtime=runtime, batch=1,
                           threads=1)
                lines.append(
                    f"| {m['name']} | {m.get('data') or 'random (untrained)'} | {runtime} | {_label(row)} | "
                    f"{row['latency_ms']['p50']:.3f} ({dense['latency_ms']['p50']:.3f}) | {_speed(vd)} | "
                    f"{_served(row)} ({_served(dense)}) | {_speed(vd, 'speedup_served')} | {_speed(vt)} | "
                    f"{vd['gzip_ratio']:.1f}x | {_acc(row)} ({_acc(dense)}) |")
    return "\n".join(lines) if len(lines) > 2 else ""


def headline_md(results: dict) -> str:
    meta = results["meta"]
    return "\n".join([
        f"Batch 1, 1 thread, {meta['machine']['cpu']} ({meta['machine']['cores']} cores); "
        f"default recipe: {' -> '.join(meta['recipe_stages'])}. Speedup = median per-round latency ratio over "
        f"{meta['settings']['runs']['1']} interleaved rounds (95% CI); gzip = gzip -9 file size ratio; "
        "accuracy on 1,000 MNIST test digits. Full tables: docs/BENCHMARKS.md.",
        "",
        *([deployment_table(results), "", "At 28-32 px:", ""] if deployment_table(results) else []),
        headline_table(results), ""])


def _measured(entry: dict, meta: dict) -> str:
    stamp = entry.get("measured") or {"date": meta["date"]}
    timing = f"turns of {stamp['block']}" if stamp.get("block") else "call-by-call alternation (cold caches)"
    return stamp["date"] + (f" ({stamp['commit']})" if stamp.get("commit") else "") + f", {timing}"


EXPORT_TIME = [
    "## Export time at deployment size", "",
    "How long the export step (the four targets, the int8 choice and the verification) takes on keras.applications "
    "models at 224 px, before and after the conversions were shared and the int8 schemes that cannot win were "
    "skipped: `docs/EXPORT_TIME.md`, measured with `python scripts/export_time.py --model mobilenetv2 --size 224 "
    "--floor` (wall and CPU seconds, with the machine's load).", "",
]


def _per_batch(counts: dict, what: str) -> str:
    """"200 runs at batch 1, 30 at batch 32" for the batches a run timed (a --rows run times batch 1 only)."""
    parts = [f"{n} {what} at batch {b}" if i == 0 else f"{n} at batch {b}" for i, (b, n) in enumerate(counts.items())]
    return ", ".join(parts)


def render_page(results: dict) -> str:
    """docs/BENCHMARKS.md from benchmarks.json: header and headline, method, frontier, per-model results."""
    lines = (_page_top(results) + _deployment_size() + _method(results) + EXPORT_TIME + frontier_section(results)
             + distill_section(results)
             + ["## Full results", ""])
    for m in results["models"]:
        lines += _model_section(m)
    return "\n".join(lines)


def _deployment_size() -> list[str]:
    """The 224 px latency section scripts/int8_scale.py writes (docs/int8_scale.md), kept on regeneration."""
    section = ROOT / "docs" / "int8_scale.md"
    return section.read_text().splitlines() + [""] if section.is_file() else []


def _page_top(results: dict) -> list[str]:
    """Title, the command that regenerates the page, date and load, machine, the headline table."""
    meta, mi = results["meta"], results["meta"]["machine"]
    return [
        "# Benchmarks", "",
        "Generated by `scripts/benchmark.py`; do not edit by hand. Regenerate with:", "",
        f"```\n{meta['command']}\n```", "",
        *([f"Models re-measured since with {', '.join(f'`{c}`' for c in meta['updates'])}: each model's "
           "date and commit are in the models table below.", ""] if meta.get("updates") else []),
        f"Date: {meta['date']} · wall time: {meta['wall_seconds'] / 60:.1f} min "
        f"({meta['build_seconds'] / 60:.1f} min training/compressing, the rest timing) · 1-min load average "
        f"{meta['load_average_1m']['before_timing']} before timing, {meta['load_average_1m']['after_timing']} after"
        + (" · **QUICK smoke run: few rounds, not for quoting**" if meta["quick"] else ""), "",
        "## Machine", "",
        f"- CPU: {mi['cpu']}, {mi['cores']} cores ({mi['platform']}), no GPU",
        f"- Python {mi['python']}; compressor {meta['tool_version']}",
        "- " + ", ".join(f"{k} {v}" for k, v in mi["versions"].items() if v), "",
        *_deployment_top(results),
        "## Headline at 28-32 px (batch 1, 1 thread)" if deployment_table(results) else
        "## Headline (batch 1, 1 thread)", "",
        "Fusion = this tool's default recipe (`" + " -> ".join(meta["recipe_stages"]) + "`, targets "
        + ", ".join(meta["recipe"]["targets"]) + "). Speedup is the median of per-round latency ratios "
        "(baseline / variant) with its 95% CI; gzip ratio is baseline gzip bytes / variant gzip bytes. "
        "Paste-ready copy: `docs/benchmarks_headline.md`.", "",
        headline_table(results), "",
    ]


def _deployment_top(results: dict) -> list[str]:
    """The deployment-size headline, when such models were measured."""
    table = deployment_table(results)
    if not table:
        return []
    stamps = [m["measured"] for m in results["models"] if m["name"] not in suite.MODELS and m.get("measured")]
    loads = sorted({v for st in stamps for v in st["load_average_1m"].values()})
    return [
        "## Headline at deployment size (batch 1, 1 thread)", "",
        "keras.applications models at 128-224 px, where a call takes milliseconds. `fusion` = the default recipe "
        "(`compressor run` without `--recipe`); `dense-int8` = the untrained dense model's int8 files (latency only). "
        "Two timings per file, taken in the same interleaved turns: **call** = the runtime call alone, the input "
        "placed before the clock (LiteRT `invoke`, onnxruntime `run_with_iobinding`); **served** = the call as a "
        "Python server pays it, input copied in and output copied out (LiteRT `set_tensor` + `invoke` + "
        "`get_tensor`, onnxruntime `session.run` with a numpy feed; one served call per 3 call-only ones). "
        f"1-min load average while timing: {loads[0]}-{loads[-1]} on {results['meta']['machine']['cores']} cores "
        "(other jobs shared the machine: read the ratios, not the milliseconds). Commands and dates: the models "
        "table under Method.", "",
        table, "",
    ]


def _method(results: dict) -> list[str]:
    """The models table, then how the variants were built, timed and scored."""
    meta, mi = results["meta"], results["meta"]["machine"]
    lines = [
        "## Method", "",
        "- **Models** (`scripts/models.py`), each trained with seed 0 on the embedded mnist5k "
        "(4,000 train / 1,000 test real MNIST digits):", "",
        "| model | description | params | dense MACs | epochs | Keras test accuracy | "
        "build seconds (train / peer / fixed / fusion) | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in results["models"]:
        s = m["seconds"]
        built = " / ".join(f"{s.get(k, 0):.0f}" for k in ("train", "tfmot-peer", "fusion-fixed", "fusion"))
        lines.append(f"| {m['name']} | {m['title']} | {m['params']:,} | {m['macs']['dense']['macs']:,} | "
                     f"{m['train_epochs']} | {_f(m['keras_accuracy'], '.4f')} | {built} | "
                     f"{_measured(m, meta)} |")
    p = PEER
    lines += [
        "",
        "- **Variants**: `dense` = the trained model exported as is. `tfmot-peer` = plain tfmot as its guide runs it: "
        f"`prune_low_magnitude` on the whole model, PolynomialDecay {p['initial_sparsity']:.0%} -> "
        f"{p['final_sparsity']:.0%} over {p['epochs']} epochs (batch {p['batch_size']}, 10% validation split), "
        "`UpdatePruningStep`, `strip_pruning`, "
        "TFLite with `EXPERIMENTAL_SPARSITY`, ONNX via tf2onnx. One deviation, in the peer's favour: pruning "
        "frequency 1 instead of the default 100, which on this small set would stop the peer at 50%; "
        "batch 32 (as the baseline was trained) instead of the guide's 128, which gives only 58 steps here "
        "(small CNN peer: 91.1% with 128, 97.7% with 32). "
        "`fusion` = `compressor.api.compress(model, data, out, recipe=None)` (its `pruned.tflite`/`pruned.onnx`); "
        "`fusion-int8` = the same run's `pruned-int8.*`. Since the default recipe ends with a goal-less `search` "
        "stage (the fastest widths measured within the accuracy budget), `fusion-fixed` = the same recipe without "
        "it: the stages' fixed amounts alone, the goal-driven result's point of comparison.",
        "- **Timing**: all files of one model and runtime are opened in one process and take turns "
        f"(dense, peer, fusion, int8, int8, fusion, …) of {meta['settings'].get('block', 1)} back-to-back calls "
        "each, the first of a turn untimed (it refills the caches the previous file evicted; a served model runs "
        "call after call), with `exporters.latency.measure_interleaved`; onnxruntime through an IOBinding (input "
        "bound before the clock starts, as LiteRT's `set_tensor`). Rows measured since the served timing was added "
        "also carry `latency_ms_served` (the *served p50* column): the call as a Python server pays it, input copied "
        "in and output copied out (LiteRT `set_tensor` + `invoke` + `get_tensor`, onnxruntime `session.run` with a "
        "numpy feed), one served call after every 3 call-only ones in the same turns. After warm-up "
        f"({_per_batch(meta['settings']['warmup'], 'runs')}), {_per_batch(meta['settings']['runs'], 'rounds')}, "
        "fixed intra-op threads. LiteRT uses its default resolver (XNNPACK) unless a file needs the builtin one "
        "(noted per row). Speedups are medians of per-round ratios, which cancel slow drift on a shared machine; "
        "absolute milliseconds are less trustworthy than ratios. The 95% CI covers round-to-round noise within "
        "this run only, not run-to-run variation (thread placement, other load): across repeated runs the same "
        "ratio moved by up to ~4% at 1 thread, so differences below ~5% are not meaningful.",
        *(["- **Machine load**: the 1-minute load average during timing "
            f"({meta['load_average_1m']['before_timing']} / {meta['load_average_1m']['after_timing']}) exceeded the "
            f"{mi['cores']} cores, so other processes competed for the CPU: 2-thread rows are contention-dominated and "
            "their spreads are wide; read the 1-thread rows."]
          if max(meta["load_average_1m"].values()) > (mi["cores"] or 1) else []),
        "- **Accuracy**: top-1 on the 1,000 test digits, run through the exported file; 95% Wilson interval; "
        "McNemar's paired test against dense on the same samples (exact below 25 discordant pairs).",
        "- **Ideal speedup** = dense MACs / variant MACs, two ways: *non-zero* (every zero weight skipped; "
        "the bound for sparse kernels) and *structural* (only physically removed units/channels; the bound "
        "for runtimes that densify, such as onnxruntime). *Of ideal* = measured speedup / ideal. MACs from "
        "`compressor.graph.flops.model_macs` of the Keras model (Dense and Conv family; int8 shares the float "
        "model's MACs).",
        "",
    ]
    return lines


def _model_section(m: dict) -> list[str]:
    """One model's full results: errors, stages, zeros, the rows table, the comparisons table, notes."""
    lines = [f"### {m['name']}: {m['title']}", ""]
    if m["errors"]:
        lines += [f"- **{v}**: {e}" for v, e in m["errors"].items()] + [""]
    if m.get("stages"):
        lines += ["Fusion stages: " + "; ".join(
            f"{s['name']} {s['amount']:.0%} -> {s['params_after']:,} params ({s['nonzero_after']:,} non-zero), "
            f"accuracy {s['accuracy_after']:.4f}" for s in m["stages"]) + ".", ""]
    if m.get("peer_sparsity") or m.get("fusion_kernel_sparsity") is not None:
        parts = []
        if m.get("peer_sparsity"):
            vals = m["peer_sparsity"]["kernels"].values()
            parts.append(f"tfmot peer {m['peer_sparsity']['overall']:.1%} (per kernel {min(vals):.0%}-{max(vals):.0%})")
        if m.get("fusion_kernel_sparsity") is not None:
            total, nonzero = m["fusion_params"]
            parts.append(f"fusion {m['fusion_kernel_sparsity']:.1%}, {total:,} weights left of {m['params']:,} "
                         f"({nonzero:,} non-zero)")
        lines += ["Zeros over all kernels: " + "; ".join(parts) + ".", ""]
    lines += ["| variant | runtime | batch | threads | p50 ms | p90 ms | p99 ms | served p50 ms | throughput/s | "
              "accuracy ± 95% CI | McNemar p vs dense | size bytes | gzip bytes | params (non-zero) in file | MACs | "
              "non-zero MACs |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in m.get("rows", []):
        lat = r["latency_ms"]
        mp = r["mcnemar_vs_dense"]["p_value"] if r["mcnemar_vs_dense"] else None
        params = (f"{r['params']:,} ({r['nonzero_params']:,})" if r["params"] is not None else "–")
        lines.append(
            f"| {_label(r)} | {r['runtime']} | {r['batch']} | {r['threads']} | {lat['p50']:.4f} | "
            f"{lat['p90']:.4f} | {lat['p99']:.4f} | {_served(r)} | {r['throughput_per_s']:,.0f} | {_acc(r)} | "
            f"{_f(mp, '.3f')} | "
            f"{r['size_bytes']:,} | {r['gzip_bytes']:,} | {params} | {_f(r['macs'], ',')} | "
            f"{_f(r['macs_nonzero'], ',')} |")
    lines += ["", "| variant | vs | runtime | batch | threads | speedup (95% CI) | p10-p90 | served speedup | "
              "gzip smaller | raw smaller | "
              "accuracy Δ (points) | McNemar p | ideal non-zero | of ideal | ideal structural | of ideal |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in m.get("comparisons", []):
        sp = c["speedup"]
        lines.append(
            f"| {c['variant']} | {c['baseline']} | {c['runtime']} | {c['batch']} | {c['threads']} | {_speed(c)} | "
            f"{sp['p10']:.2f}-{sp['p90']:.2f} | {_speed(c, 'speedup_served')} | {c['gzip_ratio']:.2f}x | "
            f"{c['size_ratio']:.2f}x | {_f(c['accuracy_delta'] and c['accuracy_delta'] * 100, '+.1f')} | "
            f"{_f((c['mcnemar'] or {}).get('p_value'), '.3f')} | {_x(c['ideal_nonzero'])} | "
            f"{_f(c['of_ideal_nonzero'], '.0%')} | {_x(c['ideal_structural'])} | "
            f"{_f(c['of_ideal_structural'], '.0%')} |")
    notes = sorted({n for r in m.get("rows", []) for n in r["notes"]})
    if notes:
        lines += [""] + [f"- note: {n}" for n in notes]
    lines.append("")
    return lines


def frontier_section(results: dict) -> list[str]:
    """Per model, the default recipe's search points: predicted vs measured speedup per runtime
    (the search's own interleaved timing, fewer rounds than the tables above) and accuracy on the budget split."""
    lines = ["## Frontier of the goal-less search (`fusion`)", "",
             "Every operating point the default recipe's search stage visited, from its report.json `frontier`; "
             "the shipped point is marked. Accuracy is on the budget split (x_val, else x_test) after the "
             "point's fine-tune; measured speedups (over the search's start, the model the earlier stages left) "
             "come from the search's own interleaved timing.", ""]
    for m in results["models"]:
        rows = m.get("frontier") or []
        if not rows:
            continue
        runtimes = sorted({rt for r in rows for rt in r.get("measured_speedup", {})})
        lines += [f"### {m['name']}", "",
                  "| point | predicted | " + " | ".join(f"measured {rt} (vs start)" for rt in runtimes)
                  + " | accuracy | within budget | widths | shipped |",
                  "|---|---|" + "---|" * len(runtimes) + "---|---|---|---|"]
        for r in rows:
            measured = " | ".join(_x(r.get("measured_speedup", {}).get(rt)) for rt in runtimes)
            widths = ", ".join(f"{g} {w}" for g, w in r["widths"].items())
            lines.append(f"| {r.get('point', '')} | {r['predicted_speedup']:.2f}x | {measured} | {r['accuracy']:.4f} | "
                         f"{'yes' if r['within_budget'] else 'no'} | {widths} | "
                         f"{'yes' if r.get('files') == ['pruned.keras'] else ''} |")
        errors = [abs(c["error_pct"]) for c in m.get("latency_model", []) if c["model"] not in ("dense", "start")]
        if errors:
            lines += ["", f"Latency model: median |prediction error| {float(np.median(errors)):.1f}% over "
                          f"{len(errors)} point/runtime pairs."]
        lines.append("")
    return lines


def _search_reach(stages: list[dict], frontier: list[dict]) -> str:
    """The shipped search point's measured speedup over the search's start per runtime, and the search's seconds."""
    shipped = next((r for r in frontier if r.get("shipped") or r.get("files") == ["pruned.keras"]), None)
    seconds = next((s["seconds"] for s in stages if s["name"] == "search"), None)
    speed = ", ".join(f"{rt} {v:.2f}x" for rt, v in sorted((shipped or {}).get("measured_speedup", {}).items()))
    return f"{speed or 'no point shipped'} | {_f(seconds, '.0f')} s"


def distill_section(results: dict) -> list[str]:
    """`--distill`: the default recipe with distillation on beside it off, per model: the shipped file's
    accuracy and speedup over dense (batch 1, 1 thread) and what the search reached within budget."""
    models = [m for m in results["models"] if m.get("distill_stages")]
    if not models:
        return []
    lines = ["## Distillation on vs off (`--distill`)", "",
             "`fusion` = the default recipe (distillation off), `fusion-distill` = the same with "
             "`distill: {enabled: true}` (alpha 0.5, T 4: every stage's and search point's fine-tune also learns "
             "the dense model's softened outputs). Accuracy and speedups of the shipped `pruned.*` files over "
             "dense at batch 1, 1 thread, timed in the tables below; the search's reach is its shipped point's "
             "measured speedup over the search's start (report.json `frontier`).", "",
             "| model | distillation | accuracy tflite ± 95% CI | speedup tflite | speedup onnxruntime | "
             "search shipped point vs its start | search stage |", "|---|---|---|---|---|---|---|"]
    for m in models:
        for variant, label, stages, frontier in (
                ("fusion", "off", m.get("stages", []), m.get("frontier", [])),
                ("fusion-distill", "on", m["distill_stages"], m.get("distill_frontier", []))):
            row = _find(m.get("rows", []), variant=variant, runtime="tflite", batch=1, threads=1)
            speed = [_find(m.get("comparisons", []), variant=variant, baseline="dense", runtime=rt, batch=1,
                           threads=1) for rt in ("tflite", "onnxruntime")]
            speeds = " | ".join(_speed(c) if c else "–" for c in speed)
            lines.append(f"| {m['name']} | {label} | {_acc(row) if row else '–'} | {speeds} | "
                         f"{_search_reach(stages, frontier)} |")
    return lines + [""]


# ------------------------------------------------------------------------------------ main

WORK_ROOT = Path(".")
DISTILL = False  # --distill: also build the fusion-distill variant


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, Path):
        return value.relative_to(WORK_ROOT).as_posix() if value.is_relative_to(WORK_ROOT) else str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _public_args(argv: list[str]) -> list[str]:
    """The command line as the page prints it: without --work/--out, whose folders are this machine's."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--work", "--out"):
            skip = True
        elif not arg.startswith(("--work=", "--out=")):
            shown.append(shlex.quote(arg))
    return shown


def _merged(previous: Path, results: dict) -> dict:
    """`results` plus the models of an earlier run on this machine that were not re-measured now."""
    if not previous.is_file():
        return results
    old = json.loads(previous.read_text())
    if old["meta"]["machine"].get("cpu") != results["meta"]["machine"].get("cpu") or old["meta"]["quick"]:
        raise SystemExit(f"error: {previous} was measured on another machine or by a --quick run; "
                         "run without --update to regenerate every model")
    fresh = {e["name"] for e in results["models"]}
    kept = [e for e in old["models"] if e["name"] not in fresh]
    order = list(suite.MODELS)
    models = provenance.in_order(kept + results["models"], "name", order)
    if not kept:  # every model re-measured: this run alone
        return results
    updates = list(dict.fromkeys(old["meta"].get("updates", []) + [results["meta"]["command"]]))  # each command once
    meta = dict(results["meta"], command=old["meta"]["command"], updates=updates)  # date, load, recipe: this run's
    if results["meta"].get("rows", "suite") != "suite":  # rows added beside the suite: its settings stay the page's
        meta = dict(old["meta"], updates=updates)
    return {"meta": meta, "models": models}


def _options(argv: list[str] | None):
    """The parsed arguments, the settings, the models to build and the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for BENCHMARKS.md and the JSON (default: docs; with --quick "
                                      "artifacts/benchmarks-quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: two models, few rounds")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(suite.MODELS)}")
    parser.add_argument("--work", help="keep the built files in this folder (default: a temporary folder, removed)")
    parser.add_argument("--distill", action="store_true", help="also run the default recipe with distillation on "
                        "(variant fusion-distill) and add the distillation on/off table")
    parser.add_argument("--update", action="store_true",
                        help="re-measure only --models and keep the other models' entries of the existing "
                             "benchmarks.json in --out (same machine only; each model's page row shows its date)")
    parser.add_argument("--rows", choices=("suite", "deployment", "latency"), default="suite",
                        help="suite: the reference models at 28-32 px; deployment: MobileNetV2 (alpha 1.0) at "
                             "--size on mnist5k@SIZE and clutter@SIZE, dense / tfmot peer / default recipe; latency: "
                             "untrained MobileNetV2 and ResNet50 at --size, dense float and int8 files timed "
                             "(not scored). "
                             "deployment and latency rows are added to the page beside the suite's (as --update)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --work: reuse the dense and peer models and the finished compressor runs an earlier "
                             "run left there (a deployment-size model trains and compresses for tens of minutes)")
    parser.add_argument("--size", type=int, help="input side in pixels for --rows deployment (128) or latency (224)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.rows != "suite":
        deployment = args.rows == "deployment"
        specs = suite.deployment(args.size or 128) if deployment else suite.latency_only(args.size or 224)
        SPECS.update(specs)
        settings = dataclasses.replace(DEPLOYMENT if deployment else LATENCY, models=tuple(specs))
        args.update = True
    if args.reuse:
        if not args.work:
            parser.error("--reuse needs --work (the folder an earlier run kept)")
        settings = dataclasses.replace(settings, reuse=True)
    names = tuple(args.models.split(",")) if args.models else settings.models
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(settings.models)}")
    out = Path(args.out or ("artifacts/benchmarks-quick" if args.quick else ROOT / "docs"))
    return args, settings, names, out


def _build_and_measure(names, settings: Settings, recipe, start: float) -> tuple[list[dict], dict]:
    """Every model's files first, then every timing, so TensorFlow is idle while the files run;
    returns the entries and the build time and load averages the page states."""
    from compressor.data.sources import load_dataset

    log(f"building {len(names)} models into {WORK_ROOT}; default recipe stages: "
        f"{', '.join(s.name for s in recipe.stages)}")
    loaded: dict = {}

    def data_for(name: str):
        spec = SPECS[name]
        if spec.data is not None and spec.data not in loaded:
            t = time.perf_counter()
            loaded.clear()  # one generated set in memory at a time (clutter@128 is ~1 GB)
            loaded[spec.data] = load_dataset(spec.data)
            log(f"data {spec.data}: {loaded[spec.data].input_shape} in {time.perf_counter() - t:.1f}s")
        return loaded.get(spec.data)

    entries = [build(SPECS[n], data_for(n), WORK_ROOT, settings) for n in names]
    build_seconds = time.perf_counter() - start
    load_before = os.getloadavg()
    for entry in entries:
        t = time.perf_counter()
        measure(entry, data_for(entry["name"]), settings)
        entry["seconds"]["bench"] = round(time.perf_counter() - t, 1)
    load_after = os.getloadavg()
    load = {"before_timing": round(load_before[0], 2), "after_timing": round(load_after[0], 2)}
    stamp = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": provenance.commit(),
             "block": BLOCK, "load_average_1m": dict(load),
             "runs": {str(k): v for k, v in settings.runs.items()}, "threads": list(settings.threads),
             "batches": list(settings.batches), "bench_recipe": settings.bench}
    for entry in entries:
        entry["measured"] = stamp
    return entries, {"build_seconds": round(build_seconds, 1), "load_average_1m": load}


def _results(args, argv, settings: Settings, recipe, entries: list[dict], timing: dict, start: float) -> dict:
    """benchmarks.json: how, when and where it was measured (meta), then the models."""
    from compressor import __version__
    from exporters.benchmark import machine_info

    command = "python scripts/benchmark.py" + "".join(f" {a}" for a in _public_args(argv or sys.argv[1:]))
    return {
        "meta": {
            "command": command, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": round(time.perf_counter() - start, 1), "quick": args.quick,
            "build_seconds": timing["build_seconds"], "load_average_1m": timing["load_average_1m"],
            "tool_version": __version__, "machine": machine_info(),
            "recipe": recipe.model_dump(mode="json"), "recipe_stages": [s.name for s in recipe.stages],
            "settings": {"runs": {str(k): v for k, v in settings.runs.items()},
                         "warmup": {str(k): v for k, v in settings.warmup.items()},
                         "block": BLOCK,
                         "batches": list(settings.batches), "threads": list(settings.threads), "seed": SEED,
                         "peer": PEER},
            "rows": args.rows,
        },
        "models": entries,
    }


def write_pages(out: Path, results: dict) -> None:
    """benchmarks.json, BENCHMARKS.md and benchmarks_headline.md in `out`, readable by everyone."""
    from exporters.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "benchmarks.json", json.dumps(results, indent=2, default=_jsonable) + "\n")
    write_text_atomic(out / "BENCHMARKS.md", render_page(results))
    write_text_atomic(out / "benchmarks_headline.md", headline_md(results))
    for name in ("benchmarks.json", "BENCHMARKS.md", "benchmarks_headline.md"):
        os.chmod(out / name, 0o644)  # atomic writes create 0600 temp files; docs are for everyone


def main(argv: list[str] | None = None) -> int:
    global WORK_ROOT, DISTILL
    args, settings, names, out = _options(argv)
    DISTILL = args.distill
    WORK_ROOT = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="compressor-bench-"))
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    WORK_ROOT = WORK_ROOT.resolve()
    start = time.perf_counter()

    from compressor.config.recipe import default_recipe

    recipe = default_recipe()
    entries, timing = _build_and_measure(names, settings, recipe, start)
    results = _results(args, argv, settings, recipe, entries, timing, start)
    if args.update:
        results = _merged(out / "benchmarks.json", results)
    write_pages(out, results)
    if not args.work:
        shutil.rmtree(WORK_ROOT, ignore_errors=True)
    log(f"wrote {out / 'BENCHMARKS.md'} in {results['meta']['wall_seconds'] / 60:.1f} min")
    failed = [f"{e['name']}: {v}" for e in entries for v in e["errors"]]
    if failed:
        log(f"problems: {'; '.join(failed)} (see the page)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
