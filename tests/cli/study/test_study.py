"""A tiny study end to end (in-process commands), its result files, and its resume."""

import json
from pathlib import Path

import pytest

from helpers import write_images
from lomar.cli.app import main
from lomar.cli.study import runner
from lomar.cli.study.runner import run_study
from lomar.cli.study.spec import StudyStopped, parse_spec

# helpers.TINY as study settings: 2 blocks, 32 wide, 32 px, 3x3 windows, 2 per image.
TINY = dict(model="vit_tiny_patch8", embed_dim=32, depth=2, num_heads=2, img_size=32, window_size=3, windows=2,
            batch_size=4, epochs=100_000, workers=0, threads=1, log_every=1, device="cpu", lr=1e-3,
            warmup_epochs=0.5, precision="fp32", save_every=100, figure_images=1)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(root / split / label, 6)
    return root


def _spec(root: Path, **changes) -> dict:
    raw = dict(name="tiny", budget="4steps", seeds=1, slice="1s", settings=TINY,
               grid={"method": ["lomar", "mae"]}, random_init=True,
               data={"pretrain": str(root / "train"), "train": str(root / "train"), "val": str(root / "val")},
               eval={"every": "2steps", "metrics": ["knn", "heldout_loss"], "knn": {"k": 3}, "equal_steps": True})
    raw.update(changes)
    return raw


def _lomar_cell(tmp_path: Path, labelled: Path, **changes) -> runner.CellRun:
    """The run of a one-cell study (lomar, no random init, no evaluation), its folder made, to advance by hand."""
    spec = parse_spec(_spec(labelled, grid={"method": ["lomar"]}, random_init=False, eval={"metrics": []}, **changes))
    cell = spec.cells()[0]
    run = runner.CellRun(runner.Study(spec, tmp_path), cell, tmp_path / "cells" / cell.name, spec.budget)
    run.folder.mkdir(parents=True)
    return run


def _states(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("cells/*/study-state.json"))}


@pytest.mark.slow  # pretrains 5 tiny runs in-process: ~20 s on an idle 2-core machine
def test_tiny_study_writes_results_tables_and_figures(tmp_path, labelled, no_cell_figures):
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
def test_a_stopped_study_continues_without_redoing_finished_work(tmp_path, labelled, monkeypatch, no_cell_figures):
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


def test_a_bad_cell_is_refused_before_any_training(tmp_path, labelled):
    spec = parse_spec(_spec(labelled, grid={"window_size": [3, 9]}))
    from lomar.errors import UsageError

    with pytest.raises(UsageError, match="cell 'window_size=9' is not a valid `lomar pretrain` setting"):
        run_study(spec, tmp_path / "study", log=lambda line: None)
    assert not (tmp_path / "study" / "cells").exists()


@pytest.mark.parametrize("metrics, split, folders, message", [
    (["heldout_loss"], "val", ["a"], r"^data.val: no images found in the class folders of .*val; supported"),
    (["knn"], "train", ["a", "b"], r"^data.train: no images found in the class folders of .*train; supported"),
    (["knn"], "train", [], r"^data.train: .*train holds no class folders"),
    (["knn"], "val", [], r"^data.val: .*val holds no class folders"),
])
def test_evaluation_data_without_images_is_refused_before_any_training(tmp_path, labelled, metrics, split, folders,
                                                                      message):
    """Caught when the first cell has trained (a slice of the budget, minutes at paper scale) is caught late."""
    import shutil

    from lomar.errors import UsageError

    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    shutil.rmtree(data / split)
    (data / split).mkdir()
    for folder in folders:
        (data / split / folder).mkdir()
    spec = parse_spec(_spec(data, eval={"metrics": metrics}, data={
        "pretrain": str(labelled / "train"), "train": str(data / "train"), "val": str(data / "val")}))
    with pytest.raises(UsageError, match=message):
        run_study(spec, tmp_path / "study", log=lambda line: None)
    assert not (tmp_path / "study" / "cells").exists()


