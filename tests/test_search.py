"""The goal-driven search: latency tables measured on the runtime and cached, the width allocation
against a goal, and the goal fields validated like the rest of the recipe."""
import numpy as np
import pytest

from compressor.config.recipe import parse_recipe
from compressor.core._tf import keras
from compressor.core.errors import CompressorError
from compressor.stages import observation, planning, search
from compressor.stages.base import StageContext
from compressor.stages.search.latency_model import LatencyModel, grid
from exporters.frontier_plot import frontier_table, plot_frontier
from tests.conftest import kept_units

L = keras.layers


def _mlp(width: int = 32) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), L.Dense(width, activation="relu", name="h1"),
                             L.Dense(width, activation="relu", name="h2"),
                             L.Dense(10, activation="softmax", name="out")])


def test_latency_table_is_measured_then_reused_from_its_file(tmp_path):
    model = _mlp()
    cache = tmp_path / "table.json"
    first = LatencyModel(model, ["h1", "h2"], "onnxruntime", cache=cache, runs=20)
    assert cache.is_file() and first.table.measured == first.entries + 1  # + the per-model overhead
    h2 = next(t for t in first.terms if t.name == "h2")
    assert h2.ins == grid(32, 8) and h2.outs == grid(32, 8)  # both widths follow a group: 2-D table
    again = LatencyModel(model, ["h1", "h2"], "onnxruntime", cache=cache, runs=20)
    assert again.table.measured == 0  # nothing exported or timed the second time
    assert again.predict() == pytest.approx(first.predict())
    assert all(v > 0 for v in again.table.entries.values())


