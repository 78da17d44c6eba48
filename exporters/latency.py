"""Interleaved latency measurement: files take turns (A B C, C B A, …) so drift on a noisy machine
hits every file alike, and each turn is a short burst of back-to-back calls.

Why bursts: a file timed right after another one finds the caches full of the other file's weights
and the instruction cache of the other graph; a small pruned model after its 4 MB dense baseline
then pays for the baseline's evictions on every call (mlp-1024 in onnxruntime measured 45 us cold vs
21 us back to back). A model in service runs call after call, so each turn runs `block` calls and
does not time the first one. `block` 1 gives the cold figure (every call follows another file).

Two figures per file: the runtime call alone (`invoke()`, the input placed before the clock), and,
with `served`, the call as a Python server pays it (`serve(x)`: the request copied in, the call, the
answer copied out). At 28 px the two differ by up to 4x; served calls are fewer (one for every
SERVED_EVERY call-only ones, in the same turns), so they add about a third to the timing.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from exporters.watchdog import beat

BLOCK = 10  # calls per turn; the first of each turn is untimed
SERVED_EVERY = 3  # one served call timed per this many call-only calls


def served_runs(runs: int, block: int = BLOCK) -> int:
    """How many served calls `measure_both` times for `runs` call-only ones."""
    per_turn = max(1, block - 1)
    turns, last = divmod(runs, per_turn)
    return turns * _served_in(per_turn) + (_served_in(last) if last else 0)


def _served_in(timed: int) -> int:
    return max(1, -(-timed // SERVED_EVERY))


def measure_interleaved(runners: dict[str, object], x: np.ndarray | dict, runs: int, warmup: int,
                        on_round: Callable[[int], None] | None = None, block: int = BLOCK) -> dict[str, np.ndarray]:
    """Per-runner invoke() times in seconds, `runs` each; the input is set outside the timed region.
    `x` is one input for every runner, or a dict giving each runner its own (files of different
    input shapes, e.g. the latency tables' probes or `compressor bench` on two models), keyed by the
    runners' labels; any other dict is one multi-input sample (keyed by input name) for every runner."""
    return measure_both(runners, x, runs, warmup, on_round, block, served=False)[0]


def measure_both(runners: dict[str, object], x: np.ndarray | dict, runs: int, warmup: int,
                 on_round: Callable[[int], None] | None = None, block: int = BLOCK,
                 served: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(call-only times, served times) per runner, in seconds: `runs` invoke() calls each and, with
    `served`, `served_runs(runs, block)` serve(x) calls taken in the same turns right after them.
    `x` as measure_interleaved takes it."""
    own = isinstance(x, dict) and set(runners) <= set(x)
    inputs = x if own else {label: x for label in runners}
    for label, runner in runners.items():
        runner.set_input(inputs[label])
        for _ in range(warmup):
            beat(getattr(runner, "path", label))  # each warm-up call is one call for the watchdog
            runner.invoke()
        if served:
            runner.serve(inputs[label])  # the first served call allocates its output: not timed
    times = {label: np.empty(runs) for label in runners}
    serve_times = {label: np.empty(served_runs(runs, block) if served else 0) for label in runners}
    forward = list(runners.items())
    backward = forward[::-1]
    per_turn = max(1, block - 1)
    done, served_done, turn = 0, 0, 0
    while done < runs:
        timed = min(per_turn, runs - done)
        extra = _served_in(timed) if served else 0
        for label, runner in (forward if turn % 2 == 0 else backward):  # alternate order: no position bias
            _turn(runner, inputs[label], block, times[label][done:done + timed],
                  serve_times[label][served_done:served_done + extra])
        if on_round is not None:
            for k in range(done, done + timed):
                on_round(k)
        done += timed
        served_done += extra
        turn += 1
    return times, serve_times


def _turn(runner, x: np.ndarray, block: int, out: np.ndarray, served_out: np.ndarray) -> None:
    """One file's turn: an untimed call (block > 1), then len(out) timed invoke() calls, then
    len(served_out) timed serve(x) calls; the times are written into the views given."""
    clock = time.perf_counter
    path = getattr(runner, "path", None)
    if block > 1:
        runner.set_input(x)
        runner.invoke()  # refills the caches the previous file evicted: not timed
    for k in range(len(out)):
        runner.set_input(x)
        start = clock()
        runner.invoke()
        out[k] = clock() - start
    for k in range(len(served_out)):
        beat(path)
        start = clock()
        runner.serve(x)
        served_out[k] = clock() - start
