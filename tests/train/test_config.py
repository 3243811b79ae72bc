"""`lomar pretrain` configuration values: YAML typing, range checks, null and off values, the method's and the
run's own constraints (settings the run would not read), and values quoted briefly in a refusal.

Everything here stops at --print-config or a ConfigError: no training."""

from __future__ import annotations

import pytest
import yaml
from config_cli import _resolve, _yaml

from lomar.cli.app import main
from lomar.train.config import PretrainConfig
from lomar.train.detect_config import DetectConfig
from lomar.train.finetune_config import FinetuneConfig
from lomar.train.segment_config import SegmentConfig
from lomar.train.settings import declarations


def test_a_given_blr_sets_the_lr_in_the_demo_preset_too(tmp_path, capsys):
    """--blr clears the recipe's absolute lr, the demo preset's 1e-3 too: the blr given sets the lr."""
    assert _resolve(tmp_path, "--blr", "1e-2") == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["preset"] == "demo" and resolved["blr"] == 1e-2 and resolved["lr"] is None
    assert _resolve(tmp_path, "--blr", "1e-2", "--lr", "2e-3") == 0  # both given: the absolute lr wins, as ever
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 2e-3
    assert _resolve(tmp_path) == 0  # neither: the demo's own lr
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 1e-3


def test_yaml_values_take_their_field_types(tmp_path, capsys):
    config = _yaml(tmp_path, "lr: 1e-3\nmin-lr: 1e-6\nbatch_size: 8.0\nblr: 2\nepochs: '50'\nout: 2024\n")
    assert main(["pretrain", "--config", config, "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["lr"] == 1e-3 and resolved["min_lr"] == 1e-6 and resolved["blr"] == 2.0
    assert resolved["batch_size"] == 8 and isinstance(resolved["batch_size"], int) and resolved["epochs"] == 50
    assert resolved["out"] == "2024"


@pytest.mark.parametrize("text, message", [
    ("batch_size: 2.5\n", "must be a whole number"),
    ("lr: fast\n", "is not a number; write e.g. lr: 1e-3"),
    ("seed: four\n", "is not a number; write e.g. seed: 0"),  # a whole number's example is one
    ("compile: 'no'\n", "must be true or false"),
    # the default as an example, in YAML's spelling: what windows or betas take
    ("model: null\n", "model: null in "),
    ("windows: null\n", "is not allowed: windows takes a value, e.g. windows: auto; write one or remove the line"),
    ("betas: null\n", "betas takes a value, e.g. betas: [0.9, 0.95]; write one"),
    ("compile: null\n", "compile takes a value, e.g. compile: false;"),
    ("1: 2\n", "setting names"),
    ("windows: [1, 2]\n", "must be a string"),
    ("seed: true\n", "must be a number"),
    ("batch_size: 8\nlr: 1e-3\nbatch_size: 16\n", "batch_size is given twice (lines 1 and 3); keep one"),
])
def test_yaml_values_of_the_wrong_type_are_usage_errors(tmp_path, capsys, text, message):
    assert main(["pretrain", "--config", _yaml(tmp_path, text), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("command, text, said", [
    ("finetune", "aa: null\n", "aa takes a value, e.g. aa: rand-m9-mstd0.5-inc1, or aa: none for off; write one or "
                               "remove the line"),
    ("segment", "rel_pos: null\n", "rel_pos takes a value, e.g. rel_pos: auto, or rel_pos: none for off; write one"),
])
def test_a_null_for_a_setting_with_an_off_value_is_told_to_write_it(tmp_path, capsys, command, text, said):
    """null is 'off' to some (timm's aa: null) and 'the default' to others: the off value is named, as --help does."""
    assert main([command, "--config", _yaml(tmp_path, text), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1


def test_every_setting_with_a_none_choice_and_another_default_declares_it_as_off():
    lacking = [(cls.COMMAND, name) for cls in (PretrainConfig, FinetuneConfig, DetectConfig, SegmentConfig)
               for name, s in declarations(cls).items()
               if "none" in (s.choices or ()) and s.default is not None and s.off != "none"]
    assert lacking == []


@pytest.mark.parametrize("flags, message", [
    (["--blr", "-1"], "--blr must be >= 0"),
    (["--lr", "-0.1"], "--lr must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--min-lr=-1e-6"], "--min-lr must be >= 0"),
    (["--warmup-epochs", "5", "--epochs", "2"], "--warmup-epochs must be in [0, --epochs 2]"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 is above --lr"),
    (["--clip-grad", "0"], "--clip-grad must be positive"),
    (["--img-size", "0"], "--img-size must be positive"),
    (["--mask-ratio", "nan"], "--mask-ratio must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    # layer scale multiplies each residual branch: 1e30 would give a NaN loss at step 1
    (["--method", "beit", "--layer-scale-init", "1e30"], "--layer-scale-init must be in (0, 1], got 1e+30"),
])
def test_out_of_range_numbers_are_usage_errors(tmp_path, capsys, flags, message):
    assert _resolve(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_mae_takes_only_absolute_positions(tmp_path, capsys):
    """MAE is built on fixed absolute position embeddings (Method.only_pos): another --pos is refused up front."""
    assert _resolve(tmp_path, "--method", "mae", "--pos", "rpe") == 2
    assert capsys.readouterr().err.endswith("--method mae needs --pos abs (got rpe)\n")
    assert _resolve(tmp_path, "--method", "lomar", "--pos", "abs") == 0


@pytest.mark.parametrize("knn_data, said", [(None, "; pass it, or --knn-every 0"), ("DIR", "; DIR does not")])
def test_knn_every_without_a_knn_set_says_what_is_missing(tmp_path, capsys, knn_data, said):
    """No --knn-data is said as missing, not as "got None"."""
    given = ["--knn-data", str(tmp_path)] if knn_data else []
    assert _resolve(tmp_path, "--knn-every", "5", *given) == 2
    assert capsys.readouterr().err.endswith("--knn-every 5 needs --knn-data ROOT holding train/ and val/ class folders"
                                            f"{said.replace('DIR', str(tmp_path))}\n")


@pytest.mark.parametrize("flags, message", [
    (["--method", "lomar", "--decoder-depth", "4"], "--decoder-depth 4 is for --method mae only (got --method lomar)"),
    (["--method", "beit", "--decoder-embed-dim", "64"], "--decoder-embed-dim 64 is for --method mae only"),
    (["--method", "beit", "--no-norm-pix-loss"], "--no-norm-pix-loss is for --method lomar and mae only"),
    (["--method", "mae", "--layer-scale-init", "0.1"], "--layer-scale-init 0.1 is for --method beit only"),
])
def test_a_setting_the_run_would_not_read_is_refused(tmp_path, capsys, flags, message):
    """Each would otherwise run ignored without a word (MAE's decoder under LoMaR, say)."""
    assert _resolve(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "drop it" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, method", [(["--method", "mae", "--window-size", "5"], "mae"),
                                           (["--windows", "global", "--window-size", "5"], "lomar")])
def test_a_window_size_without_windows_is_noted(tmp_path, capsys, flags, method):
    """A sweep over --windows keeps its window size: noted (once the settings are valid), not refused."""
    assert _resolve(tmp_path, *flags) == 0
    assert capsys.readouterr().err == (f"lomar pretrain: note: --window-size 5 is unused: this --method {method} run "
                                       f"has no windows (--windows 0: the whole image)\n")
    assert _resolve(tmp_path, *flags, "--crop-scale", "0.9", "0.1") == 2
    assert capsys.readouterr().err.count("\n") == 1  # an invalid run gets its one-line error alone


@pytest.mark.parametrize("flags", [["--method", "mae", "--decoder-depth", "4"],
                                   ["--method", "lomar", "--no-norm-pix-loss"],
                                   ["--method", "mae", "--window-size", "5", "--windows", "4"],
                                   ["--method", "beit", "--decoder-depth", "8"]])  # its default, as config.yaml has
def test_settings_the_run_reads_are_accepted(tmp_path, capsys, flags):
    assert _resolve(tmp_path, *flags) == 0
    assert capsys.readouterr().err == ""


def test_a_runs_own_config_yaml_passes_the_unread_settings_check(tmp_path, capsys):
    for method in ("lomar", "mae", "beit"):
        assert _resolve(tmp_path, "--method", method) == 0
        config = _yaml(tmp_path, capsys.readouterr().out)
        assert main(["pretrain", "--config", config, "--out", str(tmp_path / method), "--print-config"]) == 0, method
        capsys.readouterr()


def test_a_refused_recipe_default_is_named_as_the_recipes(tmp_path, capsys):
    """BEiT's recipe jitters colour, which --decode draft cannot: the refusal named a --color-jitter never typed."""
    assert _resolve(tmp_path, "--method", "beit", "--decode", "draft") == 2
    assert "--color-jitter 0.4 (--method beit's recipe) is applied by --decode full only" in capsys.readouterr().err
    assert _resolve(tmp_path, "--method", "beit", "--decode", "draft", "--color-jitter", "0.3") == 2
    assert "--color-jitter 0.3 is applied by" in capsys.readouterr().err


def test_a_saved_setting_nested_thousands_deep_is_quoted_briefly_not_a_recursion_error():
    from lomar.train.config import PretrainConfig
    from lomar.train.settings import ConfigError, coerce_all

    deep: list = []
    for _ in range(50_000):  # what a crafted checkpoint's pickled settings can hold (its unpickler does not recurse)
        deep = [deep]
    with pytest.raises(ConfigError, match=r"^seed: \[\[\[\[\.\.\.\]\]\]\] in crafted.pt must be a number$"):
        coerce_all(PretrainConfig, {"seed": deep}, "crafted.pt", strict=False)
    with pytest.raises(ConfigError, match=r"^data: \['x+\.\.\.x+'\] in crafted.pt must be a string$") as error:
        coerce_all(PretrainConfig, {"data": ["x" * 10**6]}, "crafted.pt", strict=False)
    assert len(str(error.value)) < 300  # a line, not a megabyte


def test_a_megabyte_value_from_a_crafted_checkpoint_is_quoted_in_a_line(tmp_path):
    import torch

    from lomar.train.run_state import read_meta
    from lomar.train.settings import ConfigError, Setting

    with pytest.raises(ConfigError, match=r"^--method must be one of a, b, got 'x+\.\.\.x+'$") as error:
        Setting("a", "the method", choices=("a", "b")).check("method", "x" * 10**6)  # a saved method resumed
    assert len(str(error.value)) < 300
    torch.save({"step": "x" * 10**6}, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=r"holds \{'step': 'x+\.\.\.x+'\}, not counts of steps") as error:
        read_meta(tmp_path / "crafted.pt")
    assert len(str(error.value)) < 500


@pytest.mark.parametrize("config", [FinetuneConfig, DetectConfig, SegmentConfig])
def test_each_training_commands_out_help_names_the_files_a_run_leaves(config):
    """segment's --out help named last.pt and not the best.pt its run keeps (and --eval-only reads first), and
    finetune's no config.yaml, where detect's named both."""
    said = declarations(config)["out"].help
    assert all(name in said for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl")), said
