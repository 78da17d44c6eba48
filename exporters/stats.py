"""Statistics for benchmark timings and accuracy comparisons.

Kept free of TensorFlow so the report and its tests stay light; numpy/scipy do the maths.
Timings come in as seconds; summaries report milliseconds, because that is what people read.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats as _st

__all__ = [
    "latency_summary",
    "throughput",
    "accuracy_interval",
    "mcnemar",
    "ratio_summary",
    "within_budget",
]

# Below this many discordant pairs the chi-square approximation is poor, so use the exact test.
EXACT_MCNEMAR_BELOW = 25


def _timings(seconds, name: str = "seconds") -> np.ndarray:
    """Validate timings once so every caller fails the same clear way."""
    arr = np.asarray(seconds, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError(f"{name}: need at least one timing")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}: timings must be finite and non-negative")
    return arr


def _correct(correct, name: str) -> np.ndarray:
    """Per-sample correctness as a bool vector (accepts bools or 0/1)."""
    arr = np.asarray(correct).ravel()
    if arr.size == 0:
        raise ValueError(f"{name}: need at least one sample")
    if arr.dtype != bool:
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{name}: expected booleans or 0/1 values")
        arr = arr.astype(bool)
    return arr


def latency_summary(seconds: Sequence[float]) -> dict:
    """Percentiles and moments of per-run latencies, in milliseconds.

    Percentiles use numpy's default linear interpolation so results match what anyone gets by
    hand with `np.percentile`. `std` is the sample standard deviation (ddof=1); 0.0 for one run.
    """
    ms = _timings(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(ms.mean()),
        "std": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "min": float(ms.min()),
        "max": float(ms.max()),
        "runs": int(ms.size),
    }


def throughput(seconds, batch: int) -> float:
    """Samples per second at the median run time; the median resists scheduler hiccups."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    med = float(np.median(_timings(seconds)))
    if med <= 0:
        raise ValueError("median timing is zero; cannot compute throughput")
    return batch / med


def accuracy_interval(correct: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for accuracy.

    Wilson rather than the normal approximation because accuracies sit near 1.0, where the
    normal interval overshoots 1 and is too narrow.
    """
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    arr = _correct(correct, "correct")
    ci = _st.binomtest(int(arr.sum()), int(arr.size)).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's test: do two models on the SAME samples differ in accuracy?

    Only discordant samples carry information: `a_only` (a right, b wrong) and `b_only`.
    With fewer than 25 of them the exact two-sided binomial test is used; otherwise the
    chi-square statistic with continuity correction, (|b - c| - 1)^2 / (b + c), 1 dof.
    """
    a = _correct(correct_a, "correct_a")
    b = _correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} vs {b.size}")
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    n = a_only + b_only
    if n == 0:
        # No disagreements at all: no evidence of any difference.
        return {"a_only": 0, "b_only": 0, "p_value": 1.0, "method": "exact", "statistic": None}
    if n < EXACT_MCNEMAR_BELOW:
        p = _st.binomtest(a_only, n, 0.5, alternative="two-sided").pvalue
        return {"a_only": a_only, "b_only": b_only, "p_value": float(min(1.0, p)),
                "method": "exact", "statistic": None}
    stat = (abs(a_only - b_only) - 1) ** 2 / n
    p = _st.chi2.sf(stat, df=1)
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p),
            "method": "chi2", "statistic": float(stat)}


def ratio_summary(times_a, times_b) -> dict:
    """Per-round latency ratio a/b for interleaved runs (round i ran a then b, or b then a).

    Pairing by round cancels slow drift (thermal, background load) that would bias a ratio of
    two separate medians. The 95% CI of the median ratio comes from order statistics
    (distribution-free, deterministic); with fewer than 6 rounds no such interval reaches 95%,
    so the bounds are None.
    """
    a = _timings(times_a, "times_a")
    b = _timings(times_b, "times_b")
    if a.shape != b.shape:
        raise ValueError(f"interleaved runs differ in length: {a.size} vs {b.size}")
    if np.any(b <= 0):
        raise ValueError("times_b must be positive to form ratios")
    r = a / b
    med = float(np.median(r))
    p10, p90 = np.percentile(r, [10, 90])
    # The CI does not depend on the hypothesised quantile value; any q works.
    ci = _st.quantile_test(r, q=med, p=0.5).confidence_interval(0.95)
    low = None if np.isnan(ci.low) else float(ci.low)
    high = None if np.isnan(ci.high) else float(ci.high)
    return {"median": med, "p10": float(p10), "p90": float(p90),
            "ci95_low": low, "ci95_high": high, "rounds": int(r.size)}


def within_budget(acc_dense_correct, acc_pruned_correct, max_drop: float,
                  alpha: float = 0.05) -> dict:
    """Judge an accuracy drop against a budget (a fraction, e.g. 0.01 = one point).

    The point drop decides `ok`; McNemar's paired p-value says whether the difference from the
    dense model is distinguishable from noise, so a small test set over budget is flagged
    as such instead of reported as a clear failure. Verdicts:
      "within_budget"                -> drop <= max_drop
      "over_budget"                  -> drop > max_drop and p < alpha
      "over_budget_not_significant"  -> drop > max_drop but p >= alpha
    """
    if max_drop < 0:
        raise ValueError("max_drop must be >= 0")
    d = _correct(acc_dense_correct, "acc_dense_correct")
    p = _correct(acc_pruned_correct, "acc_pruned_correct")
    test = mcnemar(d, p)
    acc_d = float(d.mean())
    acc_p = float(p.mean())
    # Drop from the discordant counts, so it is exactly (dense-only - pruned-only) / n.
    drop = (test["a_only"] - test["b_only"]) / d.size
    ok = drop <= max_drop + 1e-12
    if ok:
        verdict = "within_budget"
    elif test["p_value"] < alpha:
        verdict = "over_budget"
    else:
        verdict = "over_budget_not_significant"
    return {
        "dense_accuracy": acc_d,
        "pruned_accuracy": acc_p,
        "drop": float(drop),
        "max_drop": float(max_drop),
        "p_value": test["p_value"],
        "method": test["method"],
        "ok": bool(ok),
        "verdict": verdict,
    }
