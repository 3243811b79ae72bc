"""A tiny study end to end (in-process commands): its result files, a preset's every cell, and its resume after a
stop (a signal's exit code, a torn log line, a cell an older lomar started, a folder another study holds)."""

import json
from pathlib import Path

import pytest
from tiny_study import TINY, _spec

from helpers import write_images
from lomar.cli.app import main
from lomar.cli.study import runner
from lomar.cli.study.runner import run_study
from lomar.cli.study.spec import StudyStopped, parse_spec


def _states(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("cells/*/study-state.json"))}


@pytest.mark.slow  # pretrains 5 tiny runs in-process: ~20 s on an idle 2-core machine
def test_tiny_study_writes_results_tables_and_figures(tmp_path, labelled, no_run_figures):
    out = tmp_path / "study"
    records = run_study(parse_spec(_spec(labelled)), out, log=lambda line: None)
    data = json.loads((out / "results.json").read_text())
    assert data["records"] == records
    # random init: one end record (+ nothing else); lomar and mae: at-2steps, end, equal_steps
    points = sorted((r["setting"], r["point"]) for r in records)
    assert points == sorted([("random init", "end"), ("method=lomar", "at-2steps"), ("method=lomar", "end"),
                             ("method=lomar", "equal_steps"), ("method=mae", "at-2steps"), ("method=mae", "end"),
                             ("method=mae", "equal_steps")])
    for r in records:
        assert 0.0 <= r["knn"] <= 1.0 and r["heldout_loss"] > 0
        assert r["step"] == {"at-2steps": 2, "end": 4, "equal_steps": 4}.get(r["point"], 0) or r["random_init"]
    trained = [r for r in records if not r["random_init"]]
    assert all(r["train_seconds"] > 0 and r["train_loss"] > 0 for r in trained)
    # each cell is an ordinary, finished run folder
    for name in ("method-lomar_seed0", "method-mae_seed0"):
        assert (out / "cells" / name / "last.pt").exists() and (out / "cells" / name / "metrics.jsonl").exists()
    table = (out / "results.md").read_text()
    rows = [ln for ln in table.split("## At the end")[1].split("##")[0].splitlines() if ln.startswith("| ")][2:]
    assert [r.split(" | ")[0] for r in rows] == ["| random init", "| method=lomar", "| method=mae"]
    assert "## At equal pretraining steps (4" in table and "## Along the way: 2steps" in table
    for figure in ("time_to_accuracy.png", "ablation.png"):
        assert (out / figure).stat().st_size > 1000


@pytest.mark.slow
def test_a_stopped_study_continues_without_redoing_finished_work(tmp_path, labelled, monkeypatch, no_run_figures):
    out = tmp_path / "study"
    spec = _spec(labelled, budget="2s", slice="1s", random_init=False, eval={"metrics": ["heldout_loss"]})
    real, calls = runner.pretrain, []

    def stop_on_the_third_slice(config):  # each cell has trained a slice; the first may be done
        calls.append("pretrain")
        if calls.count("pretrain") == 3:
            return 130  # what `lomar pretrain` returns on Ctrl-C
        return real(config)

    monkeypatch.setattr(runner, "pretrain", stop_on_the_third_slice)
    with pytest.raises(StudyStopped):
        run_study(parse_spec(spec), out, log=lambda line: None)
    before = _states(out)
    assert not (out / "results.json").exists()
    monkeypatch.setattr(runner, "pretrain", real)
    records = run_study(parse_spec(spec), out, log=lambda line: None)
    after = _states(out)
    assert {r["setting"] for r in records} == {"method=lomar", "method=mae"}
    for r in records:  # a time budget: each cell trained its 2 s, to within a step
        assert r["train_seconds"] >= 1.5 and r["slices"] >= 1
    # what was finished before the stop is kept as it was (same record, same timestamp)
    for name, state in before.items():
        for key, record in state["points"].items():
            assert after[name]["points"][key] == record
    # and a third run does nothing at all
    monkeypatch.setattr(runner, "pretrain", lambda config: pytest.fail(f"re-ran pretraining of {config.out}"))
    monkeypatch.setattr(runner.Scorer, "__call__", lambda self, metric: pytest.fail(f"re-ran {metric}"))
    again = run_study(parse_spec(spec), out, log=lambda line: None)
    assert [r["evaluated_at"] for r in again] == [r["evaluated_at"] for r in records]


