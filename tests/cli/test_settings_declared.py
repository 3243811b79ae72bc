"""Every command's flags come from one declaration per setting (lomar.train.settings), and the
commands share one vocabulary: the same name means the same rule everywhere."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import yaml

from lomar.cli.app import SUBCOMMANDS, build_parser, main
from lomar.train.config import PretrainConfig
from lomar.train.detect_config import DetectConfig
from lomar.train.finetune_config import FinetuneConfig
from lomar.train.segment_config import SegmentConfig
from lomar.train.setting_flags import help_text
from lomar.train.settings import Setting, coerce_all

# The same flag name with another meaning in one command; each is a homonym, not a drift.
HOMONYMS = {
    "window_size": "finetune: ViTDet's attention window (0 = global); elsewhere LoMaR's window size K",
    "windows": "pretrain: a count, 'global' or auto; bench: counts or 'paper'; checkpoint overrides: a count >= 1",
    "attention": "visualize: draw attention figures (on/off); finetune, bench: how attention is computed",
    "images": "visualize: the image files (positional); bench --task loader: images per measurement",
    "out": "pretrain, finetune, detect, segment: the run's folder (its resume policy); tokenizer fit, visualize, "
           "compose-digits: where one command writes, as --to",
}
_OWN = {"help", "config", "print_config", "command", "tokenizer_command"}
_CONFIGS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "detect": DetectConfig, "segment": SegmentConfig}


def _commands() -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every command and sub-action (tokenizer fit / convert)."""
    def walk(prefix: str, parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(f"{prefix} {name}".strip(), sub)
        yield prefix, parser

    return [(name, p) for name, p in walk("", build_parser()) if name]


COMMANDS = _commands()


def test_every_command_is_walked():
    names = {name.split()[0] for name, _ in COMMANDS}
    assert names == {name for name, _, _ in SUBCOMMANDS}
    assert {"tokenizer fit", "tokenizer convert"} <= {name for name, _ in COMMANDS}


@pytest.mark.parametrize("command, parser", [c for c in COMMANDS if c[0] not in ("study", "tokenizer")],
                         ids=[c[0] for c in COMMANDS if c[0] not in ("study", "tokenizer")])
def test_every_flag_matches_its_declaration(command, parser):
    declared: dict[str, Setting] = parser.lomar_settings
    config = any(a.dest == "config" for a in parser._actions)  # a training command: defaults stay unset
    seen = set()
    for action in parser._actions:
        if action.dest in _OWN or isinstance(action, argparse._SubParsersAction):
            continue
        assert action.dest in declared, f"{command}: {action.option_strings or action.dest} has no declaration"
        d = declared[action.dest]
        seen.add(action.dest)
        assert action.default == (argparse.SUPPRESS if config else d.default), (command, action.dest)
        assert action.help.replace("%%", "%") == help_text(d), (command, action.dest)
        assert (tuple(action.choices) if action.choices else None) == d.takes, (command, action.dest)
        assert set(d.takes or ()) <= set(d.choices or ()), f"{command} {action.dest}: takes a choice not declared"
        assert "default: None" not in help_text(d), (command, action.dest)
        if action.option_strings and d.default is None and not d.required and action.nargs != 0:
            assert "default" in d.help.lower(), f"{command} {action.dest}: say what None means"
    assert seen == set(declared), f"{command}: declared but not a flag: {set(declared) - seen}"


def test_no_two_declarations_of_a_name_differ():
    rules: dict[str, dict[tuple, list[str]]] = {}
    for command, parser in COMMANDS:
        for name, d in getattr(parser, "lomar_settings", {}).items():
            rules.setdefault(name, {}).setdefault(d.rule(), []).append(command)
    drifted = {name: list(by_rule.values()) for name, by_rule in rules.items()
               if len(by_rule) > 1 and name not in HOMONYMS}
    assert not drifted, drifted
    assert all(len(rules[name]) > 1 for name in HOMONYMS)  # a homonym that disappeared leaves this list


def test_every_path_setting_expands_the_home_folder(monkeypatch, tmp_path):
    """'~/labelled' quoted, or --data=~/labelled, reaches a command unexpanded: pretrain expanded it, knn said
    '--data ~/labelled is not a folder'. Every command's file and folder settings expand it, flag or YAML."""
    monkeypatch.setenv("HOME", str(tmp_path))
    takers = set()
    for command, parser in COMMANDS:
        for action in parser._actions:
            declared = getattr(parser, "lomar_settings", {}).get(action.dest)
            if declared is not None and declared.path:
                assert action.type("~/x") == str(tmp_path / "x") and action.type("") == "", (command, action.dest)
                takers.add((command, action.dest) if action.dest in ("to", "json", "out") else command)
    assert {("export", "to"), ("load-original", "to"), ("tokenizer convert", "to"), ("knn", "json"),
            ("tokenizer fit", "out"), ("visualize", "out"), ("compose-digits", "out")} <= takers, takers
    assert {"pretrain", "finetune", "detect", "knn", "linprobe", "bench", "tokenizer fit", "export", "load-original",
            "visualize"} <= takers, takers
    assert coerce_all(PretrainConfig, {"data": "~/x"}, "c.yaml") == {"data": str(tmp_path / "x")}


@pytest.mark.parametrize("command", ["knn", "linprobe", "finetune"])
def test_decode_lists_only_the_modes_the_command_takes(command, tmp_path, capsys):
    """--decode is declared once, with pretrain's four modes; knn, linprobe and finetune take two of them, and
    their --help, argparse's refusal and a YAML file's list those two."""
    helps = {name: " ".join(dict(COMMANDS)[name].format_help().split()) for name in (command, "pretrain")}
    assert "--decode {full,draft} " in helps[command] and "windows,gpu" not in helps[command]
    assert "--decode {full,draft,windows,gpu} " in helps["pretrain"]
    extra = ["--print-config"] if command == "finetune" else ["ckpt"]
    for value in ("foo", "gpu"):  # a typo, or a mode of pretrain's: one line naming the two
        assert main([command, *extra, "--decode", value]) == 2
        assert capsys.readouterr().err == (f"lomar {command}: error: argument --decode: invalid choice: '{value}' "
                                           f"(choose from 'full', 'draft') (see lomar {command} --help)\n")
    if command == "finetune":
        (tmp_path / "c.yaml").write_text("decode: windows\n")
        assert main([command, "--config", str(tmp_path / "c.yaml"), *extra]) == 2
        assert capsys.readouterr().err == ("lomar finetune: error: --decode must be one of full, draft, "
                                           "got 'windows'\n")


@pytest.mark.parametrize("flag, value", [("--seed", "2147483648"), ("--device", "mps"), ("--threads", "0")])
def test_shared_settings_refuse_the_same_values_everywhere(flag, value, capsys):
    takers = [c for c, p in COMMANDS if any(flag in a.option_strings for a in p._actions)]
    assert len(takers) >= 3, takers
    for command in takers:
        extra = {"knn": ["ckpt"], "linprobe": ["ckpt"], "visualize": ["ckpt"], "pretrain": ["--print-config"],
                 "finetune": ["--print-config"]}.get(command, [])
        assert main([*command.split(), *extra, flag, value]) == 2, command
        err = capsys.readouterr().err
        assert flag in err and value in err and err.count("\n") == 1, (command, err)


def test_accum_iter_is_a_deprecated_alias(tmp_path, capsys):
    for command in ("pretrain", "finetune"):
        assert main([command, "--out", str(tmp_path / command), "--accum-iter", "3", "--print-config"]) == 0
        out, err = capsys.readouterr()
        assert yaml.safe_load(out)["accum_steps"] == 3
        assert "--accum-iter is deprecated; use --accum-steps" in err and err.count("\n") == 1
    config = tmp_path / "old.yaml"
    config.write_text("accum_iter: 2\n")
    assert main(["finetune", "--config", str(config), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["accum_steps"] == 2


def test_one_command_line_giving_a_setting_under_two_spellings_is_refused(tmp_path, capsys):
    for order in (("--accum-iter", "--accum-steps"), ("--accum-steps", "--accum-iter")):
        args = ["pretrain", "--out", str(tmp_path / "r"), order[0], "2", order[1], "3", "--print-config"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{order[0]} and {order[1]} are one setting; give it once" in err, err
    # the same spelling twice is argparse's usual "the later one wins"
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--accum-steps", "2", "--accum-steps", "3",
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["accum_steps"] == 3


def test_two_config_files_are_refused_not_the_first_dropped(tmp_path, capsys):
    """argparse kept the second --config alone: the first file's settings were dropped without a word."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("seed: 1\n")
    second.write_text("batch_size: 8\n")
    assert main(["pretrain", "--config", str(first), "--config", str(second), "--print-config"]) == 2
    assert f"--config {first} and --config {second} are one setting; give it once" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(first), f"--config={first}", "--print-config"]) == 0  # the same file
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 1


def test_a_config_file_giving_one_setting_under_two_spellings_is_refused(tmp_path, capsys):
    """The YAML reader refuses a key given twice, but max_steps and max-steps (or accum_iter and accum_steps) are
    two keys to it: the later one won without a word."""
    from lomar.train.config import PretrainConfig

    for text, keys in (("max_steps: 1\nmax-steps: 2\n", "max_steps and max-steps"),
                       ("accum_iter: 2\naccum_steps: 3\n", "accum_iter and accum_steps")):
        config = tmp_path / "twice.yaml"
        config.write_text(text)
        assert main(["pretrain", "--config", str(config), "--print-config"]) == 2
        assert f"{keys} in {config} are one setting" in capsys.readouterr().err
    assert coerce_all(PretrainConfig, {"window-size": 5, "img_size": 64}, "ok") == {"window_size": 5, "img_size": 64}


@pytest.mark.parametrize("command", ["pretrain", "finetune", "detect", "segment"])
def test_an_empty_config_path_is_refused_not_read_as_no_config(tmp_path, capsys, command, monkeypatch):
    """--config "$CONFIG" with CONFIG unset ran every default (the demo, for pretrain) without a word."""
    monkeypatch.chdir(tmp_path)
    assert main([command, "--config", "", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "--config must be non-empty, got ''; pass a YAML file of settings, or drop --config" in err
    assert err.count("\n") == 1


def test_an_out_under_home_written_with_a_tilde_is_expanded_as_data_is(tmp_path, capsys, monkeypatch):
    """`out: ~/runs/a` in a --config file (or --out=~/runs/a, which no shell expands) made a folder named '~' in the
    working folder, where `data: ~/images` was read from the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("out: ~/runs/a\n")
    for args in (["--config", str(config)], ["--out=~/runs/a"]):
        assert main(["pretrain", *args, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["out"] == str(tmp_path / "home" / "runs" / "a")
    assert main(["pretrain", "--out", "runs/b", "--print-config"]) == 0  # a relative one stays as given
    assert yaml.safe_load(capsys.readouterr().out)["out"] == "runs/b"


def test_an_old_finetune_checkpoint_saying_accum_iter_resumes(tmp_path, capsys):
    assert coerce_all(FinetuneConfig, {"accum_iter": 4}, "old") == {"accum_steps": 4}
    settings = {**dataclasses.asdict(FinetuneConfig()), "accum_iter": 2, "batch_size": 8, "out": str(tmp_path)}
    del settings["accum_steps"]
    torch.save({"optimizer": {}, "batches_done": 0, "best_top1": 0.0, "settings": settings}, tmp_path / "last.pt")
    assert main(["finetune", "--resume", str(tmp_path / "last.pt"), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["accum_steps"], resolved["batch_size"]) == (2, 8)
    assert main(["finetune", "--resume", str(tmp_path / "last.pt"), "--accum-steps", "3", "--print-config"]) == 2
    assert "--accum-steps 3 differs from 2" in capsys.readouterr().err


def test_finetune_out_defaults_to_a_timestamped_run_folder(capsys):
    assert main(["finetune", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)["out"]
    assert out.startswith("runs/") and out != "runs/finetune" and out[5:13].isdigit()


@pytest.mark.parametrize("command", ["knn", "linprobe"])
def test_probes_take_the_checkpoint_as_flag_or_positional(command, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data = ["--data", str(tmp_path / "data")]
    assert main([command, "--pretrained", str(tmp_path / "missing.pt"), *data]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert main([command, *data]) == 2
    assert "--pretrained PRETRAINED" in capsys.readouterr().err
    assert main([command, "a.pt", "--pretrained", "b.pt", *data]) == 2
    assert "pass one" in capsys.readouterr().err
    args = build_parser([command]).parse_args([command, "x.pt", "--threads", "2"])
    assert args.threads == 2 and args.img_size is None  # None: the checkpoint's training size


def test_bench_advises_only_flags_it_has(capsys):
    assert main(["bench", "--tiny", "--model", "vit_tiny_patch16", "--sizes", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "--window-size" not in err and "--sizes" in err


def test_pretrain_help_names_every_method():
    pretrain = dict(COMMANDS)["pretrain"]
    assert "BEiT" in pretrain.description and "LoMaR or MAE" not in pretrain.description
    method = next(a for a in pretrain._actions if a.dest == "method")
    assert all(name in method.help for name in ("lomar", "mae", "beit"))


def test_a_declaration_keeps_its_rule_per_command():
    with pytest.raises(TypeError, match="low"):
        Setting(1, "x", above=0).but(low=5)


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig])
def test_a_declared_kind_is_its_fields_type(cls):
    for field in dataclasses.fields(cls):
        base = field.type.split(" | ")[0].removeprefix("tuple[").split(",")[0].rstrip("]")
        assert field.metadata["setting"].kind.__name__ == base, field.name


def _numbers(text: str) -> set[float]:
    import re

    return {float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?", text)}


def test_a_help_that_words_its_own_default_states_its_value():
    """help_text appends "(default: VALUE)" unless the help speaks of its default itself; such a help must then
    give the value too (finetune's --crop-scale said "the default is timm's" and never 0.08 1.0)."""
    from lomar.train.detect_config import DetectConfig
    from lomar.train.segment_config import SegmentConfig
    from lomar.train.settings import declarations

    missing = []
    for cls in (PretrainConfig, FinetuneConfig, DetectConfig, SegmentConfig):
        for name, s in declarations(cls).items():
            if s.default in (None, False) or "default" not in s.help.lower():
                continue
            values = s.default if isinstance(s.default, tuple) else (s.default,)
            if not all(isinstance(v, (int, float)) and float(v) in _numbers(s.help) or str(v) in s.help
                       for v in values):
                missing.append(f"{cls.__name__}.{name}: {s.help}")
    assert not missing, missing


def test_a_help_states_its_integer_upper_bound():
    """--img-size refuses 8193 in every command (lomar.limits): its help says so, as --figure-images' says 64."""
    from lomar.limits import MAX_IMG_SIZE

    helps = {(command, a.option_strings[-1]): a.help for command, parser in COMMANDS for a in parser._actions
             if a.option_strings}
    assert helps[("pretrain", "--img-size")] == f"image size in pixels (default: 224; at most {MAX_IMG_SIZE})"
    assert helps[("pretrain", "--figure-images")].endswith("(default: 4; at most 64)")
    assert helps[("knn", "--img-size")].endswith(f"training size; at most {MAX_IMG_SIZE})")  # its own default text
    assert helps[("segment", "--num-classes")].count("254") == 1  # a bound the help gives already is not repeated
    assert "at most 1)" not in helps[("finetune", "--reprob")]  # nor a probability's


def test_every_training_setting_has_a_known_resume_policy():
    # the policy is a string: a typo ("run_control") would make the setting fixed on resume without a word
    from lomar.train.settings import declarations

    for cls in (PretrainConfig, FinetuneConfig, DetectConfig, SegmentConfig):
        for name, declared in declarations(cls).items():
            assert declared.resume in ("fixed", "run-control", "per-invocation", "derived"), (cls.__name__, name)


@pytest.mark.parametrize("command", ["pretrain", "finetune", "detect", "segment"])
def test_a_training_commands_help_says_what_a_resume_may_change(command):
    """The policies were in the README alone: --help named no setting a resume may change (--epochs) or refuses."""
    from lomar.train.settings import declarations

    epilog = build_parser().commands[command].epilog
    policy = {p: [s.name_flag(n) for n, s in declarations(_CONFIGS[command]).items() if s.resume == p]
              for p in ("run-control", "derived", "per-invocation")}
    assert f"With --resume the run keeps its settings: {', '.join(policy['run-control'])} may be given otherwise" \
        in epilog and "--epochs" in policy["run-control"] and "--batch-size" not in epilog.split("--resume")[1]
    assert (f"; {', '.join(policy['derived'])} as auto or unset (the run's own)" in epilog) == bool(policy["derived"])
    assert f"{policy['per-invocation'][-1]} apply to the invocation that gives them." in epilog
