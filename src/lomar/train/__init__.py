"""Training: settings and configs, the one run lifecycle every task runs in (pretraining, finetuning, detection,
segmentation), schedules, DDP/FSDP."""
