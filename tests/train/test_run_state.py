"""The run-folder infrastructure shared by pretraining and finetuning: lock, stale temporaries,
full-disk saves, resume from the newest intact checkpoint, rewind refusal, thread defaults."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_run import ToyConfig, ToyTask

from helpers import fill_disk, free_port
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.errors import UsageError
from lomar.train import runtime
from lomar.train.lifecycle import run
from lomar.train.precision import resolve_precision
from lomar.train.run_lock import RunLock
from lomar.train.run_logs import truncate_metrics
from lomar.train.run_resume import (
    check_no_rewind,
    find_resume_point,
    numerics_notes,
    read_resume_point,
    resume_point,
)
from lomar.train.run_state import (
    SaveError,
    check_out_folder,
    foreign,
    prepare_run_folder,
    refuse_held_run,
    remove_stale_temporaries,
    save_checkpoint,
    save_on_main_rank,
)
from lomar.train.settings import ConfigError


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "step": step}


def test_a_second_lock_on_the_folder_refuses_at_once(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(UsageError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            RunLock(out).acquire()
    with RunLock(out):  # released on exit
        pass


def test_a_refusal_names_the_holder_and_its_machine_where_it_is_another(tmp_path):
    """The lock file says "pid N on HOST": a run on another machine sharing the folder is named with its host (its
    PID means nothing here); a bare PID, as a lock file of an older lomar holds, reads as before."""
    out = tmp_path / "run"
    out.mkdir()
    for text, owner in (("pid 4242 on elsewhere", "pid 4242 on elsewhere"), ("4242", "pid 4242"), ("", "pid unknown")):
        (out / ".lock").write_text(text)
        with open(out / ".lock") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: another holder, as far as flock goes
            with pytest.raises(UsageError, match=rf"in use by another run \({owner}\); wait for it"):
                RunLock(out).acquire()
    (out / ".lock").write_text("pid 7 on a\n" + "x" * 100_000)  # planted: its rest must not reach the message
    with open(out / ".lock") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(UsageError) as caught:
            RunLock(out).acquire()
    assert "\n" not in str(caught.value) and f"(pid 7 on a {'x' * 69}); wait for it" in str(caught.value)


def test_a_run_on_a_filesystem_without_flock_starts_unlocked_with_one_warning(tmp_path, monkeypatch, caplog):
    """Lustre mounted -o noflock (ENOSYS), some NFS setups (ENOLCK): flock's every OSError read as another run's hold,
    and a run there refused to start, "in use by another run (pid unknown)". It starts, saying once that the folder is
    not locked; the check for a run already there and the run's export into its folder do not say it again, and a
    failed set-up leaves no folder."""
    from lomar.checkpoints.export_leftovers import export_lock

    def no_flock(handle, flags):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr("fcntl.flock", no_flock)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        with RunLock(out):  # old code: UsageError, in use by another run
            (out / "last.pt").write_bytes(b"x")
            with pytest.raises(ConfigError, match="already holds a run"):
                refuse_held_run(out, None, False)
            with export_lock(out) as locked:
                assert not locked
        assert caplog.messages == [f"--out {out}: no file lock there (Function not implemented); the folder is not "
                                   f"locked against a second run: start no other run into it meanwhile"]
        with pytest.raises(RuntimeError), RunLock(tmp_path / "new"):
            raise RuntimeError("set-up failed")
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"] and not (tmp_path / "new").exists()


def test_a_run_without_flock_leaves_the_lock_file_of_a_run_on_a_machine_with_it(tmp_path, monkeypatch):
    """An NFS folder, one client mounted with flock and this one without: the lock file there may be a live run's.
    Removing it (as one the run made is) would let a third run on the other client lock a new file beside it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("pid 4242 on elsewhere")

    def no_flock(handle, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_flock)
    with RunLock(out):
        assert (out / ".lock").read_text() == "pid 4242 on elsewhere"  # old code: removed
    assert (out / ".lock").read_text() == "pid 4242 on elsewhere"


def test_a_run_into_a_removed_working_folder_is_refused_not_stuck(tmp_path, monkeypatch):
    """--out run, relative, from a working folder removed meanwhile: making the folder fails with ENOENT each time,
    which the lock retried forever at full CPU."""

    def stuck(*_):
        pytest.fail("still trying to lock the folder after 2 s")

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    before = signal.signal(signal.SIGALRM, stuck)
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(UsageError, match=r"^--out run: No such file or directory; pass a folder you can write"):
            RunLock(Path("run")).acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


@pytest.mark.slow
def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    out = tmp_path / "run"
    code = (f"from lomar.train.run_lock import RunLock; lock = RunLock({str(out)!r}).acquire(); "
            f"import os; os._exit(3)")  # a crash: no clean-up code runs
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ}, timeout=120)
    assert proc.returncode == 3 and (out / ".lock").exists()
    with RunLock(out):
        pass