def test_two_runs_sharing_a_latency_cache_keep_each_others_entries(tmp_path):
    """Concurrent runs on one machine share the cache file: the later save merges, never drops or corrupts."""
    from compressor.stages.search.latency_model import LatencyTable

    cache = tmp_path / "table.json"
    first, second = LatencyTable.open("tflite", cache), LatencyTable.open("tflite", cache)
    first.entries["a"] = 1.0
    first.save()
    second.entries["b"] = 2.0
    second.save()
    assert LatencyTable.open("tflite", cache).entries == {"a": 1.0, "b": 2.0}
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # no temporary file left


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One table folder for the tests below: identical layer shapes are measured once."""
    return tmp_path_factory.mktemp("latency")


def test_step_shaped_table_is_interpolated_between_measured_points(shared_cache):
    from compressor.stages.search.latency_model import default_cache

    model = _mlp()
    lm = LatencyModel(model, ["h1", "h2"], "tflite", cache=shared_cache / default_cache("tflite").name, runs=20)
    h1 = next(t for t in lm.terms if t.name == "h1")
    for w in h1.outs:  # a step: widths up to 16 cost 1 ms, wider ones 3 ms (SIMD tiles)
        lm.table.entries[h1.shape.key(64, w, 1)] = 1.0 if w <= 16 else 3.0
    base = lm.table.overhead(1)
    cost = {r: lm.layer_ms({"h1": r})["h1"] + base for r in (0, 8, 16, 20)}  # widths 32, 24, 16, 12
    assert h1.outs == [1, 8, 16, 32]  # one step and a single unit are always measured
    assert cost[0] == pytest.approx(3.0) and cost[16] == pytest.approx(1.0)  # measured points kept exactly
    assert cost[8] == pytest.approx(2.0) and cost[20] == pytest.approx(1.0)  # linear between, flat on the step


def _ctx(digits, **recipe):
    raw = {"max_accuracy_drop": 0.05, "stages": [{"name": "search"}], **recipe}
    return StageContext(recipe=parse_recipe(raw), data=digits, log=lambda _m: None)


def test_allocation_meets_a_speedup_goal_on_a_tiny_model(digits, tmp_path, shared_cache):
    model = _mlp(32)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=3, verbose=0)
    ctx = _ctx(digits)
    cfg = parse_recipe({"stages": [{"name": "search", "epochs": 1, "points": [], "bisect": 1,
                                    "latency_cache": str(shared_cache),
                                    "goal": {"runtime": "onnxruntime", "speedup": 1.5}}]}).stages[0]
    outcome = search.apply(model, cfg, ctx)
    rows = outcome.details["frontier"]
    assert outcome.details["latency_model"]  # dense predicted vs measured, at least
    met = [r for r in rows if r["reached"] and r["within_budget"]]
    if met:
        chosen = rows[outcome.details["chosen"]]
        assert chosen["within_budget"] and chosen["predicted_speedup"] >= 0.98 * 1.5
        widths = planning.groups(outcome.model)
        assert all(g.units % 8 == 0 for g in widths)  # round_units respected
        assert "search (taylor, onnxruntime)" in outcome.notes[0]
    else:  # an honest one-line reason instead of a model over budget
        assert [n for n in outcome.notes if "not reachable" in n or "no operating point" in n]
        assert all("\n" not in n for n in outcome.notes)
    table = frontier_table(outcome.details, 0.9)
    assert table.count("\n") == (len(rows) + 3 if rows else 1)
    png = plot_frontier(outcome.details, tmp_path / "frontier.png", 0.9)
    assert png.stat().st_size > 1000


def test_unreachable_goal_says_so_in_one_line():
    rows = [{"goal_speedup": 2.0, "within_budget": True, "reached": True, "measured_ms": {"onnxruntime": 0.5},
             "measured_speedup": {"onnxruntime": 2.1}},
            {"goal_speedup": 8.0, "within_budget": False, "reached": True, "measured_ms": {"onnxruntime": 0.1},
             "measured_speedup": {"onnxruntime": 9.0}}]
    cfg = parse_recipe({"stages": [{"name": "search", "goal": {"speedup": 8}}]}).stages[0]
    best, notes = search._choose(rows, 8.0, cfg)
    assert best == 0 and len(notes) == 1 and "not reachable within the accuracy budget" in notes[0]


def test_allocation_prefers_the_group_that_buys_more_latency_per_importance():
    class Linear:  # latency proportional to the units kept in each group; group b is 3x costlier per unit
        def predict(self, removed=None):
            removed = removed or {}
            return (32 - removed.get("a", 0)) * 1.0 + (32 - removed.get("b", 0)) * 3.0

    share = {g: np.linspace(0, 1, 33) for g in ("a", "b")}  # equal importance per unit
    extra = search.allocate(Linear(), {"a": 32, "b": 32}, {}, share, target_ms=100.0, step=8)
    assert extra["b"] > extra["a"] and Linear().predict(extra) <= 100.0
    assert all((32 - k) % 8 == 0 for k in extra.values())


@pytest.mark.parametrize("goal, field", [({"runtime": "tensorrt"}, "goal.runtime"),
                                         ({"speedup": -2}, "goal.speedup"),
                                         ({"latency_ms": 0}, "goal.latency_ms")])
def test_goal_fields_are_validated_in_one_line(goal, field):
    with pytest.raises(CompressorError) as err:
        parse_recipe({"stages": [{"name": "search", "goal": goal}]})
    message = str(err.value)
    assert "\n" not in message and f"stages.0.search.{field}" in message


def test_existing_recipes_stay_valid():
    assert parse_recipe(None).stages[0].name == "weight"
    assert parse_recipe({"stages": [{"name": "weight"}, {"name": "search"}]}).stages[1].goal.runtime == "onnxruntime"


def test_without_a_goal_the_fastest_point_on_all_target_runtimes_ships():
    rows = [{"within_budget": True, "measured_speedup": {"onnxruntime": 6.0, "tflite": 1.5}},
            {"within_budget": True, "measured_speedup": {"onnxruntime": 4.0, "tflite": 4.0}},
            {"within_budget": False, "measured_speedup": {"onnxruntime": 9.0, "tflite": 9.0}}]
    cfg = parse_recipe({"stages": [{"name": "search"}]}).stages[0]
    assert search._choose(rows, None, cfg, ("onnxruntime", "tflite")) == (1, [])  # 4x both beats 6x/1.5x
    assert search._choose(rows, None, cfg, ("onnxruntime",)) == (0, [])
    assert parse_recipe(None).stages[-1].name == "search"  # the default recipe searches without a goal


def test_a_point_slower_than_the_start_on_a_target_runtime_never_ships():
    """MobileNetV2 measured 1.39x in LiteRT but 0.70x in onnxruntime at one point: not a result."""
    rows = [{"within_budget": True, "measured_speedup": {"onnxruntime": 0.70, "tflite": 1.39}},
            {"within_budget": True, "measured_speedup": {"onnxruntime": 1.10, "tflite": 1.20}}]
    cfg = parse_recipe({"stages": [{"name": "search"}]}).stages[0]
    best, notes = search._choose(rows, None, cfg, ("onnxruntime", "tflite"))
    assert best == 1 and len(notes) == 1 and "onnxruntime 0.70x" in notes[0] and "\n" not in notes[0]
    best, notes = search._choose(rows[:1], None, cfg, ("onnxruntime", "tflite"))
    assert best is None and notes  # the model the stages left ships unchanged
    assert search._choose(rows[:1], None, cfg, ("tflite",)) == (0, [])  # a LiteRT-only recipe takes it


def test_keep_frontier_writes_each_other_point_and_names_its_files(tmp_path):
    from compressor.load.model_io import save_model_atomic
    from compressor.run.progress import Reporter
    from compressor.run.report import search_results
    from exporters import ship

    recipe = parse_recipe({"targets": ["tflite", "onnxruntime"], "keep_frontier": True})
    rows = [{"predicted_speedup": 2.0}, {"predicted_speedup": 4.0}]
    label = search.point_label(0, rows[0])
    files = ship.export_points({label: _mlp(16)}, recipe, tmp_path / "frontier", Reporter(quiet=True),
                              save_model_atomic)
    assert sorted(files[label]) == [f"frontier/{label}/pruned.keras", f"frontier/{label}/pruned.onnx",
                                    f"frontier/{label}/pruned.tflite"]
    assert all((tmp_path / f).stat().st_size > 0 for f in files[label])
    lifted = search_results([{"name": "search", "details": {"frontier": rows, "chosen": 1}}], files)
    assert lifted["frontier"][0]["files"] == files[label] and lifted["frontier"][1]["files"] == ["pruned.keras"]


def test_a_speedup_goal_counts_from_the_model_before_any_stage(digits):
    """Earlier stages that already made the model faster than the goal leave the search nothing to do."""
    wide, narrow = _mlp(1024), _mlp(8)
    ctx = StageContext(recipe=parse_recipe({"stages": [{"name": "search"}]}), data=digits, dense_model=wide)
    cfg = parse_recipe({"stages": [{"name": "search", "goal": {"speedup": 1.2}}]}).stages[0]
    kept, note = search._relative_goal(cfg, ctx, narrow, narrow)
    assert kept is None and "already measured" in note and "\n" not in note
    same, none = search._relative_goal(cfg, StageContext(recipe=ctx.recipe, data=digits, dense_model=narrow),
                                       narrow, narrow)
    assert same is cfg and none is None  # the search is the first stage: the goal is its own


def test_attention_heads_are_a_search_group_with_a_measured_table(digits, shared_cache):
    """Heads are not output channels: the search still narrows them (loss rise when silenced, a
    table over head counts), and the chosen model runs with fewer heads."""
    from compressor.stages.search.latency_model import default_cache
    from tests.test_depth import _as_tokens, _encoder

    keras.utils.set_random_seed(0)
    data = _as_tokens(digits)
    model = _encoder()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(data.x_train, data.y_train, epochs=2, verbose=0)
    names = [g.name for g in search.search_groups(model)]
    assert {"mha0", "mha1"} <= set(names) and "ffn0_in" in names
    scores = observation.head_scores(model, data.x_train[:64], data.y_train[:64])
    assert scores["mha0"].shape == (2,) and np.all(scores["mha0"] > 0)
    lm = LatencyModel(model, names, "tflite", cache=shared_cache / default_cache("tflite").name, runs=20)
    mha = next(t for t in lm.terms if t.name == "mha0")
    assert mha.outs == [1, 2] and mha.a_out == {"mha0": 1}  # a table over head counts
    assert lm.predict({"mha0": 1, "mha1": 1}) < lm.predict()
    ctx = _ctx(data)
    cfg = parse_recipe({"stages": [{"name": "search", "epochs": 0}]}).stages[0]
    importance = search._importance(model, cfg, ctx)
    units = {g.name: g.units for g in search.search_groups(model)}
    rng = np.random.default_rng(0)  # answers recomputed only where a removal reaches equal the whole sums
    for _ in range(40):
        removed = {str(g): int(rng.integers(0, units[g])) for g in rng.choice(names, int(rng.integers(1, 3)))}
        assert lm.layer_ms(removed) == {t.name: lm._layer(t, removed, lm.table.overhead(1)) for t in lm.terms}
    extra = search.allocate(lm, units, {}, importance[4], lm.predict() / 8.0, 8)
    assert extra["mha0"] + extra["mha1"] >= 1  # heads are bought like any other width
    smaller = search._shrink(importance, extra)
    for name in ("mha0", "mha1"):
        assert smaller.get_layer(name)._num_heads == 2 - extra[name]
    assert smaller.predict(data.x_test[:4], verbose=0).shape == (4, 10)


def test_head_scores_use_the_tasks_loss_for_a_regression_encoder(digits):
    """A regression model's heads are scored by its own loss (MAE here), not a classification loss
    its outputs cannot be read by."""
    from compressor.config.task import resolve
    from tests.test_depth import _as_tokens

    keras.utils.set_random_seed(0)
    data = _as_tokens(digits)
    inputs = keras.layers.Input(data.x_train.shape[1:])
    x = keras.layers.Dense(16, name="tokens")(inputs)
    x = keras.layers.Add()([x, keras.layers.MultiHeadAttention(2, 8, name="mha0")(x, x)])
    outputs = keras.layers.Dense(1, name="value")(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, outputs)
    y = data.y_train[:64].astype("float32") / 10.0
    model.compile("adam", "mae")
    model.fit(data.x_train[:256], data.y_train[:256].astype("float32") / 10.0, epochs=2, verbose=0)
    task = resolve(parse_recipe({"metric": "mae", "max_metric_drop": 0.05}), model)
    scores = observation.head_scores(model, data.x_train[:64], y, task=task)
    assert scores["mha0"].shape == (2,) and np.all(scores["mha0"] > 0)
    kernel = model.get_layer("mha0")._output_dense.kernel
    silenced = kernel.numpy()
    silenced[0] = 0.0
    before = observation._loss_of(task)(y, model.predict(data.x_train[:64], verbose=0))
    kernel.assign(silenced)
    after = observation._loss_of(task)(y, model.predict(data.x_train[:64], verbose=0))
    assert scores["mha0"][0] == pytest.approx(max(after - before, 0.0) + 1e-6, rel=1e-4, abs=1e-6)


def test_without_a_goal_the_allocation_follows_every_target_runtime():
    """A width only one runtime pays for is still bought when the point shipped is the fastest on both."""
    class Table:
        def __init__(self, per_unit):
            self.per_unit = per_unit

        def predict(self, removed=None):
            return 10.0 + sum(self.per_unit.get(g, 0.0) * (8 - k)
                              for g, k in {"heads": 0, "ffn": 0, **(removed or {})}.items())

    flat_heads = Table({"ffn": 1.0})  # onnxruntime-like: heads cost nothing measurable
    costly_heads = Table({"heads": 2.0, "ffn": 0.1})  # LiteRT-like
    joint = search.Joint([flat_heads, costly_heads])
    assert joint.predict() == pytest.approx(1.0)
    share = {g: np.linspace(0.0, 1.0, 9) for g in ("heads", "ffn")}
    alone = search.allocate(flat_heads, {"heads": 8, "ffn": 8}, {}, share, 0.9 * flat_heads.predict(), 1)
    both = search.allocate(joint, {"heads": 8, "ffn": 8}, {}, share, 0.8, 1)
    assert alone["heads"] == 0 and both["heads"] > 0


def test_fit_line_holds_the_fixed_cost_and_never_goes_negative():
    from compressor.stages.search.latency_model import fit_line

    table = [0.01, 0.02, 0.04, 0.08]
    a, b = fit_line(table, [0.02 + 0.3 * x for x in table])  # an unmodelled fixed cost of 0.02 ms
    assert a == pytest.approx(0.02, rel=1e-6) and b == pytest.approx(0.3, rel=1e-6)
    a, b = fit_line(table, [x - 0.005 for x in table])  # a negative intercept is clamped to 0
    assert a == 0.0 and 0.5 < b < 1.0
    assert fit_line([0.05], [0.01]) == (0.0, pytest.approx(0.2))  # one model: a scale only
    a, b = fit_line(table, [0.03, 0.029, 0.031, 0.028])  # narrower is not faster: flat prediction
    assert b == 0.0 and a == pytest.approx(0.0295)


def _wide_mlp() -> keras.Model:
    """Wide enough that width, not the fixed per-op cost alone, sets its latency in both runtimes."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), L.Dense(1024, activation="relu", name="h1"),
                             L.Dense(10, activation="softmax", name="out")])


