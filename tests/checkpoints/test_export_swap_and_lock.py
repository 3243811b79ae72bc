"""How an export replaces a folder's weights and config.json: an overwrite that fails or is killed leaves one whole
export, and exports into one folder take turns under its lock (another user's, a flock-less filesystem, a bounded
wait)."""

import errno
import json
import multiprocessing
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from export_models import TINY, WINDOWED, _perturb

from helpers import dead_pid, no_flock
from lomar import LoMaR, VisionTransformer, create_encoder, export_encoder
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.io import atomic_save
from lomar.cli.app import main
from lomar.errors import UsageError

timm = pytest.importorskip("timm")
import lomar.integrations.timm  # noqa: E402,F401  (registers lomar_vit_* in timm)


def test_an_overwrite_that_fails_after_the_weights_leaves_the_old_export_whole(tmp_path, monkeypatch):
    """The weights and config.json go in as one swap: a failure between their renames leaves the old export whole,
    never the new weights beside the old config.json, which would rebuild them with the old ViTDet window size (the
    same shapes: no check would catch it)."""
    torch.manual_seed(0)
    before = VisionTransformer(WINDOWED).eval()
    export_encoder(before, tmp_path / "exp")
    rename, failed = os.replace, []

    def fail_once_at_config(src, dst):
        if Path(dst).name == "config.json" and not failed:
            failed.append(src)
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return rename(src, dst)

    monkeypatch.setattr(os, "replace", fail_once_at_config)
    with pytest.raises(OSError, match="Input/output error"):
        export_encoder(VisionTransformer(replace(WINDOWED, window_size=2)), tmp_path / "exp", overwrite=True)
    monkeypatch.undo()
    assert failed and sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["config.json", "model.safetensors"]
    after = create_encoder(tmp_path / "exp").eval()
    assert after.config == before.config
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())


def test_a_failed_swap_never_shows_the_old_config_beside_the_new_weights_nor_leaves_a_first_exports(tmp_path,
                                                                                                      monkeypatch):
    """Putting the old pair back after a failure never shows the old config.json beside the new weights, not for an
    instant nor for good where the weights' return fails; a first export that fails at config.json leaves no
    weights."""
    export_encoder(VisionTransformer(WINDOWED), tmp_path / "exp")
    folder = tmp_path / "exp"
    old_pair = ((folder / "config.json").read_bytes(), (folder / "model.safetensors").read_bytes())
    rename, mixes = os.replace, []

    def fail_at_new_config(src, dst):
        if Path(dst).name == "config.json" and ".new-" in Path(src).name:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        rename(src, dst)
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            old_config = (folder / "config.json").read_bytes() == old_pair[0]
            if old_config != ((folder / "model.safetensors").read_bytes() == old_pair[1]):
                mixes.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", fail_at_new_config)
    with pytest.raises(OSError, match="Input/output error"):
        export_encoder(VisionTransformer(replace(WINDOWED, window_size=2)), folder, overwrite=True)
    with pytest.raises(OSError, match="Input/output error"):
        export_encoder(VisionTransformer(WINDOWED), tmp_path / "first")
    monkeypatch.undo()
    assert mixes == []
    assert ((folder / "config.json").read_bytes(), (folder / "model.safetensors").read_bytes()) == old_pair
    assert list((tmp_path / "first").iterdir()) == []


