"""The output folder of `run` and `demo`: checked before any work, built aside, swapped in when complete.

A run writes into a hidden sibling `.NAME.partial-PID` and only a finished result replaces `NAME`
(old folder renamed to `.NAME.old-PID`, new one renamed into place, old one deleted). So Ctrl-C,
SIGTERM or a crash leave the previous result exactly as it was; a SIGKILLed run's leftovers are
cleaned up (or, if it died mid-swap, the previous result is put back) by the next run. A lock file
`.NAME.lock` (flock, holding the owner's pid) refuses a second run on the same folder; the kernel
drops the flock when its owner dies, so a stale lock never blocks anyone.

A symlinked `--out` is resolved first, so the result lands where the link points. A folder that
cannot be renamed (a mount point) is written through: the run's hidden entries (`.compressor.*`) live
inside it and the swap moves the old entries aside inside it, then the new ones in.

None of the run's own hidden entries is ever followed: a symlink, a foreign file or another user's
folder under one of those names is refused in one line, never written through, truncated or deleted.
A finished result lists its files in `.compressor-files.json`; `--force` replaces exactly those.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
from pathlib import Path

from compressor.core.errors import CompressorError

OUTPUT_FILES = frozenset({
    "report.json", "report.md", "dense.keras", "dense.tflite", "dense.onnx", "pruned.keras", "pruned.tflite",
    "pruned.onnx", "pruned-int8.tflite", "pruned-int8.onnx", "latency.png", "accuracy_vs_size.png", "layers.png",
    "frontier.png",
})
MANIFEST = ".compressor-files.json"  # inside a finished result: every file and folder the run wrote
INSIDE = ".compressor."  # prefix of the run's hidden entries inside a folder that is written through
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NOT_RENAMABLE = (errno.EBUSY, errno.EXDEV)
_MAX_MANIFEST_BYTES = 1 << 20


# ------------------------------------------------------------------ where things live


def _mount_points() -> set[str]:
    """Every mount point of this process (bind mounts too, which share their parent's device)."""
    try:
        raw = Path("/proc/self/mountinfo").read_bytes()
    except OSError:
        return set()
    unescape = re.compile(rb"\\([0-7]{3})")
    points = set()
    for line in raw.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            points.add(os.fsdecode(unescape.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])))
    return points


def is_mount(path: Path) -> bool:
    return os.path.ismount(path) or str(path) in _mount_points()


def resolve_out(out: str | Path) -> tuple[Path, bool]:
    """(the real folder the result goes to, True if it must be written through instead of renamed)."""
    path = Path(os.path.abspath(out))
    if path.is_symlink() and not path.exists():
        raise CompressorError(f"--out '{out}' is a symbolic link to a missing folder; create the folder it points "
                              "to, or pass a real path")
    real = Path(os.path.realpath(path))
    return real, real.is_dir() and is_mount(real)


def hidden_path(out: str | Path, tag: str) -> Path:
    """The run's own hidden entry `tag` (lock, checkpoint, partial-PID, old-PID) for output folder `out`."""
    real, inside = resolve_out(out)
    return real / f"{INSIDE}{tag}" if inside else real.parent / f".{real.name}.{tag}"


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a folder" if st.st_uid == os.geteuid() else "another user's folder"
    return "a file" if stat.S_ISREG(st.st_mode) else "a special file"


