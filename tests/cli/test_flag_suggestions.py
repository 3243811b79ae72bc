"""A flag is given in full: no prefix stands for one, and an unknown flag is one line with a suggestion."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lomar.cli.app import build_parser, main
from lomar.cli.study.flags import parse_flags, settings_flags
from lomar.errors import UsageError
from lomar.train.config import PretrainConfig
from lomar.train.setting_names import COMMAND_SETTINGS

SUGGESTED = [
    (["pretrain", "--num-workers", "2"], "pretrain", "--num-workers 2; did you mean --workers?"),
    (["pretrain", "--max_steps=4"], "pretrain", "--max_steps=4; did you mean --max-steps?"),
    (["pretrain", "--output", "x"], "pretrain", "--output x; did you mean --out?"),
    (["pretrain", "--batch-szie", "3"], "pretrain", "--batch-szie 3; did you mean --batch-size?"),
    (["pretrain", "--window", "5"], "pretrain",
     "--window 5; did you mean --window-placement, --window-size or --windows?"),
    (["detect", "--warmup", "5"], "detect", "--warmup 5; --warmup is a flag of lomar bench, not of lomar detect; "
                                            "did you mean --warmup-steps?"),  # the unit shows
    (["finetune", "--batch_size", "4", "--epoch", "3"], "finetune",
     "--batch_size 4 --epoch 3; did you mean --batch-size for --batch_size; --epochs for --epoch?"),
    (["tokenizer", "fit", "--data", "d", "--out", "t.safetensors", "--iter", "1"], "tokenizer fit",
     "--iter 1; did you mean --iters?"),
    (["export", "ck.pt", "--to", "x", "--output-dir", "y"], "export", "--output-dir y; did you mean --to?"),
    (["pretrain", "--to", "x"], "pretrain", "--to x; --to is a flag of lomar export, load-original and tokenizer "
                                            "convert, not of lomar pretrain; did you mean --out?"),  # not --tokenizer
    # another command's flag: named as theirs, as a settings file's key of another command is
    (["pretrain", "--num-classes", "10"], "pretrain",
     "--num-classes 10; --num-classes is a flag of lomar segment, not of lomar pretrain"),
    (["segment", "--mixup=0.8", "--rel_pos", "abs", "--batch-szie", "2"], "segment",
     "--mixup=0.8 --rel_pos abs --batch-szie 2; --mixup is a flag of lomar finetune, not of lomar segment; did you "
     "mean --rel-pos for --rel_pos; --batch-size for --batch-szie?"),  # --rel-pos is segment's own (detect's too)
    (["knn", "ck.pt", "--mask-ratio", "0.5"], "knn", "--mask-ratio 0.5; --mask-ratio is a flag of lomar pretrain, "
                                                    "not of lomar knn"),
    # ... and still told this command's own for it, where another tool's spelling of it would be
    (["detect", "--warmup-epochs", "5", "--lr=1e-4"], "detect",
     "--warmup-epochs 5 --lr=1e-4; --warmup-epochs is a flag of lomar pretrain, finetune and linprobe, --lr of lomar "
     "pretrain, segment and linprobe, not of lomar detect; did you mean --warmup-steps for --warmup-epochs; --blr "
     "for --lr?"),
    # a flag every training command shares, a negated one, and any command's: each command's parser is looked in
    (["knn", "ck.pt", "--accum-steps", "2"], "knn", "--accum-steps 2; --accum-steps is a flag of lomar pretrain, "
                                                   "finetune, detect and segment, not of lomar knn"),
    (["knn", "ck.pt", "--no-eval-only"], "knn", "--no-eval-only; --no-eval-only is a flag of lomar finetune, "
                                               "detect and segment, not of lomar knn"),
    (["pretrain", "--no-mixup"], "pretrain", "--no-mixup; --mixup is a flag of lomar finetune, not of lomar "
                                             "pretrain"),  # no command has --no-mixup: the flag it would negate
    (["tokenizer", "fit", "--data", "d", "--out", "t", "--time-limit", "1h"], "tokenizer fit",
     "--time-limit 1h; --time-limit is a flag of lomar pretrain, finetune, detect and segment, not of lomar "
     "tokenizer fit"),
    (["bench", "--method", "mae"], "bench",
     "--method mae; --method is a flag of lomar pretrain, not of lomar bench; did you mean --methods?"),
    # another command's flag that another tool's spelling puts beside this command's: that one is suggested too
    (["pretrain", "--steps", "100"], "pretrain", "--steps 100; --steps is a flag of lomar bench, not of lomar "
                                                 "pretrain; did you mean --max-steps?"),
    (["bench", "--max-steps", "5"], "bench", "--max-steps 5; --max-steps is a flag of lomar pretrain, finetune, "
                                             "detect and segment, not of lomar bench; did you mean --steps?"),
    # another command's flag for what this command's flag does (the table's entry of both): where the files go
    (["export", "ck.pt", "--to", "y", "--out", "x"], "export",
     "--out x; --out is a flag of lomar pretrain, finetune, detect, segment, predict, compose-digits, visualize, study "
     "and tokenizer fit, not of lomar export; did you mean --to?"),
    # ... before argparse's missing --to, which the suggestion names (an unknown flag it does not: both said)
    (["export", "ck.pt", "--out", "x"], "export",
     "--out; --out is a flag of lomar pretrain, finetune, detect, segment, predict, compose-digits, visualize, study "
     "and tokenizer fit, not of lomar export; did you mean --to?"),
    (["export", "ck.pt", "--bogus"], "export", "--bogus; the following arguments are required: --to"),
    # the data flag of the other training commands: detect's data is its COCO files
    (["detect", "--data", "coco"], "detect", "--data coco; --data is a flag of lomar bench, pretrain, finetune, "
                                             "segment, linprobe, knn, study and tokenizer fit, not of lomar detect; "
                                             "did you mean --train-ann?"),
    (["finetune", "--train-ann", "a.json"], "finetune", "--train-ann a.json; --train-ann is a flag of lomar detect, "
                                                        "not of lomar finetune; did you mean --data?"),
]


@pytest.mark.parametrize("argv, command, said", SUGGESTED, ids=[" ".join(a)[:40] for a, _, _ in SUGGESTED])
def test_an_unknown_flag_is_one_line_with_a_suggestion(argv, command, said, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"lomar {command}: error: unrecognized arguments: {said} "
                                       f"(see lomar {command} --help)\n")


@pytest.mark.parametrize("operands", [["ck.pt"], ["-ck.pt"]])
def test_what_follows_a_double_dash_is_no_unknown_flag(operands, capsys):
    """A missing required flag is said alone where every other word is an operand (a path that starts with -)."""
    assert main(["export", "--", *operands]) == 2
    assert capsys.readouterr().err == ("lomar export: error: the following arguments are required: --to "
                                       "(see lomar export --help)\n")


@pytest.mark.parametrize("argv", [["pretrain", "--warmup", "5", "--print-config"],  # was --warmup-epochs 5
                                  ["study", "--seed", "3", "--preset", "digits", "--budget", "x"],  # was 3 seeds
                                  ["export", "ck.pt", "--to", "x", "--drop"]])  # was --drop-head
def test_no_prefix_stands_for_a_flag(argv, capsys):
    assert main(argv) == 2
    assert "unrecognized arguments: " in capsys.readouterr().err


def test_every_parser_takes_whole_flags_only():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    assert [p.prog for p in parsers(build_parser()) if p.allow_abbrev] == []


def test_a_study_setting_is_a_whole_flag_name():
    with pytest.raises(UsageError, match=r"--warmup 5; did you mean --warmup-epochs\?$"):
        parse_flags(PretrainConfig.add_arguments, settings_flags({"warmup": 5}))


@pytest.mark.parametrize("argv, usage", [(["help", "knn"], "usage: lomar knn "),
                                         (["help", "tokenizer", "fit"], "usage: lomar tokenizer fit "),
                                         (["help"], "usage: lomar ")])
def test_lomar_help_cmd_is_lomar_cmd_help(argv, usage, capsys):
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(usage)


@pytest.mark.parametrize("yaml_text, said", [
    ("num_workers: 2\nepoch: 3\n",
     "epoch, num_workers in {path}; did you mean epochs for epoch; workers for num_workers?"),
    ("batch-szie: 4\n", "batch_szie in {path}; did you mean batch_size?"),
    ("colour: red\n", "colour in {path}; see `lomar pretrain --help` for the valid ones"),
    # another training command's keys: named as theirs, not sent to --help (where they are not)
    ("num_classes: 10\nmixup: 0.8\n", "mixup, num_classes in {path}; mixup is a setting of lomar finetune, "
                                       "num_classes of lomar segment, not of lomar pretrain; remove them"),
    ("rel_pos: auto\nbath_size: 2\n", "bath_size, rel_pos in {path}; rel_pos is a setting of lomar detect and "
                                       "segment, not of lomar pretrain; did you mean batch_size?"),
    ("warmup_steps: 100\n", "warmup_steps in {path}; warmup_steps is a setting of lomar detect and segment, not of "
                            "lomar pretrain; did you mean warmup_epochs?"),
])
def test_an_unknown_key_of_a_settings_file_is_one_line_with_a_suggestion(tmp_path, capsys, yaml_text, said):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml_text)
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"lomar pretrain: error: unknown setting(s) {said.format(path=path)}\n"
    assert not (tmp_path / "run").exists()


def test_another_commands_key_is_named_whatever_the_process_imported(tmp_path):
    """The Python API, which never imports the command line's modules: a finetune key given to pretrain's settings
    is named finetune's there too (a registry filled by the command line sent it to pretrain's --help)."""
    path = tmp_path / "settings.yaml"
    path.write_text("mixup: 0.8\n")
    code = ("import sys; from pathlib import Path; from lomar.train.config import PretrainConfig; "
            "from lomar.train.settings import ConfigError, read_yaml\n"
            "try: read_yaml(PretrainConfig, Path(sys.argv[1]))\nexcept ConfigError as exc: print(exc)")
    said = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert said == f"unknown setting(s) mixup in {path}; mixup is a setting of lomar finetune, not of lomar " \
                   f"pretrain; remove it\n"


def test_the_table_of_each_commands_settings_is_their_declarations():
    from lomar.train.detect_config import DetectConfig
    from lomar.train.finetune_config import FinetuneConfig
    from lomar.train.segment_config import SegmentConfig

    declared = {c.COMMAND: set(c.__dataclass_fields__) for c in (PretrainConfig, FinetuneConfig, DetectConfig,
                                                                 SegmentConfig)}
    every = set.intersection(*declared.values())
    assert COMMAND_SETTINGS == {command: names - every for command, names in declared.items()}


def test_every_setting_in_the_table_is_a_flag_of_its_command():
    """The command line names '--X' 'a flag of lomar CMD' from the table: a setting without its flag would be a
    false answer."""
    commands = build_parser(list(COMMAND_SETTINGS)).commands
    assert {command: {name for name in names if f"--{name.replace('_', '-')}" not in
                      commands[command]._option_string_actions} for command, names in COMMAND_SETTINGS.items()} \
        == dict.fromkeys(COMMAND_SETTINGS, set())


@pytest.mark.parametrize("local_rank, waits", [("0", False), ("1", True)])
def test_under_torchrun_the_first_process_of_a_machine_alone_says_an_unknown_flag(
        capsys, monkeypatch, local_rank, waits):
    # every process printed it: torchrun --nproc-per-node 8 showed the line 8 times
    import time

    from lomar import errors

    waited = []
    monkeypatch.setattr(time, "sleep", waited.append)  # as if the first process had not failed yet
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pretrain", "--num-workers", "2"]) == 2
    assert waited == ([errors.FIRST_PROCESS_WAIT] if waits else [])
    assert capsys.readouterr().err.startswith("lomar pretrain: error: unrecognized arguments: --num-workers 2;")
    waited.clear()
    assert main(["pretrain", "--batch-size", "x"]) == 2  # argparse's own checks too
    assert waited == ([errors.FIRST_PROCESS_WAIT] if waits else [])


def test_a_pattern_the_shell_expanded_is_named_with_its_fix(tmp_path, monkeypatch, capsys):
    """`--data shards/*.tar` unquoted reaches lomar as one --data and the other shards as stray operands."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    for i in range(3):
        (tmp_path / "shards" / f"s{i}.tar.gz").touch()
        (tmp_path / f"d{i}").mkdir()
    assert main(["pretrain", "--data", "shards/s0.tar.gz", "shards/s1.tar.gz", "shards/s2.tar.gz", "--seed", "1"]) == 2
    assert capsys.readouterr().err == (
        "lomar pretrain: error: unrecognized arguments: shards/s1.tar.gz shards/s2.tar.gz; --data takes one value and "
        "the shell gave it 3 paths (an unquoted pattern): quote it, lomar expands tar shard patterns itself "
        "(--data 'shards/*.tar.gz') (see lomar pretrain --help)\n")
    for earlier in (["--out"], ["--epochs", "2", "--resume"]):  # the same path under another flag before --data
        assert main(["pretrain", *earlier, "shards/s1.tar.gz", "--data", "shards/s0.tar.gz", "shards/s1.tar.gz",
                     "shards/s2.tar.gz"]) == 2
        assert capsys.readouterr().err.endswith(" (--data 'shards/*.tar.gz') (see lomar pretrain --help)\n")
    assert main(["knn", "ck.pt", "--data", "d0", "d1", "d2"]) == 2
    assert capsys.readouterr().err.endswith(
        "unrecognized arguments: d1 d2; --data takes one value and the shell gave it 3 paths (an unquoted pattern): "
        "give one (see lomar knn --help)\n")
    for json_file in ("r.json", "d0"):  # d1 an operand after --json's value, which may be a path that exists
        assert main(["knn", "--json", json_file, "d1", "--data", "d0", "d1", "d2"]) == 2
        assert capsys.readouterr().err.endswith(
            "unrecognized arguments: d1 d2; --data takes one value and the shell gave it 3 paths (an unquoted "
            "pattern): give one (see lomar knn --help)\n")
    assert main(["pretrain", "--data", "d0", "nothing-there"]) == 2  # not paths the shell found: no such guess
    assert "shell" not in capsys.readouterr().err
    for typed in (["pretrain", "--resume", "d0", "d0"], ["knn", "ck.pt", "--json", "d1", "d1"]):  # a path twice
        assert main(typed) == 2  # is typed so: a pattern names each path once
        assert capsys.readouterr().err.endswith(f"unrecognized arguments: {typed[-1]} (see lomar {typed[0]} --help)\n")
    for name in ("S0.TAR", "S1.TAR", "s0.tar.zst", "s1.tar.zst"):  # shard names too, which 'give one' would cut
        (tmp_path / name).touch()
    for shards, pattern in ((["S0.TAR", "S1.TAR"], "*.TAR"), (["s0.tar.zst", "s1.tar.zst"], "*.tar.zst")):
        assert main(["pretrain", "--data", *shards]) == 2
        assert capsys.readouterr().err.endswith(f"quote it, lomar expands tar shard patterns itself (--data "
                                                f"'{pattern}') (see lomar pretrain --help)\n")
    for command in (["pretrain", "--knn-data"], ["knn", "ck.pt", "--data"]):  # pretrain's --data alone reads shards
        assert main([*command, "S0.TAR", "S1.TAR"]) == 2
        assert capsys.readouterr().err.endswith("(an unquoted pattern): give one (see lomar "
                                                f"{command[0]} --help)\n")


