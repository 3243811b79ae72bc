"""Bad invocations end in one line, ``lomar CMD: error: …``, before any work, and never in a traceback."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lomar.cli import app
from lomar.cli.app import build_parser, main
from lomar.train.settings import MODEL_NAMES

CK = "{tmp}/ckpt.pt"  # exists but holds no checkpoint: every case must fail before reading it
DATA = ["--data", "{tmp}/data"]

BAD = [
    # knn
    ("knn", [CK, *DATA, "--device", "tpu"], "tpu"),
    ("knn", [CK, *DATA, "--device", "cuda:x"], "cuda:x"),
    ("knn", [CK, *DATA, "--device", "cuda:99"], "cuda:99"),
    ("knn", [CK, *DATA, "--temperature", "nan"], "--temperature"),
    ("knn", [CK, *DATA, "--temperature", "0"], "--temperature"),
    ("knn", [CK, *DATA, "--temperature", "inf"], "--temperature"),
    ("knn", [CK, *DATA, "--k", "0"], "--k"),
    ("knn", [CK, *DATA, "--workers", "-1"], "--workers"),
    ("knn", [CK, *DATA, "--img-size", "0"], "--img-size"),
    ("knn", [CK, *DATA, "--img-size", "100000"], "--img-size"),
    ("knn", [CK], "--data"),
    ("knn", [CK, "--data", "{tmp}/nowhere"], "nowhere"),
    ("knn", ["{tmp}/missing.pt", *DATA], "missing.pt"),
    ("knn", [CK, *DATA, "--json", "{tmp}/file/sub.json"], "is a file"),
    ("knn", [CK, *DATA, "--json", "{tmp}/dir"], "is a folder"),
    ("knn", [CK, *DATA, "--json", "/dev/null"], "/dev/null"),
    ("knn", [CK, *DATA, "--json", "/proc/lomar.json"], "/proc"),
    # linprobe
    ("linprobe", [CK, *DATA, "--lr", "nan"], "--lr"),
    ("linprobe", [CK, *DATA, "--lr", "-1"], "--lr"),
    ("linprobe", [CK, *DATA, "--epochs", "0"], "--epochs"),
    ("linprobe", [CK, *DATA, "--weight-decay", "-1"], "--weight-decay"),
    ("linprobe", [CK, *DATA, "--probe-batch-size", "0"], "--probe-batch-size"),
    ("linprobe", [CK, *DATA, "--probe-batch-size", "1"], "--probe-batch-size"),
    ("linprobe", [CK, *DATA, "--save", "{tmp}/file/probe.pt"], "is a file"),
    ("linprobe", [CK, *DATA, "--save", "{tmp}/dir"], "is a folder; give a file name such as "),
    ("linprobe", [CK, *DATA, "--json", "/proc/self/x/out.json"], "/proc"),
    # export
    ("export", [CK, "--to", "{tmp}/file"], "is a file"),
    ("export", [CK, "--to", "{tmp}/file/sub"], "is a file"),
    ("export", [CK, "--to", "/proc/lomar-export"], "/proc"),
    ("export", [CK, "--to", "{tmp}/exported"], "--overwrite"),
    ("export", [CK, "--to", "{tmp}/out", "--img-size", "0"], "--img-size"),
    ("export", ["{tmp}/missing.pt", "--to", "{tmp}/out"], "missing.pt"),
    ("export", [CK], "--to"),
    # visualize
    ("visualize", [CK, "--attention-window", "0"], "--attention-window"),
    ("visualize", [CK, "--seed", "-1"], "--seed"),
    ("visualize", [CK, "--target-patch", "-1", "0"], "--target-patch"),
    ("visualize", [CK, "--out", "{tmp}/file"], "is a file"),
    ("visualize", [CK, "--out", "{tmp}/file/sub"], "is a file"),
    ("visualize", [CK, "--out", "/proc/lomar-figures"], "/proc"),
    ("visualize", [CK, "--out", ""], "--out is empty; give a path"),  # Path("") is the working folder
    ("visualize", [CK, "--attention-window", "3"], "--attention-window is for the attention figures; add --attention"),
    ("visualize", [CK, "--masked"], "--masked is for the attention figures; add --attention"),
    ("visualize", ["{tmp}/missing.pt", "--masked"], "--masked is for the attention figures"),  # the flags first
    ("export", [CK, "--to", ""], "--to is empty; give a path"),
    ("export", ["{tmp}/missing.pt", "--to", "{tmp}/file/x"], "is a file"),  # --to's checks come first
    ("visualize", [CK, "{tmp}/missing.png"], "image {tmp}/missing.png does not exist; pass image files"),
    ("visualize", [CK, "/dev/null"], "image /dev/null is not a file; pass image files (PNG, JPEG, …) or folders"),
    ("visualize", [CK, "--windows", "0"], "--windows"),
    ("pretrain", ["--out", "{tmp}/run", "--figure-images", "65"], "--figure-images must be at most 64"),
    ("linprobe", [CK, "--data", "{tmp}/data", "--json", "{tmp}/same.json", "--save", "{tmp}/same.json"],
     "--json and --save both name"),
    ("detect", ["--train-ann", "{tmp}/nowhere.json", "--train-images", "{tmp}/dir", "--val-ann", "{tmp}/gone.json",
                "--val-images", "{tmp}/dir", "--out", "{tmp}/run"], "--val-ann {tmp}/gone.json does not exist"),
    # load-original
    ("load-original", [CK, "--to", "{tmp}/new.pt", "--img-size", "0"], "--img-size"),
    ("load-original", [CK, "--to", "{tmp}/new.pt", "--num-heads", "0"], "--num-heads"),
    ("load-original", [CK, "--to", "{tmp}/dir"], "is a folder"),
    ("load-original", [CK, "--to", "{tmp}/file"], "--overwrite"),
    ("load-original", [CK, "--to", "/dev/null", "--overwrite"], "/dev/null"),
    ("load-original", [CK, "--to", "{tmp}/file/sub.pt"], "is a file"),
    ("load-original", [CK, "--to", "{tmp}/nowhere/new.pt"], "does not exist"),
    ("load-original", [CK, "--to", "/proc/lomar.pt"], "/proc"),
    ("load-original", ["{tmp}/missing.pth", "--to", "{tmp}/new.pt"], "missing.pth"),
    ("load-original", ["{tmp}/missing.pth", "--to", "{tmp}/file/sub.pt"], "is a file"),  # --to's checks come first
    # bench
    ("bench", ["--tiny", "--threads", "-1"], "--threads"),
    ("bench", ["--tiny", "--threads", "0"], "--threads"),
    ("bench", ["--tiny", "--device", "tpu"], "tpu"),
    ("bench", ["--tiny", "--batch-size", "0"], "--batch-size"),
    ("bench", ["--tiny", "--steps", "0"], "--steps"),
    ("bench", ["--tiny", "--warmup", "-1"], "--warmup"),
    ("bench", ["--tiny", "--sizes", "0"], "--sizes"),
    ("bench", ["--tiny", "--model", "vit_nope_patch16"], "--model"),
    ("bench", ["--tiny", "--sizes", "128", "--json", "{tmp}/dir"], "is a folder; give a file name such as "),
    ("bench", ["--tiny", "--sizes", "128", "--json", "/dev/null"], "/dev/null"),
    ("bench", ["--tiny", "--sizes", "128", "--json", "/proc/bench.json"], "/proc"),
    ("bench", ["--tiny", "--sizes", "128", "--plot", "{tmp}/file/plot.png"], "is a file"),
    # tokenizer
    ("tokenizer fit", ["--data", "{tmp}/nowhere", "--out", "{tmp}/t.safetensors"], "nowhere does not exist"),
    ("tokenizer fit", ["--data", "{tmp}/dir", "--out", "{tmp}/t.safetensors"], "{tmp}/dir"),
    ("tokenizer fit", ["--data", "{tmp}/file", "--out", "{tmp}/t.safetensors"], "{tmp}/file"),
    ("tokenizer fit", ["--data", "{tmp}/s-{0..1}.tar", "--out", "{tmp}/t.safetensors"], "not tar shards"),
    ("tokenizer fit", ["--data", "{tmp}/nowhere", "--out", "{tmp}/file/t.safetensors"], "is a file"),
    ("tokenizer fit", ["--data", "{tmp}/nowhere", "--out", "{tmp}/t.pt"], ".safetensors"),
    ("tokenizer convert", ["{tmp}/missing.pkl", "--to", "{tmp}/d.safetensors"], "missing.pkl"),
    ("tokenizer convert", [CK, "--to", "{tmp}/file/d.safetensors"], "is a file"),
    ("tokenizer convert", ["{tmp}/missing.pkl", "--to", "{tmp}/file/d.safetensors"], "is a file"),
    # the top level
    ("nonsense", [], "invalid choice"),
]


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "config.json").write_text("{}\n")
    return tmp_path


def _one_error_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = "lomar: error:" if command == "nonsense" else f"lomar {command}: error:"
    assert lines[0].startswith(prefix), err
    return lines[0]


def test_visualize_says_where_a_dangling_image_link_leads(tmp, capsys):
    (tmp / "photo.jpg").symlink_to(tmp / "unmounted" / "photo.jpg")  # `ls` lists it: "not a file" said too little
    assert main(["visualize", str(tmp / "ckpt.pt"), str(tmp / "photo.jpg")]) == 2
    assert _one_error_line(capsys.readouterr().err, "visualize") == (
        f"lomar visualize: error: image {tmp}/photo.jpg is a link to {tmp}/unmounted/photo.jpg, which does not exist; "
        f"pass image files (PNG, JPEG, …) or folders")
    (tmp / "chain.jpg").symlink_to("photo.jpg")  # a link to that link: which name is missing, as for a data set's
    assert main(["visualize", str(tmp / "ckpt.pt"), str(tmp / "chain.jpg")]) == 2
    assert _one_error_line(capsys.readouterr().err, "visualize") == (
        f"lomar visualize: error: image {tmp}/chain.jpg is a link to photo.jpg, which links on to "
        f"{os.path.realpath(tmp / 'unmounted' / 'photo.jpg')}, which does not exist; pass image files (PNG, JPEG, …) "
        f"or folders")


@pytest.mark.parametrize("command, flags, named", BAD, ids=[f"{c} {' '.join(f)}"[:60] for c, f, _ in BAD])
def test_bad_invocation_is_one_line(command, flags, named, tmp, capsys):
    argv = [*command.split(), *(f.replace("{tmp}", str(tmp)) for f in flags)]
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    code = main(argv)
    said = capsys.readouterr()
    line = _one_error_line(said.err, command)
    assert code == 2
    assert said.out == ""  # no progress line before the refusal (tokenizer fit said it was fitting)
    assert named.replace("{tmp}", str(tmp)) in line  # the message names the value or flag at fault
    if "is a folder; give a file name such as " in named:  # a name the command takes, not a bare "result"
        example = Path(line.split("such as ")[1])
        assert example.parent == tmp / "dir" and example.suffix in (".json", ".pt"), line
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # nothing written


def _fail_with(monkeypatch, exc: BaseException) -> None:
    def run(args):
        raise exc

    monkeypatch.setattr("lomar.cli.export.run", run)


@pytest.mark.parametrize("exc, code, named", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.pt"), 2, "/data/x.pt does not exist"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/d"), 2, "/data/d is a folder"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/f/x"), 2, "not a folder"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, "permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 2, "read-only"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a/.tmp", None, "/b/x"), 2, "/b/x"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left"),
])
def test_os_errors_name_the_path(exc, code, named, monkeypatch, capsys):
    _fail_with(monkeypatch, exc)
    assert main(["export", "ckpt", "--to", "out"]) == code
    assert named in _one_error_line(capsys.readouterr().err, "export")


def test_full_disk_is_one_line_with_exit_1(monkeypatch, capsys):
    def run(args):
        with open("/dev/full", "w") as handle:
            handle.write("x")

    monkeypatch.setattr("lomar.cli.export.run", run)
    assert main(["export", "ckpt", "--to", "out"]) == 1
    assert "no space left" in _one_error_line(capsys.readouterr().err, "export")


@pytest.mark.parametrize("rank, printed", [(None, True), ("0", True), ("1", False)])
def test_a_failed_save_is_printed_once_across_torchrun_ranks(rank, printed, monkeypatch, capsys):
    from lomar.cli.common import report_run_failure
    from lomar.train.run_state import SaveError

    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert report_run_failure("pretrain", SaveError("no space left on the device to write last.pt")) == 1
    err = capsys.readouterr().err
    assert err == ("lomar pretrain: error: no space left on the device to write last.pt\n" if printed else "")
    assert report_run_failure("pretrain", ValueError("only this rank knows")) == 1  # not a shared failure
    assert capsys.readouterr().err == "lomar pretrain: error: only this rank knows\n"


@pytest.mark.parametrize("command", ["knn", "linprobe"])
@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_knn_and_linprobe_under_torchrun_check_their_flags_first_said_once_a_machine(command, local_rank, tmp,
                                                                                     monkeypatch, capsys):
    # every process meets the same bad flag before any joins the process group (tests/eval/test_knn_shared.py runs
    # them under torchrun): the first process of each machine says it, the others wait for torchrun to stop them
    import time

    from lomar import errors
    from lomar.train import distributed

    waited = []
    monkeypatch.setattr(time, "sleep", waited.append)  # as if the first process had not failed yet
    monkeypatch.setattr(distributed, "init_distributed", lambda *args: pytest.fail("joined before the checks"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert main([command, str(tmp / "ckpt.pt"), "--data", str(tmp / "file"), "--json", str(tmp / "s.json")]) == 2
    assert _one_error_line(capsys.readouterr().err, command) == (
        f"lomar {command}: error: --data {tmp / 'file'} is not a folder; pass an ImageFolder root")
    assert waited == ([errors.FIRST_PROCESS_WAIT] if local_rank == "1" else []) and not (tmp / "s.json").exists()
    if command == "linprobe":  # a protocol's flag, refused before the rest is checked
        waited.clear()
        assert main([command, str(tmp / "ckpt.pt"), "--data", str(tmp / "data"), "--weight-decay", "0.5",
                     "--protocol", "mae"]) == 2
        assert "--weight-decay is for --protocol adamw" in _one_error_line(capsys.readouterr().err, command)
        assert waited == ([errors.FIRST_PROCESS_WAIT] if local_rank == "1" else [])


@pytest.mark.parametrize("local_rank, said", [(None, True), ("0", True), ("1", False)])
def test_interrupt_exits_130(local_rank, said, monkeypatch, capsys):
    # Ctrl-C reaches every process of a torchrun launch: each one printed the line
    if local_rank is not None:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert main(["export", "ckpt", "--to", "out"]) == 130
    assert capsys.readouterr().err == ("lomar export: interrupted\n" if said else "")


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), OSError(errno.EIO, "I/O error"), TypeError("a bug")])
def test_bugs_keep_their_traceback(exc, monkeypatch):
    _fail_with(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["export", "ckpt", "--to", "out"])


def test_multi_line_and_coloured_messages_become_one_line(monkeypatch, capsys):
    from lomar.errors import UsageError

    _fail_with(monkeypatch, UsageError("unsafe pickle:\n\x1b[1mWeightsUnpickler error\x1b[0m: bad global"))
    assert main(["export", "ckpt", "--to", "out"]) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert line == "lomar export: error: unsafe pickle: WeightsUnpickler error: bad global"


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
    from lomar.bench.backbone import ENCODERS
    from lomar.models.vit_config import REL_POS_MODES
    from lomar.train.settings import REL_POS

    assert REL_POS.choices == ("auto", *REL_POS_MODES)
    bench = _subparsers()["bench"]
    assert next(a.choices for a in bench._actions if "--encoders" in a.option_strings) == tuple(ENCODERS)


def _torch_free(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


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
    there was refused only after it. In one process that cannot import torch, each command's one line comes first."""
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
    code = ("import json, sys\n"
            "sys.modules['torch'] = None  # import torch now raises ImportError\n"
            "from lomar.cli.app import main\n"
            f"print(json.dumps([main(argv) for argv in {runs!r}]))\n")
    result = _torch_free(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == [2] * len(runs), result.stderr
    said = result.stderr.splitlines()
    assert len(said) == len(runs) and all(missing in line for line in said[:-2]), said
    assert said[-2].startswith(f"lomar tokenizer fit: error: --out {tmp_path}/file/t.safetensors: ") and \
        "is a file" in said[-2]
    assert said[-1].startswith(f"lomar bench: error: --plot {tmp_path}/file/bench.png: ") and "is a file" in said[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("command, args", [("pretrain", []), ("knn", ["ckpt"]), ("visualize", ["ckpt"])])
def test_an_unknown_flag_is_the_commands_own_error(command, args, capsys):
    assert main([command, *args, "--bogus", "x"]) == 2
    assert capsys.readouterr().err == (f"lomar {command}: error: unrecognized arguments: --bogus x "
                                       f"(see lomar {command} --help)\n")


@pytest.mark.parametrize("name, value", [("LOMAR_MAX_IMAGE_PIXELS", "abc"), ("LOMAR_MAX_IMAGE_PIXELS", "-1"),
                                         ("LOMAR_MAX_IMAGE_BYTES", "0")])
def test_a_bad_image_limit_in_the_environment_is_one_line_before_any_work(name, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(name, value)
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    default = {"LOMAR_MAX_IMAGE_PIXELS": 178956970, "LOMAR_MAX_IMAGE_BYTES": 268435456}[name]
    assert err == (f"lomar pretrain: error: {name} must be a positive integer, got {value!r}; unset it or set "
                   f"e.g. {default} (the default)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, other, marks", [
    ("pretrain", "finetune", {"format": "lomar-finetune-1"}), ("finetune", "pretrain", {"format": "lomar-pretrain-2"}),
    ("segment", "detect", {"format": "lomar-detect-1"}), ("detect", "segment", {"task": "segment"})])
def test_resuming_another_commands_checkpoint_names_that_command(command, other, marks, tmp_path, capsys):
    import torch

    checkpoint = tmp_path / "other" / "last.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": {}, "config": {}, "settings": {}, **marks}, checkpoint)
    assert main([command, "--resume", str(checkpoint), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        f"lomar {command}: error: --resume {checkpoint} is a `lomar {other}` checkpoint, not a `lomar {command}` "
        f"one; resume it with `lomar {other}`, or start a new run with another --out\n")


@pytest.mark.parametrize("marks, command", [({"format": "lomar-detect-1"}, "detect"), ({"task": "segment"}, "segment")])
def test_a_detector_or_segmenter_given_as_an_encoder_is_named(marks, command, tmp_path, capsys):
    import torch

    checkpoint = tmp_path / "last.pt"
    torch.save({"model": {"backbone.w": torch.zeros(1)}, **marks}, checkpoint)
    assert main(["knn", str(checkpoint), "--data", str(tmp_path)]) == 2
    assert f"is a whole `lomar {command}` model, not an encoder; pass the encoder" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "knn"])