def own_folder(path: Path, what: str) -> bool:
    """True if `path` is a real folder of this user, False if absent; refuses anything else in one line
    (a planted symlink is never followed, a foreign entry never deleted)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        return True
    raise CompressorError(f"'{path}' is {_kind(st)}, not {what}; nothing was written through or deleted: "
                          "remove or rename it yourself, or choose another --out")


# ------------------------------------------------------------------ what a result holds


def write_manifest(folder: Path) -> None:
    """List every file and folder of a finished result (relative paths, folders end in '/')."""
    from exporters.files import write_text_atomic

    names = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        names += [f"{(rel / d).as_posix()}/" for d in dirs] + [(rel / f).as_posix() for f in files]
    names = sorted(n for n in names if n != MANIFEST)
    write_text_atomic(folder / MANIFEST, json.dumps({"format": 1, "files": names}, indent=1))


def _listed(folder: Path) -> set[str] | None:
    """The names a result's manifest lists; None if it has none (a result of an older version)."""
    try:
        st = os.lstat(folder / MANIFEST)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
        return set()
    try:
        body = json.loads((folder / MANIFEST).read_text())
        return {str(n) for n in body["files"]} | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _legacy(rel: str, is_dir: bool) -> bool:
    """Without a manifest, a file of the contracted names or a `frontier/<point>/` file is ours."""
    parts = rel.split("/")
    if parts[0] == "frontier":
        return len(parts) == 1 or (len(parts) == 2 and is_dir) or (len(parts) == 3 and parts[2] in OUTPUT_FILES)
    return len(parts) == 1 and not is_dir and rel in OUTPUT_FILES


def foreign_entries(folder: Path, skip: frozenset = frozenset()) -> list[str]:
    """Entries of `folder` this tool did not write (symlinks never count as ours); `skip`: top-level
    names of the run's hidden entries, checked where they are used."""
    listed = _listed(folder)
    foreign = []

    def walk(where: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(where), key=lambda e: e.name):
            rel = prefix + entry.name
            if not prefix and entry.name in skip:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            name = f"{rel}/" if is_dir else rel
            ours = name in listed if listed is not None else _legacy(rel, is_dir)
            if not ours or not (is_dir or entry.is_file(follow_symlinks=False)):
                foreign.append(rel)
            elif is_dir:
                walk(Path(entry.path), name)

    walk(folder, "")
    return foreign


def check_out_dir(out: str | Path, force: bool, inputs: tuple = ()) -> Path:
    """Validate --out before any work, without touching it.

    A non-empty folder is refused without --force; with --force only a folder holding nothing but
    this tool's own outputs is accepted, so `--out . --force` can never wipe a user's files.
    """
    out = Path(out)
    real, inside = resolve_out(out)
    if real.exists() and not real.is_dir():
        raise CompressorError(f"output '{out}' is a file; pass a folder path to --out")
    for path in inputs:
        if path is not None and Path(path).exists() and Path(path).resolve().is_relative_to(real):
            raise CompressorError(f"--out '{out}' contains the input '{path}'; choose a different output folder")
    names = os.listdir(real) if real.exists() else []
    skip = frozenset(n for n in names if (inside and n.startswith(INSIDE)) or _is_leftover(n, INSIDE))
    if len(names) > len(skip) and not force:
        raise CompressorError(
            f"output folder '{out}' is not empty; pass --force to overwrite it or choose another --out")
    foreign = foreign_entries(real, skip) if len(names) > len(skip) else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise CompressorError(f"output folder '{out}' holds files compressor did not write ({shown}); "
                              "--force only replaces a previous result: move them away or choose another --out")
    return out


