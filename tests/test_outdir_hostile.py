"""The output folder under hostile or unlucky conditions: planted links and foreign files under the run's
own hidden names, dotfiles with --force, a mount point or a symlink as --out, a full disk, non-UTF-8 names.
Each case: one `error:` line (or a correct result), nothing outside the run's own files touched."""
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compressor.cli import main
from compressor.core.errors import CompressorError
from compressor.run import outdir
from compressor.run.outdir import OutputFolder, check_out_dir

ROOT = Path(__file__).resolve().parents[1]
FAST = {"targets": ["tflite"], "max_accuracy_drop": 0.2, "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
        "bench": {"runs": 200, "warmup": 1, "batch": [1], "threads": [1]}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_mlp):
    folder = tmp_path_factory.mktemp("inputs")
    small_mlp.save(folder / "m.keras")
    (folder / "r.yaml").write_text(yaml.safe_dump(FAST))
    return folder


def _run(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(inputs / "m.keras"), "--data", "digits", "--recipe", str(inputs / "r.yaml"),
            "--out", str(out), "--quiet", *extra]


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _tree(folder: Path) -> dict:
    """Every entry below `folder` (links not followed): file -> sha256, link -> target, folder -> None."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = None
    return found


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "thesis"
    (victim / "chapters").mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    (victim / "chapters" / "one.tex").write_text("chapter one")
    return victim


def _previous(out: Path, files: dict | None = None) -> dict:
    """A finished result written the tool's own way (with its manifest); returns its tree."""
    folder = OutputFolder(out, force=True)
    with folder as work:
        for name, text in (files or {"report.json": '{"old": 1}', "pruned.tflite": "old model"}).items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        folder.commit()
    return _tree(out)


# --------------------------------------------------------------------------- 1. planted links, foreign files


def test_planted_checkpoint_symlink_is_refused_and_its_target_kept(inputs, tmp_path, capsys):
    victim = _victim(tmp_path)
    before = _tree(victim)
    out = tmp_path / "res"
    (tmp_path / ".res.checkpoint").symlink_to(victim)
    assert main(_run(inputs, out)) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "is a symbolic link, not compressor's checkpoint folder" in errors[0], errors
    assert _tree(victim) == before and os.readlink(tmp_path / ".res.checkpoint") == str(victim)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".res.checkpoint", "thesis"]


