"""Interleaved latency measurement: A B C C B A … so drift on a noisy machine hits every file alike."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def measure_interleaved(runners: dict[str, object], x: np.ndarray, runs: int, warmup: int,
                        on_round: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Per-runner invoke() times in seconds; the input is set outside the timed region."""
    for runner in runners.values():
        runner.set_input(x)
        for _ in range(warmup):
            runner.invoke()
    times = {label: np.empty(runs) for label in runners}
    clock = time.perf_counter
    forward = list(runners.items())
    backward = forward[::-1]
    for i in range(runs):
        for label, runner in (forward if i % 2 == 0 else backward):  # alternate order: no position bias
            runner.set_input(x)
            start = clock()
            runner.invoke()
            times[label][i] = clock() - start
        if on_round is not None:
            on_round(i)
    return times
