"""Hand-computed checks for exporters.stats."""
import math
import sys
import time

import numpy as np
import pytest

from exporters import stats


def _paired(both, a_only, b_only, neither):
    """Build paired correctness vectors with exactly these cell counts."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return np.array(a), np.array(b)


# ---- latency_summary / throughput -------------------------------------------------------------

def test_latency_summary_percentiles_in_ms():
    # 1..10 ms. Linear interpolation: position (n-1)*q = 9*q.
    # p50 -> pos 4.5 -> 5.5; p90 -> pos 8.1 -> 9.1; p99 -> pos 8.91 -> 9.91.
    s = stats.latency_summary([i / 1000 for i in range(10, 0, -1)])  # order must not matter
    assert s["p50"] == pytest.approx(5.5)
    assert s["p90"] == pytest.approx(9.1)
    assert s["p99"] == pytest.approx(9.91)
    assert s["mean"] == pytest.approx(5.5)
    assert s["std"] == pytest.approx(math.sqrt(82.5 / 9))  # sum of squared deviations = 82.5
    assert s["min"] == pytest.approx(1.0)
    assert s["max"] == pytest.approx(10.0)
    assert s["runs"] == 10


def test_latency_summary_single_run_and_errors():
    s = stats.latency_summary([0.002])
    assert s["p50"] == s["p99"] == pytest.approx(2.0)
    assert s["std"] == 0.0 and s["runs"] == 1
    with pytest.raises(ValueError):
        stats.latency_summary([])
    with pytest.raises(ValueError):
        stats.latency_summary([0.001, float("nan")])


def test_throughput_uses_median():
    # Median of (0.01, 0.02, 1.0) is 0.02 s; the 1 s outlier must not matter. 8 / 0.02 = 400.
    assert stats.throughput([0.01, 1.0, 0.02], batch=8) == pytest.approx(400.0)
    with pytest.raises(ValueError):
        stats.throughput([0.01], batch=0)


# ---- accuracy_interval ------------------------------------------------------------------------

def test_wilson_950_of_1000():
    # z = 1.959964, z^2 = 3.841459; centre = (0.95 + z^2/2000) / (1 + z^2/1000) = 0.948278;
    # half = z * sqrt(0.95*0.05/1000 + z^2/4e6) / (1 + z^2/1000) = 0.013592.
    correct = np.array([True] * 950 + [False] * 50)
    lo, hi = stats.accuracy_interval(correct)
    assert lo == pytest.approx(0.934686, abs=2e-6)
    assert hi == pytest.approx(0.961870, abs=2e-6)


def test_wilson_all_correct_and_level():
    # p = 1: upper bound 1, lower bound n / (n + z^2) = 10 / 13.841459 = 0.722467.
    lo, hi = stats.accuracy_interval(np.ones(10, dtype=int))
    assert hi == pytest.approx(1.0)
    assert lo == pytest.approx(0.722467, abs=2e-6)
    # A lower confidence level must give a narrower interval around the same data.
    correct = np.array([1] * 80 + [0] * 20)
    lo95, hi95 = stats.accuracy_interval(correct, 0.95)
    lo80, hi80 = stats.accuracy_interval(correct, 0.80)
    assert lo95 < lo80 < 0.8 < hi80 < hi95
    with pytest.raises(ValueError):
        stats.accuracy_interval(np.array([0, 2, 1]))


# ---- mcnemar ----------------------------------------------------------------------------------

def test_mcnemar_exact_b0_c6():
    # Two-sided exact: 2 * 0.5**6 = 0.03125.
    a, b = _paired(both=50, a_only=0, b_only=6, neither=4)
    r = stats.mcnemar(a, b)
    assert (r["a_only"], r["b_only"], r["method"]) == (0, 6, "exact")
    assert r["p_value"] == pytest.approx(0.03125)


def test_mcnemar_exact_symmetric_case_and_no_disagreement():
    # b=1, c=2: every outcome is at least as extreme -> p = 1.
    r = stats.mcnemar(*_paired(5, 1, 2, 0))
    assert r["p_value"] == pytest.approx(1.0)
    # b=2, c=8 (n=10): P(X<=2) = (1+10+45)/1024 = 56/1024, two-sided 112/1024 = 0.109375.
    r = stats.mcnemar(*_paired(5, 2, 8, 0))
    assert r["p_value"] == pytest.approx(0.109375)
    r = stats.mcnemar(*_paired(7, 0, 0, 3))
    assert r["p_value"] == 1.0 and r["a_only"] == r["b_only"] == 0


def test_mcnemar_chi2_continuity_corrected():
    # b=30, c=10: stat = (|30-10| - 1)^2 / 40 = 9.025; 1-dof chi2 tail = erfc(sqrt(stat / 2)).
    r = stats.mcnemar(*_paired(100, 30, 10, 5))
    assert r["method"] == "chi2"
    assert r["statistic"] == pytest.approx(9.025)
    assert r["p_value"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    assert r["p_value"] == pytest.approx(0.002663, abs=1e-6)


def test_mcnemar_switches_method_at_25():
    assert stats.mcnemar(*_paired(0, 12, 12, 0))["method"] == "exact"   # 24 discordant
    assert stats.mcnemar(*_paired(0, 12, 13, 0))["method"] == "chi2"    # 25 discordant


def test_mcnemar_length_mismatch():
    with pytest.raises(ValueError):
        stats.mcnemar(np.ones(3, bool), np.ones(4, bool))


# ---- ratio_summary ----------------------------------------------------------------------------

def test_ratio_summary_equal_arrays_is_one():
    t = np.linspace(0.001, 0.003, 50)
    r = stats.ratio_summary(t, t.copy())
    for key in ("median", "p10", "p90", "ci95_low", "ci95_high"):
        assert r[key] == pytest.approx(1.0), key
    assert r["rounds"] == 50


def test_ratio_summary_pairs_by_round():
    # b drifts 10x across rounds while a is always exactly half of b: every ratio is 0.5.
    # Comparing separate medians would still give 0.5 here, but sorting would break pairing.
    b = np.geomspace(0.001, 0.01, 20)
    r = stats.ratio_summary(b / 2, b)
    assert r["median"] == pytest.approx(0.5)
    assert r["ci95_low"] == pytest.approx(0.5) and r["ci95_high"] == pytest.approx(0.5)


def test_ratio_summary_order_statistic_ci():
    # Ratios 1..20 (shuffled). Median 10.5; p10 -> pos 1.9 -> 2.9; p90 -> pos 17.1 -> 18.1.
    # 95% CI by order statistics: j=6 since 2*P(Bin(20,.5) <= 5) = 0.041 <= 0.05 but
    # 2*P(Bin <= 6) = 0.115 > 0.05 -> (x(6), x(15)) = (6, 15).
    rng = np.random.default_rng(0)
    ratios = rng.permutation(np.arange(1.0, 21.0))
    b = np.full(20, 0.002)
    r = stats.ratio_summary(ratios * b, b)
    assert r["median"] == pytest.approx(10.5)
    assert r["p10"] == pytest.approx(2.9)
    assert r["p90"] == pytest.approx(18.1)
    assert (r["ci95_low"], r["ci95_high"]) == (pytest.approx(6.0), pytest.approx(15.0))


def test_ratio_summary_too_few_rounds_has_no_ci():
    r = stats.ratio_summary([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert r["median"] == pytest.approx(2.0)
    assert r["ci95_low"] is None and r["ci95_high"] is None
    with pytest.raises(ValueError):
        stats.ratio_summary([1.0, 2.0], [1.0])


# ---- within_budget ----------------------------------------------------------------------------

def test_within_budget_verdicts():
    # 1000 samples; dense-only 30, pruned-only 10 -> drop 20/1000 = 0.02, McNemar p = 0.00266.
    dense, pruned = _paired(900, 30, 10, 60)
    r = stats.within_budget(dense, pruned, max_drop=0.03)
    assert r["drop"] == pytest.approx(0.02)
    assert r["dense_accuracy"] == pytest.approx(0.93)
    assert r["pruned_accuracy"] == pytest.approx(0.91)
    assert r["ok"] and r["verdict"] == "within_budget"

    r = stats.within_budget(dense, pruned, max_drop=0.01)
    assert not r["ok"] and r["verdict"] == "over_budget"
    assert r["p_value"] == pytest.approx(0.002663, abs=1e-6)

    # 100 samples; dense-only 3, pruned-only 1 -> drop 0.02 > 0.01, but exact p = 0.625.
    dense, pruned = _paired(90, 3, 1, 6)
    r = stats.within_budget(dense, pruned, max_drop=0.01)
    assert r["drop"] == pytest.approx(0.02)
    assert r["p_value"] == pytest.approx(0.625)
    assert not r["ok"] and r["verdict"] == "over_budget_not_significant"


def test_within_budget_drop_exactly_at_budget_and_improvement():
    dense, pruned = _paired(90, 1, 0, 9)  # drop exactly 0.01
    assert stats.within_budget(dense, pruned, max_drop=0.01)["ok"]
    dense, pruned = _paired(90, 0, 5, 5)  # pruned better: negative drop
    r = stats.within_budget(dense, pruned, max_drop=0.0)
    assert r["drop"] == pytest.approx(-0.05) and r["verdict"] == "within_budget"


def test_stats_does_not_import_tensorflow():
    import subprocess
    code = "import sys, exporters.stats; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _CacheRunner:
    """A fake runner whose call is slow when another runner ran last (its caches were evicted)."""

    last = None

    def __init__(self, name, log):
        self.name, self.log = name, log

    def set_input(self, x):
        pass

    def invoke(self):
        cold = _CacheRunner.last not in (None, self.name)
        _CacheRunner.last = self.name
        self.log.append((self.name, cold))
        time.sleep(0.002 if cold else 0.0002)


def test_interleaved_turns_time_the_warm_calls_and_block_one_the_cold():
    from exporters.latency import measure_interleaved

    for block in (10, 1):
        log = []
        runners = {n: _CacheRunner(n, log) for n in ("dense", "pruned")}
        times = measure_interleaved(runners, None, runs=45, warmup=1, block=block)
        assert all(len(t) == 45 and np.all(t > 0) for t in times.values())
        cold_share = [float(np.mean(t > 0.001)) for t in times.values()]
        if block > 1:  # the untimed first call of each turn absorbs the eviction
            assert all(np.median(t) < 0.001 for t in times.values()), cold_share
        else:  # every other call follows the other file: the old, cold figure
            assert all(share > 0.4 for share in cold_share), cold_share
        switches = sum(a[0] != b[0] for a, b in zip(log, log[1:]))
        assert switches >= 45 // max(1, block - 1) - 1  # the files still take turns: drift hits both


class _ServedRunner(_CacheRunner):
    """A fake runner whose served call (copy-in, call, copy-out) costs more than the call alone."""

    def serve(self, x):
        self.invoke()
        time.sleep(0.001)


def test_served_timing_is_fewer_calls_in_the_same_turns_and_includes_the_copies():
    from exporters.latency import measure_both, served_runs

    log = []
    runners = {n: _ServedRunner(n, log) for n in ("dense", "pruned")}
    call, served = measure_both(runners, None, runs=45, warmup=1)
    assert all(len(t) == 45 for t in call.values())
    assert all(len(t) == served_runs(45) and 0 < len(t) < 45 for t in served.values())
    assert all(np.median(served[n]) > np.median(call[n]) + 0.0008 for n in runners)
