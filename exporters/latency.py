"""Interleaved latency measurement: files take turns (A B C, C B A, …) so drift on a noisy machine
hits every file alike, and each turn is a short burst of back-to-back calls.

Why bursts: a file timed right after another one finds the caches full of the other file's weights
and the instruction cache of the other graph; a small pruned model after its 4 MB dense baseline
then pays for the baseline's evictions on every call (mlp-1024 in onnxruntime measured 45 us cold vs
21 us back to back). A model in service runs call after call, so each turn runs `block` calls and
does not time the first one. `block` 1 gives the cold figure (every call follows another file).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from exporters.watchdog import beat

BLOCK = 10  # calls per turn; the first of each turn is untimed


def measure_interleaved(runners: dict[str, object], x: np.ndarray | dict, runs: int, warmup: int,
                        on_round: Callable[[int], None] | None = None, block: int = BLOCK) -> dict[str, np.ndarray]:
    """Per-runner invoke() times in seconds, `runs` each; the input is set outside the timed region.
    `x` is one input for every runner, or a dict giving each runner its own (files of different
    input shapes, e.g. the latency tables' probes or `compressor bench` on two models), keyed by the
    runners' labels; any other dict is one multi-input sample (keyed by input name) for every runner."""
    own = isinstance(x, dict) and set(runners) <= set(x)
    inputs = x if own else {label: x for label in runners}
    for label, runner in runners.items():
        runner.set_input(inputs[label])
        for _ in range(warmup):
            beat(getattr(runner, "path", label))  # each warm-up call is one call for the watchdog
            runner.invoke()
    times = {label: np.empty(runs) for label in runners}
    clock = time.perf_counter
    forward = list(runners.items())
    backward = forward[::-1]
    per_turn = max(1, block - 1)
    done, turn = 0, 0
    while done < runs:
        timed = min(per_turn, runs - done)
        for label, runner in (forward if turn % 2 == 0 else backward):  # alternate order: no position bias
            if block > 1:
                runner.set_input(inputs[label])
                runner.invoke()  # refills the caches the previous file evicted: not timed
            for k in range(done, done + timed):
                runner.set_input(inputs[label])
                start = clock()
                runner.invoke()
                times[label][k] = clock() - start
        if on_round is not None:
            for k in range(done, done + timed):
                on_round(k)
        done += timed
        turn += 1
    return times
