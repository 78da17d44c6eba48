"""A latency model measured on the target runtime: per-layer tables over candidate widths.

Latency on CPU runtimes is step-shaped in width (SIMD tiles) and every op has a fixed cost, so a
MAC count mispredicts it. Each weighted layer is exported alone (a one-layer tf-keras model, the
same exporters the pipeline ships with), timed interleaved with the other entries, and stored in
a JSON cache keyed by machine and runtime version, so a second run (or another model with the
same layer shapes) measures nothing. Widths between measured grid points are interpolated.
The table's sum for a model = fixed per-model overhead + sum over layers of (entry - overhead).

That sum misses what only a whole model has: the runtime's layout reorders between layers (or, the
other way, the reorders and transposes each layer pays alone but not inside a model) and the fixed
cost of the unweighted ops (pooling, batch norm, adds, activations), which dominate once earlier
stages removed width. So the prediction is calibrated on whole models measured on the runtime:
measured ≈ a + b·table_sum (a ≥ 0 holds the unmodelled fixed cost), fitted on the search's start
model, a few uniformly narrowed probes of it, and every point the search measures afterwards.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.core._tf import keras
from compressor.core.errors import CompressorError
from compressor.graph import surgery
from exporters import targets
from exporters.latency import BLOCK

RUNTIMES = ("onnxruntime", "tflite")
LEVELS = (0.03125, 0.125, 0.25, 0.5, 1.0)  # grid fractions of a layer's full width (rounded to `step`)
MEASURED_KINDS = ("Dense", "Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MultiHeadAttention")
ATTENTION = "MultiHeadAttention"  # its output width is the residual stream; its table width is num_heads


_DISTRIBUTION = {"onnx": "onnxruntime", "tflite": "ai-edge-litert"}  # by file format: what runs it


def runtime_version(runtime: str) -> str:
    """The installed version of the package that runs this runtime's files (part of the cache key)."""
    from importlib.metadata import version

    if runtime not in RUNTIMES:
        raise CompressorError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    try:
        return version(_DISTRIBUTION[targets.float_target(runtime).format.name])
    except Exception:  # noqa: BLE001 - a missing distribution name only changes the cache key
        return "unknown"


TIMING = f"interleaved turns of {BLOCK} calls, first untimed"  # entries timed otherwise are not comparable


def default_cache(runtime: str) -> Path:
    """One file per machine + runtime version; COMPRESSOR_LATENCY_CACHE names a folder to keep them in."""
    folder = Path(os.environ.get("COMPRESSOR_LATENCY_CACHE") or Path.home() / ".cache" / "compressor")
    machine = f"{platform.node()}-{platform.machine()}-{os.cpu_count()}cpu"
    return folder / f"latency-{machine}-{runtime}-{runtime_version(runtime)}.json"


@dataclass
class LayerShape:
    """What a layer's latency depends on besides its widths (HALP's table key)."""

    kind: str
    config: dict  # the layer's keras config (activation, kernel, stride, padding…)
    spatial: tuple  # input shape without batch and channels
    in0: int
    out0: int

    def key(self, width_in: int, width_out: int, batch: int) -> str:
        c = self.config
        parts = [self.kind, f"in={width_in}", f"out={width_out}", f"sp={'x'.join(map(str, self.spatial))}",
                 f"k={c.get('kernel_size', '')}", f"s={c.get('strides', '')}", f"pad={c.get('padding', '')}",
                 f"act={c.get('activation', '')}", f"bias={c.get('use_bias', '')}",
                 f"dm={c.get('depth_multiplier', '')}",
                 f"b={batch}"]
        if self.kind == ATTENTION:  # heads of this size: the table's out width counts heads
            parts[-1:-1] = [f"kd={c.get('key_dim')}", f"vd={c.get('value_dim')}"]
        return "|".join(str(p).replace(" ", "") for p in parts)

    def build(self, width_in: int, width_out: int) -> keras.Model:
        """The layer alone at these widths (random weights: latency does not depend on values)."""
        cfg = dict(self.config, name="layer")
        if self.kind == ATTENTION:  # self-attention over the same tokens, `width_out` heads
            cfg.update(num_heads=width_out, query_shape=None, key_shape=None, value_shape=None)
            inputs = keras.Input(shape=(*self.spatial, width_in))
            return keras.Model(inputs, keras.layers.MultiHeadAttention.from_config(cfg)(inputs, inputs))
        if "units" in cfg:
            cfg["units"] = width_out
        elif "filters" in cfg:
            cfg["filters"] = width_out
        inputs = keras.Input(shape=(*self.spatial, width_in))
        return keras.Model(inputs, getattr(keras.layers, self.kind).from_config(cfg)(inputs))


