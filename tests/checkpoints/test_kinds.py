"""lomar.checkpoints.kinds: what a checkpoint says it is and the precision its run trained in."""

from lomar.checkpoints.kinds import FINETUNE_FORMAT, trained_precision


def test_trained_precision_reads_a_finetune_checkpoint_that_keeps_its_settings_as_args():
    """A `lomar finetune` last.pt of a lomar that saved its command line's namespace as "args" (format
    lomar-finetune-1, no "settings", no recorded precision) trained in the --precision it names there; its auto
    chose by a rule of its own (bf16 on CUDA only), which the file does not record."""
    older = {"format": FINETUNE_FORMAT, "step": 7, "args": {"precision": "bf16", "batch_size": 8}}
    assert trained_precision(older) == "bf16"
    assert trained_precision({**older, "args": {"precision": "fp32"}}) == "fp32"
    assert trained_precision({**older, "args": {"precision": "auto"}}) is None
    assert trained_precision({**older, "args": {}}) is None
    # "settings", where a checkpoint holds them, are the run's; a recorded choice of auto beside the step counts
    assert trained_precision({**older, "settings": {"precision": "fp16"}}) == "fp16"
    assert trained_precision({**older, "settings": {"precision": "auto"}, "precision": "bf16"}) == "bf16"
    # an original checkpoint's "args" are its code's namespace, not a lomar run's settings
    assert trained_precision({"model": {}, "args": {"precision": "bf16"}}) is None
