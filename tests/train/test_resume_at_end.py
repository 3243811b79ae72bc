"""A resume that finds the run at its end: it says so without building the run, leaves the folder as it is, and
writes what the end lacks (exports, curves, a missing final evaluation) and nothing more."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from toy_run import ToyConfig, ToyTask, _losses

from lomar.checkpoints.io import safe_load
from lomar.train.lifecycle import run


def test_a_finished_run_resumed_says_where_it_ends_and_why(tmp_path, capsys):
    assert run(ToyConfig(out=str(tmp_path / "run")), ToyTask) == 0  # 3 epochs of 4 steps
    capsys.readouterr()
    assert run(ToyConfig(out=str(tmp_path / "run"), resume="auto", max_steps=20), ToyTask) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "lomar toy: nothing to do, the run is at step 12; it ends at 12 (--max-steps 20 or --epochs 3 of 4 steps, "
        "whichever ends first)")
    assert run(ToyConfig(out=str(tmp_path / "run"), resume="auto"), ToyTask) == 0  # no --max-steps: no 'whichever'
    assert capsys.readouterr().out.splitlines()[-1] == (
        "lomar toy: nothing to do, the run is at step 12; it ends at 12 (--epochs 3 of 4 steps)")


def test_a_finished_run_resumed_leaves_its_folder_as_it_is(tmp_path):
    # "nothing to do" rewrites neither config.yaml (which would record the resume's run-control flags) nor metrics.jsonl
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out)), ToyTask) == 0

    def files():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()
                if p.is_file() and p.name != ".lock"}

    before = files()
    assert {"config.yaml", "metrics.jsonl", "last.pt"} <= before.keys()
    assert run(ToyConfig(out=str(out), resume="auto", max_steps=20, log_every=7), ToyTask) == 0
    assert files() == before


def test_a_finished_run_resumed_answers_without_building_the_run(tmp_path, capsys):
    # it built the model and read the whole checkpoint to say "nothing to do": ~4 s for a ViT-B on 2 CPU cores
    class Counted(ToyTask):
        final_outputs, builds = ("finished",), []

        def __init__(self, config, info, device):
            super().__init__(config, info, device)
            self.builds.append(config.resume)

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Counted) == 0  # mid-epoch 0: steps an epoch from the checkpoint
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Counted) == 0
    assert Counted.builds == [None] and capsys.readouterr().out.splitlines()[-1] == (
        "lomar toy: nothing to do, the run is at step 3; it ends at 3 (--max-steps 3 or --epochs 3 of 4 steps, "
        "whichever ends first)")
    ckpt = safe_load(out / "last.pt")
    del ckpt["steps_per_epoch"]  # a checkpoint saved before it was kept: mid-epoch 0, only the built run can tell
    torch.save(ckpt, out / "last.pt")
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Counted) == 0
    assert Counted.builds == [None, "auto"]
    assert run(ToyConfig(out=str(out), max_steps=4, resume="auto"), Counted) == 0  # epoch 1 from step 4
    del Counted.builds[:]
    ckpt = safe_load(out / "last.pt")
    del ckpt["steps_per_epoch"]  # at an epoch's end the steps done tell it
    torch.save(ckpt, out / "last.pt")
    assert run(ToyConfig(out=str(out), max_steps=4, resume="auto"), Counted) == 0
    (out / "finished").unlink()  # the end-of-run export needs the model
    assert run(ToyConfig(out=str(out), max_steps=4, resume="auto"), Counted) == 0
    assert Counted.builds == ["auto"] and (out / "finished").read_text() == "yes"


def test_a_finished_run_resumed_draws_its_missing_curves_again(tmp_path, capsys):
    # a deleted curve is drawn again from the log alone, as a missing export is written again
    class Curved(ToyTask):
        curves = ("curve.txt",)

        @staticmethod
        def draw_curves(config, out):
            (out / "curve.txt").write_text(str(len(_losses(out))))

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Curved) == 0
    capsys.readouterr()
    assert not (out / "curve.txt").exists()  # as if deleted: a toy draws no figures as it trains
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Curved) == 0
    assert (out / "curve.txt").read_text() == "3" and "; writing its missing curve.txt" in capsys.readouterr().out


def test_a_finished_run_resumed_removes_stale_temporaries(tmp_path, capsys):
    # a run killed while writing its end-of-run files leaves a temporary (an export's: the encoder's size); the
    # resume that writes them again left it there for good
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out)), ToyTask) == 0
    stale = out / ".encoder.safetensors.tmp-999"
    stale.write_bytes(b"x" * 100)
    assert run(ToyConfig(out=str(out), resume="auto"), ToyTask) == 0
    printed, noted = capsys.readouterr()
    assert not stale.exists() and "lomar toy: note: removed 1 stale temporary file(s)" in noted  # a note: stderr
    assert "stale" not in printed


def test_a_resume_that_finds_the_run_at_its_end_writes_the_end_of_run_files_it_lacks(tmp_path, capsys):
    """A run whose end-of-run export failed after its last checkpoint (a full disk: '... free space, then rerun'):
    --resume auto, with nothing left to train, writes the export it lacks, and leaves one it has."""
    class Exporting(ToyTask):
        final_outputs = ("finished",)

    out = tmp_path / "run"
    run(ToyConfig(out=str(out), max_steps=3), Exporting)
    (out / "finished").unlink()
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Exporting) == 0
    assert (out / "finished").read_text() == "yes"
    assert "nothing to do, the run is at step 3" in capsys.readouterr().out
    (out / "finished").write_text("kept")
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Exporting) == 0
    assert (out / "finished").read_text() == "kept"  # present: not written again


def test_a_resume_at_the_end_rewrites_an_export_of_an_earlier_end(tmp_path, capsys):
    # a run extended past its end and stopped between its new last checkpoint and its new export holds the earlier
    # export: the next resume, with nothing left to train, writes the export of the last checkpoint over it
    class Exported(ToyTask):
        final_outputs = ("config.json",)
        stop_in_finish = False

        def finish(self, out):
            if self.stop_in_finish:
                raise KeyboardInterrupt  # a stop after the last checkpoint
            step = safe_load(out / "last.pt")["step"]
            (out / "config.json").write_text(json.dumps({"step": step}))

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Exported) == 0
    Exported.stop_in_finish = True
    with pytest.raises(KeyboardInterrupt):
        run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Exported)
    Exported.stop_in_finish = False
    assert json.loads((out / "config.json").read_text()) == {"step": 3} and safe_load(out / "last.pt")["step"] == 5
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Exported) == 0
    assert json.loads((out / "config.json").read_text()) == {"step": 5}
    assert "nothing to do, the run is at step 5" in capsys.readouterr().out


def test_a_resume_at_the_end_runs_a_missing_final_evaluation_once(tmp_path, capsys):
    # a run extended past its end and stopped after its new last checkpoint, before its final evaluation: a later
    # resume runs that evaluation, once, rather than say "nothing to do" with the step-3 score the last
    class Scored(ToyTask):
        stop_in_evaluate, builds, evaluations = False, 0, 0

        def __init__(self, config, info, device):
            super().__init__(config, info, device)
            Scored.builds += 1

        def evaluate(self):
            if Scored.stop_in_evaluate and self.progress.final:
                raise KeyboardInterrupt  # a stop after the last checkpoint
            Scored.evaluations += 1
            return super().evaluate()

    def scored_steps():
        return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "score" in r]

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Scored) == 0 and scored_steps() == [3]  # 4 steps an epoch
    Scored.stop_in_evaluate = True
    with pytest.raises(KeyboardInterrupt):
        run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Scored)
    Scored.stop_in_evaluate = False
    assert safe_load(out / "last.pt")["step"] == 5 and scored_steps() == [3, 4]
    Scored.builds = Scored.evaluations = 0
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Scored) == 0
    assert scored_steps() == [3, 4, 5] and (Scored.builds, Scored.evaluations) == (1, 1)
    assert "nothing to do, the run is at step 5" in capsys.readouterr().out
    assert run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Scored) == 0  # done: never scored twice
    assert scored_steps() == [3, 4, 5] and (Scored.builds, Scored.evaluations) == (1, 1)


def test_a_resume_that_runs_the_missing_final_evaluation_writes_the_end_files_from_it(tmp_path):
    # detect's finish writes predictions.json from the last evaluation: after the resumed one, its own, not the
    # earlier end's (step 3) beside the step-5 score, though final_outputs names none of them
    class Predicting(ToyTask):
        stop_in_evaluate, scored = False, -1

        def evaluate(self):
            if Predicting.stop_in_evaluate and self.progress.final:
                raise KeyboardInterrupt  # a stop after the last checkpoint
            self.scored = self.progress.step
            return super().evaluate()

        def finish(self, out):
            (out / "predictions").write_text(str(self.scored))

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Predicting) == 0
    assert (out / "predictions").read_text() == "3"
    Predicting.stop_in_evaluate = True
    with pytest.raises(KeyboardInterrupt):
        run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Predicting)
    Predicting.stop_in_evaluate = False
    assert run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Predicting) == 0
    assert (out / "predictions").read_text() == "5"  # step 5's, not "3"


class _Predicting(ToyTask):
    """Each evaluation writes the step it scored to OUT/predictions, as detect's writes its predictions.json."""

    evaluation_outputs = ("predictions",)

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        self.out = Path(config.out)

    def evaluate(self):
        (self.out / "predictions").write_text(str(self.progress.step))
        return super().evaluate()


def test_a_rewind_leaves_no_later_evaluations_files_beside_its_checkpoint(tmp_path, capsys):
    # predictions.json (detect) and predictions/ (segment) hold the latest evaluation's detections, which neither the
    # log nor the checkpoint keeps: a rewind kept the dropped step 8's until the next evaluation, for good at the end
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=4), _Predicting) == 0  # 4 steps an epoch: evaluated at 4
    shutil.copy(out / "last.pt", out / "checkpoint-000004.pt")
    assert run(ToyConfig(out=str(out), max_steps=8, resume="auto"), _Predicting) == 0
    assert (out / "predictions").read_text() == "8"
    rewind = ToyConfig(out=str(out), max_steps=4, resume=str(out / "checkpoint-000004.pt"), overwrite=True)
    capsys.readouterr()
    assert run(rewind, _Predicting) == 0
    assert (out / "predictions").read_text() == "4"
    assert "nothing to do, the run is at step 4" in (said := capsys.readouterr().out) and "missing predictions" in said
    scored = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "score" in r]
    assert scored == [4]  # evaluated again for its file, not logged twice