def layer_shape(layer) -> LayerShape | None:
    """The table key of a weighted layer the model measures, else None (its cost is in the overhead)."""
    kind = type(layer).__name__
    if kind not in MEASURED_KINDS:
        return None
    shape = _query_shape(layer) if kind == ATTENTION else layer.input_shape
    if shape is None or isinstance(shape, list) or any(d is None for d in shape[1:]):
        return None
    cfg = layer.get_config()
    for drop in ("name", "trainable", "dtype", "batch_input_shape", "query_shape", "key_shape", "value_shape"):
        cfg.pop(drop, None)
    return LayerShape(kind, cfg, tuple(int(d) for d in shape[1:-1]), int(shape[-1]), out_width(layer))


def measured_shapes(model) -> dict[str, LayerShape]:
    """Layer name -> table key, for every layer the latency model measures."""
    return {layer.name: s for layer in model.layers if (s := layer_shape(layer)) is not None}


def _query_shape(layer):
    """Self-attention's input shape (query = value); None for cross-attention, which the table does not cover."""
    shapes = layer.input_shape
    if isinstance(shapes, list):
        if any(tuple(s) != tuple(shapes[0]) for s in shapes):
            return None
        shapes = shapes[0]
    return tuple(shapes)


def in_width(layer) -> int:
    shape = _query_shape(layer) if type(layer).__name__ == ATTENTION else layer.input_shape
    return int(shape[-1])


def out_width(layer) -> int:
    """The width a layer's removals change: output channels, or an attention layer's heads."""
    if type(layer).__name__ == ATTENTION:
        return int(layer._num_heads)
    return int(layer.output_shape[-1])


def grid(full: int, step: int, low: int = 1) -> list[int]:
    """Candidate widths measured for a dimension of `full` units: a few fractions, multiples of `step`,
    plus one step and the narrowest width the search may reach (`low`: 1 lets it narrow a layer of one
    step or less unit by unit; without these the interpolation would be flat below the smallest
    multiple and see no gain there). Nothing narrower than `low` is measured: the search never goes
    there (`limits.floors`), and each entry is an export and a timing session."""
    low = max(1, min(low, full))
    points = {full} | {w for w in (low, step) if low <= w < full}
    for f in LEVELS:
        w = int(round(full * f / step)) * step
        if low <= w < full:
            points.add(w)
    return sorted(points)


