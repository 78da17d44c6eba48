"""Progress on stderr with rich: what the run is doing now, epochs, benchmark rounds; silent with --quiet."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet, highlight=False)
        self._start = time.perf_counter()

    def step(self, message: str) -> None:
        self.console.print(f"[dim]{time.perf_counter() - self._start:6.1f}s[/dim] {message}")

    def warn(self, message: str) -> None:
        if not self.quiet:
            print(f"warning: {message}", file=sys.stderr)

    def bar(self, label: str, total: int) -> "_Bar":
        return _Bar(self, label, total)

    def epoch_callback(self, label: str, epochs: int):
        return None if self.quiet else _epoch_bar_class()(self, label, epochs)


class _Bar:
    """A context-managed progress bar; `advance()` per unit of work."""

    def __init__(self, reporter: Reporter, label: str, total: int):
        self._progress = None
        if not reporter.quiet:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=reporter.console, transient=True)
            self._task = self._progress.add_task(label, total=total)

    def __enter__(self):
        if self._progress:
            self._progress.start()
        return self

    def advance(self, n: int = 1) -> None:
        if self._progress:
            self._progress.advance(self._task, n)

    def __exit__(self, *exc):
        if self._progress:
            self._progress.stop()


def _epoch_bar_class():
    """Built on first use so `bench` and `inspect` never pay for importing TensorFlow."""
    from compressor._tf import keras

    class EpochBar(keras.callbacks.Callback):
        """A keras callback that shows epochs while training, then the final train accuracy."""

        def __init__(self, reporter: Reporter, label: str, epochs: int):
            super().__init__()
            self.reporter, self.label, self.epochs = reporter, label, epochs
            self._bar = None
            self._logs = {}

        def on_train_begin(self, logs=None):
            self._bar = _Bar(self.reporter, self.label, self.epochs).__enter__()

        def on_epoch_end(self, epoch, logs=None):
            self._logs = logs or {}
            self._bar.advance()

        def on_train_end(self, logs=None):
            self._bar.__exit__(None, None, None)
            if "accuracy" in self._logs:
                self.reporter.step(f"{self.label}: train accuracy {self._logs['accuracy']:.3f}")

    return EpochBar
