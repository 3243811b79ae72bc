"""`lomar --help` and each command's help: every flag with its default, the model choices equal to what the code
builds, and the parser, help and missing-input refusals reached without importing torch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from lomar.cli import app
from lomar.cli.app import build_parser
from lomar.train.settings import MODEL_NAMES


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", [name for name, _, _ in app.SUBCOMMANDS])
def test_every_flag_has_help_with_its_default(command):
    sub = _subparsers()[command]
    formatter = sub._get_formatter()
    missing = []
    for action in sub._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.help == argparse.SUPPRESS:
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        if not action.help:
            missing.append(f"{name}: no help")
        elif (action.option_strings and not action.required and action.nargs != 0
              and "default" not in formatter._get_help_string(action).lower()):
            missing.append(f"{name}: no default shown")
    assert not missing, missing


def test_model_flag_lists_the_models():
    from lomar.models.vit import list_models

    assert MODEL_NAMES == tuple(list_models())
    bench = _subparsers()["bench"]
    help_text = next(a.help for a in bench._actions if "--model" in a.option_strings)
    assert all(name in help_text for name in MODEL_NAMES)


def test_torch_free_choices_equal_the_models_own():
    """The flags' choices are written out (no torch for --help); they must name what the code builds."""
    from lomar.bench.backbone_plan import ENCODERS
    from lomar.models.vit_config import REL_POS_MODES
    from lomar.train.settings import REL_POS

    assert REL_POS.choices == ("auto", *REL_POS_MODES)
    bench = _subparsers()["bench"]
    assert next(a.choices for a in bench._actions if "--encoders" in a.option_strings) == tuple(ENCODERS)


def _torch_free(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _main_without_torch(runs: list[list[str]]) -> tuple[list[int], list[str]]:
    """``lomar ARGV`` for each ARGV of ``runs``, in one interpreter where importing torch fails: the exit codes, and
    the lines said on stderr."""
    result = _torch_free("import json, sys\n"
                         "sys.modules['torch'] = None  # import torch now raises ImportError\n"
                         "from lomar.cli.app import main\n"
                         f"print(json.dumps([main(argv) for argv in {runs!r}]))\n")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr.splitlines()


@pytest.mark.slow
def test_building_the_parser_imports_no_torch():
    result = _torch_free("import lomar.cli.app, sys; lomar.cli.app.build_parser(); "
                         "assert 'torch' not in sys.modules")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_lomar_help_reads_no_commands_settings():
    # `lomar --help` lists the commands only: reading the settings' declarations (and YAML) doubled its CPU time
    result = _torch_free("import lomar.cli.app as a, sys\n"
                         "try:\n    a.main(['--help'])\nexcept SystemExit:\n    pass\n"
                         "assert 'lomar.train.settings' not in sys.modules and 'yaml' not in sys.modules\n")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_help_of_every_cli_module_imports_no_torch():
    code = ("import importlib.util, sys, lomar.cli.app as a\n"
            "names = [n for n, t, _ in a.SUBCOMMANDS if importlib.util.find_spec(t.split(':')[0])]\n"
            "assert len(names) >= 7, names\n"
            "for n in names:\n"
            "    try:\n"
            "        a.main([n, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert a.main(['--help']) == 0\n"
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, names\n")
    result = _torch_free(code)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_missing_input_is_refused_before_torch_is_imported(tmp_path):
    """Importing torch takes seconds (10-15 s on a busy machine): a checkpoint, dVAE file or data folder that is not
    there is refused before it. In one process that cannot import torch, each command's one line comes first."""
    missing = str(tmp_path / "missing.pt")
    (tmp_path / "file").write_text("a file\n")
    runs = [["export", missing, "--to", str(tmp_path / "x")],
            ["load-original", missing, "--to", str(tmp_path / "x.pt")],
            ["visualize", missing],
            ["knn", missing, "--data", str(tmp_path)],
            ["linprobe", missing, "--data", str(tmp_path)],
            ["tokenizer", "convert", missing, "--to", str(tmp_path / "d.safetensors")],
            ["segment", "--data", missing, "--out", str(tmp_path / "run")],
            ["finetune", "--data", missing, "--out", str(tmp_path / "run")],
            ["finetune", "--train", str(tmp_path), "--val", missing, "--out", str(tmp_path / "run")],
            ["detect", "--train-ann", missing, "--train-images", str(tmp_path), "--val-ann", missing,
             "--val-images", str(tmp_path), "--out", str(tmp_path / "run")],
            ["study", missing],
            ["bench", "--task", "loader", "--data", missing],
            ["predict", missing, str(tmp_path), "--out", str(tmp_path / "out")],
            ["predict", str(tmp_path / "file"), str(tmp_path), missing, "--out", str(tmp_path / "out")],
            # an output under a file
            ["tokenizer", "fit", "--data", missing, "--out", str(tmp_path / "file" / "t.safetensors")],
            ["bench", "--tiny", "--plot", str(tmp_path / "file" / "bench.png")]]
    codes, said = _main_without_torch(runs)
    assert codes == [2] * len(runs), said
    assert len(said) == len(runs) and all(missing in line for line in said[:-2]), said
    assert said[-2].startswith(f"lomar tokenizer fit: error: --out {tmp_path}/file/t.safetensors: ") and \
        "is a file" in said[-2]
    assert said[-1].startswith(f"lomar bench: error: --plot {tmp_path}/file/bench.png: ") and "is a file" in said[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_a_data_root_without_its_splits_is_refused_before_torch_is_imported(tmp_path):
    """finetune --data ROOT, ROOT there without train/ or val/: the line says which split it lacks and what ROOT holds
    instead (images to pretrain on, or one split), before torch is imported."""
    photos, labelled = tmp_path / "photos", tmp_path / "labelled"
    photos.mkdir()
    (photos / "img0.jpg").write_bytes(b"")
    (labelled / "train" / "cat").mkdir(parents=True)
    runs = [["finetune", "--data", str(root), "--out", str(tmp_path / "run")] for root in (photos, labelled)]
    codes, said = _main_without_torch(runs)
    assert codes == [2, 2], said
    assert said == [
        f"lomar finetune: error: {photos} holds no train/ folder: it holds images, not class folders (a folder to "
        f"pretrain on: lomar pretrain --data {photos}); labelled images go in ROOT/train/CLASS/IMAGE and "
        f"ROOT/val/CLASS/IMAGE",
        f"lomar finetune: error: {labelled} holds no val/ folder: expected the split's class folders there "
        f"({labelled}/val/CLASS/IMAGE, beside train/)"]


def test_lomar_help_lists_the_time_limit_exit_code():
    from lomar.train.preemption import TIME_LIMIT_EXIT

    assert f"; {TIME_LIMIT_EXIT} a training run stopped by --time-limit" in app.EXIT_CODES
