"""Flags and checks shared by the commands; argparse-only at import (building a parser imports no torch).

Everything here runs before any work: a bad flag or an output path that cannot be written
is reported in one line while nothing has been computed yet.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from lomar.errors import LomarError, UsageError, in_flags, leave_it_to_the_first_process
from lomar.train import settings as S
from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting

__all__ = ["resolve_device", "check_input", "check_checkpoint", "check_output_file", "check_output_dir", "write_json",
           "add_override_arguments", "load_for_cli", "training_command", "refuse_torchrun", "resume_policies"]


def resolve_device(text: str) -> str:
    """A --device value (spelling checked by the declaration) -> a device string torch can use here;
    UsageError otherwise."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine; pass --device cpu")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"pass cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return text


def check_input(path: str | Path, message: str) -> None:
    """A UsageError of ``message`` when nothing is at ``path`` (a dangling link is left to the reader, which names its
    target): called before a command imports torch, which takes seconds, for a path its reader would refuse anyway."""
    if not os.path.lexists(path):
        raise UsageError(message)


def check_checkpoint(path: str) -> None:
    """:func:`check_input` of a command's CHECKPOINT, in the words of load_model's refusal (lomar.checkpoints.io, which
    imports torch)."""
    check_input(path, f"checkpoint {path} does not exist; check the path")


def _check_writable_dir(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a temporary file in ``folder``: the only test a read-only mount or ACL answers."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".lomar-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"{flag} {target}: cannot write in {folder} ({reason}); choose a writable location") \
            from None


def _existing_ancestor(path: Path, flag: str, target: Path) -> Path:
    """The nearest existing folder above ``path`` (which a command may create); a file there is an error."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {target}: {parent} is a file, not a folder; choose another path")
            return parent
    return Path.cwd()


def check_output_file(path: str | Path | None, flag: str, overwrite: bool = True,
                      create_parents: bool = False, example: str = "result") -> None:
    """Fail now if a result cannot be written to ``path`` later (None: nothing to check).

    The parent must exist (or, with ``create_parents``, its nearest existing ancestor) and
    accept a new file; ``path`` must not be a folder or a device, nor exist unless ``overwrite``.
    ``example``: a file name the command takes, suggested inside a folder given instead of a file.
    """
    if path is None:
        return
    _non_empty(path, flag)
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder; give a file name such as {target / example}")
    if target.exists() or target.is_symlink():
        if not target.is_file():
            raise UsageError(f"{flag} {target} is not a regular file (a device or special file); "
                             f"give a file path")
        if not overwrite:
            raise UsageError(f"{flag} {target} already exists; pass --overwrite to replace it")
    if not create_parents and not target.parent.exists():
        raise UsageError(f"{flag} {target}: folder {target.parent} does not exist; create it first")
    _check_writable_dir(_existing_ancestor(target.parent, flag, target), flag, target)


def _non_empty(path: str | Path, flag: str) -> None:
    if not str(path).strip():  # Path("") is the working folder: an unset shell variable would write there
        raise UsageError(f"{flag} is empty; give a path")


def check_output_dir(path: str | Path, flag: str) -> None:
    """Fail now if ``path`` cannot become (or is not) a writable folder; it may not exist yet."""
    _non_empty(path, flag)
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {target} is a file, not a folder; pass a folder")
    _check_writable_dir(_existing_ancestor(target, flag, target), flag, target)


def write_json(path: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON atomically: never half a file."""
    from lomar.checkpoints.io import atomic_write_text  # torch: not for --help

    return atomic_write_text(path, json.dumps(result, indent=1) + "\n")


# ---- for original checkpoints ---------------------------------------------------------------
# What an original checkpoint's weights cannot tell (None: inferred from the checkpoint).
OVERRIDES = {
    "num_heads": S.NUM_HEADS.but(help="attention heads, needed for non-standard widths without an RPE table "
                                      "(default: inferred)"),
    "img_size": S.IMG_SIZE.but(default=None, nargs="+", metavar="SIZE",
                               help="pretraining image size: SIZE, or HEIGHT WIDTH (default: from the checkpoint, "
                                    "else 224)"),
    "window_size": S.WINDOW_SIZE.but(default=None, help="LoMaR window size K (default: the checkpoint's, else 7)"),
    "num_windows": Setting(None, "LoMaR windows per image (default: the checkpoint's, else 4; at most what its grid "
                                 "holds, as the original capped them)", kind=int, above=0, flag="--windows"),
    "decoder_num_heads": S.DECODER_NUM_HEADS.but(default=None, help="MAE decoder heads (default: 16 for a 512-wide "
                                                                     "decoder)"),
}


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, OVERRIDES, group="for original checkpoints (what the weights cannot tell)")


