"""What a lomar checkpoint says it is, and which command's run wrote it. Imports no torch: the
commands read it while checking their settings, before any model is built."""

__all__ = ["PRETRAIN_FORMAT", "CLASSIFIER_FORMAT", "FINETUNE_FORMAT", "DETECT_FORMAT", "SEGMENT_TASK", "run_command"]

PRETRAIN_FORMAT = "lomar-pretrain-2"  # 2: `windows` is meant for every method (an MAE run saved 4 unused)
CLASSIFIER_FORMAT = "lomar-classifier-1"
FINETUNE_FORMAT = "lomar-finetune-1"
DETECT_FORMAT = "lomar-detect-1"
SEGMENT_TASK = "segment"  # a `lomar segment` checkpoint says {"task": "segment"} instead of a format

_COMMANDS = {"lomar-pretrain-1": "pretrain", PRETRAIN_FORMAT: "pretrain", FINETUNE_FORMAT: "finetune",
             DETECT_FORMAT: "detect", SEGMENT_TASK: "segment"}


def run_command(checkpoint: dict) -> str | None:
    """The lomar command whose checkpoints are of ``checkpoint``'s kind ('pretrain', 'finetune', 'detect',
    'segment'); None when it does not say (an export, an original checkpoint, an older file)."""
    kind = checkpoint.get("format", checkpoint.get("task"))
    return _COMMANDS.get(kind) if isinstance(kind, str) else None
