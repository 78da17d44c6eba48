"""`compressor bench`: latency distribution, throughput, accuracy and size of one exported file,
or of two files run interleaved (A B A B …) so their ratio survives a noisy machine.

JSON shape (`--json`):

    {"machine": {...}, "settings": {...},
     "files": [{"file", "runtime", "resolver", "input_shape", "inputs", "size_bytes", "gzip_bytes",
                "latency_ms": {"p50", "p90", "p99", "mean", "std", "min", "max", "runs", "warmup"},
                "latency_ms_served": {... the same keys},
                "throughput_per_s", "accuracy", "accuracy_ci95", "test_samples", "notes"}, ...],
     "compare": {"latency_ratio": {"median", "p10", "p90", "ci95_low", "ci95_high", "rounds"},
                 "latency_ratio_served": {... the same keys}, "speedup_of_model": float,
                 "speedup_of_model_served": float, "mcnemar": {...} | null}}     # only with --compare

`latency_ms` times the runtime call alone, the input placed before the clock; `latency_ms_served`
times the call as a Python server makes it (input copied in, output copied out), one served call
per three call-only ones in the same turns. `latency_ratio` is model / compare per interleaved
round (below 1.0 the --model file is faster); `speedup_of_model` = 1 / its median: how many times
as fast --model runs as --compare.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np

from compressor.core.errors import CompressorError
from exporters import targets
from exporters.untrusted import check_model_file

RANDOM_SEED = 0


def check_file(path: str | Path, flag: str = "--model") -> Path:
    """Fail before any runtime is loaded, with the fix in the message."""
    path = Path(path)
    targets.format_for(path, runnable=True, flag=flag)
    if not path.is_file():
        raise CompressorError(f"{flag} '{path}' not found; pass an existing {targets.extension_list(runnable=True)}")
    check_model_file(path)  # size, external data, nesting: before any runtime opens it (exporters.untrusted)
    return path


def fit_samples(x: np.ndarray, input_shape: tuple[int, ...], data_name: str, path: Path) -> np.ndarray:
    """Reshape data samples to the file's input (784 <-> 28x28x1); a different size is an error."""
    if tuple(x.shape[1:]) == tuple(input_shape):
        return x.astype(np.float32)
    if int(np.prod(x.shape[1:])) != int(np.prod(input_shape)):
        raise CompressorError(f"data '{data_name}': samples have shape {tuple(x.shape[1:])} but '{path.name}' expects "
                              f"{tuple(input_shape)}; pass data that matches the model's input")
    return x.reshape((len(x), *input_shape)).astype(np.float32)


def batch_input(input_shape: tuple[int, ...], batch: int, x: np.ndarray | None) -> np.ndarray:
    """The timed input: real samples when there are any (repeated to fill the batch), else fixed-seed noise."""
    if x is not None:
        return np.resize(x[:batch], (batch, *input_shape)).astype(np.float32)
    return np.random.default_rng(RANDOM_SEED).random((batch, *input_shape), dtype=np.float32)


MAX_THREADS = 256  # onnxruntime and LiteRT start one OS thread each: 100,000 fails in the runtime
MAX_COUNT = 10_000_000  # --runs / --warmup: timings are kept in memory, and 10^7 calls is hours on any model
TIME_LIMIT_S = 60.0  # one runtime call (opening the file or one inference) before the file is stopped
_TIME_LIMIT_ENV = "COMPRESSOR_BENCH_TIME_LIMIT"
INPUT_MEMORY_SHARE = 8  # the timed input may take at most 1/8 of the free memory (activations need the rest)


def _validate(args) -> None:
    for name, low in (("runs", 1), ("warmup", 0), ("block", 1), ("threads", 1), ("batch", 1)):
        value = getattr(args, name)
        if value < low:
            raise CompressorError(f"--{name} {value} is invalid; pass --{name} >= {low}")
    if args.threads > MAX_THREADS:
        raise CompressorError(f"--threads {args.threads} is more than {MAX_THREADS}; pass --threads between 1 and "
                              f"{MAX_THREADS} (this machine has {os.cpu_count()} cores)")
    for name in ("runs", "warmup"):
        if getattr(args, name) > MAX_COUNT:
            raise CompressorError(f"--{name} {getattr(args, name)} is more than {MAX_COUNT:,}; pass a smaller --{name}")


def time_limit(args) -> float:
    """Seconds one runtime call may take: --time-limit, else COMPRESSOR_BENCH_TIME_LIMIT, else 60."""
    value, source = getattr(args, "time_limit", None), "--time-limit"
    if value is None:
        raw = os.environ.get(_TIME_LIMIT_ENV, "").strip()
        if not raw:
            return TIME_LIMIT_S
        value, source = raw, _TIME_LIMIT_ENV
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise CompressorError(f"{source} {value!r} is not a positive number of seconds; pass e.g. 60")
    return seconds


