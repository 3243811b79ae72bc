"""The names of the files lomar writes into a run folder (``--out`` of pretrain, finetune, detect, segment) and an
export folder, for every command that writes or reads one; torch-free, for the commands' argument checks."""

from __future__ import annotations

__all__ = ["LAST", "BEST", "LAST_POINTER", "METRICS", "RUN_CONFIG", "KNN_LOG", "RUN_ENCODER", "LOSS_CURVE",
           "FITTED_TOKENIZER", "ENCODER_WEIGHTS", "CONFIG_NAME"]

# a run folder
LAST = "last.pt"  # the newest checkpoint, written beside its checkpoint-N.pt
BEST = "best.pt"  # the checkpoint of the best evaluation so far (finetune, detect, segment)
LAST_POINTER = "last.json"  # a sharded run's pointer to its newest checkpoint-N.dcp folder
METRICS = "metrics.jsonl"  # one JSON record a logged step or evaluation
RUN_CONFIG = "config.yaml"  # the run's settings, as --config reads them back
KNN_LOG = "knn.jsonl"  # pretrain's --knn-every scores
RUN_ENCODER = "encoder.safetensors"  # pretrain's encoder at the end of the run, beside CONFIG_NAME
LOSS_CURVE = "loss.png"
FITTED_TOKENIZER = "tokenizer.safetensors"  # pretrain --method beit's k-means tokenizer, without --tokenizer

# an export folder (lomar export; timm's and Hugging Face's names)
ENCODER_WEIGHTS = "model.safetensors"
CONFIG_NAME = "config.json"