@dataclass
class LatencyTable:
    """Measured p50 (ms) per entry key, for one runtime; loaded from and saved to `path`."""

    runtime: str
    path: Path
    entries: dict[str, float] = field(default_factory=dict)
    measured: int = 0  # entries measured in this process (0 on a fully cached run)

    @classmethod
    def open(cls, runtime: str, path: str | Path | None = None) -> "LatencyTable":
        if runtime not in RUNTIMES:
            raise CompressorError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
        path = Path(path) if path else default_cache(runtime)
        entries = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
                stored = (raw.get("runtime"), raw.get("version"), raw.get("timing"))
                if stored == (runtime, runtime_version(runtime), TIMING):
                    entries = {k: float(v) for k, v in raw.get("entries", {}).items()}
            except (ValueError, AttributeError):
                entries = {}  # a damaged cache is rebuilt, not trusted
        return cls(runtime, path, entries)

    def save(self) -> None:
        """Merge with what another process may have saved meanwhile, then replace the file atomically
        (two runs sharing a cache never corrupt it or drop each other's entries)."""
        from exporters.files import write_text_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = LatencyTable.open(self.runtime, self.path).entries
        self.entries = {**on_disk, **self.entries}
        body = {"runtime": self.runtime, "version": runtime_version(self.runtime), "timing": TIMING,
                "machine": platform.node(),
                "entries": dict(sorted(self.entries.items()))}
        write_text_atomic(self.path, json.dumps(body, indent=1))

    def ensure(self, wanted: dict[str, tuple[LayerShape, int, int]], batch: int, runs: int = 200) -> None:
        """Measure the keys not in the table yet, all in one interleaved session, and save."""
        missing = {k: v for k, v in wanted.items() if k not in self.entries}
        overhead = _overhead_key(batch)
        if overhead not in self.entries:
            missing[overhead] = (LayerShape("Dense", {"units": 1, "use_bias": False}, (), 1, 1), 1, 1)
        if not missing:
            return
        from exporters.latency import measure_interleaved
        from exporters.runtimes import open_runner, timing_input

        with tempfile.TemporaryDirectory() as tmp:
            runners = {}
            for i, (key, (shape, w_in, w_out)) in enumerate(missing.items()):
                path = Path(tmp) / targets.float_target(self.runtime).filename(f"entry{i}")
                _export(shape.build(w_in, w_out), path, self.runtime)
                runners[key] = open_runner(path)
            x = {k: timing_input(r, batch) for k, r in runners.items()}
            times = _measure_each(runners, x, runs, measure_interleaved)
        for key, t in times.items():
            self.entries[key] = float(np.median(t) * 1e3)
        self.measured += len(times)
        self.save()

    def overhead(self, batch: int) -> float:
        return self.entries[_overhead_key(batch)]


def _overhead_key(batch: int) -> str:
    return f"overhead|b={batch}"


