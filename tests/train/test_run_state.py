"""Checks on a run's --out folder and its preparation (lomar.train.run_state): no rewind or graft onto a held
run, one folder under two spellings, what a rewind removes, folders that hold no run or cannot hold one."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import _state
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.errors import UsageError
from lomar.train.run_resume import check_no_rewind, find_resume_point
from lomar.train.run_state import check_out_folder, foreign, prepare_run_folder, refuse_held_run
from lomar.train.settings import ConfigError


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


def test_a_copy_of_an_older_checkpoint_elsewhere_is_not_offered_as_a_rewind(tmp_path):
    """A finetune / detect / segment run keeps no numbered checkpoint, so a rewind resumes a copy of last.pt. One
    outside the run's folder is another folder's checkpoint: --overwrite replaces the run, its log with it, so the
    refusal does not call that a rewind, and says where a copy rewinds from."""
    run = _run_folder(tmp_path / "run", 4, seed=0)
    atomic_save(_state(2), tmp_path / "step2.pt")
    with pytest.raises(UsageError) as caught:
        check_no_rewind(tmp_path / "step2.pt", run, overwrite=False)
    assert str(caught.value) == (f"--resume {tmp_path / 'step2.pt'} is another folder's checkpoint, and --out "
                                 f"{run} already holds a run; pass --out NEW_FOLDER to branch off, or --overwrite to "
                                 f"replace that run; a copy of this run's checkpoint rewinds it, its log kept up to "
                                 f"step 2, from inside {run}: put it there and resume it with --overwrite")
    shutil.copy(tmp_path / "step2.pt", run / "step2.pt")
    with pytest.raises(UsageError, match=r"step2\.pt \(step 2\) would rewind .*--overwrite to rewind"):
        check_no_rewind(run / "step2.pt", run, overwrite=False)
    check_no_rewind(run / "step2.pt", run, overwrite=True)


@dataclasses.dataclass
class _Config:
    out: str
    resume: str | None = None
    overwrite: bool = False


class _Task:
    name, eval_log, outputs, final_outputs = "toy", "knn.jsonl", ("knn.jsonl", "figure.png"), ()
    evaluation_outputs: tuple[str, ...] = ()
    best_metric: str | None = None


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
    """The export written at the run's end (step 5) goes with a rewind to step 3: left there, a user would take the
    dropped steps' weights for the run's own until its new end wrote them again."""
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


def test_a_resume_removes_the_evaluation_files_of_the_steps_its_log_drops(tmp_path):
    """segment's predictions/ and per_class.md of an evaluation at step 5 go with a resume at step 3, which drops it;
    a resume at step 5 keeps them."""
    class Segmenting(_Task):
        evaluation_outputs = ("predictions", "per_class.md")

    out = _run_folder(tmp_path / "run", 5, seed=0)  # knn.jsonl: records without an lr, an evaluation's
    (out / "predictions").mkdir()
    (out / "predictions" / "val_0.png").write_text("step 5")
    (out / "per_class.md").write_text("step 5")
    prepare_run_folder(_Config(str(out), "auto"), Segmenting(), out / "last.pt", 5, 0)  # nothing dropped: kept
    assert (out / "per_class.md").exists() and (out / "predictions" / "val_0.png").exists()
    prepare_run_folder(_Config(str(out), str(out / "checkpoint-000003.pt"), True), Segmenting(), out / "x.pt", 3, 0)
    assert not (out / "per_class.md").exists() and not (out / "predictions").exists()


def test_a_rewind_makes_the_state_it_resumed_from_the_newest(tmp_path):
    """A rewound run that dies before its first checkpoint (killed, out of memory) leaves last.pt at step 3, the
    state it resumed from, not the dropped step 5, whose checkpoint and metrics are gone: --resume auto takes step 3."""
    out = _run_folder(tmp_path / "run", 5, seed=0)
    atomic_save(_state(3), out / "checkpoint-000003.pt")
    prepare_run_folder(_Config(str(out), str(out / "checkpoint-000003.pt"), True), _Task(),
                       out / "checkpoint-000003.pt", 3, 0)
    assert safe_load(find_resume_point(out).path)["step"] == 3 and safe_load(out / "last.pt")["step"] == 3
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint-000003.pt", "last.pt"]
    assert not list(out.glob(".*.tmp*"))


def test_a_new_run_does_not_delete_files_of_a_folder_that_holds_no_run(tmp_path):
    """--out DIR holding no run of lomar's (no config.yaml, no checkpoint) but a tb/ or metrics.jsonl of something
    else: a new run, not told --overwrite, is refused rather than delete them (tb/ with rmtree) as an earlier run's
    leftovers; told it, it deletes them."""
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


def test_a_sharded_rewind_points_last_json_at_the_checkpoint_it_resumes_from(tmp_path):
    """An --fsdp run ended at step 4 (last.json naming checkpoint-000004.dcp, last.pt consolidated at 4), rewound to
    checkpoint-000002.dcp: last.json names that folder, not the removed one (a rewind to the run's end consolidates
    what it names), and the dropped step's last.pt goes (every reader of the folder takes a last.pt first)."""
    out = tmp_path / "run"
    for step in (2, 4):
        (out / f"checkpoint-{step:06d}.dcp").mkdir(parents=True)
    (out / "last.json").write_text(json.dumps({"checkpoint": "checkpoint-000004.dcp", "step": 4}) + "\n")
    atomic_save({"model": {}, "step": 4, "epoch": 2}, out / "last.pt")  # consolidated: no optimizer
    resume = out / "checkpoint-000002.dcp"
    prepare_run_folder(_Config(str(out), str(resume), True), _Task(), resume, 2, 0)
    assert json.loads((out / "last.json").read_text()) == {"checkpoint": "checkpoint-000002.dcp", "step": 2}
    assert sorted(p.name for p in out.iterdir() if p.name != "config.yaml") == ["checkpoint-000002.dcp", "last.json"]