def check_batch_memory(batch: int, input_shape: tuple[int, ...], path: Path) -> None:
    """Refuse a batch whose input alone would not fit, before anything is allocated."""
    per_sample = 4 * max(1, int(np.prod(input_shape, dtype=np.float64)))
    budget = _free_memory() // INPUT_MEMORY_SHARE
    if batch * per_sample > budget:
        gib = batch * per_sample / 2**30
        raise CompressorError(f"--batch {batch} needs {gib:,.1f} GiB for the input of '{path.name}' alone "
                              f"({'x'.join(map(str, input_shape))} float32 a sample), more than 1/{INPUT_MEMORY_SHARE}"
                              f" of the free memory; pass --batch <= {max(1, budget // per_sample):,}")


def _free_memory() -> int:
    """Available physical memory in bytes (1 GiB x the share when the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return INPUT_MEMORY_SHARE << 30


def bench_command(args, reporter) -> str:
    """Run the benchmark described by the parsed `compressor bench` arguments; returns the text to print.

    The runtimes run in a watched child process (exporters.watchdog): a file that loops for ever
    is stopped after the time limit, and SIGTERM ends the command at once."""
    from exporters.watchdog import run_watched

    _validate(args)
    limit = time_limit(args)
    paths = [check_file(args.model)]
    if args.compare:
        paths.append(check_file(args.compare, "--compare"))
    dataset = None
    if args.data:
        from compressor.data.sources import Dataset, load_dataset

        dataset = load_dataset(args.data)
        if not isinstance(dataset, Dataset):
            raise CompressorError("`compressor bench --data` takes labelled arrays "
                                  f"(.npz, {', '.join(('mnist5k', 'digits', 'mnist5k@SIZE', 'clutter@SIZE'))} "
                                  "or a function returning arrays); streamed data is read by `compressor run`")
    result = run_watched(measure, (args, paths, dataset, reporter), paths, limit, debug=getattr(args, "debug", False))
    return json.dumps(result, indent=2) if args.json else render_table(result)


def measure(args, paths: list[Path], dataset, reporter) -> dict:
    """Open, score and time every file (in the watched child); the JSON result."""
    from exporters.benchmark import correctness, machine_info
    from exporters.files import gzip_size
    from exporters.latency import measure_both
    from exporters.runtimes import open_runner_safely
    from exporters.stats import accuracy_interval, latency_summary, mcnemar, ratio_summary, throughput
    from exporters.watchdog import beat, idle

    files, runners, correct = [], {}, []
    for i, path in enumerate(paths):
        beat(path)
        runner, resolver, note = open_runner_safely(path, args.threads)
        idle()  # gzip of a large file is not a runtime call
        shape = runner.input_shape
        if isinstance(shape, dict):  # several inputs: timed on fixed-seed noise, each set by name
            files.append(_several_inputs(args, path, runner, resolver, note, dataset, runners))
            continue
        check_batch_memory(args.batch, shape, path)
        entry = {"file": str(path), "runtime": runner.runtime, "resolver": resolver, "input_shape": list(shape),
                 "size_bytes": path.stat().st_size, "gzip_bytes": gzip_size(path), "notes": [note] if note else []}
        x = None
        if dataset is not None:
            x = fit_samples(dataset.x_test, shape, dataset.name, path)
            reporter.step(f"accuracy of {path.name} on {len(x)} test samples of '{dataset.name}'")
            ok = correctness(runner, x, dataset.y_test, path)
            correct.append(ok)
            low, high = accuracy_interval(ok)
            entry.update(accuracy=float(ok.mean()), accuracy_ci95=[low, high], test_samples=int(ok.size))
        entry["inputs"] = f"data '{dataset.name}'" if dataset is not None else "random (fixed seed)"
        files.append(entry)
        runners[f"{i}:{path}"] = (runner, batch_input(shape, args.batch, x))

    times, served = _time(runners, args, reporter, measure_both)
    idle()
    for entry, samples, serve_samples in zip(files, times, served):
        entry["latency_ms"] = {**latency_summary(samples), "warmup": args.warmup}
        entry["latency_ms_served"] = {**latency_summary(serve_samples), "warmup": args.warmup}
        entry["throughput_per_s"] = throughput(samples, args.batch)

    result = {
        "machine": machine_info(),
        "settings": {"threads": args.threads, "batch": args.batch, "runs": args.runs, "warmup": args.warmup,
                     "block": args.block, "data": args.data, "interleaved": len(paths) > 1},
        "files": files,
    }
    if len(paths) > 1:
        ratio, ratio_served = ratio_summary(times[0], times[1]), ratio_summary(served[0], served[1])
        result["compare"] = {"latency_ratio": ratio, "speedup_of_model": 1.0 / ratio["median"],
                             "latency_ratio_served": ratio_served,
                             "speedup_of_model_served": 1.0 / ratio_served["median"],
                             "mcnemar": mcnemar(correct[0], correct[1]) if len(correct) == 2 else None}
    return result


def _several_inputs(args, path: Path, runner, resolver: str, note, dataset, runners: dict) -> dict:
    """The entry of a file with several inputs, its runner queued with a fixed-seed input per input."""
    from compressor.core import CompressorError
    from exporters.files import gzip_size
    from exporters.runtimes import timing_input

    if dataset is not None:
        raise CompressorError(f"'{path.name}' takes {len(runner.input_shape)} inputs ({', '.join(runner.input_shape)})"
                              "; --data feeds one: time it without --data, or score it with compressor run")
    for shape in runner.input_shape.values():
        check_batch_memory(args.batch, shape, path)
    runners[f"{len(runners)}:{path}"] = (runner, timing_input(runner, args.batch, RANDOM_SEED))
    return {"file": str(path), "runtime": runner.runtime, "resolver": resolver,
            "input_shape": {k: list(v) for k, v in runner.input_shape.items()}, "size_bytes": path.stat().st_size,
            "gzip_bytes": gzip_size(path), "notes": [note] if note else [], "inputs": "random (fixed seed)"}


def _time(runners: dict, args, reporter, measure) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Interleaved timings, (call-only, served) per file. Each runner keeps its own input, so files
    with different input shapes can still be compared round by round."""
    label = f"timing {len(runners)} file{'s' if len(runners) > 1 else ''} ({args.runs} runs, {args.warmup} warm-up)"
    with reporter.bar(label, args.runs) as bar:
        out, served = measure({k: r for k, (r, _) in runners.items()}, {k: x for k, (_, x) in runners.items()},
                              args.runs, args.warmup, on_round=lambda i: bar.advance(), block=args.block)
    return [out[label] for label in runners], [served[label] for label in runners]


