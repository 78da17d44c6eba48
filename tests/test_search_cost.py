"""The search spends its time on points that can hold the budget (issue 25, item 5)."""
from __future__ import annotations

import numpy as np
import pytest

from compressor.core._tf import keras
from compressor.stages.search import tuning
from compressor.stages.search.costs import PHASES, Clock, Files
from compressor.stages.search.latency_model import grid, measure_models


class _Scripted:
    """A task whose metric is read off a script, one value per evaluation (higher is better, 1-point budget)."""

    direction, budget = "higher", 0.01

    def __init__(self, values):
        self.values = list(values)

    def keras(self, model):
        return type("Score", (), {"value": self.values.pop(0)})()

    def drop(self, baseline, value):
        return baseline - value

    def within(self, baseline, value):
        return self.drop(baseline, value) <= self.budget


@pytest.fixture
def epochs(monkeypatch):
    """The fine-tune epochs asked for, in order (no training happens)."""
    asked = []
    monkeypatch.setattr(tuning.recovery, "finetune", lambda model, ctx, n, label: asked.append(n))
    return asked


def _cfg(epochs=2, recover=4):
    return type("Cfg", (), {"epochs": epochs, "recover_epochs": recover})()


def test_a_point_that_cannot_reach_the_budget_stops_after_its_first_epoch(epochs):
    """0.10 after the cut, 0.15 after one epoch, 0.94 needed: five more epochs at +0.05 cannot get there."""
    clock = Clock()
    value, extra, spent, why = tuning.tune(None, None, _cfg(), _Scripted([0.10, 0.15]), 0.95, "p", clock)
    assert (value, extra, spent, epochs) == (0.15, 0, 1, [1])
    assert why.startswith("hopeless after 1 epoch(s)") and "\n" not in why
    assert clock.seconds["fine_tune"] > 0 and clock.seconds["recovery"] == 0


def test_a_point_that_can_still_make_it_gets_its_whole_fine_tune_and_recovery(epochs):
    """0.50 -> 0.85 in one epoch could reach 0.94: the second epoch runs, then recovery while it improves."""
    value, extra, spent, why = tuning.tune(None, None, _cfg(), _Scripted([0.50, 0.85, 0.93, 0.945]), 0.95, "p")
    assert (value, extra, spent, why, epochs) == (0.945, 1, 3, None, [1, 1, 1])


def test_a_point_within_budget_after_its_first_epoch_saves_the_rest(epochs):
    value, extra, spent, why = tuning.tune(None, None, _cfg(), _Scripted([0.90, 0.96]), 0.95, "p")
    assert (value, extra, spent, why, epochs) == (0.96, 0, 1, "within budget after 1 of 2 epoch(s)", [1])


def test_recovery_stops_when_the_remaining_epochs_cannot_close_the_gap(epochs):
    """Over after its fine-tune (0.60); recovery gains +0.02: three epochs left cannot reach 0.94."""
    value, extra, spent, why = tuning.tune(None, None, _cfg(epochs=1), _Scripted([0.60, 0.62]), 0.95, "p")
    assert (value, extra, spent, epochs) == (0.62, 1, 2, [1, 1])
    assert why.startswith("hopeless after 1 recovery epoch(s)")


def test_latency_tables_measure_nothing_narrower_than_the_floors_allow():
    assert grid(96, 8) == [1, 8, 16, 24, 48, 96]
    assert grid(96, 8, low=8) == [8, 16, 24, 48, 96]
    assert grid(64, 16, low=8) == [8, 16, 32, 64]  # the floor itself is measured: narrower may be faster there
    assert grid(4, 8, low=8) == [4]


def test_a_whole_model_is_exported_once_per_runtime_for_the_whole_search():
    inputs = keras.Input((16,))
    small = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    files = Files()
    try:
        first = measure_models({"start": small}, "tflite", runs=5, files=files)
        again = measure_models({"start": small}, "tflite", runs=5, files=files)
        assert files.exported == 1 and set(first) == set(again) == {"start"}
        other = keras.models.clone_model(small)
        measure_models({"start": other}, "tflite", runs=5, files=files)  # a new model under a known label
        assert files.exported == 2
    finally:
        files.close()


def test_the_clock_accounts_for_every_phase():
    clock = Clock()
    with clock.phase("tables"):
        pass
    clock.count("exports", 3)
    record = clock.record()
    assert list(record["seconds"]) == list(PHASES) and record["counts"] == {"exports": 3}
    assert record["total_s"] >= sum(record["seconds"].values())


def test_a_two_width_table_is_measured_on_its_cross_and_filled_in_as_a_product():
    """in x out grids of 4 x 4 widths measure 7 entries; a cost that is a product of the two widths
    (MACs-like, plus the per-model overhead) comes back exactly at every width, steps included."""
    from compressor.stages.search.latency_model import LayerShape, LayerTerm, separable

    ins, outs, base = [8, 16, 24, 32], [1, 8, 16, 32], 0.05

    def cost(i, o):
        return base + 0.001 * (-(-i // 16) * 16) * o  # input widths step in tiles of 16

    term = LayerTerm("h", LayerShape("Dense", {}, (), 32, 32), {"a": 1}, {"b": 1}, ins, outs, False)
    assert len(term.points()) == 7 and (16, 16) not in term.points()
    filled = separable(ins, outs, cost, base)
    assert np.allclose(filled, [[cost(i, o) for o in outs] for i in ins])


def test_the_benchmark_pages_distillation_table_sets_on_beside_off():
    """`scripts/benchmark.py --distill`: per model one row with distillation off and one with it on."""
    from tests.test_bench_cli import _load_script

    script = _load_script("benchmark")
    assert script.distill_recipe().distill.enabled and not script.fixed_recipe().distill.enabled

    def comparison(variant, rt, x):
        return {"variant": variant, "baseline": "dense", "runtime": rt, "batch": 1, "threads": 1,
                "speedup": {"median": x, "ci95": [x - 0.1, x + 0.1]}}
    rows = [{"variant": v, "runtime": "tflite", "batch": 1, "threads": 1, "accuracy": a,
             "accuracy_ci95": [a - .01, a + .01]} for v, a in (("fusion", 0.94), ("fusion-distill", 0.93))]
    model = {"name": "m", "rows": rows,
             "comparisons": [comparison(v, rt, x) for v, x in (("fusion", 2.0), ("fusion-distill", 1.5))
                             for rt in ("tflite", "onnxruntime")],
             "stages": [{"name": "search", "seconds": 40.0}], "distill_stages": [{"name": "search", "seconds": 90.0}],
             "frontier": [{"shipped": True, "measured_speedup": {"tflite": 1.5}}], "distill_frontier": []}
    text = "\n".join(script.distill_section({"models": [model]}))
    assert "| m | off | 0.940 ± 0.010 | 2.00x (1.90–2.10) | 2.00x (1.90–2.10) | tflite 1.50x | 40 s |" in text
    assert "| m | on | 0.930 ± 0.010 | 1.50x (1.40–1.60) | 1.50x (1.40–1.60) | no point shipped | 90 s |" in text
    assert script.distill_section({"models": [{"name": "x"}]}) == []