def test_a_failed_set_up_leaves_no_empty_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with RunLock(out):
            raise RuntimeError("set-up failed")
    assert not out.exists()
    existing = tmp_path / "old"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with RunLock(existing):
            raise RuntimeError("set-up failed")
    assert existing.is_dir()  # not ours to remove


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    names = [".checkpoint-000009.pt.tmp-4242", ".last.pt.tmp-99999", ".metrics.jsonl.tmp", ".config.yaml.tmp",
             f".last.pt.tmp-4242-{'0a' * 8}"]  # atomic_write's own name: a writer killed mid-write
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    keep = ["last.pt", "checkpoint-000009.pt", "notes.tmp.txt", ".lock"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    with RunLock(tmp_path):
        removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_a_run_without_its_folders_lock_removes_no_temporary(tmp_path, monkeypatch, caplog):
    """A filesystem without flock (a share mounted without it): the run goes on unlocked, and a temporary there may be
    a live writer's on another machine, whose PID says nothing here. Old code removed it."""
    def no_flock(handle, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    names = [f".last.pt.tmp-4242-{'0a' * 8}", ".checkpoint-000009.pt.tmp-4242"]
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    monkeypatch.setattr("fcntl.flock", no_flock)
    with caplog.at_level("WARNING", "lomar.train"), RunLock(tmp_path):
        assert remove_stale_temporaries(tmp_path) == []
    assert "no file lock there" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_an_export_running_into_the_folder_keeps_its_temporaries(tmp_path):
    """A ``lomar export --to RUN`` writing while the run starts: its temporaries are its, not stale."""
    from lomar.checkpoints.export_leftovers import export_lock

    names = [".config.json.tmp-4242", ".model.safetensors.tmp-4242", ".last.pt.tmp-99"]
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    with RunLock(tmp_path):
        with export_lock(tmp_path) as held:
            assert held
            assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.pt.tmp-99"]
        assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted(names[:2])  # no export: stale


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, step=1, keep_last=2)

    fill_disk(monkeypatch, room=64)  # torch.save's zip writer meets ENOSPC part-way, as on a real disk
    with pytest.raises(SaveError) as info:
        save_checkpoint(_state(2), tmp_path, step=2, keep_last=2)
    message = str(info.value)
    assert "no space left" in message and "last.pt is intact" in message and "\n" not in message
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert safe_load(tmp_path / "last.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001.pt", "last.pt"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_folder_gone_unwritable_mid_run_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, code):
    # a file system remounted read-only, or a folder whose permissions changed: the traceback-free line said
    # "choose a writable location" (exit 2, as for a bad flag), not that last.pt is intact and how to go on
    from lomar.checkpoints import io

    save_checkpoint(_state(1), tmp_path, step=1, keep_last=2)

    def refused(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(io, "open", refused, raising=False)
    with pytest.raises(SaveError) as info:
        save_checkpoint(_state(2), tmp_path, step=2, keep_last=2)
    monkeypatch.undo()
    assert str(info.value) == (f"cannot write {tmp_path / 'checkpoint-000002.pt'} ({os.strerror(code)}); "
                               f"{tmp_path / 'last.pt'} is intact; make {tmp_path} writable and resume with "
                               f"--resume auto")
    assert info.value.errno == code and safe_load(tmp_path / "last.pt")["step"] == 1


def test_a_disk_filled_by_the_step_checkpoint_names_it_as_the_intact_state(tmp_path, monkeypatch):
    """The first save of a run writes checkpoint-N.pt, then last.pt: if only the first fits, the
    state is safe in it, and the message says so (not "no earlier checkpoint")."""
    from lomar.train import run_state

    written = []

    def second_write_fails(state, path):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(atomic_save(state, path))

    monkeypatch.setattr(run_state, "atomic_save", second_write_fails)
    with pytest.raises(SaveError, match=r"last\.pt; .*checkpoint-000004\.pt is intact"):
        save_checkpoint(_state(4), tmp_path, step=4, keep_last=2)
    assert safe_load(tmp_path / "checkpoint-000004.pt")["step"] == 4
    assert find_resume_point(tmp_path).path.name == "checkpoint-000004.pt"


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    for step in (3, 6, 9):
        atomic_save(_state(step), tmp_path / f"checkpoint-{step:06d}.pt")
    (tmp_path / "checkpoint-000012.pt").write_bytes(b"truncated by a full disk")
    found = find_resume_point(tmp_path)
    assert found.path.name == "checkpoint-000009.pt"
    text = " | ".join(found.notes)
    assert "last.pt is missing" in text and "checkpoint-000012.pt cannot be read" in text
    assert "checkpoint-000009.pt" in text
    atomic_save(_state(12), tmp_path / "last.pt")
    found = find_resume_point(tmp_path)
    assert (found.path, found.notes) == (tmp_path / "last.pt", [])
    found = find_resume_point(tmp_path / "nothing")
    assert (found.path, found.notes) == (None, [])


def test_resume_auto_takes_a_step_checkpoint_newer_than_last_pt(tmp_path):
    """A run killed between writing checkpoint-N.pt and last.pt leaves last.pt a save behind."""
    atomic_save(_state(10), tmp_path / "last.pt")
    atomic_save(_state(10), tmp_path / "checkpoint-000010.pt")
    atomic_save(_state(15), tmp_path / "checkpoint-000015.pt")
    found = find_resume_point(tmp_path)
    assert found.path.name == "checkpoint-000015.pt"
    assert found.notes[0] == f"{tmp_path / 'last.pt'} is at step 10, behind checkpoint-000015.pt"


def test_resume_auto_under_the_lock_takes_a_newer_checkpoint_the_folders_time_does_not_show(tmp_path):
    """The settings read last.pt; before the run's lock a run killed between its two writes left a newer
    checkpoint-N.pt, on a filesystem whose clock (1-2 s) or cached attributes (NFS) show the folder unchanged."""
    atomic_save(_state(2), tmp_path / "last.pt")
    read = find_resume_point(tmp_path)
    held = tmp_path.stat()
    atomic_save(_state(4), tmp_path / "checkpoint-000004.pt")
    os.utime(tmp_path, ns=(held.st_atime_ns, held.st_mtime_ns))
    point = resume_point("auto", tmp_path, False, read)
    assert point.path.name == "checkpoint-000004.pt" and point.step == 4


def test_a_checkpoint_rewritten_in_place_since_the_settings_read_it_is_read_again(tmp_path):
    """rsync --inplace -t: the same inode, size and mtime, but another state (its ctime tells)."""
    path = tmp_path / "last.pt"
    atomic_save(_state(2), path)
    read = read_resume_point(path)
    before = path.stat()
    atomic_save(_state(3), tmp_path / "other.pt")
    data = (tmp_path / "other.pt").read_bytes()
    assert len(data) == before.st_size
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    while path.stat().st_ctime_ns == before.st_ctime_ns:  # a coarse clock: until it ticks
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert resume_point(str(path), tmp_path, False, read).step == 3


def test_an_older_checkpoint_does_not_rewind_a_folder_whose_last_pt_is_gone(tmp_path):
    atomic_save(_state(55), tmp_path / "checkpoint-000055.pt")
    atomic_save(_state(60), tmp_path / "checkpoint-000060.pt")
    for last in (None, b"cut short"):  # missing, then unreadable
        if last is not None:
            (tmp_path / "last.pt").write_bytes(last)
        with pytest.raises(UsageError, match=r"step 55\).*would rewind.*checkpoint-000060\.pt is at step 60"):
            check_no_rewind(tmp_path / "checkpoint-000055.pt", tmp_path, overwrite=False)
    check_no_rewind(tmp_path / "checkpoint-000060.pt", tmp_path, overwrite=False)


def test_resuming_an_older_checkpoint_into_a_newer_folder_refuses(tmp_path):
    atomic_save(_state(135), tmp_path / "checkpoint-000135.pt")
    atomic_save(_state(180), tmp_path / "last.pt")
    with pytest.raises(UsageError, match=r"step 135.*would rewind.*step 180.*--out NEW_FOLDER.*--overwrite"):
        check_no_rewind(tmp_path / "checkpoint-000135.pt", tmp_path, overwrite=False)
    check_no_rewind(tmp_path / "checkpoint-000135.pt", tmp_path, overwrite=True)
    check_no_rewind(tmp_path / "checkpoint-000135.pt", tmp_path / "elsewhere", overwrite=False)
    check_no_rewind(tmp_path / "last.pt", tmp_path, overwrite=False)


@dataclasses.dataclass
class _Config:
    out: str
    resume: str | None = None
    overwrite: bool = False


class _Task:
    name, eval_log, outputs, final_outputs = "toy", "knn.jsonl", ("knn.jsonl", "figure.png"), ()


def _run_folder(out, step: int, seed: int):
    out.mkdir(parents=True)
    atomic_save(_state(step), out / "last.pt")
    atomic_save(_state(step), out / f"checkpoint-{step:06d}.pt")
    for log in ("metrics.jsonl", "knn.jsonl"):
        (out / log).write_text("".join(f'{{"step": {s}, "seed": {seed}}}\n' for s in range(1, step + 1)))
    (out / "figure.png").write_text(f"seed {seed}")
    return out


def test_another_folders_checkpoint_does_not_graft_onto_a_held_run(tmp_path):
    a, b = _run_folder(tmp_path / "a", 4, seed=0), _run_folder(tmp_path / "b", 2, seed=7)
    with pytest.raises(UsageError, match=r"another folder's checkpoint, and --out .*b already holds a run; pass --out "
                                         r"NEW_FOLDER to branch off, or --overwrite"):
        check_no_rewind(a / "last.pt", b, overwrite=False)
    with pytest.raises(UsageError, match=r"^resume: \S+a/last.pt in my.yaml is another folder's checkpoint, and out: "
                                         r"\S+b in my.yaml already holds a run;"):  # as --config gave them
        check_no_rewind(a / "last.pt", b, overwrite=False, in_file={"resume": "my.yaml", "out": "my.yaml"})
    check_no_rewind(a / "last.pt", tmp_path / "new", overwrite=False)  # branching off into a new folder
    check_no_rewind(a / "last.pt", b, overwrite=True)
    prepare_run_folder(_Config(str(b), str(a / "last.pt"), True), _Task(), a / "last.pt", 4, 0)
    assert sorted(p.name for p in b.iterdir()) == ["config.yaml"]  # nothing of the seed-7 run is left


def test_one_folder_spelt_two_ways_is_one_folder(tmp_path, capsys):
    """Two spellings of one folder that resolved paths keep apart (a case-insensitive file system's two cases, here
    a bind mount that a child's mount namespace holds, reached through its /proc/PID/root, which resolve() reads as
    the empty folder under it): a checkpoint of the run is not another folder's, and --out in it is inside it."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:  # no user namespaces here
        pytest.skip("needs unshare -rm (user and mount namespaces) for a bind mount")
    from PIL import Image

    from lomar.cli.app import main

    real, alias = tmp_path / "real", tmp_path / "alias"
    for split in ("train", "val"):
        (real / "data" / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(real / "data" / split / "a" / "x.png")
    (real / "run").mkdir()
    (real / "run" / "last.pt").write_bytes(b"")
    (real / "encoder.pt").write_bytes(b"")
    alias.mkdir()
    # the mount lives as long as the child, which ends at its stdin's end (this process's, if it is killed)
    holder = subprocess.Popen(["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$1" && echo mounted && exec cat',
                               str(real), str(alias)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "mounted\n"
        seen = Path(f"/proc/{holder.pid}/root") / alias.relative_to("/")
        assert (seen / "run" / "last.pt").is_file()
        assert seen.resolve() == alias.resolve()  # what the resolved strings took for another folder
        assert not foreign(real / "run" / "last.pt", seen / "run")
        assert main(["finetune", "--pretrained", str(real / "encoder.pt"), "--data", str(seen / "data"),
                     "--out", str(real / "data" / "scored")]) == 2
    finally:
        holder.stdin.close()
        holder.wait(5)
        holder.stdout.close()
    assert not (real / "data" / "scored").exists()
    assert capsys.readouterr().err == (f"lomar finetune: error: --out {real / 'data/scored'} is inside --data "
                                       f"{seen / 'data'}: the run's files would join the data it reads; put the "
                                       f"run elsewhere\n")


def test_a_rewind_removes_the_figures_of_the_steps_it_drops(tmp_path):
    class Figures(_Task):
        outputs = ("reconstruction*.png",)

    out = _run_folder(tmp_path / "run", 5, seed=0)
    for step in (0, 3, 5):
        (out / f"reconstruction-{step:06d}.png").write_text("figure")
    (out / "reconstruction.png").write_text("the latest")
    prepare_run_folder(_Config(str(out), str(out / "checkpoint-000003.pt"), True), Figures(), out / "x.pt", 3, 0)
    assert sorted(p.name for p in out.glob("reconstruction*")) == [
        "reconstruction-000000.png", "reconstruction-000003.png", "reconstruction.png"]


def test_a_rewind_removes_the_export_of_the_steps_it_drops(tmp_path):
    """The export written at the run's end (step 5) stayed beside the run rewound to step 3: a user took the
    dropped steps' weights for the run's own, until its new end wrote them again."""
    class Exports(_Task):
        final_outputs = ("encoder.safetensors", "config.json")

    out = _run_folder(tmp_path / "run", 5, seed=0)
    for name in Exports.final_outputs:
        (out / name).write_text("step 5")
    prepare_run_folder(_Config(str(out), str(out / "checkpoint-000003.pt"), True), Exports(), out / "x.pt", 3, 0)
    assert not (out / "encoder.safetensors").exists() and not (out / "config.json").exists()
    for name in Exports.final_outputs:  # a resume that rewinds nothing keeps them
        (out / name).write_text("step 5")
    prepare_run_folder(_Config(str(out), str(out / "last.pt"), False), Exports(), out / "last.pt", 5, 0)
    assert (out / "encoder.safetensors").read_text() == "step 5"


def test_a_rewind_makes_the_state_it_resumed_from_the_newest(tmp_path):
    """A rewound run that dies before its first checkpoint (killed, out of memory) left last.pt at the dropped
    step 5 while checkpoint-000005.pt and the metrics past step 3 were gone: --resume auto took step 5 up again."""
    out = _run_folder(tmp_path / "run", 5, seed=0)
    atomic_save(_state(3), out / "checkpoint-000003.pt")
    prepare_run_folder(_Config(str(out), str(out / "checkpoint-000003.pt"), True), _Task(),
                       out / "checkpoint-000003.pt", 3, 0)
    assert safe_load(find_resume_point(out).path)["step"] == 3 and safe_load(out / "last.pt")["step"] == 3
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint-000003.pt", "last.pt"]
    assert not list(out.glob(".*.tmp*"))


def test_a_new_run_does_not_delete_files_of_a_folder_that_holds_no_run(tmp_path):
    """--out DIR holding no run of lomar's (no config.yaml, no checkpoint) but a tb/ or metrics.jsonl of something
    else: a new run, not told --overwrite, deleted them (tb/ with rmtree) as an earlier run's leftovers."""
    out = tmp_path / "mine"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "events").write_text("someone's logs")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(UsageError, match=r"--out .*mine holds metrics.jsonl, tb, which a new run would delete, but no "
                                         r"run \(no config.yaml or checkpoint\); pass --overwrite to let it"):
        prepare_run_folder(_Config(str(out)), _Task(), None, 0, 0)
    assert (out / "tb" / "events").is_file() and (out / "metrics.jsonl").is_file()
    prepare_run_folder(_Config(str(out), None, True), _Task(), None, 0, 0)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    prepare_run_folder(_Config(str(tmp_path / "new")), _Task(), None, 0, 0)  # an empty folder: nothing to refuse


def test_a_resume_cuts_the_evaluation_log_back_too(tmp_path):
    out = _run_folder(tmp_path / "run", 5, seed=0)
    prepare_run_folder(_Config(str(out), "auto"), _Task(), out / "checkpoint-000005.pt", 3, 0)
    for log in ("metrics.jsonl", "knn.jsonl"):
        assert [json.loads(line)["step"] for line in (out / log).read_text().splitlines()] == [1, 2, 3], log


@pytest.mark.parametrize("case", ["file", "under a file", "read-only"])
def test_unusable_output_folders(tmp_path, case):
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    path, words = {"file": (afile, "is a file"), "under a file": (afile / "sub", "which is a file"),
                   "read-only": (ro / "run", "not writable")}[case]
    if case == "read-only" and os.access(ro, os.W_OK):
        pytest.skip("running as a user who can write anywhere")
    with pytest.raises(UsageError, match=words):
        check_out_folder(path)
    check_out_folder(tmp_path / "new" / "deeper")


def test_metrics_truncation_drops_later_and_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    # lines that are no record of this log (damaged, or written by something else) never stop a resume: those after
    # the step's record go with the records past it, those before it stay (every reader of the log skips them)
    kept = b'{"step": 1}\n[1, 2]\n{"step": "a"}\n"text"\n\xff\xfe\n{"step": 2, "loss": 0.5}\n'
    path.write_bytes(kept + b'[3]\n\xff\n{"step": 3}\n{"step": "b"}\n')
    truncate_metrics(path, 2)
    assert path.read_bytes() == kept


def test_metrics_truncation_writes_nothing_when_nothing_follows_the_step(tmp_path):
    # every resume copied the whole log to drop nothing: 40 s at a million logged steps on a 2-core machine
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    os.utime(path, ns=(0, 0))
    inode = path.stat().st_ino
    truncate_metrics(path, 2)
    assert (path.stat().st_ino, path.stat().st_mtime_ns, path.read_text()) == (inode, 0, '{"step": 1}\n{"step": 2}\n')
    truncate_metrics(path, 1)  # cut in place, not copied
    assert (path.stat().st_ino, path.read_text()) == (inode, '{"step": 1}\n')
    path.write_text('{"step": 1}\n{"step": 2}')  # whole but for its line end: the next record would join its line
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.parametrize("block", [1, 5, 64])
def test_metrics_truncation_reads_backwards_across_blocks_and_keeps_records_without_a_step(tmp_path, monkeypatch,
                                                                                          block):
    from lomar.train import run_logs

    monkeypatch.setattr(run_logs, "_BLOCK", block)
    path = tmp_path / "metrics.jsonl"
    score = '{"box_AP": 1.5}'
    cases = {  # (log, step) -> what stays: a record without a step among the dropped ones is kept by a copy
        ('{"step": 1}\n{"step": 2}\n{"step": 3}\n', 2): '{"step": 1}\n{"step": 2}\n',
        ('{"step": 1}\n{"step": 2}\n{"step": 3}\n', 0): "",
        (f'{{"step": 1}}\n{score}\n{{"step": 3}}\n{score}\n{{"step": 4', 1): f'{{"step": 1}}\n{score}\n{score}\n',
        (f'{{"step": 1}}\n{{"step": 3}}\n{score}\n', 1): f'{{"step": 1}}\n{score}\n',
        (f'{{"step": 1}}\n{score}\n\n{{"step": 2}}\n\n', 5): f'{{"step": 1}}\n{score}\n\n{{"step": 2}}\n',
        ("\n", 3): "",
        ("", 3): "",
    }
    for (log, step), expected in cases.items():
        path.write_text(log)
        truncate_metrics(path, step)
        assert path.read_text() == expected, (log, step)


def test_metrics_truncation_keeps_records_without_a_step(tmp_path):
    # detect --eval-only appends its scores to --out's metrics.jsonl without a step; a resume of the run there
    # dropped them
    path = tmp_path / "metrics.jsonl"
    scores = json.dumps({"eval_only": True, "pretrained": "run/last.pt", "img_size": 64, "box_AP": 12.5})
    path.write_text(f'{{"step": 1}}\n{scores}\n{{"step": 3}}\n')
    truncate_metrics(path, 2)
    assert path.read_text() == f'{{"step": 1}}\n{scores}\n'


def test_metrics_truncation_holds_one_line_at_a_time_and_keeps_the_lines_as_they_were(tmp_path):
    # every resume held the whole log and its lines at once: a single-GPU ImageNet run logs 8 million steps
    import tracemalloc

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "note": "é ✓"}, ensure_ascii=False)
             for s in range(1, 4_001)]
    path.write_text("".join(line + "\n" for line in lines) + '{"step": 4001, "lo', encoding="utf-8")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        truncate_metrics(path, 3_600)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.read_bytes() == "".join(line + "\n" for line in lines[:3_600]).encode()
    assert peak - held < size / 4