def test_calibrated_prediction_of_a_held_out_narrowed_model_is_close_to_its_measurement(shared_cache):
    """The per-layer table sum alone mispredicts whole models (isolated layers pay their own
    transposes and reorders); fitted on the start model and two probes, the prediction of a width
    it never saw lands within 35% of the measurement (observed: under 12% on an idle or a loaded
    machine, while the raw table sum was off by +6..+150%)."""
    from compressor.stages.search.latency_model import default_cache, measure_models

    model, units = _wide_mlp(), {"h1": 1024}
    for rt in ("onnxruntime", "tflite"):
        lm = LatencyModel(model, list(units), rt, cache=shared_cache / default_cache(rt).name, runs=30)
        reference, from_probes = search.calibrate({rt: lm}, model, units, 8, 1)
        assert len(lm.samples) == len(search.PROBES) + 1 and lm.fit[0] >= 0.0 and lm.fit[1] > 0.0
        assert from_probes[rt] > 0.0
        held, removed = search.narrowed(model, units, 0.375, 8)  # width 384: no probe had it
        assert removed == {"h1": 640}
        p50 = measure_models({"start": model, "held": held}, rt, runs=1000)
        measured = reference[rt] * p50["held"] / p50["start"]  # in the calibration session's load
        assert abs(lm.predict(removed) - measured) / measured < 0.35, (rt, lm.predict(removed), measured)