def test_planted_lock_symlink_is_not_truncated(inputs, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("do not truncate me")
    out = tmp_path / "res"
    (tmp_path / ".res.lock").symlink_to(victim)
    assert main(_run(inputs, out)) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "not compressor's lock file" in errors[0], errors
    assert victim.read_text() == "do not truncate me" and (tmp_path / ".res.lock").is_symlink()
    assert not out.exists()


def test_foreign_lock_file_hard_link_and_old_link_are_refused_untouched(tmp_path):
    victim = _victim(tmp_path)
    before = _tree(victim)
    out = tmp_path / "res"
    lock = tmp_path / ".res.lock"
    lock.write_text("my notes, not a pid")
    with pytest.raises(CompressorError, match="not compressor's lock file"), OutputFolder(out, force=False):
        pass
    assert lock.read_text() == "my notes, not a pid"
    lock.unlink()
    os.link(victim / "thesis.tex", lock)  # a hard link: truncating it would truncate the thesis
    with pytest.raises(CompressorError, match="not compressor's lock file"), OutputFolder(out, force=False):
        pass
    lock.unlink()
    (tmp_path / ".res.old-12345").symlink_to(victim)  # a "previous result" put back by recovery
    with pytest.raises(CompressorError, match=r"\.res\.old-12345' is a symbolic link"), OutputFolder(out, force=False):
        pass
    assert _tree(victim) == before and not out.exists() and not lock.exists()


def test_checkpoint_folder_holding_foreign_files_is_never_emptied(tmp_path, small_mlp):
    from compressor.run.checkpoint import Checkpoint, folder_for

    folder = folder_for(tmp_path / "res")
    folder.mkdir()
    (folder / "diary.txt").write_text("mine")
    with pytest.raises(CompressorError, match=r"holds files compressor did not write \(diary.txt\)"):
        Checkpoint(tmp_path / "res", {"recipe": "r"}, load_keras=None).save(1, small_mlp, [], None)
    with pytest.raises(CompressorError, match="did not write"):
        Checkpoint(tmp_path / "res", {}, load_keras=None).discard()
    assert sorted(os.listdir(folder)) == ["diary.txt"]


# --------------------------------------------------------------------------- 2. --force replaces what the run wrote


def test_force_refuses_a_result_holding_dotfiles_and_keeps_them(inputs, tmp_path, capsys):
    out = tmp_path / "res"
    _previous(out)
    (out / ".env").write_text("SECRET=1")
    (out / ".gitignore").write_text("*.onnx\n")
    before = _tree(out)
    assert main(_run(inputs, out, "--force")) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "did not write (.env, .gitignore)" in errors[0], errors
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_force_accepts_its_own_frontier_and_replaces_exactly_the_listed_files(tmp_path):
    out = tmp_path / "res"
    _previous(out, {"report.json": "{}", "pruned.keras": "k", "frontier/2.0x/pruned.keras": "p",
                    "frontier/2.0x/pruned.tflite": "t"})
    assert check_out_dir(out, force=True) == out  # the tool's own --keep-frontier result
    _previous(out, {"report.json": '{"new": 1}'})  # --force over it: the old files are all gone
    assert sorted(os.listdir(out)) == [".compressor-files.json", "report.json"]
    (out / "frontier").mkdir()
    with pytest.raises(CompressorError, match=r"did not write \(frontier\)"):
        check_out_dir(out, force=True)  # not in this result's manifest
    (out / "frontier").rmdir()
    (out / "report.json").unlink()
    (out / "report.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CompressorError, match=r"did not write \(report.json\)"):
        check_out_dir(out, force=True)  # a link is never ours, whatever its name


def test_a_result_of_an_older_version_keeps_its_contracted_names(tmp_path):
    out = tmp_path / "res"
    (out / "frontier" / "4.0x").mkdir(parents=True)
    for name in ("report.json", "pruned.tflite", "frontier/4.0x/pruned.onnx"):
        (out / name).write_text("x")
    assert check_out_dir(out, force=True) == out
    (out / ".env").write_text("SECRET=1")
    with pytest.raises(CompressorError, match=r"did not write \(.env\)"):
        check_out_dir(out, force=True)


# --------------------------------------------------------------------------- 3. mount point or symlink as --out


def test_symlinked_out_is_written_where_the_link_points(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    _previous(real)
    link.symlink_to(real)
    folder = OutputFolder(link, force=True)
    with folder as work:
        (work / "report.json").write_text('{"new": 1}')
        folder.commit()
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "report.json").read_text() == '{"new": 1}' and not (real / "pruned.tflite").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-*, no .real.*


def test_run_with_force_on_a_symlinked_out_keeps_the_link(inputs, tmp_path, capsys):
    real, link = tmp_path / "real", tmp_path / "link"
    _previous(real)
    link.symlink_to(real)
    assert main(_run(inputs, link, "--force")) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert all(v["ok"] for v in json.loads((real / "report.json").read_text())["verification"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_dangling_symlink_out_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    with pytest.raises(CompressorError, match="symbolic link to a missing folder"):
        check_out_dir(tmp_path / "link", force=False)


@pytest.fixture
def mounted(monkeypatch, tmp_path):
    """`tmp_path/mnt` taken for a mount point (the mount table is mocked)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setattr(outdir, "is_mount", lambda path: Path(path) == mnt)
    return mnt


def test_mount_point_out_is_written_through(mounted, tmp_path):
    before = _previous(mounted)
    assert "report.json" in before and sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
    inode = mounted.stat().st_ino
    folder = OutputFolder(mounted, force=True)
    with folder as work:
        assert work.parent == mounted  # built inside the mount: the swap is a rename on one file system
        (work / "report.json").write_text('{"new": 1}')
        folder.commit()
    assert mounted.stat().st_ino == inode and (mounted / "report.json").read_text() == '{"new": 1}'
    assert sorted(os.listdir(mounted)) == [".compressor-files.json", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


def test_failed_swap_into_a_mount_point_keeps_the_previous_result(mounted, tmp_path, monkeypatch):
    before = _previous(mounted)
    real_move = outdir._move_in
    calls = []

    def failing(src, dst, scratch):
        calls.append(src.name)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real_move(src, dst, scratch)

    monkeypatch.setattr(outdir, "_move_in", failing)
    folder = OutputFolder(mounted, force=True)
    with pytest.raises(OSError), folder as work:
        for name in ("report.json", "pruned.tflite", "dense.tflite"):
            (work / name).write_text("new")
        folder.commit()
    assert _tree(mounted) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


def test_rename_refused_with_ebusy_falls_back_to_writing_through(tmp_path, monkeypatch):
    out = tmp_path / "res"
    _previous(out)
    real_rename = os.rename

    def busy(src, dst, *a, **k):
        if Path(src) == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", busy)
    folder = OutputFolder(out, force=True)
    with folder as work:
        (work / "report.json").write_text('{"new": 1}')
        folder.commit()
    assert (out / "report.json").read_text() == '{"new": 1}' and not (out / "pruned.tflite").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


@pytest.mark.parametrize("stage", ["before-move-in", "mid-move-in", "complete"])
def test_a_write_through_swap_cut_by_sigkill_is_undone_or_finished(mounted, tmp_path, stage):
    before = _previous(mounted)
    old = mounted / ".compressor.old-999999999"
    old.mkdir()
    (old / ".incoming.json").write_text(json.dumps(["report.json", ".compressor-files.json"]))
    for name in os.listdir(mounted):
        if not name.startswith(".compressor."):
            os.rename(mounted / name, old / name)
    if stage != "before-move-in":
        (old / ".moved-out").write_text("")
        (mounted / "report.json").write_text("new, half swapped")
    if stage == "complete":
        (mounted / ".compressor-files.json").write_text(json.dumps({"format": 1, "files": ["report.json"]}))
        (old / ".complete").write_text("")
    folder = OutputFolder(mounted, force=True)
    with folder:
        if stage == "complete":
            assert sorted(os.listdir(mounted)) == [".compressor-files.json", ".compressor.lock",
                                                   f".compressor.partial-{os.getpid()}", "report.json"]
        else:
            assert {k: v for k, v in _tree(mounted).items() if not k.startswith(".compressor.")} == before
    assert not [n for n in os.listdir(mounted) if n.startswith(".compressor.")]


def _can_mount(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True,
                        check=False).returncode == 0 if os.geteuid() == 0 else False
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of the asked size (root only), unmounted afterwards."""
    if not _can_mount(tmp_path):
        pytest.skip("mounting a tmpfs needs root")
    mounts = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_real_mount_point_as_out_gets_the_result(inputs, tmpfs, tmp_path, capsys):
    mnt = tmpfs("mnt", "64m")
    assert main(_run(inputs, mnt)) == 0, capsys.readouterr().err
    first = json.loads((mnt / "report.json").read_text())
    assert all(v["ok"] for v in first["verification"])
    assert main(_run(inputs, mnt, "--force")) == 0, capsys.readouterr().err
    assert not [n for n in os.listdir(mnt) if n.startswith(".compressor.")]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "probe") == ["mnt"]


# --------------------------------------------------------------------------- 4. full disk


def test_full_disk_names_the_file_and_the_room_and_leaves_nothing(inputs, tmp_path, capsys, monkeypatch):
    import exporters.report

    out = tmp_path / "res"
    before = _previous(out)

    def disk_fills(report, folder, *args, **kwargs):
        (Path(folder) / ".report.json.x1y2.partial").write_bytes(b"{" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporters.report, "write_reports", disk_fills)
    assert main(_run(inputs, out, "--force")) == 1
    errors = _errors(capsys)
    assert len(errors) == 1, errors
    assert f"no space left on the disk of '{out}' while writing 'report.json'" in errors[0]
    assert " MB, " in errors[0] and " free); free some space or choose an --out on another disk" in errors[0]
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no checkpoint


def test_a_really_full_tmpfs_gives_one_line_and_leaves_nothing(inputs, tmpfs, capsys):
    disk = tmpfs("small", "160k")
    assert main(_run(inputs, disk / "res")) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on the disk of '{disk / 'res'}'"), errors
    assert os.listdir(disk) == []


# --------------------------------------------------------------------------- 5. names that are not UTF-8


def test_non_utf8_out_is_refused_before_any_work(inputs, tmp_path):
    out = os.fsencode(tmp_path) + b"/r\xffes"
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", "run", "--model", str(inputs / "m.keras"),
                           "--data", "digits", "--out", out, "--quiet"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        (f"error: --out '{tmp_path}/r\\xffes' is not valid UTF-8 (TensorFlow and the runtimes cannot open such "
         "paths); rename it, or pass a path whose name is UTF-8")]
    assert os.listdir(tmp_path) == []


def test_non_utf8_model_path_is_refused_in_one_line(tmp_path, capsys):
    model = os.fsdecode(os.fsencode(tmp_path) + b"/m\xe9.keras")
    Path(model).write_bytes(b"not read")
    assert main(["run", "--model", model, "--data", "digits", "--out", str(tmp_path / "o")]) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: --model '{tmp_path}/m\\xe9.keras' is not valid UTF-8")
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_whose_first_save_fails_leaves_no_empty_folder(tmp_path, small_mlp, monkeypatch):
    from compressor.load import model_io
    from compressor.run.checkpoint import Checkpoint, folder_for

    def fails(model, path):
        Path(path).with_name(".stage-1.tmp-0123abcd.keras").write_bytes(b"half")
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(model_io, "save_model_atomic", fails)
    with pytest.raises(OSError):
        Checkpoint(tmp_path / "res", {"recipe": "r"}, load_keras=None).save(1, small_mlp, [], None)
    assert not folder_for(tmp_path / "res").exists() and os.listdir(tmp_path) == []