def _shape_text(shape) -> str:
    if isinstance(shape, dict):
        return " + ".join(f"{k} " + "x".join(map(str, v)) for k, v in shape.items())
    return "x".join(map(str, shape))


def render_table(result: dict) -> str:
    """A rich table rendered to a string, so the CLI decides where it goes."""
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    table = Table(title=f"compressor bench: batch {s['batch']}, "
                        f"{s['threads']} thread{'s' if s['threads'] > 1 else ''}, "
                        f"{s['runs']} runs after {s['warmup']} warm-up" + (", interleaved" if s["interleaved"] else ""))
    table.add_column("metric")
    for f in result["files"]:
        table.add_column(Path(f["file"]).name, justify="right")
    rows = [
        ("runtime", lambda f: f["runtime"] + ("" if f["resolver"] == "default" else " (builtin ops)")),
        ("input", lambda f: _shape_text(f["input_shape"]) + f", {f['inputs']}"),
        ("p50 ms", lambda f: f"{f['latency_ms']['p50']:.4f}"),
        ("p90 ms", lambda f: f"{f['latency_ms']['p90']:.4f}"),
        ("p99 ms", lambda f: f"{f['latency_ms']['p99']:.4f}"),
        ("mean ms", lambda f: f"{f['latency_ms']['mean']:.4f}"),
        ("served p50 ms", lambda f: f"{f['latency_ms_served']['p50']:.4f}"),
        ("served p90 ms", lambda f: f"{f['latency_ms_served']['p90']:.4f}"),
        ("served runs", lambda f: f"{f['latency_ms_served']['runs']}"),
        ("throughput /s", lambda f: f"{f['throughput_per_s']:,.0f}"),
        ("size bytes", lambda f: f"{f['size_bytes']:,}"),
        ("gzip bytes", lambda f: f"{f['gzip_bytes']:,}"),
    ]
    if "accuracy" in result["files"][0]:
        rows.append(("accuracy (95% CI)", lambda f: f"{f['accuracy']:.4f} ({f['accuracy_ci95'][0]:.4f}-"
                                                    f"{f['accuracy_ci95'][1]:.4f}), n={f['test_samples']}"))
    for name, cell in rows:
        table.add_row(name, *(cell(f) for f in result["files"]))
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, force_terminal=False, color_system=None)
    console.print(table)
    lines = []
    cmp = result.get("compare")
    if cmp:
        r = cmp["latency_ratio"]
        a, b = (Path(f["file"]).name for f in result["files"])
        ci = (f", 95% CI {r['ci95_low']:.3f}-{r['ci95_high']:.3f}" if r["ci95_low"] is not None else "")
        lines.append(f"latency ratio {a} / {b}: median {r['median']:.3f} (p10 {r['p10']:.3f}, p90 {r['p90']:.3f}{ci}, "
                     f"{r['rounds']} rounds): {a} runs {cmp['speedup_of_model']:.2f}x as fast as {b}")
        rs = cmp["latency_ratio_served"]
        lines.append(f"served (copy-in + call + copy-out) ratio {a} / {b}: median {rs['median']:.3f} "
                     f"({rs['rounds']} rounds): {a} runs {cmp['speedup_of_model_served']:.2f}x as fast as {b}")
        if cmp["mcnemar"]:
            m = cmp["mcnemar"]
            lines.append(f"McNemar paired test: {m['a_only']} samples only {a} gets right, {m['b_only']} only {b}; "
                         f"p = {m['p_value']:.3g} ({m['method']})")
    notes = [n for f in result["files"] for n in f["notes"]]
    lines += [f"note: {n}" for n in notes]
    m = result["machine"]
    lines.append("p50/p90/p99 ms: the runtime call alone (input placed before the clock); served: the call with the "
                 "input copied in and the output copied out, as a Python server pays it")
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}")
    return buffer.getvalue().rstrip("\n") + "\n" + "\n".join(lines)