def test_the_goal_less_search_refits_on_every_visited_point_and_goes_past_the_first(digits, shared_cache):
    keras.utils.set_random_seed(0)  # two wide layers: after a 2x cut it still runs well above the per-call floor
    model = keras.Sequential([keras.Input((64,)), L.Dense(1024, activation="relu", name="h1"),
                              L.Dense(1024, activation="relu", name="h2"),
                              L.Dense(10, activation="softmax", name="out")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=2, verbose=0)
    ctx = _ctx(digits)
    cfg = parse_recipe({"stages": [{"name": "search", "epochs": 1, "bisect": 1,
                                    "latency_cache": str(shared_cache)}]}).stages[0]
    outcome = search.apply(model, cfg, ctx)
    rows, fits = outcome.details["frontier"], outcome.details["calibration"]
    assert len(rows) >= 2  # a 1024-wide MLP measures faster at 2x: the search does not stop there
    for rt, fit in fits.items():
        assert fit["models"] == len(search.PROBES) + 1 + len(rows)  # start, probes, then every point
        assert all(rt in r["visit_speedup"] and r["predicted_ms"][rt] > 0 for r in rows)
    checks = outcome.details["latency_model"]
    assert {c["model"] for c in checks} == {"start", *(f"point{i}" for i in range(len(rows)))}
    assert all(np.isfinite(c["error_pct"]) and c["load_drift"] > 0 for c in checks)


def _scripted(speedups: list[float], within: list[bool]) -> "search._Search":
    """A search whose points measure the given speedups (no training, no runtime): the run logic alone."""
    cfg = parse_recipe({"stages": [{"name": "search", "bisect": 1}]}).stages[0]
    s = object.__new__(search._Search)
    s.cfg, s.follow, s.rows, s.good, s.reached, s.visited = cfg, ("onnxruntime",), [], (1.0, None, {}), True, []
    s.capped, s.bad = False, None

    def visit(speedup, extra=None):
        s.visited.append(round(speedup, 3))
        if len(s.rows) == len(speedups):
            return None
        i = len(s.rows)
        s.rows.append({"visit_speedup": {"onnxruntime": speedups[i]}})
        if within[i]:
            s.good = (speedup, None, {})
        else:
            s.bad = (speedup, {})
        return within[i]
    s.visit = visit
    return s


def test_without_a_goal_the_search_doubles_while_measured_speed_improves():
    improving = _scripted([1.6, 2.9, 4.1, 4.1], [True] * 4)
    improving.run([2.0, 4.0, 8.0], None)
    assert improving.visited == [2.0, 4.0, 8.0, 16.0]  # past the listed points; stops when 4.1x repeats
    over = _scripted([1.6, 2.9, 5.0, 3.5], [True, True, False, True])
    over.run([2.0, 4.0, 8.0], None)
    assert over.visited == [2.0, 4.0, 8.0, 5.657]  # over budget at 8x: one bisection step back
    exhausted = _scripted([1.6], [True])
    exhausted.run([2.0, 4.0], None)
    assert exhausted.visited == [2.0, 4.0]  # nothing new to remove at 4x: done, no bisection


def test_the_frontier_table_counts_speed_from_dense_and_marks_where_the_search_began():
    row = {"goal_speedup": 2.0, "within_budget": True, "accuracy": 0.95, "widths": {"fc": 8},
           "predicted_ms": {"onnxruntime": 0.3}, "measured_ms": {"onnxruntime": 0.25},
           "measured_speedup": {"onnxruntime": 2.0}, "start_ms": {"onnxruntime": 0.5}, "dense_ms": {"onnxruntime": 1.0},
           "files": ["pruned.keras"]}
    table = frontier_table({"frontier": [row]}, 0.96)
    lines = table.splitlines()
    assert lines[2].startswith("| dense |") and "1.0000 | 1.00x" in lines[2]
    assert lines[3].startswith("| start |") and "2.00x (1.00x)" in lines[3]  # the stages' own 2x
    assert "(shipped)" in lines[4] and "4.00x (2.00x)" in lines[4]  # 4x over dense, 2x of it from the search


def test_couplings_probed_once_follow_mobilenetv2s_residual_groups_and_leave_the_model_whole():
    """The search probes each group once for both runtimes' tables (surgery on a deep network costs
    seconds per group); a residual group's probe must reach every conv that reads or writes it."""
    from compressor.stages.search.latency_model import probe

    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10)
    before = {layer.name: w.shape for layer in model.layers for w in layer.get_weights()}
    groups = {g.name: g for g in search.search_groups(model)}
    found = probe(model, list(groups))
    # nothing cut in place
    assert {layer.name: w.shape for layer in model.layers for w in layer.get_weights()} == before
    residual = next(g for g in groups.values() if "block_2_project" in g.members)
    writers = {name for name, (_, a_out) in found.items() if a_out.get(residual.name)}
    readers = {name for name, (a_in, _) in found.items() if a_in.get(residual.name)}
    assert {"block_1_project", "block_2_project"} <= writers
    assert {"block_2_expand", "block_3_expand"} <= readers
    expand = next(g for g in groups.values() if g.members == ["block_3_expand"])
    assert found["block_3_depthwise"] == ({expand.name: 1}, {expand.name: 1})  # depthwise follows its input


