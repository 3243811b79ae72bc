"""The ``lomar`` command. Each subcommand's module provides ``add_arguments(parser)`` and ``run(args) -> int``
(``NAME_add_arguments`` and ``NAME_run``, NAME with underscores for dashes, where it serves several); this file
wires them up and is the one error boundary every command shares.

Subcommand modules import only argparse-level code at module level, so ``lomar --help`` and
``lomar CMD --help`` never import torch; :func:`main` builds only the parser of the command
it runs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import signal
import sys
from collections.abc import Iterable
from time import monotonic

from lomar import __version__
from lomar.cli.command_lines import prefix_warnings
from lomar.cli.stop_signals import command_running, handle_stop_signals
from lomar.cli.suggest import (
    command_action,
    command_parser,
    expanded_by_shell,
    operand_list,
    split_at_spaces,
    split_operand,
    suggest_flags,
)
from lomar.errors import (
    FULL_DISK,
    LomarError,
    first_on_machine,
    full_disk_words,
    leave_it_to_the_first_process,
    one_line,
)
from lomar.limits import check_env_limits
from lomar.train.preemption import Terminated, mark_command_start, process_age, take_command_start

__all__ = ["SUBCOMMANDS", "build_parser", "command_prefix", "main", "run", "describe_os_error"]

# (name, module, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("bench", "lomar.cli.bench", "time LoMaR, MAE and BEiT training steps across image sizes on this machine (also "
                                 "the loader, or the encoder alone at high resolution: --task)"),
    ("pretrain", "lomar.cli.train", "pretrain an encoder with LoMaR, MAE or BEiT (no arguments: a demo on CPU)"),
    ("finetune", "lomar.cli.train", "finetune a pretrained encoder for classification (original recipe)"),
    ("detect", "lomar.cli.train", "train and evaluate Mask R-CNN (ViTDet) on COCO-format detection data"),
    ("segment", "lomar.cli.train", "train and evaluate UperNet semantic segmentation on an encoder (ADE20K layout, "
     "mIoU)"),
    ("predict", "lomar.cli.predict", "run a trained classifier, detector or segmenter (a finetune, detect or segment "
     "checkpoint, or a linprobe --save file) on image files and folders"),
    ("linprobe", "lomar.cli.probe", "linear probe (BatchNorm + linear) on frozen features"),
    ("knn", "lomar.cli.probe", "cosine k-NN accuracy of frozen features"),
    ("compose-digits", "lomar.cli.compose", "write an offline detection/segmentation set: sklearn digits on the "
     "bundled photographs, COCO and ADE20K layouts"),
    ("export", "lomar.cli.export", "write a checkpoint's encoder as model.safetensors + config.json (timm-ready)"),
    ("visualize", "lomar.cli.visualize", "reconstruction and attention figures of a pretrained model"),
    ("load-original", "lomar.cli.export", "convert an original LoMaR / MAE checkpoint into ours"),
    ("study", "lomar.cli.study", "a grid of pretraining runs and their evaluations as one resumable job"),
    ("tokenizer", "lomar.cli.tokenizer", "BEiT visual tokenizers: fit a k-means one on images, convert a dVAE"),
]
EXIT_CODES = ("exit codes: 0 done; 1 the work failed (e.g. a full disk: free space and rerun); "
              "2 a bad flag, input or output path (nothing was computed); 75 a training run stopped by --time-limit "
              "(resume it; 0 under torchrun); 130 interrupted; 143 SIGTERM and 138 SIGUSR1 outside a training loop "
              "(which checkpoints on them and exits 0)")


_REQUIRED = "the following arguments are required: "  # argparse's words


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, ``lomar CMD: error: …``, with a pointer to --help. No prefix of a flag stands for
    it (``lomar.cli.suggest`` says why); an unknown flag gets a suggestion instead."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # the subcommands' parsers too: argparse makes them of this class
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        given = list(sys.argv[1:] if args is None else args)  # for error(): the flags typed, known or not
        self._given = given[:given.index("--")] if "--" in given else given  # after a --, operands: no flags
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith(_REQUIRED):
            message = self._unknown_before_required(message)
        # "argument --k: --k must be positive" -> "--k must be positive": a declaration's check names its flag
        named = re.match(r"argument (\S+): (--[\w-]+) ", message)
        if named and named[2] in named[1].split("/"):
            message = message[len(named[0]) - len(named[2]) - 1:]
        leave_it_to_the_first_process()  # under torchrun every process meets the same flag: the first one says it
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def _unknown_before_required(self, message: str) -> str:
        """argparse says a missing required flag before the unknown ones, which it has not looked at yet: `lomar
        export CKPT --out DIR` was told '--to is required', not that --out is no flag of export and --to the one it
        means. The unknown flags and their suggestion come first, the missing ones after unless the suggestion names
        them all."""
        unknown = [token for token in getattr(self, "_given", ()) if token.startswith("-") and len(token) > 1
                   and token.split("=", 1)[0] not in self._option_string_actions
                   and not self._negative_number_matcher.match(token)]
        if not unknown:
            return message
        suggestion = suggest_flags(self, unknown, build_parser)
        named = all(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", suggestion)
                    for name in message[len(_REQUIRED):].split(", "))
        return f"unrecognized arguments: {' '.join(unknown)}{suggestion}" + ("" if named else f"; {message}")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``lomar`` parser; ``commands`` limits which subcommands get their flags (None: all)."""
    wanted = None if commands is None else set(commands)
    parser = _Parser(prog="lomar", epilog=f"a command's flags: lomar CMD --help (or lomar help CMD); {EXIT_CODES}",
                     description="Self-supervised ViT pretraining by local masked reconstruction (LoMaR).")
    parser.add_argument("--version", action="version", version=f"lomar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices  # name -> its parser, argparse's own: an unknown flag is that command's error
    for name, target, help_text in SUBCOMMANDS:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if wanted is not None and name not in wanted:
            continue
        module = importlib.import_module(target)  # by name, once wanted: `lomar CMD` loads no other command's module
        prefix = name.replace("-", "_") + "_"
        prefix = prefix if hasattr(module, f"{prefix}run") else ""
        getattr(module, f"{prefix}add_arguments")(sub_parser)
        sub_parser.set_defaults(_run=getattr(module, f"{prefix}run"))
    return parser


def command_prefix(args: argparse.Namespace) -> str:
    """'lomar CMD', with its action where the command has them ('lomar tokenizer fit'): what every line a command
    prints of its own begins with (its errors, said here, its notes and results, said by the command)."""
    action = command_action(args)
    return f"lomar {args.command}" + (f" {action}" if action else "")


def describe_os_error(exc: OSError, command: str | None = None) -> tuple[str, int] | None:
    """(one-line message naming the path and the fix, exit code) for an OSError on a path;
    None for one without a path (left as a traceback: it is not about the user's input). A training
    ``command`` that ran out of space mid-run (a log file) is resumed, not rerun: its folder holds a run."""
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    code = exc.errno
    if code in FULL_DISK:
        where = f"writing {path}: " if path is not None else ""
        fix = f"free space, then resume with {_RESUME}" if _trains(command) else \
            "free space or choose another location, then rerun"
        return f"{where}{full_disk_words(code)}; {fix}", 1
    if path is None:
        return None
    fixes = {
        errno.ENOENT: f"{path} does not exist; check the path",
        errno.EISDIR: f"{path} is a folder; give a file path",
        errno.ENOTDIR: f"{path}: part of this path is a file, not a folder; check the path",
        errno.EACCES: f"{path}: permission denied; choose a location you may read or write",
        errno.EPERM: f"{path}: operation not permitted; choose another location",
        errno.EROFS: f"{path} is on a read-only file system; choose a writable location",
        errno.EEXIST: f"{path} already exists; remove it or choose another path",
        errno.ENAMETOOLONG: f"{path}: name too long; choose a shorter path",
    }
    return fixes.get(code, f"{path}: {exc.strerror or type(exc).__name__}; check the path"), 2


# a run stopped before its first checkpoint has none to keep: --resume auto then starts it afresh
_RESUME = "--resume auto (from the last checkpoint, if one was written)"
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer")  # gloo's words for a process that is gone


def describe_lost_peer(exc: RuntimeError, command: str | None = None) -> str | None:
    """The one line for a process of a multi-process run (torchrun) whose collective failed because another
    process died (killed, out of memory, its own error): that process's error is the cause, this rank's
    traceback would bury it. None for any other error, or outside a process group (a bug: kept as a traceback).
    Only a training ``command`` is resumed (knn and linprobe, which also run under torchrun, take no --resume)."""
    if (lost := _peer_lost(exc)) is None:
        return None
    return (f"rank {os.environ.get('RANK', '?')}: another process of this run stopped ({lost.lower()}); its own "
            f"error says why; fix that, then relaunch every process{f' with {_RESUME}' if _trains(command) else ''}")


def _peer_lost(exc: RuntimeError) -> str | None:
    """How a collective of a multi-process run told ``exc`` that another process is gone; None for any other error."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return next((words for words in _PEER_LOST if words in str(exc)), None)


def describe_dead_worker(exc: RuntimeError, command: str) -> str | None:
    """The one line for a data-loading worker that the system killed (out of memory, most often): torch's
    RuntimeError names the worker; a worker's own exception arrives as itself (a bug: kept as a traceback)."""
    if not str(exc).startswith("DataLoader worker (pid"):
        return None
    return (f"{str(exc).strip().splitlines()[0]} (the system kills a worker that runs out of memory: lower --workers "
            f"or --batch-size){f'; resume with {_RESUME}' if _trains(command) else ''}")


def _trains(command: str | None) -> bool:
    return any(name == command and module == "lomar.cli.train" for name, module, _ in SUBCOMMANDS)


def _run_command(args: argparse.Namespace):
    with command_running():
        try:
            return args._run(args)
        except RuntimeError as exc:  # a peer lost: the first process may be saying why (rank 0's full disk) as it ended
            if _peer_lost(exc) is not None:
                leave_it_to_the_first_process()  # and torchrun stops this one silently; else its line comes after
            raise


def _operands_after_flags(own: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> list[str]:
    """What is left of ``unknown`` once operands typed after the flags (``lomar visualize CKPT --out D a.png``)
    join the command's one list of operands, as they would before the flags: argparse fills a positional list
    only up to the first flag."""
    action = operand_list(own)
    if action is None or any(u.startswith("-") for u in unknown):
        return unknown
    setattr(args, action.dest, [*(getattr(args, action.dest) or []), *map(action.type or str, unknown)])
    return []


def main(argv: list[str] | None = None) -> int:
    # --time-limit counts from lomar's start: this process's (its command line), or a Python caller's call (argv)
    started = monotonic() - (process_age() if argv is None else 0.0)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["help"]:  # git's and pip's spelling: `lomar help CMD` is `lomar CMD --help`
        argv = [*argv[1:], "--help"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command else [])
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            own = command_parser(parser, args)
            if unknown := _operands_after_flags(own, args, unknown):
                # a path split into more words than a flag and an optional operand took: the operand's word is named
                if not (split := split_at_spaces(argv, unknown, own)) and (operand := split_operand(argv, own, args)):
                    own.error(operand)
                # every command's parser, built on this error's path only: `lomar knn --accum-steps` is told whose
                own.error(f"unrecognized arguments: {' '.join(unknown)}{suggest_flags(own, unknown, build_parser)}"
                          f"{expanded_by_shell(argv, unknown, shards=own.prog == 'lomar pretrain')}{split}")
        if split := split_operand(argv, own := command_parser(parser, args), args):
            own.error(split)
    except SystemExit as exc:  # --help, --version, a usage error: already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    prefix = command_prefix(args)
    try:  # else every image would fail on them, each blamed on the image
        check_env_limits()
    except ValueError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    give_back_handlers = handle_stop_signals()  # SIGTERM, SIGUSR1, Ctrl-C unwind the command (see stop_signals)
    give_back_warnings = prefix_warnings(prefix)  # a log of several commands says whose each warning is
    try:
        mark_command_start(started)
        return int(_run_command(args) or 0)
    except LomarError as exc:
        print(f"{prefix}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except Terminated as exc:
        signum = exc.args[0] if exc.args else signal.SIGTERM
        if first_on_machine():  # torchrun signals every process: one line a machine
            print(f"{prefix}: terminated ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except KeyboardInterrupt:
        if first_on_machine():  # Ctrl-C reaches every process torchrun started: one line a machine
            print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if (line := describe_lost_peer(exc, args.command) or describe_dead_worker(exc, args.command)) is None:
            raise
        print(f"{prefix}: error: {line}", file=sys.stderr)
        return 1
    except OSError as exc:
        described = describe_os_error(exc, args.command)
        if described is None:
            raise
        message, code = described
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return code
    finally:
        take_command_start()  # a run a Python caller starts after this command counts from its own call
        give_back_warnings()
        give_back_handlers()


class OutlivedStream:
    """``sys.stdout`` / ``sys.stderr`` for a command whose reader may leave first (``lomar pretrain | head``): on a
    broken pipe the output goes to /dev/null from then on, and the run goes on to its checkpoint instead of dying
    mid-step."""

    def __init__(self, stream):
        self._stream = stream

    def _forward(self, method: str, *args):
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())  # what is still buffered goes there
            return getattr(self._stream, method)(*args)

    def write(self, text: str) -> int:
        return self._forward("write", text)

    def flush(self) -> None:
        self._forward("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run() -> None:
    """The process entry point (``lomar``, ``python -m lomar``): :func:`main`, then exit with its code.

    A process started by torchrun (``WORLD_SIZE`` > 1) leaves with ``os._exit`` once the command
    has returned and its output is flushed: its checkpoints and logs are closed by then, and the
    interpreter's own teardown can abort (SIGABRT) while gloo's threads are still being joined,
    which turns a finished run into a failed one for torchrun and the scheduler.
    """
    sys.stdout, sys.stderr = OutlivedStream(sys.stdout), OutlivedStream(sys.stderr)
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
