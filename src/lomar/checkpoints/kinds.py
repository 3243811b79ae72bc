"""What a lomar checkpoint says it is, and which command's run wrote it. Imports no torch: the
commands read it while checking their settings, before any model is built."""

from dataclasses import dataclass, field
from pathlib import Path

from lomar.checkpoints.run_folder import run_checkpoints

__all__ = ["PRETRAIN_FORMAT", "CLASSIFIER_FORMAT", "FINETUNE_FORMAT", "DETECT_FORMAT", "SEGMENT_TASK",
           "LINPROBE_FORMAT", "run_command", "FoundCheckpoint", "find_command_checkpoint", "is_probe_file",
           "classifier_pool", "trained_precision"]

PRETRAIN_FORMAT = "lomar-pretrain-2"  # 2: `windows` is meant for every method (an MAE run saved 4 unused)
CLASSIFIER_FORMAT = "lomar-classifier-1"
FINETUNE_FORMAT = "lomar-finetune-1"
DETECT_FORMAT = "lomar-detect-1"
SEGMENT_TASK = "segment"  # a `lomar segment` checkpoint says {"task": "segment"} instead of a format
LINPROBE_FORMAT = "lomar-linprobe-1"  # `lomar linprobe --save`: the probe on its encoder (no run to resume)

_COMMANDS = {"lomar-pretrain-1": "pretrain", PRETRAIN_FORMAT: "pretrain", FINETUNE_FORMAT: "finetune",
             DETECT_FORMAT: "detect", SEGMENT_TASK: "segment"}


def run_command(checkpoint: dict) -> str | None:
    """The lomar command whose checkpoints are of ``checkpoint``'s kind ('pretrain', 'finetune', 'detect',
    'segment'); None when it does not say (an export, an original checkpoint, an older file)."""
    kind = checkpoint.get("format", checkpoint.get("task"))
    return _COMMANDS.get(kind) if isinstance(kind, str) else None


@dataclass
class FoundCheckpoint:
    """A command's checkpoint as :func:`find_command_checkpoint` read it, handed on instead of read again: ``path``,
    and ``checkpoint``, its contents with the tensors mapped from that file (read where they are used) until
    :meth:`take` gives them to the model built from them."""

    path: Path
    checkpoint: dict
    _taken: bool = field(default=False, init=False, repr=False)

    def take(self) -> dict:
        """The contents, for the one model built from them; ``checkpoint`` keeps the entries that hold no tensor (its
        settings, step, classes), so that the weights (read as the model loads them: a second copy of the model in
        memory) are let go once that model holds them, whoever keeps this object. Taken once: a second take raises."""
        if self._taken:
            raise RuntimeError(f"{self.path}: its weights were given to the model built from it; read the file again "
                               f"(find_command_checkpoint) to build another")
        contents, self._taken = self.checkpoint, True
        self.checkpoint = {key: value for key, value in contents.items() if _plain(value)}
        return contents


def _plain(value) -> bool:
    """Whether ``value`` holds no tensor: strings, numbers, booleans and None, in dicts, lists and tuples."""
    if isinstance(value, dict):
        return all(_plain(key) and _plain(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


def find_command_checkpoint(path: str | Path, command: str) -> FoundCheckpoint | None:
    """The checkpoint of a `lomar COMMAND` run that ``path`` names (a file, whatever its suffix, or a run folder's
    best.pt / last.pt), read once; None if not one."""
    from lomar.checkpoints.io import safe_load  # torch: not at import, for the commands' argument checks

    path = Path(path)
    # a best.pt that is unreadable or another command's is passed over for last.pt
    for candidate in [path] if path.is_file() else run_checkpoints(path):
        try:
            checkpoint = safe_load(candidate, mmap=True)
        except (OSError, ValueError, RuntimeError):
            continue
        if run_command(checkpoint) == command:
            return FoundCheckpoint(candidate, checkpoint)
    return None


def is_probe_file(path: str | Path) -> bool:
    """Whether ``path`` is a file `lomar linprobe --save` wrote (a probe on its frozen encoder), which the evaluations
    of the training commands do not score."""
    from lomar.checkpoints.io import safe_load  # torch: read only to name what a refused file is

    try:
        return Path(path).is_file() and safe_load(path, mmap=True).get("format") == LINPROBE_FORMAT
    except (OSError, ValueError, RuntimeError, AttributeError):  # unreadable, or not a dict: not one
        return False


def classifier_pool(checkpoint: dict, state: dict) -> str:
    """How a classifier checkpoint (a head in ``state``, its weights) pools its tokens: as it saved (`lomar finetune
    --global-pool`), else 'avg' where it holds fc_norm (the averaging head's norm), else 'cls'."""
    return checkpoint.get("global_pool") or ("avg" if "fc_norm.weight" in state else "cls")


def trained_precision(checkpoint: dict) -> str | None:
    """The precision a training run's ``checkpoint`` was trained (and evaluated) in: its --precision, or where that was
    auto, the precision auto chose on its machine (recorded beside its step); None where it records neither (an older
    lomar's, a classifier converted from the original code, an original one). A finetune checkpoint's settings are
    its "settings", or "args" in a lomar's that saved its command line's namespace (an original checkpoint's "args"
    are its own code's, not a lomar run's)."""
    keys = ("settings", "args") if checkpoint.get("format") == FINETUNE_FORMAT else ("settings",)
    run = next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), dict)), {})
    return checkpoint.get("precision") if run.get("precision", "auto") == "auto" else run.get("precision")
