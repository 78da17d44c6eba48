"""The output folder of `run` and `demo`: checked before any work, built aside, swapped in when complete.

A run writes into a hidden sibling `.NAME.partial-PID` and only a finished result replaces `NAME`
(old folder renamed to `.NAME.old-PID`, new one renamed into place, old one deleted). So Ctrl-C,
SIGTERM or a crash leave the previous result exactly as it was; a SIGKILLed run's leftovers are
cleaned up (or, if it died mid-swap, the previous result is put back) by the next run. A lock file
`.NAME.lock` (flock, holding the owner's pid) refuses a second run on the same folder; the kernel
drops the flock when its owner dies, so a stale lock never blocks anyone.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
from pathlib import Path

from compressor.core.errors import CompressorError

OUTPUT_FILES = frozenset({
    "report.json", "report.md", "dense.keras", "dense.tflite", "dense.onnx", "pruned.keras", "pruned.tflite",
    "pruned.onnx", "pruned-int8.tflite", "pruned-int8.onnx", "latency.png", "accuracy_vs_size.png", "layers.png",
    "frontier.png",
})
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ours(entry: Path) -> bool:
    """A file this tool writes (or its temp file from an interrupted run)."""
    return entry.is_file() and (entry.name in OUTPUT_FILES or entry.name.startswith("."))


def check_out_dir(out: str | Path, force: bool, inputs: tuple = ()) -> Path:
    """Validate --out before any work, without touching it.

    A non-empty folder is refused without --force; with --force only a folder holding nothing but
    this tool's own outputs is accepted, so `--out . --force` can never wipe a user's files.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output '{out}' is a file; pass a folder path to --out")
    for path in inputs:
        if path is not None and Path(path).exists() and Path(path).resolve().is_relative_to(out.resolve()):
            raise CompressorError(f"--out '{out}' contains the input '{path}'; choose a different output folder")
    entries = list(out.iterdir()) if out.exists() else []
    if entries and not force:
        raise CompressorError(f"output folder '{out}' is not empty; pass --force to overwrite it or choose another --out")
    foreign = [e.name for e in entries if not _ours(e)]
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (" …" if len(foreign) > 3 else "")
        raise CompressorError(f"output folder '{out}' holds files compressor did not write ({shown}); "
                              "--force only replaces a previous result: choose another --out")
    return out


class OutputFolder:
    """`with OutputFolder(out, force, inputs) as work:` write into `work`, then `commit()`.

    Leaving the block without commit() (error, Ctrl-C, SIGTERM turned into an exception) removes
    the partial folder and leaves `out` as it was.
    """

    def __init__(self, out: str | Path, force: bool, inputs: tuple = ()):
        self.out = check_out_dir(out, force, inputs)
        self.force, self.inputs = force, inputs
        self.final = Path(os.path.abspath(self.out))
        self.partial = self._sibling(f"partial-{os.getpid()}")
        self._lock_fd: int | None = None

    def _sibling(self, tag: str) -> Path:
        return self.final.parent / f".{self.final.name}.{tag}"

    def __enter__(self) -> Path:
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as exc:
            raise CompressorError(f"cannot write beside the output folder '{self.out}' ({exc.strerror}); the result "
                                  "is built next to --out and swapped in: choose a --out in a writable folder") from None
        try:
            self._recover()
            check_out_dir(self.out, self.force, self.inputs)  # again, now that nobody else writes it
            self.partial.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self.partial

    def __exit__(self, *exc) -> None:
        with _signals_deferred():
            try:
                shutil.rmtree(self.partial, ignore_errors=True)
            finally:
                self._unlock()

    def commit(self) -> Path:
        """Swap the finished result into place; signals wait until the folder is consistent."""
        old = self._sibling(f"old-{os.getpid()}")
        with _signals_deferred():
            if self.final.exists():
                os.rename(self.final, old)
            os.rename(self.partial, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return self.final

    # ------------------------------------------------------------------ lock and recovery

    def _lock(self) -> None:
        path = self._sibling("lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise CompressorError(
                    f"output folder '{self.out}' is being written by another compressor run (pid {owner}); "
                    "wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its previous owner unlinked while we waited for it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._sibling("lock"))
        os.close(self._lock_fd)
        self._lock_fd = None

    def _recover(self) -> None:
        """Holding the lock, every other sibling of ours belongs to a run that died (SIGKILL, power loss)."""
        prefix = f".{self.final.name}."
        leftovers = sorted(p for p in self.final.parent.iterdir()
                           if p.name.startswith(prefix) and p.name[len(prefix):].startswith(("partial-", "old-")))
        for path in leftovers:
            if path.name[len(prefix):].startswith("old-") and not self.final.exists():
                os.rename(path, self.final)  # died between the two renames of a swap: put the result back
            else:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    """Block SIGINT/SIGTERM for the two renames of a swap; they are delivered right after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so cleanup (finally blocks, context managers) runs as for Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_exception():
    """For the CLI: a CI time limit or a closed terminal ends the run like Ctrl-C, not mid-write.

    The previous handler is restored afterwards (the CLI also runs inside test processes).
    """
    def raise_terminated(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
