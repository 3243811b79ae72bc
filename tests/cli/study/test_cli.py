"""`lomar study` on the command line: one-line errors (exit 2) and the presets' grids."""

from pathlib import Path

import pytest

from helpers import write_images
from lomar.cli.app import build_parser, main
from lomar.cli.study.flags import settings_flags
from lomar.cli.study.presets import DIGITS, DIGITS_EVAL, DIGITS_FINETUNE, build_preset, method_available
from lomar.cli.study.runner import check_cells, steps_per_epoch


@pytest.mark.parametrize("argv, message", [
    (["study"], "pass either SPEC.yaml or --preset NAME"),
    (["study", "--preset", "nope"], "--preset 'nope' is unknown; choose one of fig3"),
    (["study", "--preset", "windows", "--seeds", "0"], "--seeds must be a positive count, got 0"),
    (["study", "--preset", "windows", "--budget", "fast"], "--budget: 'fast' is not a budget"),
    (["study", "--preset", "windows", "--budget", ""], "--budget: '' is not a budget"),
    (["study", "--preset", "windows", "--seeds", "1000000000"], "--seeds: 1000000000 seeds is more than"),
    (["study", "--preset", "windows", "--data", "/no/such/dir"], "--data /no/such/dir is not a folder"),
    (["study", "/no/such/spec.yaml"], "study spec /no/such/spec.yaml does not exist"),
    # not studies/NAME in the working folder: `--out "$DIR"` with DIR unset
    (["study", "--preset", "windows", "--out", ""], "--out is empty; give a path"),
])
def test_bad_invocations_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_out_that_is_a_file_is_refused_before_the_preset_composes_its_data(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["study", "--preset", "digits", "--out", str(tmp_path / "afile"), "--budget", "1steps"]) == 2
    err = capsys.readouterr().err
    assert err == f"lomar study: error: --out {tmp_path / 'afile'} is a file, not a folder; pass a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_torchrun_is_refused_in_one_line_said_once_a_machine(local_rank, tmp_path, monkeypatch, capsys):
    """Under torchrun every process ran the whole study: one took the lock, the others failed 'in use by another
    run', and a bad spec was said by each."""
    import time

    from lomar import errors

    waited = []
    monkeypatch.setattr(time, "sleep", waited.append)  # as if the first process had not failed yet
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert main(["study", "--preset", "digits", "--budget", "5s", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == ("lomar study: error: it runs in one process (under torchrun each would run "
                                       "the whole study); run it without torchrun\n")
    assert waited == ([errors.FIRST_PROCESS_WAIT] if local_rank == "1" else []) and not any(tmp_path.iterdir())


def test_a_specs_out_that_is_a_file_is_named_as_the_spec_gives_it(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    spec = tmp_path / "s.yaml"
    spec.write_text("out: afile\nbudget: 1steps\ngrid: {method: [lomar]}\neval: {metrics: []}\n")
    assert main(["study", str(spec)]) == 2
    err = capsys.readouterr().err  # the spec's out: (resolved against its folder), not a --out never passed
    assert err == f"lomar study: error: out: {tmp_path / 'afile'} is a file, not a folder; pass a folder\n"
    said = next(action.help for action in build_parser(["study"]).commands["study"]._actions if action.dest == "out")
    assert said.startswith("study folder (default: the spec's out:, else studies/NAME")  # not studies/<name>


def test_a_bad_spec_file_names_the_key(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("budget: 30s\ngrid: {method: [lomar]}\neval: {metrics: [knn]}\n")
    assert main(["study", str(spec)]) == 2
    assert "eval.metrics knn need labelled data" in capsys.readouterr().err


def test_a_budget_flag_in_another_unit_than_the_specs_eval_every_is_refused(tmp_path, capsys):
    """The spec's check ran before --budget replaced its budget: 'at-2steps' points were scored in a seconds budget."""
    spec = tmp_path / "s.yaml"
    spec.write_text("budget: 4steps\ngrid: {method: [lomar]}\neval: {every: 2steps, metrics: []}\n")
    assert main(["study", str(spec), "--budget", "3s", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("lomar study: error: eval.every: 2 steps must use the budget's unit (seconds, "
                                       "from --budget 3s), e.g. every: 10s with budget: 30s\n")
    assert not (tmp_path / "out").exists()


def test_a_missing_data_path_names_the_spec_folder_it_was_read_against(capsys):
    """data: paths are relative to the spec's folder, so a path that exists from the working
    directory can still be missing: the message shows where it was looked for."""
    write_images(Path("digits/train"), 1)
    Path("st").mkdir()
    Path("st/a.yaml").write_text("data: {pretrain: digits/train}\nbudget: 1steps\ngrid: {method: [mae]}\n")
    assert main(["study", "st/a.yaml"]) == 2
    assert capsys.readouterr().err == (
        "lomar study: error: data.pretrain: digits/train (relative to the spec's folder: st/digits/train) "
        "does not exist; give a path relative to st/ or an absolute one\n")


def test_enc_dec_preset_compares_lomar_windowed_mae_and_global_mae():
    spec = build_preset("enc-dec", budget="10s")
    got = [(c.settings["method"], c.settings.get("windows"), c.settings.get("window_size")) for c in spec.cells()]
    assert got == [("lomar", 4, 6), ("mae", 4, 6), ("mae", 0, None)]  # the paper's 7:4 on a 12x12 grid
    check_cells(spec)  # each resolves as `lomar pretrain` would


def test_a_spec_with_an_empty_budget_override_is_refused(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("budget: 30s\ngrid: {method: [lomar]}\neval: {metrics: []}\n")
    assert main(["study", str(spec), "--budget", ""]) == 2
    assert "--budget: '' is not a budget" in capsys.readouterr().err


def test_windows_preset_has_the_five_paper_settings_and_all_are_valid_runs():
    spec = build_preset("windows", budget="10s")
    labels = [label for label, _ in spec.grid["window"]]
    assert [label.split(" ")[0] for label in labels] == ["5:8", "7:4", "9:3", "11:2", "14:1"]
    assert len(spec.cells()) == 5 and spec.eval.metrics == ()
    check_cells(spec)  # each passes `lomar pretrain --print-config`


def test_fig3_includes_beit_only_when_pretrain_accepts_it():
    spec = build_preset("fig3", budget="40s")
    methods = [label for label, _ in spec.grid["method"]]
    assert methods == ["lomar", "mae"] + (["beit"] if method_available("beit") else [])
    assert str(spec.eval.every) == "10s"


def test_the_digits_finetune_recipe_reaches_lomar_finetune_as_flags():
    flags = settings_flags(DIGITS_FINETUNE)
    i = flags.index("--crop-scale")
    assert flags[i:i + 3] == ["--crop-scale", "0.5", "1.0"]
    assert settings_flags({"crop_scale": [0.25, 1]}) == ["--crop-scale", "0.25", "1"]  # a spec's YAML list
    args = build_parser().parse_args(["finetune", *flags])
    assert args.crop_scale == (0.5, 1.0) and args.epochs == DIGITS_FINETUNE["epochs"]


def test_digits_checks_preset_has_the_lr_and_window_cells_and_all_are_valid_runs(tmp_path):
    spec = build_preset("digits-checks", budget="3s", out=str(tmp_path / "study"))
    assert spec.seeds == [0] and str(spec.budget) == "3s" and not spec.random_init
    assert spec.data_train == str(tmp_path / "study" / "data" / "train")
    assert spec.eval.metrics == tuple(DIGITS_EVAL["metrics"]) and spec.eval.finetune == DIGITS_FINETUNE
    assert not spec.eval.equal_steps and build_preset("digits", out=str(tmp_path / "d")).eval.equal_steps
    cells = spec.cells()
    got = [(c.settings["method"], c.settings["lr"], c.settings.get("window_size"), c.settings.get("windows"))
           for c in cells]
    assert got == [("lomar", 3e-4, 5, 4), ("lomar", 1e-3, 5, 4), ("lomar", 3e-3, 5, 4), ("lomar", 1e-3, 3, 4),
                   ("lomar", 1e-3, 8, 1), ("mae", 1e-3, None, None)]
    for cell in cells:  # the digits model and pretraining recipe
        assert {k: cell.settings[k] for k in DIGITS if k != "lr"} == {k: v for k, v in DIGITS.items() if k != "lr"}
    assert len({c.name for c in cells}) == 6
    check_cells(spec)  # each passes `lomar pretrain --print-config`
    assert build_preset("digits-checks", seeds=2, out=str(tmp_path / "study")).seeds == [0, 1]
    with pytest.raises(Exception, match="--preset digits-checks builds its own data"):
        build_preset("digits-checks", data=str(tmp_path), out=str(tmp_path / "study"))


def test_a_cell_whose_training_fails_is_exit_1_not_a_usage_error(tmp_path, monkeypatch, capsys):
    """A non-finite loss is the work failing (exit 1, as `lomar pretrain` says it); 2 says nothing was computed."""
    from lomar.cli.study import runner
    from lomar.train.task import TrainingError

    def nan(config):
        raise TrainingError("loss is nan at step 2 (epoch 0); lower --blr/--lr or set --clip-grad")

    monkeypatch.setattr(runner, "train", nan)
    write_images(tmp_path / "images" / "a", 4)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"budget: 2steps\ngrid: {{method: [lomar]}}\ndata: {{pretrain: {tmp_path / 'images'}}}\n"
                    "settings: {model: vit_tiny_patch8, img_size: 32, batch_size: 2, window_size: 3, windows: 1}\n"
                    "eval: {metrics: []}\n")
    assert main(["study", str(spec), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lomar study: error: pretraining in ") and "loss is nan at step 2" in err
    assert err.count("\n") == 1


def test_data_too_small_for_a_step_is_counted_in_the_singular_where_one(tmp_path):
    from types import SimpleNamespace

    from lomar.errors import UsageError

    write_images(tmp_path, 1, size=(32, 32))
    with pytest.raises(UsageError, match="^1 image cannot fill one step of batch 2 x accum 1; lower batch_size"):
        steps_per_epoch(SimpleNamespace(data=str(tmp_path), img_size=32, batch_size=2, accum_steps=1))
