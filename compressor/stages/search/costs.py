"""Where a search spends its time, and the whole-model files it exports only once.

A search on a deep network is mostly exports (each whole model converted for each runtime), layer
table measurements and fine-tune epochs. The clock adds up each phase so report.json shows where
the time went; the file store keeps every whole model's exported file for the search's lifetime,
so the start model, timed beside every point, and the final session that times them all again
convert nothing a second time.
"""
from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PHASES = ("couplings", "tables", "calibration", "importance", "fine_tune", "recovery", "measure", "final_measure")


class Clock:
    """Seconds and counts per phase of one search (`PHASES`, in the order a search runs them)."""

    def __init__(self):
        self.began = time.perf_counter()
        self.seconds = {p: 0.0 for p in PHASES}
        self.counts: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def record(self) -> dict:
        """The stage record's account: seconds per phase, the rest (surgery, allocation) and the counts."""
        total = time.perf_counter() - self.began
        spent = {p: round(s, 2) for p, s in self.seconds.items()}
        return {"seconds": spent, "other_s": round(max(0.0, total - sum(self.seconds.values())), 2),
                "total_s": round(total, 2), "counts": dict(self.counts)}


class Files:
    """Exported whole-model files by label and runtime, kept until `close` (the search's end).

    A label names one model for the search's lifetime ('start', 'point3', 'dense'); a different model
    object under a known label is exported again, so a reused label can never time a stale file."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="compressor-search-")
        self._paths: dict[tuple[str, str], tuple[int, Path]] = {}
        self.exported = 0

    def path(self, label: str, model, runtime: str, export) -> Path:
        """The file of `model` for `runtime`, made by `export(model, path)` the first time it is asked for."""
        from exporters import targets

        known = self._paths.get((label, runtime))
        if known is not None and known[0] == id(model) and known[1].is_file():
            return known[1]
        path = Path(self._folder.name) / targets.float_target(runtime).filename(f"{label}-{len(self._paths)}")
        export(model, path)
        self.exported += 1
        self._paths[(label, runtime)] = (id(model), path)
        return path

    def close(self) -> None:
        self._folder.cleanup()
        self._paths.clear()