def load_for_cli(path: str, args: argparse.Namespace, original: bool = False, loader=None):
    """Our model of the checkpoint at ``path`` (``original``: of an original LoMaR / MAE one; ``loader``: what it
    returns, called as load_model is) with the override flags; UsageError on bad input, the library's "pass
    num_heads=... to load_original" read as "pass --num-heads", its other parameters (``window_size=9``) as their
    flags (:func:`lomar.errors.in_flags`)."""
    from lomar.checkpoints.formats import load_model  # torch: not for --help
    from lomar.checkpoints.original import load_original  # torch: not for --help

    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    if "img_size" in overrides:  # the library's (height, width) pair, or one side of a square
        sides = tuple(overrides["img_size"])
        if len(sides) > 2:
            raise UsageError(f"--img-size takes SIZE or HEIGHT WIDTH, got {' '.join(map(str, sides))}")
        overrides["img_size"] = sides if len(sides) == 2 else sides[0]
    try:
        return (loader or (load_original if original else load_model))(path, **overrides)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        # the flag is this command's: converting with load-original first is no other way
        message = re.sub(r"pass (\w+)=\.\.\. to load_original(, or convert it first: [^;]*)?",
                         lambda m: f"pass --{m[1].replace('_', '-')} N", str(exc))
        message = message.replace("img_size=(height, width)", "--img-size HEIGHT WIDTH")
        flags = {name: setting.name_flag(name) for name, setting in OVERRIDES.items()}  # num_windows: --windows
        raise UsageError(in_flags(re.sub(r"\b(\w+)=\.\.\.", lambda m: flags.get(m[1], m[0]), message), flags)) from None


def report_run_failure(command: str, exc: Exception) -> int:
    """Print why a run stopped (``lomar COMMAND: error: ...``) and return exit code 1. A failed
    checkpoint save is raised on every torchrun rank; only rank 0 prints it."""
    from lomar.train.run_state import SaveError  # torch: not for --help

    if not isinstance(exc, SaveError) or int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(f"lomar {command}: error: {exc}\n")
    return 1


def training_command(config_cls, runner: str, epilog: str):
    """(add_arguments, run) of a training command: flags and YAML -> ``config_cls`` (a
    :class:`~lomar.train.task_config.TaskConfig`) -> ``runner``, "module:function" imported when
    the run starts (torch: not for --help)."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.epilog = f"{epilog} {resume_policies(config_cls)}"
        config_cls.add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        try:
            config = config_cls.resolve(args)  # a ConfigError is a UsageError: one line, exit 2
        except LomarError:
            leave_it_to_the_first_process()
            raise
        if args.print_config:
            sys.stdout.write(config.dump(invocation=True))
            return 0
        from lomar.train.run_state import SaveError  # torch: not for --help
        from lomar.train.task import TrainingError  # torch: not for --help

        module, _, function = runner.partition(":")
        try:
            return getattr(importlib.import_module(module), function)(config)  # torch: not for --help
        except (TrainingError, SaveError) as exc:
            return report_run_failure(config_cls.COMMAND, exc)
        except LomarError:  # the data's, the device's, the run folder's: found by every process alike
            leave_it_to_the_first_process()
            raise

    return add_arguments, run


def resume_policies(config_cls) -> str:
    """What a resume of ``config_cls``'s runs may change, by the settings' declared resume policies, for --help:
    'With --resume the run keeps its settings: --epochs, ... may be given otherwise; ...'."""
    by_policy: dict[str, list[str]] = {}
    for name, declared in S.declarations(config_cls).items():
        by_policy.setdefault(declared.resume, []).append(declared.name_flag(name))
    derived, once = by_policy.get("derived"), by_policy["per-invocation"]
    return (f"With --resume the run keeps its settings: {', '.join(by_policy['run-control'])} may be given otherwise"
            + (f"; {', '.join(derived)} as auto or unset (the run's own)" if derived else "")
            + f"; any other only as the run has it; {', '.join(once[:-1])} and {once[-1]} apply to the invocation "
              f"that gives them.")


def refuse_torchrun(why: str) -> None:
    """A command that runs in one process refuses torchrun in one line, said by the first process of each machine;
    ``why`` is the work each process would repeat ('each would run the whole study')."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_it_to_the_first_process()
        raise UsageError(f"it runs in one process (under torchrun {why}); run it without torchrun")