@pytest.mark.slow  # 3 small ViTs x 2 steps and their k-NN, probe and held-out loss: ~30 s on 2 cores
def test_the_enc_dec_preset_runs_every_cell(tmp_path, capsys, no_run_figures):
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(tmp_path / "data" / split / label, 8)
    out = tmp_path / "study"
    assert main(["study", "--preset", "enc-dec", "--budget", "2steps", "--data", str(tmp_path / "data"),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    records = json.loads((out / "results.json").read_text())["records"]
    assert sorted(r["setting"] for r in records) == ["design=lomar (encoder, windows)",
                                                     "design=mae (encoder-decoder, global)",
                                                     "design=mae (encoder-decoder, windows)"]
    for r in records:
        assert r["point"] == "end" and r["step"] == 2 and r["train_loss"] > 0
        assert 0.0 <= r["knn"] <= 1.0 and 0.0 <= r["linprobe"] <= 1.0 and r["heldout_loss"] > 0
    configs = {r["setting"]: (Path(r["run"]) / "config.yaml").read_text() for r in records}
    assert "windows: 4" in configs["design=mae (encoder-decoder, windows)"]
    assert "windows: 0" in configs["design=mae (encoder-decoder, global)"]


def test_a_stop_signal_that_a_slice_took_after_its_last_step_stops_the_study(tmp_path, labelled, monkeypatch):
    """The training loop heeds a signal between steps only; one that comes during the slice's final checkpoint
    and figures (most of a short slice) leaves the slice complete, exit 0. The study went on with the next
    slice as if Ctrl-C had not been pressed."""
    import os
    import signal

    from lomar.train.preemption import StopFlag

    steps = [0]

    def slice_signalled_at_its_end(config):  # reaches its target, then Ctrl-C while it saves
        steps[0] = config.max_steps
        flag = StopFlag()  # the handler a run has until it has saved its last checkpoint
        flag.install()
        try:
            os.kill(os.getpid(), signal.SIGINT)
        finally:
            flag.restore()
        return 0

    monkeypatch.setattr(runner, "read_progress", lambda folder, batch: (steps[0], [1.0], 0.5))
    monkeypatch.setattr(runner, "pretrain", slice_signalled_at_its_end)
    spec = _spec(labelled, budget="1steps", grid={"method": ["lomar"]}, random_init=False, eval={"metrics": []})
    with pytest.raises(StudyStopped, match="stopped at step 1 .signal.; re-run the same command to continue"):
        run_study(parse_spec(spec), tmp_path / "study", log=lambda line: None)


@pytest.mark.parametrize("signum, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGUSR1", 138)])
def test_a_stopped_study_exits_with_its_signals_code(tmp_path, labelled, monkeypatch, capsys, signum, code):
    # it exited 130 whatever the signal; a scheduler reads 143 as "stopped by SIGTERM", as the README says
    import os
    import signal

    import yaml

    from lomar.train.preemption import StopFlag

    def slice_signalled(config):
        flag = StopFlag()
        flag.install()
        try:
            os.kill(os.getpid(), getattr(signal, signum))
        finally:
            flag.restore()
        return 0

    monkeypatch.setattr(runner, "read_progress", lambda folder, batch: (0, [1.0], 0.5))
    monkeypatch.setattr(runner, "pretrain", slice_signalled)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(labelled, budget="1steps", grid={"method": ["lomar"]}, random_init=False,
                                         eval={"metrics": []})))
    assert main(["study", str(spec), "--out", str(tmp_path / "study")]) == code
    assert "lomar study: stopped: pretraining of" in capsys.readouterr().err


def test_a_second_study_into_a_folder_in_use_is_refused(tmp_path, labelled, monkeypatch):
    """The study's folder is locked, not only each cell's run folder while it trains: a second study into the same
    folder is refused, rather than scoring the finished cells again over the first one's states and results."""
    from lomar.errors import UsageError
    from lomar.train.run_lock import RunLock

    monkeypatch.setattr(runner, "pretrain", lambda config: pytest.fail(f"trained {config.out}"))
    spec = _spec(labelled, budget="1steps", grid={"method": ["lomar"]}, random_init=False, eval={"metrics": []})
    out = tmp_path / "study"
    with RunLock(out), pytest.raises(UsageError, match=f"^--out {out} is in use by another run .pid [0-9]+.; "):
        run_study(parse_spec(spec), out, log=lambda line: None)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_resumed_study_reads_past_the_torn_last_line_of_a_killed_runs_log(tmp_path):
    # the study reads each cell's metrics.jsonl before the run's resume cuts the torn line off: a JSONDecodeError
    # traceback instead of the study going on
    records = [{"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-3, "img_s": 8.0} for s in (1, 2, 3)]
    lines = [json.dumps(r) for r in records] + [json.dumps({"step": 4, "epoch": 0, "loss": 0.2})[:17]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    steps, times, loss = runner.read_progress(tmp_path, batch=4)
    assert (steps, times) == (3, [0.5] * 3) and loss == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


@pytest.mark.slow  # one cell of 1 step, then a refused re-run: ~5 s
def test_a_cell_started_by_an_older_lomar_is_named_not_told_to_drop_a_flag(tmp_path, labelled):
    """A cell an older lomar started, whose steps budget left the lr schedule to the epochs, records no
    schedule_steps in its checkpoint (and no spec in its state). Re-run, the study names it as an older lomar's cell
    and says to delete it to redo it, rather than pretrain's '--schedule-steps 1 differs ...; drop
    --schedule-steps', a flag the user never gave."""
    import torch

    from lomar.errors import UsageError

    out = tmp_path / "study"
    settings = {k: v for k, v in TINY.items() if k != "epochs"}  # the budget's steps then lay the lr schedule
    spec = _spec(labelled, budget="1steps", grid={"method": ["lomar"]}, random_init=False, settings=settings,
                 eval={"metrics": ["knn"], "knn": {"k": 3}})
    run_study(parse_spec(spec), out, log=lambda line: None)
    cell = out / "cells" / "method-lomar_seed0"
    for path in cell.glob("*.pt"):  # as the older lomar wrote them
        checkpoint = torch.load(path, weights_only=False)
        del checkpoint["config"]["schedule_steps"]
        torch.save(checkpoint, path)
    state = json.loads((cell / "study-state.json").read_text())
    del state["spec"]
    (cell / "study-state.json").write_text(json.dumps(state))
    with pytest.raises(UsageError, match=f"^cell method-lomar_seed0 in {out} holds a run trained with schedule_steps: "
                                         f"the default .unset. .{cell}/last.pt., which the spec as this lomar runs it "
                                         f"gives 1: the cell was started by an older lomar.*delete {cell} to redo"):
        run_study(parse_spec(spec), out, log=lambda line: None)