# ------------------------------------------------------------------ floors, one scale, bisection (issue 25)

def _cnn(digits, widths=(16, 32), epochs: int = 2) -> keras.Model:
    """A small Conv-BN CNN on the 8x8 digits: the first conv is the stem, the last the classifier's input."""
    keras.utils.set_random_seed(0)
    x = inp = keras.Input((64,))
    x = L.Reshape((8, 8, 1))(x)
    for i, w in enumerate(widths):
        x = L.Conv2D(w, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.ReLU()(L.BatchNormalization(name=f"bn{i}")(x))
    model = keras.Model(inp, L.Dense(10, activation="softmax", name="out")(L.GlobalAveragePooling2D()(x)))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=epochs, verbose=0)
    return model


def _search_cfg(**fields):
    return parse_recipe({"stages": [{"name": "search", "epochs": 0, "recover_epochs": 0, **fields}]}).stages[0]


def test_no_visited_point_cuts_a_group_below_its_floor_or_more_than_half_at_once(digits, stand_in_runtime):
    """Narrower is always faster here, the budget is loose and the goal is 16x: the old search drove both
    convs to one unit. Now every point keeps each group at >= 8 (round_units), the stem included, cuts at
    most half of a group per point, and the search says in one line that the floors stop it."""
    model = _cnn(digits)
    ctx = _ctx(digits, round_units=8, max_accuracy_drop=0.9)
    outcome = search.apply(model, _search_cfg(goal={"speedup": 16}), ctx)
    rows = outcome.details["frontier"]
    before = {"conv0": 16, "conv1": 32}
    for row in rows:
        assert all(w >= 8 for w in row["widths"].values()), row["widths"]
        assert all(row["widths"][g] >= before[g] / 2 for g in before), (before, row["widths"])
        before = row["widths"] if row["within_budget"] else before
    assert rows and outcome.details["limits"]["floors"] == {"conv0": 8, "conv1": 8}
    assert outcome.details["limits"]["bottlenecks"] == {"conv0": "stem", "conv1": "classifier input"}
    assert rows[-1]["widths"] == {"conv0": 8, "conv1": 8}  # the floors reached, and the search stopped there
    said = [n for n in outcome.notes if "out of reach at the width floors" in n]
    assert len(said) == 1 and "\n" not in said[0]
    assert any("goal 16.00x on onnxruntime not reachable at the width floors" in n for n in outcome.notes)
    assert sum(r["shipped"] for r in rows) == 1 and rows[outcome.details["chosen"]]["shipped"]
    costs = outcome.details["costs"]  # where the search's time went, per phase and per point
    assert costs["total_s"] > 0 and {"tables", "fine_tune", "recovery", "measure"} <= set(costs["seconds"])
    assert all(set(r["seconds"]) == {"fine_tune", "recovery", "measure"} and r["epochs_spent"] == 0 for r in rows)