def test_a_plain_pickle_is_one_line_without_torchs_protocol_warning(command, tmp_path, capsys):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    args = [str(path), "--to", str(tmp_path / "out")] if command == "export" else [str(path), "--data", str(tmp_path)]
    assert main([command, *args]) == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert line.endswith(f"{path}: it is a Python pickle, not a checkpoint written by torch.save")


@pytest.mark.slow
def test_sigterm_outside_training_cleans_up_and_exits_143(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "digits"
    proc = subprocess.Popen([sys.executable, "-m", "lomar", "compose-digits", "--out", str(out), "--images",
                             "1000000", "--img-size", "32"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".digits.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".digits.tmp-*")), "the composition never started"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.endswith("lomar compose-digits: terminated (SIGTERM)\n"), err
    assert list(tmp_path.iterdir()) == []  # its temporary folder removed, nothing half-written


def test_the_sigterm_handler_is_given_back(monkeypatch):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    _fail_with(monkeypatch, ValueError("any end"))
    with pytest.raises(ValueError):
        main(["export", "ckpt", "--to", "out"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigusr1_outside_training_unwinds_as_sigterm_does(monkeypatch, capsys):
    """A scheduler's early warning (SLURM --signal=USR1) that comes before the training loop, which checkpoints on
    it, ends the command with one line and its clean-up instead of killing it unannounced."""
    import os
    import signal
    import time

    def run(args):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(10)  # the handler interrupts this
        return 0

    monkeypatch.setattr("lomar.cli.export.run", run)
    def ignored(*_):  # should lomar leave the signal alone, pytest survives it
        pass

    before = signal.signal(signal.SIGUSR1, ignored)
    try:
        code = main(["export", "ckpt", "--to", "out"])
        assert signal.getsignal(signal.SIGUSR1) is ignored  # given back
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert code == 128 + signal.SIGUSR1 and capsys.readouterr().err == "lomar export: terminated (SIGUSR1)\n"
    assert f"{code} SIGUSR1" in app.EXIT_CODES  # lomar --help lists it


def test_lomar_help_lists_the_time_limit_exit_code():
    from lomar.train.preemption import TIME_LIMIT_EXIT

    assert f"; {TIME_LIMIT_EXIT} a training run stopped by --time-limit" in app.EXIT_CODES


def test_a_rank_whose_peer_died_says_so_in_one_line(monkeypatch, capsys):
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:24990: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
                        "application. Check the logs of the remote worker before reporting an error. GLHF!")
    _fail_with(monkeypatch, gloo)
    with pytest.raises(RuntimeError):  # one process: no peer to lose, so a bug, kept as a traceback
        main(["export", "ckpt", "--to", "out"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["export", "ckpt", "--to", "out"]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "rank 0: another process of this run stopped (connection reset by peer)" in line
    assert line.endswith("its own error says why; fix that, then relaunch every process")  # export takes no --resume
    monkeypatch.setattr("lomar.cli.train.pretrain_run", lambda args: (_ for _ in ()).throw(gloo))
    assert main(["pretrain"]) == 1  # a training run is resumed
    assert _one_error_line(capsys.readouterr().err, "pretrain").endswith(
        "relaunch every process with --resume auto (from the last checkpoint, if one was written)")
    _fail_with(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError):  # any other failure under torchrun keeps its traceback
        main(["export", "ckpt", "--to", "out"])


def test_a_sigterm_while_a_rank_reports_its_lost_peer_leaves_the_one_line(monkeypatch, capsys):
    """torchrun SIGTERMs the processes that outlive a failed one: a rank already reporting its lost peer ends with
    its one line and exit 1, with no Terminated traceback after the line."""
    import os
    import signal

    _fail_with(monkeypatch, RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer."))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    describe = app.describe_lost_peer

    def described_then_stopped(exc, command):
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun stopping this survivor while it reports
        return describe(exc, command)

    monkeypatch.setattr(app, "describe_lost_peer", described_then_stopped)
    try:
        code = main(["export", "ckpt", "--to", "out"])
    except KeyboardInterrupt as exc:  # Terminated: caught here, else it would stop pytest itself
        pytest.fail(f"the SIGTERM after the command had failed escaped as {exc!r}")
    assert code == 1
    assert "rank 0: another process of this run stopped" in _one_error_line(capsys.readouterr().err, "export")


def test_a_rank_that_lost_its_peer_leaves_the_why_to_the_first_process(monkeypatch, capsys):
    """Rank 0's full disk on metrics.jsonl under torchrun: its line, then rank 1's 'another process of this run
    stopped', two lines for one failure. Rank 1 waits for torchrun to stop it (silently); one still running says it."""
    import os
    import signal

    _fail_with(monkeypatch, RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer."))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    waits = []
    monkeypatch.setattr("lomar.errors.time.sleep", lambda seconds: (waits.append(seconds),
                                                                    os.kill(os.getpid(), signal.SIGTERM)))
    assert main(["export", "ckpt", "--to", "out"]) == 128 + signal.SIGTERM  # torchrun's SIGTERM during the wait
    assert capsys.readouterr().err == "" and waits
    monkeypatch.setattr("lomar.errors.time.sleep", lambda seconds: None)  # not stopped: it says it after all
    assert main(["export", "ckpt", "--to", "out"]) == 1
    assert "rank 1: another process of this run stopped" in _one_error_line(capsys.readouterr().err, "export")


def test_a_dvae_that_is_not_a_pickle_is_not_called_one(tmp_path, capsys):
    path = tmp_path / "random.pt"
    path.write_bytes(b"\x01" + bytes(range(256)))
    assert main(["tokenizer", "convert", str(path), "--to", str(tmp_path / "tok.safetensors")]) == 2
    line = _one_error_line(capsys.readouterr().err, "tokenizer convert")
    assert f"refusing to load {path}: it is a file in an unknown format, not a dVAE; use" in line


@pytest.mark.parametrize("pattern", ["shard-*.tar", "shard-000.tar"])
def test_tokenizer_fit_says_it_reads_no_tar_shards(tmp_path, capsys, pattern):
    (tmp_path / "shard-000.tar").write_bytes(b"")
    data = str(tmp_path / pattern)
    assert main(["tokenizer", "fit", "--data", data, "--out", str(tmp_path / "tok.safetensors")]) == 2
    line = _one_error_line(capsys.readouterr().err, "tokenizer fit")
    assert f"--data {data}: tokenizer fit reads an image folder or a .txt list of paths, not tar shards" in line
    assert "lomar pretrain --method beit" in line


def test_a_killed_loader_worker_is_one_line_in_every_command_and_only_training_ones_say_resume():
    from lomar.cli.app import describe_dead_worker

    killed = RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. ")
    assert describe_dead_worker(killed, "knn") == ("DataLoader worker (pid 7) is killed by signal: Killed. (the system "
                                                   "kills a worker that runs out of memory: lower --workers or "
                                                   "--batch-size)")
    assert describe_dead_worker(killed, "finetune").endswith(
        "; resume with --resume auto (from the last checkpoint, if one was written)")
    assert describe_dead_worker(RuntimeError("Caught ValueError in DataLoader worker process 0."), "knn") is None
