"""Progress on stderr with rich: what the run is doing now, epochs, benchmark rounds; silent with --quiet."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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
    from compressor.core._tf import keras

    return type("EpochBar", (_EpochBar, keras.callbacks.Callback), {})


class _EpochBar:
    """A keras callback (mixed into keras.callbacks.Callback by `_epoch_bar_class`) showing epoch,
    samples/s and ETA while training, then the train accuracy.

    On a terminal it is a live bar advanced per batch; in a log (CI, `2> file`) one line per epoch.
    `samples_per_epoch` is filled in by training.fit; without it the rate is in batches/s.
    """

    def __init__(self, reporter: Reporter, label: str, epochs: int):
        super().__init__()
        self.reporter, self.label, self.epochs = reporter, label, epochs
        self.samples_per_epoch: int | None = None
        self._progress = self._task = None
        self._logs, self._epoch, self._batches, self._start = {}, 0, 0, 0.0

    def on_train_begin(self, logs=None):
        self._steps = self.params.get("steps") or None
        self._start, self._batches = time.perf_counter(), 0
        if self.reporter.console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"),
                TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
                console=self.reporter.console, transient=True)
            total = self.epochs * self._steps if self._steps else self.epochs
            self._task = self._progress.add_task(self._title(1), total=total, rate="")
            self._progress.start()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1
        if self._progress:
            self._progress.update(self._task, description=self._title(self._epoch))

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._progress and self._steps:
            self._progress.update(self._task, advance=1, rate=self.rate_text())

    def on_epoch_end(self, epoch, logs=None):
        self._logs = logs or {}
        if self._progress:
            self._progress.update(self._task, advance=0 if self._steps else 1, rate=self.rate_text())
        else:
            left = (self.epochs - epoch - 1) * (time.perf_counter() - self._start) / (epoch + 1)
            self.reporter.step(f"{self._title(epoch + 1)}, {self.rate_text()}, ETA {_clock(left)}")

    def on_train_end(self, logs=None):
        if self._progress:
            self._progress.stop()
        if "accuracy" in self._logs:
            self.reporter.step(f"{self.label}: train accuracy {self._logs['accuracy']:.3f}, {self.rate_text()}")

    def _title(self, epoch: int) -> str:
        return f"{self.label}: epoch {epoch}/{self.epochs}"

    def rate_text(self) -> str:
        """Training throughput so far: samples/s when the epoch size is known, else batches/s."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        if self.samples_per_epoch and self._steps:
            return f"{self._batches / self._steps * self.samples_per_epoch / elapsed:,.0f} samples/s"
        return f"{self._batches / elapsed:,.1f} batches/s"


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
