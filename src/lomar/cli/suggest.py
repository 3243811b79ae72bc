"""A suggestion ("did you mean --workers?") for a flag a command does not have; argparse-only (no torch).

Prefixes of flags are not accepted (the parsers set ``allow_abbrev=False``): ``lomar study --seed 3`` would
have run 3 seeds (``--seeds``), and ``--warmup 5`` meant epochs in ``pretrain`` but steps in ``detect``. What a
user types instead, a prefix, another tool's spelling or a typo, gets one suggestion from the command's own flags.
"""

from __future__ import annotations

import argparse
import difflib

__all__ = ["suggest_flags", "command_parser"]

# Other tools' spellings (MAE's and timm's scripts, Hugging Face, detectron2, Lightning) and common shortenings
# -> our flags, the first one the command has. Keys are written with dashes, lower case, without the leading --.
_ALIASES: dict[str, tuple[str, ...]] = {}
for _names, _flags in [
    ("num-workers workers-per-gpu nworkers num-worker worker dataloader-num-workers j", ("--workers",)),
    ("batch batchsize bs per-device-train-batch-size ims-per-batch", ("--batch-size",)),
    ("epoch num-epochs n-epochs num-train-epochs max-epochs", ("--epochs",)),
    ("max-step max-iter max-iters iters num-steps total-steps", ("--max-steps", "--steps")),
    ("lr-min min-learning-rate minlr eta-min", ("--min-lr",)),
    ("learning-rate base-lr", ("--lr", "--blr")),
    ("warmup warmup-epoch warmup-iters warmup-step warmup-steps warmup-epochs",
     ("--warmup-epochs", "--warmup-steps", "--warmup")),
    ("output output-dir output-path outdir out-dir save-dir work-dir log-dir logdir run-dir", ("--out", "--to")),
    ("resume-from resume-path auto-resume", ("--resume",)),
    ("finetune weights pretrained-path pretrained-weights init-from", ("--pretrained",)),
    ("input-size image-size img resolution crop-size", ("--img-size", "--size")),
    ("data-path data-dir data-root dataset root", ("--data",)),
    ("nb-classes num-class n-classes", ("--num-classes",)),
    ("gpu gpus cuda", ("--device",)),
    ("grad-accum gradient-accumulation-steps accumulate-grad-batches", ("--accum-steps",)),
    ("wd", ("--weight-decay",)),
    ("amp fp16 bf16 mixed-precision dtype", ("--precision",)),
    ("cfg config-file", ("--config",)),
    ("num-threads", ("--threads",)),
    ("random-seed", ("--seed", "--seeds")),
    ("save-freq save-interval checkpoint-every ckpt-every", ("--save-every",)),
    ("print-freq log-freq log-interval", ("--log-every",)),
    ("num-windows num-window n-windows", ("--windows",)),
    ("force", ("--overwrite",)),
    ("dry-run", ("--print-config",)),
]:
    _ALIASES.update(dict.fromkeys(_names.split(), _flags))


def _own_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for flag in parser._option_string_actions if flag.startswith("--") and flag != "--help"]


def _suggestion(token: str, flags: list[str]) -> list[str]:
    name = token.split("=", 1)[0].lstrip("-").lower().replace("_", "-")
    if f"--{name}" in flags:  # --batch_size, --Max-Steps
        return [f"--{name}"]
    own = [flag for flag in _ALIASES.get(name, ()) if flag in flags]
    if own:
        return own[:1]
    # --window: one of --window-placement, --window-size, --windows (a single flag that starts so, as --tokenizer
    # for --to, is another concept as often as not: only a close spelling names it)
    prefixed = sorted(flag for flag in flags if flag.startswith(f"--{name}"))
    if 1 < len(prefixed) <= 4:
        return prefixed
    return difflib.get_close_matches(f"--{name}", flags, n=1, cutoff=0.75)


def _either(flags: list[str]) -> str:
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} or {flags[-1]}"


def suggest_flags(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'; did you mean --workers?' (or '; did you mean --workers for --num-workers; --epochs for --epoch?')
    for the flags among ``unknown`` that resemble ``parser``'s flags; '' when none does."""
    flags = _own_flags(parser)
    pairs = [(token.split("=", 1)[0], suggestion) for token in unknown
             if token.startswith("-") and len(token) > 1 and (suggestion := _suggestion(token, flags))]
    if not pairs:
        return ""
    if len(pairs) == 1:
        return f"; did you mean {_either(pairs[0][1])}?"
    return "; did you mean " + "; ".join(f"{_either(ours)} for {given}" for given, ours in pairs) + "?"


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command ``args`` ran (``lomar tokenizer fit``'s, not ``lomar tokenizer``'s); ``parser``
    when none ran."""
    command = getattr(args, "command", None)
    found = parser.commands.get(command, parser) if command else parser
    nested = getattr(args, f"{command.replace('-', '_')}_command", None) if command else None
    for action in found._actions if isinstance(nested, str) else ():
        if isinstance(action, argparse._SubParsersAction) and nested in action.choices:
            return action.choices[nested]
    return found