def test_below_round_units_only_where_faster_and_never_for_a_bottleneck(digits, stand_in_runtime):
    """round_units 16: the stem (16) and the classifier's input (32) keep 16; the middle conv, a plain
    group the table says is faster narrower, may go to 8, never below (it has 32 units)."""
    model = _cnn(digits, widths=(16, 32, 32), epochs=1)
    ctx = _ctx(digits, round_units=16, max_accuracy_drop=0.9)
    outcome = search.apply(model, _search_cfg(goal={"speedup": 16}), ctx)
    for row in outcome.details["frontier"]:
        assert row["widths"]["conv0"] == 16 and row["widths"]["conv1"] >= 8 and row["widths"]["conv2"] >= 16
    assert min(r["widths"]["conv1"] for r in outcome.details["frontier"]) == 8
    assert outcome.details["limits"]["floors"] == {"conv0": 16, "conv1": 8, "conv2": 16}


def test_min_width_and_min_fraction_raise_the_floors():
    from compressor.stages.search.limits import floors

    cfg = _search_cfg(min_width=12, min_fraction=0.5)
    assert floors({"a": 64, "b": 16, "c": 8}, set(), {}, cfg, 8, lambda *a: True) == {"a": 32, "b": 12, "c": 8}
    cfg = _search_cfg()
    assert floors({"a": 64, "b": 12, "h": 4}, {"h"}, {}, cfg, 8, lambda *a: False) == {"a": 8, "b": 8, "h": 1}
    assert floors({"a": 64, "b": 12}, set(), {}, cfg, 16, lambda *a: True) == {"a": 8, "b": 8}
    assert floors({"a": 64, "b": 12}, set(), {}, cfg, 16, lambda *a: False) == {"a": 16, "b": 12}
    assert floors({"a": 64, "b": 12}, set(), {}, cfg, 1, lambda *a: True) == {"a": 8, "b": 8}  # round_units 1
    assert floors({"a": 64, "b": 12}, set(), {"a": "stem", "b": "residual"}, cfg, 16, lambda *a: True) == {
        "a": 16, "b": 12}
    cfg = _search_cfg(min_width=4)
    assert floors({"a": 64, "b": 12}, set(), {}, cfg, 8, lambda *a: False) == {"a": 8, "b": 4}