def test_a_labelled_evaluation_of_one_class_is_refused_before_any_training(tmp_path, labelled):
    from lomar.errors import UsageError

    for split in ("train", "val"):
        write_images(tmp_path / split / "only", 2)
    spec = parse_spec(_spec(tmp_path, eval={"metrics": ["knn"]}, data={
        "pretrain": str(labelled / "train"), "train": str(tmp_path / "train"), "val": str(tmp_path / "val")}))
    with pytest.raises(UsageError, match=r"^data.train: .*train holds one class folder \(only\)"):
        run_study(spec, tmp_path / "study", log=lambda line: None)


def test_a_finetune_stopped_by_a_signal_is_not_a_result(tmp_path):
    """`lomar finetune` exits 0 when a signal stops it (checkpoint written, resumable); its last
    record is then an earlier epoch's, which must not be stored as the evaluation's value."""
    from lomar.cli.study.evals import _check_finished

    done = {"epoch": 9, "step": 210, "top1": 0.5}
    _check_finished(done, {"epochs": 10}, tmp_path)
    with pytest.raises(StudyStopped, match="epoch 6"):
        _check_finished({"epoch": 6, "step": 147, "top1": 0.48}, {"epochs": 10}, tmp_path)
    with pytest.raises(StudyStopped):  # --max-steps inside the last epoch is not "finished" without it
        _check_finished({**done, "partial": True}, {"epochs": 10}, tmp_path)
    _check_finished({"epoch": 0, "step": 5, "partial": True, "top1": 0.1}, {"max_steps": 5}, tmp_path)
    with pytest.raises(StudyStopped):
        _check_finished({"epoch": 0, "step": 3, "partial": True, "top1": 0.1}, {"max_steps": 5}, tmp_path)