def test_a_path_with_spaces_the_shell_split_is_named_quoted(tmp_path, monkeypatch, capsys):
    """`--data My Photos` unquoted reaches lomar as --data 'My' and a stray 'Photos': the unknown-argument line names
    the path quoted, with its flag."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "My Photos").mkdir()
    (tmp_path / "exports" / "my vit 448").mkdir(parents=True)
    assert main(["pretrain", "--data", "My", "Photos", "--seed", "1"]) == 2
    assert capsys.readouterr().err == ("lomar pretrain: error: unrecognized arguments: Photos; quote a path with "
                                       "spaces, which the shell splits at them: --data 'My Photos' (see lomar "
                                       "pretrain --help)\n")
    assert main(["pretrain", "--data=My", "Photos"]) == 2
    assert capsys.readouterr().err.endswith(": --data 'My Photos' (see lomar pretrain --help)\n")
    assert main(["knn", "exports/my", "vit", "448", "--data", "d"]) == 2  # an operand
    assert capsys.readouterr().err.endswith("unrecognized arguments: vit 448; quote a path with spaces, which the "
                                            "shell splits at them: 'exports/my vit 448' (see lomar knn --help)\n")
    assert main(["pretrain", "--data", "My Photos", "extra"]) == 2  # no path it continues: nothing said
    assert capsys.readouterr().err.endswith("unrecognized arguments: extra (see lomar pretrain --help)\n")


def test_a_path_split_after_a_flag_that_takes_no_value_is_named_as_the_operand_it_is(tmp_path, monkeypatch, capsys):
    """`lomar knn --overwrite exports/my vit 448`: the split path is knn's operand, and --overwrite takes no value, so
    the hint quotes the path alone, not `--overwrite 'exports/my vit 448'`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports" / "my vit 448").mkdir(parents=True)
    assert main(["knn", "--overwrite", "exports/my", "vit", "448", "--data", "d"]) == 2
    assert capsys.readouterr().err.endswith("unrecognized arguments: vit 448; quote a path with spaces, which the "
                                            "shell splits at them: 'exports/my vit 448' (see lomar knn --help)\n")