def _is_leftover(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name[len(prefix):].startswith(("partial-", "old-"))


def _remove(path: Path) -> None:
    """Delete one of the run's own entries; a symlink is unlinked, never followed."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


class OutputFolder:
    """`with OutputFolder(out, force, inputs) as work:` write into `work`, then `commit()`.

    Leaving the block without commit() (error, Ctrl-C, SIGTERM turned into an exception) removes
    the partial folder and leaves `out` as it was.
    """

    def __init__(self, out: str | Path, force: bool, inputs: tuple = ()):
        self.out = check_out_dir(out, force, inputs)
        self.force, self.inputs = force, inputs
        self.final, self.inside = resolve_out(self.out)
        self.partial = self._hidden(f"partial-{os.getpid()}")
        self._lock_fd: int | None = None

    def _hidden(self, tag: str) -> Path:
        return self.final / f"{INSIDE}{tag}" if self.inside else self.final.parent / f".{self.final.name}.{tag}"

    def __enter__(self) -> Path:
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as exc:
            raise CompressorError(f"cannot write beside the output folder '{self.out}' ({exc.strerror}); the result "
                                  "is built next to --out and swapped in: "
                                  "choose a --out in a writable folder") from None
        try:
            self._recover()
            check_out_dir(self.out, self.force, self.inputs)  # again, now that nobody else writes it
            os.mkdir(self.partial)  # fails on anything already there, a symlink included
        except BaseException as exc:
            self._unlock()
            if is_disk_full(exc):
                raise DiskFull(self.out, self.partial, 2**20) from None
            raise
        return self.partial

    def __exit__(self, *exc) -> None:
        with _signals_deferred():
            try:
                if own_folder(self.partial, "the run's partial folder"):
                    shutil.rmtree(self.partial, ignore_errors=True)
            finally:
                self._unlock()

    def commit(self) -> Path:
        """Swap the finished result into place; signals wait until the folder is consistent."""
        write_manifest(self.partial)
        with _signals_deferred():
            swapped = False
            if not self.inside:
                try:
                    swapped = self._swap_renaming()
                except OSError as exc:  # a mount point the mount table did not show
                    if exc.errno not in _NOT_RENAMABLE:
                        raise
            if not swapped:
                self._swap_inside()
        return self.final

    def _swap_renaming(self) -> bool:
        old = self._hidden(f"old-{os.getpid()}")
        if os.path.lexists(old):
            raise CompressorError(f"'{old}' appeared during the run; remove it and run again")
        had = self.final.exists()
        if had:
            os.rename(self.final, old)
        try:
            os.rename(self.partial, self.final)
        except BaseException:
            if had:
                os.rename(old, self.final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return True

    def _swap_inside(self) -> None:
        """Write through a folder that cannot be renamed: the old entries go aside inside it, the new
        ones come in; marker files let the next run finish or undo a swap a SIGKILL cut short."""
        old = self.final / f"{INSIDE}old-{os.getpid()}"
        os.mkdir(old)
        incoming = sorted(os.listdir(self.partial), key=lambda n: n == MANIFEST)  # the manifest comes in last
        outgoing = sorted((n for n in os.listdir(self.final) if not n.startswith(INSIDE)), key=lambda n: n != MANIFEST)
        moved_out, moved_in = [], []
        try:
            _write_new(old / ".incoming.json", json.dumps(incoming))
            for name in outgoing:
                os.rename(self.final / name, old / name)
                moved_out.append(name)
            _write_new(old / ".moved-out", "")
            for name in incoming:
                _move_in(self.partial / name, self.final / name, old)
                moved_in.append(name)
            _write_new(old / ".complete", "")
        except BaseException:
            for name in moved_in:
                _remove(self.final / name)
            for name in moved_out:
                os.rename(old / name, self.final / name)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ lock and recovery

    def _lock(self) -> None:
        path = self._hidden("lock")
        while True:
            fd = _open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise CompressorError(
                    f"output folder '{self.out}' is being written by another compressor run (pid {owner}); "
                    "wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.lstat(path).st_ino
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
        path = self._hidden("lock")
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_ino == os.fstat(self._lock_fd).st_ino:
                os.unlink(path)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _recover(self) -> None:
        """Holding the lock, every other partial/old entry of ours belongs to a run that died (SIGKILL,
        power loss): a swap it left half done is finished or undone, the rest is removed."""
        prefix = f".{self.final.name}."
        beside = [] if self.inside else [p for p in self.final.parent.iterdir() if _is_leftover(p.name, prefix)]
        inside = [p for p in self.final.iterdir() if _is_leftover(p.name, INSIDE)] if self.final.is_dir() else []
        for path in sorted(beside) + sorted(inside):
            own_folder(path, "a folder compressor left behind")
            if path in inside and path.name.startswith(f"{INSIDE}old-"):
                _finish_inside_swap(path, self.final)
            elif path.name.startswith(f"{prefix}old-") and not self.final.exists():
                os.rename(path, self.final)  # died between the two renames of a swap: put the result back
            else:
                shutil.rmtree(path)


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file without following a symlink; anything but our own lock is refused
    before a byte of it is written."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        raise CompressorError(f"'{path}' is {_kind(os.lstat(path))}, not compressor's lock file; nothing was written "
                              "through it: remove it yourself and run again") from None
    st = os.fstat(fd)
    body = os.pread(fd, 64, 0)
    if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid() and st.st_size < 32
            and re.fullmatch(rb"\d*\n?", body)):
        os.close(fd)
        raise CompressorError(f"'{path}' is not compressor's lock file (a file it did not write); nothing was written "
                              "to it: remove it yourself and run again")
    return fd


def _move_in(src: Path, dst: Path, scratch: Path) -> None:
    """Rename, or copy then rename when the partial folder is on another file system."""
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = scratch / f".copy-{src.name}"
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, tmp, symlinks=True)
    else:
        shutil.copy2(src, tmp, follow_symlinks=False)
    os.rename(tmp, dst)
    _remove(src)


def _finish_inside_swap(old: Path, final: Path) -> None:
    """A written-through swap a dead run left: complete -> drop the old entries; else put them back."""
    markers = {".incoming.json", ".moved-out", ".complete"}
    if not (old / ".complete").exists():
        if (old / ".moved-out").exists():
            for name in json.loads((old / ".incoming.json").read_text()):
                if isinstance(name, str) and "/" not in name and not name.startswith(INSIDE):
                    _remove(final / name)
        for name in os.listdir(old):
            if name not in markers and not name.startswith(".copy-"):
                os.rename(old / name, final / name)
    shutil.rmtree(old)


@contextlib.contextmanager
def _signals_deferred():
    """Block SIGINT/SIGTERM for the renames of a swap; they are delivered right after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------ a full disk

_TEMP_NAMES = (re.compile(r"\.(?P<name>.+)\.[^.]+\.partial"), re.compile(r"\.(?P<stem>.+)\.tmp-[0-9a-f]{8}(?P<ext>.*)"))


def _inside(path: Path, out: Path) -> str:
    """`path` as the user reads it beside `out`: relative to it when inside (the line names `out`
    already, and two long absolute paths would not fit one line)."""
    try:
        return str(Path(path).relative_to(out))
    except ValueError:
        return str(path)


class DiskFull(CompressorError):
    """ENOSPC/EDQUOT while writing; the free space is measured when the message is shown, after the
    run's partial files are gone, so it is the room a rerun has."""

    def __init__(self, out: Path, path: Path | None, needed: int):
        super().__init__()
        self.out, self.path, self.needed = Path(out), path, needed

    def __str__(self) -> str:
        where = next(p for p in (self.out, *self.out.parents) if p.exists())
        free = shutil.disk_usage(where).free
        what = "the result" if self.path is None else f"'{_inside(self.path, self.out)}'"
        return (f"no space left on the disk of '{self.out}' while writing {what} (this run needs about "
                f"{_size(self.needed)}, {_size(free)} free); free some space or choose an --out on another disk")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: OSError, out: Path, work: Path, others: tuple = (), needed: int = 0) -> DiskFull:
    """The file being written (the exception's, else the newest file of the run) under the name the user
    knows, and an estimate of the room needed: at least what the run had written."""
    files = [(e.stat(follow_symlinks=False).st_mtime_ns, Path(e.path), e.stat(follow_symlinks=False).st_size)
             for place in (work, *others) if place is not None and os.path.isdir(place)
             for e in _walk_files(Path(place))]
    written = sum(size for _, _, size in files)
    path = Path(os.fsdecode(exc.filename)) if exc.filename else (max(files)[1] if files else None)
    return DiskFull(out, _user_name(path, work, out), max(needed, written))


def _walk_files(folder: Path):
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_files(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            yield entry


def _user_name(path: Path | None, work: Path, out: Path) -> Path | None:
    """A temp file in the partial folder, shown as the result file it was becoming."""
    if path is None:
        return None
    for pattern in _TEMP_NAMES:
        match = pattern.fullmatch(path.name)
        if match:
            parts = match.groupdict()
            path = path.with_name(parts.get("name") or parts["stem"] + parts["ext"])
            break
    with contextlib.suppress(ValueError):
        return Path(out) / path.relative_to(work)
    return path


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