def test_the_heldout_loss_reads_class_folders_as_the_probes_do(tmp_path, pretrained):
    """`lomar compose-digits --classify-images` leaves some class folders empty; the loss needs the
    images only, so empty class folders and unreadable images are skipped, and no image at all is one line."""
    from lomar.cli.study.evals import heldout_loss
    from lomar.errors import LomarError

    write_images(tmp_path / "clean" / "a", 3, size=(36, 36))
    write_images(tmp_path / "mixed" / "a", 3, size=(36, 36))
    (tmp_path / "mixed" / "b").mkdir()
    (tmp_path / "mixed" / "c").mkdir()
    (tmp_path / "mixed" / "c" / "bad.png").write_bytes(b"not a png")
    loss = heldout_loss(pretrained, str(tmp_path / "mixed"), 32)
    assert loss > 0 and loss == heldout_loss(pretrained, str(tmp_path / "clean"), 32)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(LomarError, match=r"^heldout_loss: no images found in the class folders of .*empty; "):
        heldout_loss(pretrained, str(tmp_path / "empty"), 32)
    (tmp_path / "unreadable" / "c").mkdir(parents=True)
    (tmp_path / "unreadable" / "c" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(LomarError, match=r"^heldout_loss: no image of .*unreadable could be read; set data.val"):
        heldout_loss(pretrained, str(tmp_path / "unreadable"), 32)


@pytest.mark.parametrize("options, pool", [({}, "mean"), ({"protocol": "mae"}, "cls"),
                                           ({"protocol": "mae", "pool": "mean"}, "mean")])
def test_the_study_linear_probe_reads_its_options_as_lomar_linprobe(tmp_path, labelled, options, pool, monkeypatch):
    """Same pooling default and same protocol as the command: the study's probe is `lomar linprobe`."""
    from lomar.cli.probe import Frozen
    from lomar.cli.study import evals
    from lomar.cli.study.spec import Cell
    from lomar.eval import linear_probe

    spec = parse_spec(_spec(labelled, eval={"metrics": ["linprobe"], "linprobe": {"epochs": 20, **options}}))
    cell = Cell({}, dict(spec.settings), 0)
    args = evals._args("linprobe", spec, cell, tmp_path / "last.pt", tmp_path / "ft")
    assert args.pool == pool and args.protocol == options.get("protocol", "adamw")
    seen = []
    frozen = Frozen(("features",), {"train": 0, "val": 0}, ["a", "b"])
    monkeypatch.setattr(evals, "frozen_features", lambda args: seen.append(args.pool) or frozen)
    monkeypatch.setattr(linear_probe, "train_mae_linear_probe" if options else "train_linear_probe",
                        lambda *features, **k: (None, 0.5))
    assert evals.Scorer(spec, cell, tmp_path / "last.pt", tmp_path / "ft")("linprobe") == 0.5
    assert seen == [pool]


def test_a_study_linear_probe_warm_up_beyond_its_epochs_is_refused_up_front(labelled):
    from lomar.cli.study.evals import check_options
    from lomar.errors import UsageError

    spec = parse_spec(_spec(labelled, eval={"metrics": ["linprobe"],
                                            "linprobe": {"protocol": "mae", "epochs": 5, "warmup_epochs": 10}}))
    with pytest.raises(UsageError, match=r"eval.linprobe: --warmup-epochs must be in \[0, --epochs 5\], got 10"):
        check_options(spec)


@pytest.mark.parametrize("metric", ["knn", "linprobe"])
def test_a_study_evaluation_decoding_as_pretrain_alone_does_is_refused_up_front(labelled, metric):
    """--decode windows (pretrain's) is refused before any cell trains, not at the first score after a cell's whole
    budget."""
    from lomar.cli.study.evals import check_options
    from lomar.errors import UsageError

    spec = parse_spec(_spec(labelled, eval={"metrics": [metric], metric: {"decode": "windows"}}))
    with pytest.raises(UsageError, match=rf"^eval.{metric}: argument --decode: invalid choice: 'windows' \(choose "
                                         r"from 'full', 'draft'\); fix the spec's"):
        check_options(spec)


@pytest.mark.slow  # 3 small ViTs x 2 steps and their k-NN, probe and held-out loss: ~30 s on 2 cores
def test_the_enc_dec_preset_runs_every_cell(tmp_path, capsys, no_cell_figures):
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


@pytest.mark.slow  # one cell of 1 step, then refused re-runs: ~5 s
def test_a_re_run_with_an_edited_spec_is_refused_before_it_replaces_anything(tmp_path, labelled, monkeypatch):
    """A finished cell is not skipped whatever the spec now says: another budget, setting or evaluation would show the
    old numbers as the new spec's (eval.every would score 'at-2steps' at step 4). The cell's spec is kept, and a
    re-run under another is refused before it replaces anything."""
    from lomar.errors import UsageError

    out = tmp_path / "study"
    spec = _spec(labelled, budget="1steps", grid={"method": ["lomar"]}, random_init=False,
                 eval={"metrics": ["knn"], "knn": {"k": 3}})
    run_study(parse_spec(spec), out, log=lambda line: None)
    before = (out / "spec.json").read_text()
    for change, message in [
        ({"budget": "2steps"}, 'budget "1 step", the spec now gives "2 steps"'),
        ({"settings": {**TINY, "mask_ratio": 0.5}}, "settings.mask_ratio unset, the spec now gives 0.5"),
        ({"eval": {"metrics": ["knn", "linprobe"], "knn": {"k": 3}}}, 'eval.metrics \\["knn"\\], the spec now'),
        ({"eval": {"metrics": ["knn"], "knn": {"k": 5}}}, "eval.knn.k 3, the spec now gives 5"),
        ({"eval": {"metrics": ["knn"], "knn": {"k": 3}, "every": "1steps"}}, "eval.every unset"),
    ]:
        with pytest.raises(UsageError, match=f"^cell method-lomar_seed0 in {out} was run with {message}.*; restore "
                                             f"the spec .or flags., pass another --out, or delete "
                                             f"{out}/cells/method-lomar_seed0"):
            run_study(parse_spec({**spec, **change}), out, log=lambda line: None)
        assert (out / "spec.json").read_text() == before
    # what a cell's numbers do not depend on may change: the slice, more seeds, the data's spelling
    monkeypatch.chdir(labelled)
    data = {"pretrain": "train", "train": "./train", "val": "val"}
    records = run_study(parse_spec({**spec, "slice": "3s", "seeds": [0, 1], "data": data}), out, log=lambda line: None)
    assert sorted(r["seed"] for r in records) == [0, 1]


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


def test_a_finetune_that_fails_is_one_line_not_a_traceback(tmp_path, labelled, pretrained, monkeypatch):
    """`lomar finetune` reports a non-finite loss in one line (exit 1); the study's finetune let it through as a
    RuntimeError, a traceback."""
    from lomar.cli.study import evals
    from lomar.cli.study.spec import Cell, StudyFailed
    from lomar.train.task import TrainingError

    def nan(config):
        raise TrainingError("loss is nan at step 3")

    spec = parse_spec(_spec(labelled, eval={"metrics": ["finetune"], "finetune": {"epochs": 1}}))
    args = evals._args("finetune", spec, Cell({}, dict(spec.settings), 0), pretrained, tmp_path / "ft")
    monkeypatch.setattr(evals, "finetune", nan)
    with pytest.raises(StudyFailed, match="^finetuning in .*ft failed: loss is nan at step 3$"):
        evals._finetune(args, {})


def test_the_heldout_loss_of_a_beit_cell_is_none_not_a_crash(tmp_path, labelled):
    """fig3 scores BEiT beside LoMaR and MAE with heldout_loss: BEiT has no pixel loss, so its cell's is '–', and its
    model is not called with a generator it does not take (a TypeError after the cell's whole budget)."""
    from helpers import pretrain
    from lomar.cli.study.evals import heldout_loss

    assert pretrain("--data", str(labelled / "train"), "--out", str(tmp_path / "run"), "--method", "beit",
                    "--max-steps", "1") == 0
    assert heldout_loss(tmp_path / "run" / "last.pt", str(labelled / "val"), 32) is None


def test_a_step_budget_past_the_cells_epochs_is_refused_before_any_training(tmp_path, labelled):
    """Each cell stopped at its epochs' end, short of the budget, its lr schedule (laid over the budget) unfinished."""
    from lomar.errors import UsageError

    settings = {k: v for k, v in TINY.items() if k != "epochs"}  # the recipe's 400 epochs of 3 steps: 1200 < 4000
    spec = parse_spec(_spec(labelled, budget="4000steps", settings=settings, random_init=False,
                            eval={"metrics": ["heldout_loss"]}))
    with pytest.raises(UsageError, match=r"^cell method-lomar_seed0: its 400 epochs of 3 steps end at step 1200, "
                                         r"before its 4000-step lr schedule; add epochs: 1334 and schedule_steps: "
                                         r"4000 to the spec's settings, or lower the budget$"):
        run_study(spec, tmp_path / "study", log=lambda line: None)
    assert not list((tmp_path / "study").glob("cells/*/last.pt"))


def test_a_resumed_study_reads_past_the_torn_last_line_of_a_killed_runs_log(tmp_path):
    # the study reads each cell's metrics.jsonl before the run's resume cuts the torn line off: a JSONDecodeError
    # traceback instead of the study going on
    records = [{"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-3, "img_s": 8.0} for s in (1, 2, 3)]
    lines = [json.dumps(r) for r in records] + [json.dumps({"step": 4, "epoch": 0, "loss": 0.2})[:17]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    steps, times, loss = runner.read_progress(tmp_path, batch=4)
    assert (steps, times) == (3, [0.5] * 3) and loss == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_a_seconds_budgets_next_slice_is_planned_at_the_latest_slices_pace(tmp_path, labelled, monkeypatch):
    """A machine twice as busy since the second of three 10 s slices (80 steps of 1/8 s, then 40 of 1/4 s): the
    mean pace over the run planned the last slice to step 180, 15 s at the pace it trains at, 5 s (17 %) past the
    30 s budget."""
    run = _lomar_cell(tmp_path, labelled, budget="30s", slice="10s")
    records = [{"step": i + 1, "loss": 1.0, "img_s": run.batch / t} for i, t in enumerate([0.125] * 80 + [0.25] * 40)]
    (run.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    planned = []

    def slice_at_its_pace(config):
        planned.append(config.max_steps)
        more = [{"step": s, "loss": 1.0, "img_s": run.batch / 0.25} for s in range(121, config.max_steps + 1)]
        with open(run.folder / "metrics.jsonl", "a") as file:
            file.writelines(json.dumps(r) + "\n" for r in more)
        return 0

    monkeypatch.setattr(runner, "pretrain", slice_at_its_pace)
    run.advance()
    assert planned == [160]  # not 180
    assert sum(runner.read_progress(run.folder, run.batch)[1]) == 30.0


def test_a_slice_that_the_machine_slows_is_stopped_by_its_time_limit_and_the_cell_goes_on(tmp_path, labelled,
                                                                                     monkeypatch):
    """Planned at 8 steps a second, the 10 s slice trains at 2 (the machine 4 times busier since it started): its
    --time-limit stops it near its plan instead of after 40 s of training at the target step, and the study takes
    that stop for the end of a slice, not a signal. The limit: 10 s, the least 3 s of start-up and save a slice took,
    and what the run keeps inside it, one more step (1/8 s) and the save as estimated from the 3 kB checkpoint (3 s at
    1 kB/s, and 2 s); without those two, the run would stop 5 s short of its plan on an unslowed machine."""
    from lomar.train import preemption

    monkeypatch.setattr(preemption, "SAVE_BYTES_PER_S", 1000)
    run = _lomar_cell(tmp_path, labelled, budget="30s", slice="10s")
    records = [{"step": i + 1, "loss": 1.0, "img_s": run.batch / 0.125} for i in range(80)]
    (run.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run.state.update(slices=1, wall_seconds=13.0, overhead_s=3.0)
    (run.folder / "last.pt").write_bytes(bytes(3000))
    planned = []

    def slice_slowed(config):  # 0.5 s a step: the limit less start-up and the step and save kept leave 20 steps
        planned.append((config.max_steps, config.time_limit))
        with open(run.folder / "metrics.jsonl", "a") as file:
            file.writelines(json.dumps({"step": s, "loss": 1.0, "img_s": run.batch / 0.5}) + "\n"
                            for s in range(81, 101))
        return 75

    monkeypatch.setattr(runner, "pretrain", slice_slowed)
    run.advance()
    assert planned == [(160, 19)] and run.state["slices"] == 2 and not run.done  # not 13


def test_the_first_slice_of_a_seconds_budget_has_a_time_limit_counted_from_its_call(tmp_path, labelled, monkeypatch):
    """No slice measured yet: the first gets its 10 s as its --time-limit (it had none, and a machine that runs its
    first steps slowly trained them unbounded), counted from the slice's call, not from the study's start."""
    from lomar.train import preemption

    run = _lomar_cell(tmp_path, labelled, budget="30s", slice="10s")
    planned = []

    def first_slice(config):
        planned.append((config.max_steps, config.time_limit, preemption.take_command_start()))
        with open(run.folder / "metrics.jsonl", "a") as file:
            file.writelines(json.dumps({"step": s, "loss": 1.0, "img_s": run.batch / 0.5}) + "\n" for s in (1, 2))
        return 0

    monkeypatch.setattr(runner, "pretrain", first_slice)
    preemption.mark_command_start(preemption.monotonic() - 60.0)  # `lomar study` began a minute ago
    try:
        run.advance()
    finally:
        preemption.take_command_start()
    assert planned == [(2, 10, None)] and run.state["slices"] == 1  # not (2, None, ...)


@pytest.mark.slow  # one cell of 1 step, then a refused re-run: ~5 s
def test_a_cell_started_by_an_older_lomar_is_named_not_told_to_drop_a_flag(tmp_path, labelled):
    """Before 3 Dec 2026 a steps budget left the lr schedule to the epochs: such a cell's checkpoint records no
    schedule_steps (and its state no spec). Re-run, the study stopped with pretrain's '--schedule-steps 1 differs
    ...; drop --schedule-steps', a flag the user never gave (measured with the study of 35c877b)."""
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


def test_a_cells_notes_are_said_once_not_at_each_slice_and_evaluation(tmp_path, labelled, pretrained, monkeypatch,
                                                                       capsys):
    """'lomar pretrain: note: --window-size 3 is unused' of an MAE cell is said once a study, not at the check, each
    cell's start and each of its slices (57 times in a study of 8 MAE cells); the finetune's warm-up note once too,
    not at each evaluation."""
    from lomar.cli.study import evals
    from lomar.cli.study.spec import Cell, StudyFailed
    from lomar.train import finetune_config
    from lomar.train.task import TrainingError

    steps: dict[str, int] = {}

    def slice_to_its_target(config):
        steps[str(config.out)] = config.max_steps
        return 0

    monkeypatch.setattr(runner, "read_progress", lambda folder, batch: (steps.get(str(folder), 0), [1.0], 0.5))
    monkeypatch.setattr(runner, "pretrain", slice_to_its_target)
    grid = {"method": ["lomar", {"label": "mae", "method": "mae", "windows": 0}]}
    spec = _spec(labelled, budget="3steps", seeds=2, grid=grid, random_init=False, eval={"metrics": []})
    run_study(parse_spec(spec), tmp_path / "study", log=lambda line: None)
    assert capsys.readouterr().err == ("lomar pretrain: note: --window-size 3 is unused: this --method mae run has no "
                                       "windows (--windows 0: the whole image)\n")
    spec = parse_spec(_spec(labelled, eval={"metrics": ["finetune"], "finetune": {"epochs": 1, "batch_size": 4}}))
    said = runner.check_cells(spec)
    assert capsys.readouterr().err.count("lomar finetune: note: warming up") == 1
    monkeypatch.setattr(evals, "finetune", lambda config: (_ for _ in ()).throw(TrainingError("stop")))
    args = evals._args("finetune", spec, Cell({}, dict(spec.settings), 0), pretrained, tmp_path / "f")
    with pytest.raises(StudyFailed):
        evals._finetune(args, said)
    assert capsys.readouterr().err == ""
    # A BEiT cell's finetune takes BEiT's recipe (20 warm-up epochs): its own note, which the check cannot know of,
    # is said at its first evaluation, once.
    monkeypatch.setattr(finetune_config, "_is_beit", lambda pretrained: True)
    for _ in range(2):
        with pytest.raises(StudyFailed):
            evals._finetune(args, said)
    assert capsys.readouterr().err == ("lomar finetune: note: warming up for all 1 epoch(s) (the default 20 is longer "
                                       "than --epochs)\n")


def test_a_finetunes_start_notes_are_said_once_a_study_and_its_other_lines_each_time(tmp_path, labelled, pretrained,
                                                                                    monkeypatch, capsys):
    """eval.finetune's 'lomar finetune: note: --train-pos-embed is unused', which the finetune says at its start (it
    needs the encoder: a LoMaR cell's has no position table), is said once a study, not at every cell's evaluation;
    its other lines (a warning) are said each time."""
    import sys

    import torch

    from lomar.cli.study import evals
    from lomar.cli.study.spec import Cell, StudyFailed
    from lomar.train import finetune
    from lomar.train.distributed import DistInfo
    from lomar.train.task import TrainingError

    def start(config, make_task):  # the run's start: its task built (the encoder, its notes), then stopped
        make_task(config, DistInfo(), torch.device("cpu"))
        print("lomar finetune: warning: not a note", file=sys.stderr, flush=True)
        raise TrainingError("stop")

    monkeypatch.setattr(finetune, "run", start)
    spec = parse_spec(_spec(labelled, eval={"metrics": ["finetune"], "finetune": {"epochs": 1, "batch_size": 4,
                                                                                  "train_pos_embed": True}}))
    said = runner.check_cells(spec)
    capsys.readouterr()
    for where in ("f1", "f2"):  # two cells' evaluations
        args = evals._args("finetune", spec, Cell({}, dict(spec.settings), 0), pretrained, tmp_path / where)
        with pytest.raises(StudyFailed):
            evals._finetune(args, said)
    again = "lomar finetune: warning: not a note\n"
    assert capsys.readouterr().err == ("lomar finetune: note: --train-pos-embed is unused: it acts on an absolute "
                                       "position table (MAE's), and this encoder has none\n" + again + again)


def test_a_slice_runs_where_the_system_has_no_load_average(tmp_path, labelled, monkeypatch):
    """Windows has no os.getloadavg: the slice trains and its cell's records say no load (an AttributeError before)."""
    monkeypatch.delattr("os.getloadavg")
    run = _lomar_cell(tmp_path, labelled, budget="4steps")

    def a_slice(config):
        with open(run.folder / "metrics.jsonl", "a") as file:
            file.writelines(json.dumps({"step": s, "loss": 1.0, "img_s": 8.0}) + "\n" for s in range(1, 5))
        return 0

    monkeypatch.setattr(runner, "pretrain", a_slice)
    run.advance()
    assert run.state["slices"] == 1 and run.state["loads"] == []
