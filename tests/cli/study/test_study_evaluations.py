"""A study's evaluations of its cells: finetune results (a stopped one is no result, a failing one one line), the
held-out loss (class folders as the probes read them, BEiT's none), the linear probe read as `lomar linprobe`, and
the notes its cells' commands and evaluations say once a study."""

import pytest
from tiny_study import _spec

from helpers import write_images
from lomar.cli.study import runner
from lomar.cli.study.runner import run_study
from lomar.cli.study.spec import StudyStopped, parse_spec


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


@pytest.mark.parametrize("metric", ["knn", "linprobe"])
def test_a_features_error_at_a_score_is_one_line_naming_the_metric(tmp_path, pretrained, metric):
    """Data changed after the study's check (a val class folder added): the features' refusal, which names the
    command, is the study's one line (its evaluations' arguments carry the command as the parser sets it)."""
    from lomar.cli.study import evals
    from lomar.cli.study.spec import Cell
    from lomar.errors import LomarError

    for split, classes in (("train", ("a", "b")), ("val", ("a", "b", "c"))):
        for label in classes:
            write_images(tmp_path / split / label, 2)
    spec = parse_spec(_spec(tmp_path, eval={"metrics": [metric]}))
    cell = Cell({}, dict(spec.settings), 0)
    with pytest.raises(LomarError, match=rf"^{metric} of .*: train and val class folders differ: only in .*train: "
                                         r"none, only in .*val: \['c'\]"):
        evals.Scorer(spec, cell, pretrained, tmp_path / "cell")(metric)