@pytest.mark.parametrize("command", ["predict", "visualize"])
def test_a_path_with_spaces_split_among_a_list_of_operands_is_named_quoted(command, tmp_path, monkeypatch, capsys):
    """predict's and visualize's list of images takes every word the shell split a path into, so argparse leaves
    none over: a split checkpoint, image folder or --out is named quoted as the first word that names nothing."""
    monkeypatch.chdir(tmp_path)
    for folder in ("exports/my vit 448", "new photos", "my out"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "a.jpg").touch()
    said = "quote a path with spaces, which the shell splits at them:"
    assert main([command, "exports/my", "vit", "448", "a.jpg", "--out", "o"]) == 2
    assert capsys.readouterr().err == (f"lomar {command}: error: vit does not exist; {said} 'exports/my vit 448' "
                                       f"(see lomar {command} --help)\n")
    assert main([command, "exports/my vit 448", "a.jpg", "new", "photos", "--out", "o"]) == 2  # an operand's own
    assert capsys.readouterr().err.startswith(f"lomar {command}: error: new does not exist; {said} 'new photos' (")
    assert main([command, "exports/my vit 448", "a.jpg", "--out", "my", "out"]) == 2  # left over, then listed
    assert f"out does not exist; {said} --out 'my out' (" in capsys.readouterr().err