def test_an_export_over_a_run_folder_removes_the_weights_its_old_config_named_and_no_other_file(tmp_path):
    """`lomar export RUN/last.pt --to RUN --overwrite` removes pretrain's encoder.safetensors, which the old
    config.json named, and no other file: left beside the new model.safetensors and read directly, it would be
    taken without its config.json (its ViTDet windows)."""
    model = LoMaR(WINDOWED, window_size=3, num_windows=2)
    atomic_save(pretrain_checkpoint(model), tmp_path / "last.pt")
    export_encoder(model.encoder, tmp_path, weights_name="encoder.safetensors", metadata={"method": "lomar"})
    assert main(["export", str(tmp_path / "last.pt"), "--to", str(tmp_path), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "last.pt", "model.safetensors"]
    # a config.json edited to name a checkpoint (or the tokenizer) never takes it along
    for name in ("last.pt", "tokenizer.safetensors"):
        (tmp_path / "tokenizer.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "weights": name}))
        export_encoder(model.encoder, tmp_path, overwrite=True)
        assert (tmp_path / "last.pt").is_file() and (tmp_path / "tokenizer.safetensors").is_file()


def test_the_next_export_removes_what_a_killed_one_left_but_not_a_live_ones(tmp_path, monkeypatch, caplog):
    """A kill between write_export's renames leaves .NAME.old-TAG / .NAME.new-TAG files (and atomic_write's temporary)
    that the next export removes. Under the folder's export lock no other export is writing, so all are stale, also
    those whose PID is a live process here (another machine's export on a share, a PID reused); where
    the filesystem has no flock the export warns and keeps those of a live PID (one may be mid-swap) and those of
    another machine (whose PID says nothing here)."""
    from lomar.checkpoints.export_leftovers import writer_tag

    ended = dead_pid()
    host, token = writer_tag().split("-")[0], "0123456789abcdef"
    dead, live = (f"{host}-{pid}-{token}" for pid in (ended, os.getppid()))
    dead_elsewhere = f"node_b.cluster-{ended}-{token}"  # what a tag names a host 'node-b.cluster' by
    export_encoder(VisionTransformer(TINY), tmp_path)
    stale = [f".config.json.old-{dead}", f".model.safetensors.old-{dead}", f".encoder.safetensors.new-{dead}",
             f"..config.json.new-{dead}.tmp-7-{token}"]
    kept = [f".last.pt.old-{dead}", "last.pt"]
    alive = [f".config.json.new-{live}", f".config.json.old-{dead_elsewhere}"]
    for name in stale + kept + alive:
        (tmp_path / name).write_bytes(b"x")
    export_encoder(VisionTransformer(TINY), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["config.json", "model.safetensors"])

    no_flock(monkeypatch)
    for name in stale + alive:
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("WARNING", "lomar.checkpoints"):
        export_encoder(VisionTransformer(TINY), tmp_path, overwrite=True)
    assert f"{tmp_path}: no file lock there (No locks available); exporting unlocked" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + alive + ["config.json", "model.safetensors"])


def test_lomar_export_into_a_folder_without_flock_warns_once(tmp_path, monkeypatch, caplog):
    """`lomar export` holds the folder's lock around the write, which takes it again: where the filesystem has no
    flock, the two tries warn once between them, not the same words twice."""
    export_encoder(VisionTransformer(TINY), tmp_path / "src")

    no_flock(monkeypatch)
    with caplog.at_level("WARNING", "lomar.checkpoints"):
        assert main(["export", str(tmp_path / "src"), "--to", str(tmp_path / "out")]) == 0
    assert [r.getMessage() for r in caplog.records if "no file lock" in r.getMessage()] == [  # once
        f"{tmp_path / 'out'}: no file lock there (No locks available); exporting unlocked: run no other export into "
        f"it meanwhile"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def _export_pausing(model: VisionTransformer, folder: Path, ready, pause_s: float) -> None:
    """Export ``model`` into ``folder``, pausing once its weights are renamed in and before its config.json is: where
    another export's pair, put in meanwhile, would end beside the wrong file."""
    rename = os.replace

    def rename_then_pause(src, dst):
        rename(src, dst)
        if Path(dst).name == "model.safetensors" and ".new-" in Path(src).name:
            ready.set()
            time.sleep(pause_s)

    os.replace = rename_then_pause
    export_encoder(model, folder, overwrite=True)


def _pausing_export(model: VisionTransformer, folder: Path, pause_s: float):
    context = multiprocessing.get_context("fork")  # the model as it is, without a new interpreter's imports
    ready = context.Event()
    child = context.Process(target=_export_pausing, args=(model, folder, ready, pause_s))
    child.start()
    assert ready.wait(20), "the child export never reached its pause"
    return child


def test_two_exports_into_one_folder_at_once_take_turns_and_leave_one_whole_export(tmp_path):
    """An export locks its folder: a second export waits for the first to end, then replaces its export whole, so
    its pair never goes in while the first is between its two renames (the first's config.json of 2 blocks beside
    the second's weights of 1 block, unreadable)."""
    first, second = VisionTransformer(TINY), _perturb(VisionTransformer(replace(TINY, depth=1)))
    child = _pausing_export(first, tmp_path, pause_s=1.0)
    export_encoder(second, tmp_path, overwrite=True)
    child.join(20)
    assert child.exitcode == 0
    assert json.loads((tmp_path / "config.json").read_text())["depth"] == 1  # the second's, not the first's 2
    loaded = create_encoder(tmp_path)  # weights and config.json of one export: no UsageError
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no lock file left


def test_an_export_waits_for_another_users_export_whose_lock_file_it_cannot_write(tmp_path, monkeypatch):
    """Another user's lock file (made 0644) cannot be opened for writing, and flock needs no write access: the
    export waits for theirs as for its own user's, rather than going on unlocked with its pair going in while theirs
    is between its renames (their config.json beside its weights); a lock file it cannot remove stays, the export
    done."""
    from lomar.checkpoints import file_lock

    first, second = VisionTransformer(TINY), _perturb(VisionTransformer(replace(TINY, depth=1)))
    child = _pausing_export(first, tmp_path, pause_s=1.0)
    opened, unlink = file_lock.open_in_place, Path.unlink

    def theirs(path, mode="r", **text):  # the file there is theirs; one this export makes is its own
        if "a" in mode and os.path.exists(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return opened(path, mode, **text)

    def kept_if_theirs(path, missing_ok=False):  # a sticky folder: another user's file stays
        if path.name == ".export.lock" and path.exists() and path.read_text() == "pid 1 on elsewhere":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return unlink(path, missing_ok)

    monkeypatch.setattr(file_lock, "open_in_place", theirs)
    export_encoder(second, tmp_path, overwrite=True)
    child.join(20)
    assert child.exitcode == 0
    assert json.loads((tmp_path / "config.json").read_text())["depth"] == 1  # ours, not their 2
    loaded = create_encoder(tmp_path)  # weights and config.json of one export: no UsageError
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second.state_dict().items())
    (tmp_path / ".export.lock").write_text("pid 1 on elsewhere")  # a killed export's, theirs, in a sticky folder
    monkeypatch.setattr(Path, "unlink", kept_if_theirs)
    export_encoder(first, tmp_path, overwrite=True)  # locked on their file, which it cannot remove: done all the same
    assert json.loads((tmp_path / "config.json").read_text())["depth"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.lock", "config.json", "model.safetensors"]


def test_an_export_waits_a_bounded_time_for_another_and_clears_a_killed_ones_leftovers(tmp_path, monkeypatch,
                                                                                       caplog):
    """An export into a folder another is writing waits LOCK_WAIT_S, then says in one line which folder and who
    writes it; once that writer is killed (mid-swap, its lock file left), the next export takes the folder and
    removes what it left, and a reader names them as an interrupted export's only then."""
    from lomar.checkpoints import export_leftovers
    from lomar.checkpoints.export_leftovers import interrupted_export

    export_encoder(VisionTransformer(TINY), tmp_path)
    child = _pausing_export(VisionTransformer(TINY), tmp_path, pause_s=60)
    try:
        assert not (tmp_path / "config.json").exists() and interrupted_export(tmp_path) == ""  # mid-swap: alive
        monkeypatch.setattr(export_leftovers, "LOCK_WAIT_S", 0.3)
        with pytest.raises(UsageError) as caught, caplog.at_level("WARNING", "lomar.checkpoints"):
            export_encoder(VisionTransformer(TINY), tmp_path, overwrite=True)  # waits, then refuses
        assert caplog.messages == [f"{tmp_path} is being written by another export (pid {child.pid} on "
                                   f"{socket.gethostname()}): waiting for it, up to 0.3 s"]  # once, as it starts
        assert str(caught.value) == (f"{tmp_path} is being written by another export (pid {child.pid} on "
                                     f"{socket.gethostname()}), waited for 0.3 s; export again once it ends, or export "
                                     f"to another folder")
    finally:
        child.kill()
        child.join(20)
    assert (tmp_path / ".export.lock").is_file()  # a killed holder's file: its lock went with it
    assert "an export into it was interrupted" in interrupted_export(tmp_path)
    model = _perturb(VisionTransformer(TINY))
    export_encoder(model, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(create_encoder(tmp_path).cls_token, model.cls_token)