@pytest.mark.slow
def test_tensorboard_keeps_every_step_of_a_run_that_stops_with_an_error(tmp_path):
    # such a run closes no Monitor, and at exit TensorBoard's writer thread dropped what it had not written yet: the
    # steps before the error (its writes slowed here, as a busy disk would: it then always had some left)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = (
        "import sys, time\n"
        "from tensorboard.summary.writer.record_writer import RecordWriter\n"
        "from lomar.train.monitor import Monitor\n"
        "write = RecordWriter.write\n"
        "RecordWriter.write = lambda self, data: (time.sleep(0.002), write(self, data))\n"
        "monitor = Monitor(__import__('pathlib').Path(sys.argv[1]), active=True, total=30, log_every=100)\n"
        "for step in range(1, 31):\n"
        "    monitor.step(step, 0, 1.0 / step, 1e-3, 10.0)\n"
        "raise SystemExit('the run stopped')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.endswith("the run stopped\n"), done.stderr[-2000:]
    logged = EventAccumulator(str(tmp_path / "tb"))
    logged.Reload()
    assert [event.step for event in logged.Scalars("train/loss")] == list(range(1, 31))


def test_thread_and_worker_defaults_fit_the_machine(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (runtime.default_threads(), runtime.default_workers()) == (2, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_threads() == 1
    monkeypatch.setattr(runtime, "available_cores", lambda: 1)
    assert (runtime.default_threads(), runtime.default_workers()) == (1, 0)
    monkeypatch.setattr(runtime, "available_cores", lambda: 64)
    assert runtime.default_workers() == 8


class FailsToStartOnMain(ToyTask):
    """The main process's start fails as pretrain's first figure does on a full disk."""

    def begin(self):
        raise OSError(errno.ENOSPC, "No space left on device", "reconstruction-000000.png")


def _save_worker(rank: int, world: int, port: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from lomar.train.distributed import cleanup_distributed

    torch.set_num_threads(1)
    # a rank left waiting in a collective fails after a minute instead of hanging the test
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        def full_disk():
            raise SaveError("no space left on the device to write last.pt")

        try:
            save_on_main_rank(full_disk, rank == 0, torch.device("cpu"))
            raised = "nothing"
        except Exception as exc:  # noqa: BLE001 - the test records whatever came out
            raised = f"{type(exc).__name__}: {exc}"
        written = save_on_main_rank(lambda: "written", rank == 0, torch.device("cpu"))
        from types import SimpleNamespace

        from lomar.train.distributed import main_rank_out

        # a default --out is each process's clock's: two that read it in different seconds split a sharded checkpoint
        folder = main_rank_out(SimpleNamespace(out=f"runs/2026120{rank}-000000"))
        dist.barrier()
        # a run's start (pretrain's first figure) is the main process's, shared as a save is: in this launch, as
        # spawning two more processes costs 20 s. The run joins this group and leaves it.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        try:
            run(ToyConfig(out=f"{out}/run", accum_steps=1), FailsToStartOnMain)
            started = "nothing"
        except Exception as exc:  # noqa: BLE001 - the test records whatever came out
            started = f"{type(exc).__name__}: {exc}"
        with open(f"{out}/rank{rank}.txt", "w") as f:
            f.write(f"{raised}|{written}|{folder}|{started}")
    finally:
        cleanup_distributed()
    os._exit(0)  # skip the interpreter's teardown, which gloo's threads can abort (lomar.cli.app.run)


@pytest.mark.slow
def test_a_failed_save_or_start_on_the_main_rank_stops_every_rank_together(tmp_path):
    # a start that failed on the main rank alone left the other in the first step's collective, said by it too
    import torch.multiprocessing as mp

    # forked: neither process imports torch, lomar and this module afresh, as spawned ones did (3-4 s)
    mp.start_processes(_save_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    assert (tmp_path / "rank0.txt").read_text() == \
        "SaveError: no space left on the device to write last.pt|written|runs/20261200-000000|" \
        "OSError: [Errno 28] No space left on device: 'reconstruction-000000.png'"
    assert (tmp_path / "rank1.txt").read_text() == \
        "SaveError: the main process could not write the checkpoint; see its message|None|runs/20261200-000000|" \
        "SaveError: the main process could not write the checkpoint; see its message"


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                         (False, True, "bf16")])
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_precision_is_bf16_only_where_the_gpu_multiplies_bf16(monkeypatch, native, expected):
    """A T4 or V100 runs bf16 emulated, slower than fp32: torch's is_bf16_supported() says yes to it by default."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_the_saved_random_state_holds_the_normal_samplers_cached_value(tmp_path):
    import random

    import numpy as np

    from lomar.train.rng import rng_state, set_rng_state

    np.random.seed(3)
    random.seed(3)
    np.random.beta(1.0, 1.0)  # as timm's cutmix: the normal draw inside leaves one value cached
    random.gauss(0, 1)
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    ahead = [np.random.beta(1.0, 1.0), np.random.standard_normal(), random.gauss(0, 1)]
    set_rng_state(safe_load(tmp_path / "rng.pt")["rng"])  # weights_only: plain data
    assert [np.random.beta(1.0, 1.0), np.random.standard_normal(), random.gauss(0, 1)] == ahead


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a checkpoint read onto a CUDA device")
def test_the_random_state_of_a_checkpoint_read_onto_the_gpu_is_restored(tmp_path):
    """A resume reads its checkpoint onto the run's device (task.preload), RNG states included: torch's generators
    refused them there ('RNG state must be a torch.ByteTensor'), so no single-file run resumed on CUDA."""
    from lomar.train.rng import rng_state, set_rng_state

    cuda = torch.device("cuda")
    atomic_save({"rng": rng_state(cuda)}, tmp_path / "rng.pt")
    ahead = [torch.rand(3), torch.rand(3, device=cuda).cpu()]
    set_rng_state(safe_load(tmp_path / "rng.pt", map_location=cuda)["rng"], cuda)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [torch.rand(3), torch.rand(3, device=cuda).cpu()]))


class _OffHost(torch.Tensor):
    """A tensor held off the host, as a checkpoint read onto the GPU holds its RNG states (the meta device stands in
    for CUDA on a machine without one): only a copy to the host reads it."""

    @staticmethod
    def __new__(cls, held: torch.Tensor):
        tensor = torch.Tensor._make_wrapper_subclass(cls, held.shape, dtype=held.dtype, device="meta")
        tensor.held = held
        return tensor

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and (kwargs or {}).get("device") == torch.device("cpu"):
            return args[0].held.clone()
        raise TypeError(f"{func} reads a tensor off the host")


def test_the_device_kind_is_told_from_a_checkpoint_that_records_it_only():
    """A checkpoint holds a CUDA stream where its run trained on CUDA since every rank's states are kept (rng_ranks):
    an older one, a CUDA run's too, holds rank 0's host streams alone, and its GPU resume was told 'device cpu →
    cuda'."""
    rng, cuda = {"torch": torch.zeros(8, dtype=torch.uint8)}, torch.device("cuda")
    gpu_run = {"step": 5, "precision": "fp32", "rng": {**rng, "cuda": rng["torch"]}}
    assert numerics_notes({**gpu_run, "rng_ranks": [gpu_run["rng"]]}, "fp32", "fp32", cuda) == []
    assert numerics_notes({"step": 5, "precision": "fp32", "rng": rng}, "fp32", "fp32", cuda) == []
    cpu_run = {"step": 5, "precision": "fp32", "rng": rng, "rng_ranks": [rng]}
    assert numerics_notes(cpu_run, "fp32", "fp32", cuda) == [
        "device cpu → cuda after step 5: the weights and optimizer state move over; its kernels and device random "
        "draws (drop path) differ, so it does not go on bit for bit"]


def test_random_states_read_onto_another_device_are_restored_through_the_host():
    """task.preload maps a checkpoint onto the run's device, RNG states included, and torch's and numpy's generators
    read host memory only: a CUDA resume stopped on 'RNG state must be a torch.ByteTensor'. Runs without a GPU."""
    import random

    import numpy as np

    from lomar.train.rng import rng_state, set_rng_state

    state = rng_state()
    ahead = [torch.rand(3), np.random.rand(), random.random()]
    set_rng_state({k: _OffHost(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    assert torch.equal(ahead[0], torch.rand(3)) and ahead[1:] == [np.random.rand(), random.random()]


def test_a_cuda_random_state_read_onto_the_gpu_is_handed_to_torch_from_the_host(monkeypatch):
    """The CUDA generator's state too: torch.cuda.set_rng_state takes a host ByteTensor (its generator's set_state
    raises 'RNG state must be a torch.ByteTensor' at CUDA's lazy start otherwise), and the run's device. Runs without
    a GPU: the state stands off the host (meta), the call is recorded."""
    from lomar.train.rng import rng_state, set_rng_state

    cuda_state, given = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: given.append((state, device)))
    state = {**rng_state(), "cuda": cuda_state}
    set_rng_state({k: _OffHost(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()},
                  torch.device("cuda", 1))
    ((handed, device),) = given
    assert handed.device.type == "cpu" and torch.equal(handed, cuda_state) and device == torch.device("cuda", 1)
    set_rng_state(state, torch.device("cpu"))  # a CPU resume leaves the CUDA generator alone
    assert len(given) == 1


@pytest.mark.slow
def test_a_killed_run_frees_its_folder_at_once_though_its_forked_workers_live_on(tmp_path):
    out = tmp_path / "run"
    code = (f"import multiprocessing as mp, time, sys; from lomar.train.run_lock import RunLock; "
            f"lock = RunLock({str(out)!r}).acquire(); worker = mp.get_context('fork').Process(target=time.sleep, "
            f"args=(60,)); worker.start(); print(worker.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    try:
        proc.kill()  # as kill -9: the loader worker outlives the run by seconds
        proc.wait(timeout=30)
        with RunLock(out):
            pass
    finally:
        os.kill(worker, 9)
        proc.stdout.close()  # else the collector closes it: a ResourceWarning (unclosed file) under -W error


def test_a_resume_mismatch_names_what_differs():
    """torch's first line of a failed load_state_dict is a header: the one-line error takes the difference."""
    from lomar.checkpoints.io import mismatch

    with pytest.raises(RuntimeError) as caught:
        torch.nn.Linear(4, 3).load_state_dict(torch.nn.Linear(4, 2).state_dict())
    assert mismatch(caught.value).startswith("size mismatch for weight: copying a param with shape")
    assert mismatch(KeyError("optimizer")) == "'optimizer'" and mismatch(ValueError()) == "ValueError"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO])
def test_a_log_write_that_fails_mid_run_names_the_file(tmp_path, code):
    # a write's OSError names no file: a folder gone read-only under metrics.jsonl was a traceback
    from lomar.cli.app import describe_os_error
    from lomar.train.monitor import Monitor

    class Refusing:
        def write(self, text):
            raise OSError(code, os.strerror(code))

        def close(self):
            pass

    monitor = Monitor(tmp_path, active=True, total=3, log_every=1)
    monitor.file.close()
    monitor.file = Refusing()
    with pytest.raises(OSError) as info:
        monitor.step(1, 0, 0.5, 1e-3, 10.0)
    monitor.close()
    assert info.value.errno == code and info.value.filename == str(tmp_path / "metrics.jsonl")
    message, _ = describe_os_error(info.value)
    assert str(tmp_path / "metrics.jsonl") in message and "\n" not in message


def test_a_full_disk_mid_run_says_resume_not_rerun(tmp_path):
    # "then rerun" sent a training run's user to a command that refuses the folder the run holds
    from lomar.cli.app import describe_os_error

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    message, code = describe_os_error(full, "pretrain")
    assert code == 1 and message == (f"writing {tmp_path / 'metrics.jsonl'}: no space left on the device; free space, "
                                     f"then resume with --resume auto (from the last checkpoint, if one was written)")
    assert describe_os_error(full, "export")[0].endswith("free space or choose another location, then rerun")


def test_a_quota_is_named_a_quota_not_a_full_device(tmp_path, monkeypatch):
    # df shows free space on the device of a user whose quota is used up: "no space left on the device" misleads
    from lomar.cli.app import describe_os_error
    from lomar.train import run_state

    quota = OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "metrics.jsonl"))
    message, code = describe_os_error(quota, "pretrain")
    assert code == 1 and message.startswith(f"writing {tmp_path / 'metrics.jsonl'}: no space left in the disk quota; "
                                            f"free space, then resume"), message

    def over_quota(state, path):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))

    monkeypatch.setattr(run_state, "atomic_save", over_quota)
    with pytest.raises(SaveError) as info:
        run_state.save_state(_state(1), tmp_path / "last.pt", tmp_path / "last.pt")
    assert str(info.value) == (f"no space left in the disk quota to write {tmp_path / 'last.pt'}; no earlier "
                               f"checkpoint exists; free space and resume with --resume auto")
    assert info.value.errno == errno.EDQUOT


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_evaluation_record_on_a_full_disk_names_its_file(tmp_path, monkeypatch):
    # /dev/full: the kernel's ENOSPC at the flush, and again when the file is closed, which named nothing
    from lomar.train import monitor as monitor_module

    monitor = monitor_module.Monitor(tmp_path, active=True, total=3, log_every=1)
    monkeypatch.setattr(monitor_module, "open_in_place", lambda path, mode: open("/dev/full", mode))
    with pytest.raises(OSError) as info:
        monitor.evaluation("knn.jsonl", 1, 0, {"knn_top1": 0.5}, {}, "epoch 0")
    monitor.close()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "knn.jsonl")


