"""Training infrastructure: configuration, the pretraining engine, finetuning, schedules."""
