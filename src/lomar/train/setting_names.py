"""What a user types for a setting's name, and the name lomar has for it; text only (no torch), for the command
line's flags (:mod:`lomar.cli.suggest`) and a YAML file's keys (:func:`lomar.train.settings.coerce_all`) alike."""

from __future__ import annotations

import difflib

__all__ = ["closest_flags", "either", "did_you_mean", "unknown_settings", "other_commands", "as_given",
           "source_of", "setting_of", "setting_named", "flag_of", "COMMAND_SETTINGS"]

# Other tools' spellings (MAE's and timm's scripts, Hugging Face, detectron2, Lightning) and common shortenings
# -> our flags, the first one the command has. Keys are written with dashes, lower case, without the leading --.
_ALIASES: dict[str, tuple[str, ...]] = {}
_KIN: dict[str, set[str]] = {}  # a flag -> every flag its entry spells (--steps: --max-steps, --max-iter, ...)
_OURS: dict[str, tuple[str, ...]] = {}  # one of our flags (dashed, no --) -> its entry's flags: --out's --to
for _names, _flags in [
    ("num-workers workers-per-gpu nworkers num-worker worker dataloader-num-workers j", ("--workers",)),
    ("batch batchsize bs per-device-train-batch-size ims-per-batch", ("--batch-size",)),
    ("epoch num-epochs n-epochs num-train-epochs max-epochs", ("--epochs",)),
    ("max-step max-iter max-iters iters num-steps total-steps", ("--max-steps", "--steps")),
    ("lr-min min-learning-rate minlr eta-min", ("--min-lr",)),
    ("learning-rate base-lr lr blr", ("--lr", "--blr")),
    ("warmup warmup-epoch warmup-iters warmup-step warmup-steps warmup-epochs",
     ("--warmup-epochs", "--warmup-steps", "--warmup")),
    ("output output-dir output-path outdir out-dir save-dir work-dir log-dir logdir run-dir", ("--out", "--to")),
    ("resume-from resume-path auto-resume", ("--resume",)),
    ("finetune weights pretrained-path pretrained-weights init-from", ("--pretrained",)),
    ("input-size image-size img resolution crop-size", ("--img-size", "--size")),
    ("data-path data-dir data-root dataset root", ("--data", "--train-ann")),
    ("nb-classes num-class n-classes", ("--num-classes",)),
    ("gpu gpus cuda", ("--device",)),
    ("grad-accum gradient-accumulation-steps accumulate-grad-batches", ("--accum-steps",)),
    ("wd", ("--weight-decay",)),
    ("amp fp16 bf16 mixed-precision dtype", ("--precision",)),
    ("cfg config-file", ("--config",)),
    ("num-threads", ("--threads",)),
    ("random-seed", ("--seed", "--seeds")),
    ("method", ("--methods",)),
    ("save-freq save-interval checkpoint-every ckpt-every", ("--save-every",)),
    ("print-freq log-freq log-interval", ("--log-every",)),
    ("num-windows num-window n-windows", ("--windows",)),
    ("force", ("--overwrite",)),
    ("dry-run", ("--print-config",)),
]:
    _ALIASES.update(dict.fromkeys(_names.split(), _flags))
    for _flag in _flags:
        _OURS[_flag[2:]] = (*_OURS.get(_flag[2:], ()), *_flags)
    for _flag in (_group := {*(f"--{_name}" for _name in _names.split()), *_flags}):
        _KIN.setdefault(_flag, set()).update(_group)


def closest_flags(token: str, flags: list[str]) -> list[str]:
    """The flags among ``flags`` that ``token`` (``--num_workers``, ``--num-workers=2``, ``num_workers``) most
    likely meant: its own spelling with dashes, another tool's name for one, the flags it starts (2 to 4), else
    the closest spelling; [] when none is close."""
    name = flag_of(token)[2:]
    if f"--{name}" in flags:  # --batch_size, --Max-Steps
        return [f"--{name}"]
    if own := _aliased(name, flags):
        return own[:1]
    # --window: one of --window-placement, --window-size, --windows (a single flag that starts so, as --tokenizer
    # for --to, is another concept as often as not: only a close spelling names it)
    prefixed = sorted(flag for flag in flags if flag.startswith(f"--{name}"))
    if 1 < len(prefixed) <= 4:
        return prefixed
    return difflib.get_close_matches(f"--{name}", flags, n=1, cutoff=0.75)


def flag_of(token: str) -> str:
    """The flag ``token`` spells (``--num_workers=2``, ``-Num-Workers``, ``num_workers``: ``--num-workers``)."""
    return "--" + token.split("=", 1)[0].lstrip("-").lower().replace("_", "-")


def _aliased(name: str, flags: list[str]) -> list[str]:
    """The flags among ``flags`` that the table of spellings gives for ``name`` (dashed, without --): for another
    tool's spelling, or for another command's flag, the others of its entry (export's --to for --out)."""
    return [flag for flag in _ALIASES.get(name) or _OURS.get(name, ()) if flag in flags]


def either(flags: list[str], word: str = "or") -> str:
    """'--a', '--a or --b', '--a, --b or --c' (``word``: 'and' for 'a, b and c')."""
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} {word} {flags[-1]}"


def did_you_mean(given: list[str], flags: list[str], as_keys: bool = False) -> str:
    """'; did you mean --workers?' (or '; did you mean --workers for --num-workers; --epochs for --epoch?') for the
    names among ``given`` that resemble ``flags``; '' when none does. ``as_keys``: the suggestions as YAML keys
    (``workers``), as a settings file names them."""
    pairs = [(name.split("=", 1)[0], found) for name in given if (found := closest_flags(name, flags))]
    if as_keys:
        pairs = [(name, [flag[2:].replace("-", "_") for flag in found]) for name, found in pairs]
    if not pairs:
        return ""
    if len(pairs) == 1:
        return f"; did you mean {either(pairs[0][1])}?"
    return "; did you mean " + "; ".join(f"{either(ours)} for {name}" for name, ours in pairs) + "?"