def test_bottlenecks_are_the_stem_the_classifier_input_and_residual_projections():
    from compressor.stages.search.limits import roles

    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, name="stem")(inp)
    a = L.BatchNormalization()(L.Conv2D(16, 1, name="proj_a")(x))
    b = L.Conv2D(16, 1, name="proj_b")(L.ReLU()(L.Conv2D(24, 1, name="expand")(a)))
    x = L.Conv2D(32, 1, name="last")(L.Add()([a, b]))
    model = keras.Model(inp, L.Dense(10, name="out")(L.GlobalAveragePooling2D()(x)))
    found = roles(model, search.search_groups(model))
    assert found == {"stem": "stem", "proj_a": "residual", "last": "classifier input"}  # 'expand' is free


def test_importance_is_on_one_scale_across_groups(digits):
    """Two groups of 16 read by the classifier: one carries the prediction, the other's output is
    scaled to almost nothing. A share of each group's own total made half of either cost 0.5; the loss
    cost makes the redundant group far cheaper, so with equal latency per unit the allocation takes it."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,))
    merged = L.Concatenate()([L.Dense(16, activation="relu", name="important")(inp),
                              L.Dense(16, activation="relu", name="redundant")(inp)])
    model = keras.Model(inp, L.Dense(10, activation="softmax", name="out")(merged))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=5, verbose=0)
    kernel, bias = model.get_layer("out").get_weights()
    kernel[16:] *= 1e-3
    model.get_layer("out").set_weights([kernel, bias])
    for criterion in ("taylor", "mean_abs"):
        cost = search._importance(model, _search_cfg(criterion=criterion), _ctx(digits))[4]
        assert cost["redundant"][8] < 0.05 * cost["important"][8], criterion
        assert cost["redundant"][-1] + cost["important"][-1] == pytest.approx(1.0)  # one total for all groups

    class Equal:
        def predict(self, removed=None):
            return float(sum(16 - (removed or {}).get(g, 0) for g in ("important", "redundant")))
    extra = search.allocate(Equal(), {"important": 16, "redundant": 16}, {}, cost, target_ms=24.0, step=8)
    assert extra == {"important": 0, "redundant": 8}


def test_bisection_runs_a_point_between_the_last_good_and_the_failing_one(digits, stand_in_runtime, monkeypatch):
    """Points that keep fewer than 40 of the MLP's 64+64 units fail the budget: after 2x holds and 4x
    fails, the search visits a point between them, and it is within budget and faster than 2x."""
    real = search.tuning.tune

    def tune(model, *args):
        acc, *rest = real(model, *args)
        return (acc if kept_units(model) >= 40 else 0.0), *rest
    monkeypatch.setattr(search.tuning, "tune", tune)
    model = _mlp(64)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=3, verbose=0)
    outcome = search.apply(model, _search_cfg(points=[2.0, 4.0], bisect=2, epochs=1),
                           _ctx(digits, round_units=8, max_accuracy_drop=0.5))
    rows = outcome.details["frontier"]
    assert [r["goal_speedup"] for r in rows[:2]] == [2.0, 4.0]
    assert rows[0]["within_budget"] and not rows[1]["within_budget"]
    between = [r for r in rows[2:] if 2.0 < r["goal_speedup"] < 4.0]
    assert between and any(r["within_budget"] for r in between)
    kept = [sum(r["widths"].values()) for r in rows]
    assert all(kept[1] < sum(r["widths"].values()) < kept[0] for r in between)
    assert rows[outcome.details["chosen"]] in between  # the fastest within budget is the bisected one


def test_bisection_falls_back_to_widths_half_way_when_the_midpoint_allocation_repeats_a_point():
    """Seen with a small CNN: the allocation at the geometric-mean speedup gave the failing point's
    widths again, so nothing between 2x and 4x was tried. Now the widths half way are."""
    s = _scripted([2.0, 3.0], [True, False])
    s.units, s.step = {"a": 64, "b": 16}, 8
    calls = []

    def visit(speedup, extra=None):
        calls.append((round(speedup, 3), extra))
        s.rows.append({"visit_speedup": {"onnxruntime": speedup}})
        if speedup == 2.0:
            s.good = (2.0, None, {"a": 32})  # widths 32 / 16
            return True
        if speedup == 4.0:
            s.bad = (4.0, {"a": 56, "b": 8})  # widths 8 / 8
            return False
        return None if extra is None else True
    s.visit = visit
    s.run([2.0, 4.0], None)
    # a: 32 -> 24 (of the grid widths 16 and 24 around the mean 20, the wider); b: no multiple of 8 between 16 and 8
    assert calls[2] == (2.828, None) and calls[3] == (2.828, {"a": 8})
