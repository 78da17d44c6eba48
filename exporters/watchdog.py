"""Run runtime work on files from elsewhere in a child process the parent can always stop.

A hostile or broken file can keep a runtime busy inside one native call for ever (an ONNX `Loop`
whose trip count is 2**62, a LiteRT `WHILE` that never ends) or crash it. Inside that call
Python's signal handlers do not run, so neither SIGTERM nor a timer in the same process can end
it. The parent therefore forks a child for the work and waits in Python: a SIGTERM or Ctrl-C is
handled at once (the child is killed), a call that runs past the time limit is stopped with one
line naming the file, and a native crash of the runtime becomes one line instead of a dead process.

The child stamps a shared clock before each runtime call (`beat`, from the runners' `set_input`
and `predict`, outside the timed region), so the limit bounds one call, not the whole benchmark.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import signal
import sys
import time
import traceback
from pathlib import Path

from compressor.core import CompressorError

_current: _Heartbeat | None = None  # set in the child only


class _Heartbeat:
    """When the child last entered a runtime call, and for which file (shared memory, no lock)."""

    def __init__(self, ctx, files: list[Path]):
        self.stamp = ctx.RawValue("d", time.monotonic())
        self.who = ctx.RawValue("i", -1)  # the file in a runtime call now; -1: none (the clock is stopped)
        self.last = -1  # the child's own note of the last file, for `who`
        self.files = [Path(f) for f in files]
        self._index = {str(f): i for i, f in enumerate(self.files)}

    def beat(self, path) -> None:
        self.stamp.value = time.monotonic()
        self.who.value = self.last = self._index.get(str(path), self.last)

    def age(self) -> float:
        return time.monotonic() - self.stamp.value

    def file(self) -> str:
        i = self.who.value if self.who.value >= 0 else self.last
        return str(self.files[i]) if 0 <= i < len(self.files) else "the file"


def beat(path) -> None:
    """Mark the start of a runtime call on `path`; a no-op outside a watched child."""
    if _current is not None:
        _current.beat(path)


def idle() -> None:
    """Out of the runtime (hashing, gzip, statistics): the clock stops until the next `beat`."""
    if _current is not None:
        _current.who.value = -1


def _child(fn, args, heart: _Heartbeat, send, debug: bool) -> None:
    global _current
    _current = heart
    if not debug:
        faulthandler.disable()  # a crash is reported by the parent in one line, not as a thread dump
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent answers it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        answer = ("ok", fn(*args))
    except CompressorError as exc:
        answer = ("error", str(exc))
    except MemoryError:
        answer = ("error", "out of memory while running the file; lower --batch or free memory")
    except BaseException as exc:  # noqa: BLE001 - every failure crosses the pipe as one message
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        answer = ("unexpected", f"{type(exc).__name__}: {first}", traceback.format_exc())
    send.send(answer)
    send.close()


def _context():
    """fork where it is safe and cheap (Linux: no re-import); spawn elsewhere."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def run_watched(fn, args: tuple, files: list[Path], limit: float, debug: bool = False):
    """fn(*args) in a child process; its return value, or one CompressorError for any failure.

    `limit` is the most seconds one runtime call may take (see `beat`). KeyboardInterrupt and
    SIGTERM (turned into an exception by the CLI) reach the parent while it waits; the child is
    killed on the way out whatever happens.
    """
    ctx = _context()
    heart = _Heartbeat(ctx, files)
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, heart, send, debug), daemon=True)
    proc.start()
    send.close()
    try:
        answer = _wait(proc, receive, heart, limit)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receive.close()
    if answer is None:
        code = proc.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
        raise CompressorError(f"the runtime crashed ({how}) while running {heart.file()}; the file is damaged or "
                              "uses something the runtime cannot run: re-export the model")
    if answer[0] == "ok":
        return answer[1]
    if answer[0] == "unexpected" and debug:
        print(answer[2], file=sys.stderr, end="")
    raise CompressorError(answer[1] if answer[0] == "error" else f"unexpected {answer[1]} (rerun with --debug)")


def _wait(proc, receive, heart: _Heartbeat, limit: float):
    """The child's answer, None if it died without one; CompressorError when a call overruns."""
    while not receive.poll(0.05):
        if not proc.is_alive() and not receive.poll(0):
            return None
        if heart.who.value >= 0 and heart.age() > limit:  # inside a runtime call (imports are not)
            raise CompressorError(f"{heart.file()}: one runtime call ran for more than {limit:g} s and was stopped; "
                                  "the file may loop without end (e.g. an ONNX Loop with a huge trip count): if it is "
                                  "only slow, raise the limit with --time-limit SECONDS")
    try:
        return receive.recv()
    except EOFError:
        return None