# Each training command's settings that not every one of them takes: the commands' modules import this one, which
# cannot import them (tests/cli/test_flag_suggestions.py checks the table against their declarations).
COMMAND_SETTINGS: dict[str, frozenset[str]] = {
    "pretrain": frozenset((
        "betas blr color_jitter compile compile_mode cpu_decode_share crop_scale data decode decode_ahead "
        "decoder_depth decoder_embed_dim decoder_num_heads depth embed_dim figure_images fsdp gpu_decoder "
        "keep_last knn_data knn_decode knn_every layer_scale_init lr mask_ratio method min_lr model "
        "norm_pix_loss num_heads patch_size pos preset save_every tokenizer warmup_epochs window_placement "
        "window_size windows").split()),
    "finetune": frozenset((
        "aa attention blr crop_scale cutmix data decay_rel_pos_bias decode drop_path eval_only global_blocks "
        "global_pool grad_checkpointing layer_decay min_lr mixup pretrained reprob smoothing train "
        "train_pos_embed val warmup_epochs window_size").split()),
    "detect": frozenset((
        "attention blr drop_path eval_every eval_only global_blocks grad_checkpointing jitter layer_decay "
        "model pretrained rel_pos rois_per_image train_ann train_images train_pos_embed val_ann val_images "
        "warmup_steps window_size").split()),
    "segment": frozenset((
        "aux_weight data drop_path eval_every eval_mode eval_only eval_stride grad_checkpointing "
        "head_channels layer_decay lr min_lr model num_classes photometric poly_power pretrained rel_pos "
        "train_pos_embed warmup_steps zero_label").split()),
}


def as_given(name: str, text: str, source: str | None) -> str:
    """A setting and its value (``text``, as typed) as the user gave it, for an error: 'out: r1 in my.yaml' from a
    settings file ``source``, else its flag: '--out r1' (the fix is that line of the file, or the flag)."""
    return f"{name}: {text} in {source}" if source else f"--{name.replace('_', '-')} {text}"


def source_of(config, name: str) -> str | None:
    """The settings file that gave ``config``'s setting ``name`` (``in_file``, kept by
    :meth:`lomar.train.task_config.TaskConfig.resolve`); None where a flag or the default did."""
    return getattr(config, "in_file", {}).get(name)


def setting_of(config, name: str) -> str:
    """:func:`as_given` of ``config``'s setting ``name``, naming the settings file that gave it, if one did."""
    return as_given(name, str(getattr(config, name)), source_of(config, name))


def setting_named(config, name: str, preposition: str = "in") -> str:
    """``config``'s setting ``name`` as a fix names it: its key where a settings file gave it ('epochs in base.yaml';
    ``preposition`` 'from' after 'drop'), else its flag ('--epochs'), not a flag the user never typed."""
    source = source_of(config, name)
    return f"{name} {preposition} {source}" if source else f"--{name.replace('_', '-')}"


def unknown_settings(unknown: list[str], names: list[str], source: str, config: type) -> str:
    """The error for the keys ``unknown`` of a settings file ``source`` whose settings (``config``'s) are ``names``:
    the other training commands that take one (a key of finetune's in a file given to pretrain), what each other
    one most likely meant, else where the valid ones are listed."""
    command = getattr(config, "COMMAND", "<command>")
    flags = [f"--{name.replace('_', '-')}" for name in names]
    theirs, elsewhere = other_commands({key: key for key in unknown}, command, flags)
    hint = did_you_mean([key for key in unknown if key not in elsewhere], flags, as_keys=True)
    return (f"unknown setting(s) {', '.join(unknown)} in {source}" + theirs
            + (hint or ("; remove it" if len(unknown) == 1 else "; remove them") * bool(theirs)
               or f"; see `lomar {command} --help` for the valid ones"))


def other_commands(given: dict[str, str], command: str, flags: list[str], kind: str = "setting",
                   table: dict[str, frozenset[str]] | None = None) -> tuple[str, list[str]]:
    """('; mixup is a setting of lomar finetune, num_classes of lomar segment, not of lomar pretrain', [the ones
    named that the table of spellings puts beside none of ``command``'s ``flags``]) for the entries of ``given``
    {as the user wrote it: the setting's name} that a command other than ``command`` takes (``table``: each
    command's names, :data:`COMMAND_SETTINGS` where None); ('', []) when none. The ones left out of the list still
    get a suggestion: detect's --warmup-steps for --warmup-epochs, finetune's --blr for --lr, pretrain's --max-steps
    for bench's --steps. ``kind``: 'setting'
    for a settings file's key, 'flag' for the command line's (:mod:`lomar.cli.suggest`), which get the same answer."""
    table = table or COMMAND_SETTINGS
    found = {shown: [other for other, names in table.items() if other != command and name in names]
             for shown, name in given.items()}
    found = {shown: either(commands, "and") for shown, commands in found.items() if commands}
    theirs = ", ".join(f"{shown}{f' is a {kind}' * (not i)} of lomar {others}" for i, (shown, others)
                       in enumerate(found.items()))
    return ((f"; {theirs}, not of lomar {command}" if theirs else ""),
            [shown for shown in found if not _KIN.get(f"--{given[shown].replace('_', '-')}", set()) & set(flags)])