def test_scores_never_go_into_a_run_folder(tmp_path):
    """An --eval-only record in a run's metrics.jsonl (detect and segment took one, --overwrite or not) is cut back
    by the run's next resume and read by `lomar study` as the run's last evaluation: refused, whatever --overwrite
    says; a folder of scores alone takes more."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"eval_only": true}\n')
    refuse_held_run(out, None, False, eval_only=True)
    (out / "last.pt").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=rf"^--out {out} holds a run, whose metrics.jsonl is its training's own; "
                                              rf"pass another --out for the scores$"):
            refuse_held_run(out, None, overwrite, eval_only=True)


def test_a_slow_steps_image_rate_is_printed_not_rounded_to_zero(tmp_path, capsys):
    # one decimal printed a slow CPU step's 0.04 img/s as "img/s 0.0"
    from lomar.train.monitor import Monitor

    monitor = Monitor(tmp_path, active=True, total=2, log_every=1)
    monitor.step(1, 0, 0.5, 1e-3, 0.04)
    monitor.step(2, 0, 0.5, 1e-3, 123.45)
    monitor.close()
    out = capsys.readouterr().out
    assert "img/s 0.04 " in out and "img/s 123.5 " in out, out


def test_a_monitor_whose_tensorboard_writer_fails_to_start_closes_its_metrics_file(tmp_path, monkeypatch):
    # metrics.jsonl is opened before TensorBoard's writer: a writer that failed (here: tb is a file, not a folder)
    # left it open, a ResourceWarning
    from lomar.train import monitor as monitor_module

    opened = []
    real_open = monitor_module.open_in_place
    monkeypatch.setattr(monitor_module, "open_in_place", lambda *args: opened.append(real_open(*args)) or opened[-1])
    (tmp_path / "tb").write_text("not a folder")
    with pytest.raises(OSError) as info:
        monitor_module.Monitor(tmp_path, active=True, total=3, log_every=1)
    assert info.value.filename == str(tmp_path / "tb")
    assert len(opened) == 1 and opened[0].closed