def _measure_each(runners: dict, x: dict, runs: int, measure) -> dict[str, np.ndarray]:
    """Entries differ in input shape: each runner gets its own input, every round runs each once."""
    return measure(runners, x, runs, warmup=max(5, runs // 10))


def _export(model, path: Path, runtime: str) -> None:
    """The runtime's float file, dense storage (the registry's exporter)."""
    targets.float_target(runtime).export(model, path, sparse=False)


@dataclass
class LayerTerm:
    """One measured layer: how its input/output widths follow the groups' removals, and its grid."""

    name: str
    shape: LayerShape
    a_in: dict[str, int]  # group -> input channels lost per removed unit (Flatten repeats them)
    a_out: dict[str, int]
    ins: list[int]
    outs: list[int]
    diagonal: bool  # in and out follow the same group one to one (depthwise): a 1-D table

    def widths(self, removed: dict[str, int]) -> tuple[int, int]:
        w_in = self.shape.in0 - sum(a * removed.get(g, 0) for g, a in self.a_in.items())
        w_out = self.shape.out0 - sum(a * removed.get(g, 0) for g, a in self.a_out.items())
        return max(1, w_in), max(1, w_out)

    def points(self) -> list[tuple[int, int]]:
        """The widths measured: a depthwise layer's diagonal, else the cross through the full widths
        (every input width at the full output, every output width at the full input; `separable`)."""
        if self.diagonal:
            return [(w + self.shape.in0 - self.shape.out0, w) for w in self.outs]
        full_in, full_out = self.shape.in0, self.shape.out0
        return [(i, full_out) for i in self.ins] + [(full_in, o) for o in self.outs if o != full_out]


def separable(ins: list[int], outs: list[int], entry, base: float) -> np.ndarray:
    """The whole in x out grid (ms) from its cross through the full widths (`entry(i, o)` on the cross).

    A layer's own cost (entry - base, the per-model overhead) is close to a product of an input and an
    output factor, steps included (MACs are in x out, and SIMD tiles step each width on its own), so
    cost(i, o) = cost(i, full) x cost(full, o) / cost(full, full): a 5 x 5 grid measures 9 entries
    instead of 25. The whole-model calibration absorbs what the product misses."""
    rows = np.maximum(np.array([entry(i, outs[-1]) for i in ins]) - base, 0.0)
    cols = np.maximum(np.array([entry(ins[-1], o) for o in outs]) - base, 0.0)
    corner = float(rows[-1])
    if corner <= 1e-9:  # the layer costs no more than the overhead: add what each width changes
        return base + np.maximum(np.add.outer(rows, cols) - corner, 0.0)
    return base + np.outer(rows, cols) / corner


def probe(model, group_names: list[str]) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
    """Per measured layer, how many input and output channels it loses per unit removed from each
    group: {layer: (a_in, a_out)}, found by one surgery per group on `model` (which stays as it is).
    The runtimes' tables share it: surgery on a deep network costs seconds per group."""

    shapes = measured_shapes(model)
    found = {n: ({}, {}) for n in shapes}
    for g in group_names:
        smaller, _ = surgery.remove_units(model, {g: [0]})  # a new model; `model` keeps its units
        for name, shape in shapes.items():
            layer = smaller.get_layer(name)
            for lost, width, full in ((found[name][0], in_width(layer), shape.in0),
                                      (found[name][1], out_width(layer), shape.out0)):
                if full - width:
                    lost[g] = full - width
    return found


class LatencyModel:
    """Predicted p50 (ms) of `model` with some units removed per group, on one runtime."""

    def __init__(self, model, group_names: list[str], runtime: str, batch: int = 1, step: int = 8,
                 cache: str | Path | None = None, runs: int = 200, couplings: dict | None = None, low: int = 1):
        """`couplings`: `probe(model, group_names)` when several runtimes' models share one; `low`: the
        narrowest channel width the search may reach (attention heads are counted from 1)."""
        self.runtime, self.batch = runtime, batch
        self.table = LatencyTable.open(runtime, cache)
        shapes = measured_shapes(model)
        couplings = couplings if couplings is not None else probe(model, group_names)
        a_in = {n: couplings[n][0] for n in shapes}
        a_out = {n: couplings[n][1] for n in shapes}
        self.terms = []
        for name, shape in shapes.items():
            diagonal = bool(a_in[name]) and a_in[name] == a_out[name] and len(a_in[name]) == 1
            ins = grid(shape.in0, step, low) if a_in[name] and not diagonal else [shape.in0]
            heads = shape.kind == ATTENTION  # a few heads: every count matters, not multiples of `step`
            outs = (grid(shape.out0, 1) if heads else grid(shape.out0, step, low)) if a_out[name] else [shape.out0]
            self.terms.append(LayerTerm(name, shape, a_in[name], a_out[name], ins, outs, diagonal))
        wanted = {t.shape.key(i, o, batch): (t.shape, i, o) for t in self.terms for i, o in t.points()}
        self.entries = len(wanted)
        self.table.ensure(wanted, batch, runs)
        self._grids: dict[str, np.ndarray] = {}  # term name -> its measured grid (ms), see `_entry`
        self._memo: dict[tuple[str, int, int], float] = {}
        self._reach: dict[str, list[int]] = {}  # group -> indices of the terms whose widths it changes
        for i, t in enumerate(self.terms):
            for g in set(t.a_in) | set(t.a_out):
                self._reach.setdefault(g, []).append(i)
        self._start: dict[str, int] = {}  # the last fully computed removal, and its per-term ms (`layer_ms`)
        self._start_ms: list[float] | None = None
        self.fit = (0.0, 1.0)  # (a, b): identity until whole models are observed
        self.samples: list[tuple[float, float]] = []  # (table_sum, measured ms) of whole models

    def _entry(self, term: LayerTerm, w_in: int, w_out: int) -> float:
        """A layer's interpolated table entry at these widths. The search's allocation asks for the
        same few widths of every layer thousands of times (DenseNet121: ~120 layers per prediction,
        several predictions per group per step), so each term's grid is read once and each answer kept."""
        known = self._memo.get((term.name, w_in, w_out))
        if known is not None:
            return known
        grid_ms = self._grids.get(term.name)
        if grid_ms is None:  # read on first use: the table is complete by then
            key = term.shape.key
            def entry(i, o):
                return self.table.entries[key(i, o, self.batch)]
            grid_ms = self._grids[term.name] = (
                np.array([entry(*p) for p in term.points()]) if term.diagonal
                else separable(term.ins, term.outs, entry, self.table.overhead(self.batch)))
        if term.diagonal:
            value = float(np.interp(w_out, term.outs, grid_ms))
        else:
            along_out = np.array([np.interp(w_out, term.outs, row) for row in grid_ms])
            value = float(np.interp(w_in, term.ins, along_out))
        self._memo[(term.name, w_in, w_out)] = value
        return value

    def layer_ms(self, removed: dict[str, int]) -> dict[str, float]:
        """Each measured layer's own cost (its entry minus the per-model overhead).

        The allocation asks about many removals that each differ from the last in a group or two: only
        the layers those groups reach are recomputed (DenseNet121: a handful of its ~120 layers). When
        they reach many layers, everything is recomputed and this removal becomes the new start."""
        changed = {g for g in set(removed) | set(self._start) if removed.get(g, 0) != self._start.get(g, 0)}
        reached = {i for g in changed for i in self._reach.get(g, ())}
        base = self.table.overhead(self.batch)
        if self._start_ms is None or len(reached) > len(self.terms) // 4:
            self._start = {g: k for g, k in removed.items() if k}
            self._start_ms = [self._layer(t, removed, base) for t in self.terms]
            return dict(zip((t.name for t in self.terms), self._start_ms))
        values = list(self._start_ms)
        for i in reached:
            values[i] = self._layer(self.terms[i], removed, base)
        return dict(zip((t.name for t in self.terms), values))

    def _layer(self, term: LayerTerm, removed: dict[str, int], base: float) -> float:
        return max(0.0, self._entry(term, *term.widths(removed)) - base)

    def table_sum(self, removed: dict[str, int] | None = None) -> float:
        """The uncalibrated per-layer prediction (ms)."""
        return self.table.overhead(self.batch) + sum(self.layer_ms(removed or {}).values())

    def predict(self, removed: dict[str, int] | None = None) -> float:
        """Calibrated p50 (ms): a + b·table_sum, with (a, b) fitted on the whole models observed so far."""
        a, b = self.fit
        return a + b * self.table_sum(removed)

    def observe(self, removed: dict[str, int], measured_ms: float) -> None:
        """Add a whole model's measured p50 (`removed` relative to this model) and refit (a, b)."""
        self.samples.append((self.table_sum(removed), float(measured_ms)))
        self.fit = fit_line([x for x, _ in self.samples], [y for _, y in self.samples])


def fit_line(table_ms: list[float], measured_ms: list[float]) -> tuple[float, float]:
    """(a, b) of measured ≈ a + b·table, minimising the *relative* error (the report's error_pct), a ≥ 0.

    One sample only scales the table (a = 0). A negative intercept has no physical meaning (it
    would predict negative time for tiny models), so it is clamped to 0 and b refitted alone. A
    slope ≤ 0 means the samples do not discriminate (noise, or a runtime whose latency ignores width):
    the prediction then stays flat at their mean, which tells the search that narrowing buys nothing.
    """
    x, y = np.asarray(table_ms, float), np.asarray(measured_ms, float)
    if len(x) == 0:
        return 0.0, 1.0
    w = 1.0 / y  # rows scaled by 1/measured: least squares on relative error
    if len(x) >= 2 and np.ptp(x) > 1e-9 * max(1.0, float(x.max())):
        (a, b), *_ = np.linalg.lstsq(np.stack([w, x * w], 1), np.ones_like(y), rcond=None)
        if a >= 0 and b > 0:
            return float(a), float(b)
        if b <= 0:
            return float(np.mean(y)), 0.0
    b = float(np.sum(x * w) / np.sum((x * w) ** 2))  # through the origin, relative least squares
    return 0.0, b


def measure_models(models: dict[str, object], runtime: str, batch: int = 1, runs: int = 300,
                   files=None) -> dict[str, float]:
    """p50 (ms) of whole Keras models exported for `runtime`, measured interleaved in one session.
    `files` (search.costs.Files): keep each label's exported file and reuse it when asked again."""
    from exporters.latency import measure_interleaved
    from exporters.runtimes import open_runner, timing_input

    def export(model, path):
        _export(model, path, runtime)

    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for i, (label, model) in enumerate(models.items()):
            if files is not None:
                path = files.path(label, model, runtime, export)
            else:
                path = Path(tmp) / targets.float_target(runtime).filename(f"m{i}")
                export(model, path)
            runners[label] = open_runner(path)
        x = {k: timing_input(r, batch) for k, r in runners.items()}
        times = _measure_each(runners, x, runs, measure_interleaved)
    return {k: float(np.median(t) * 1e3) for k, t in times.items()}