def test_a_path_split_into_an_optional_operand_is_named_quoted(tmp_path, monkeypatch, capsys):
    """knn's and linprobe's optional PRETRAINED operand takes the word after a split path (`--data My Photos`:
    'Photos'), so argparse leaves none over: the word that names nothing is said with the path quoted."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "My Photos").mkdir()
    (tmp_path / "exports" / "my vit").mkdir(parents=True)
    said = "quote a path with spaces, which the shell splits at them:"
    for command in ("knn", "linprobe"):
        assert main([command, "--data", "My", "Photos"]) == 2
        assert capsys.readouterr().err == (f"lomar {command}: error: Photos does not exist; {said} --data 'My Photos' "
                                           f"(see lomar {command} --help)\n")
    assert main(["knn", "--pretrained", "exports/my", "vit", "--data", "d"]) == 2
    assert capsys.readouterr().err.endswith(f"vit does not exist; {said} --pretrained 'exports/my vit' (see lomar "
                                            "knn --help)\n")
    (tmp_path / "exports" / "my vit b").mkdir()  # the operand took 'vit', 'b' is left over: the line names the path
    assert main(["knn", "--pretrained", "exports/my", "vit", "b", "--data", "d"]) == 2
    assert capsys.readouterr().err.endswith(f"vit does not exist; {said} --pretrained 'exports/my vit b' (see lomar "
                                            "knn --help)\n")
