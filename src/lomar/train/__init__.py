"""Training: settings and configs, the one run lifecycle every task runs in (pretraining, finetuning, detection,
segmentation), schedules, DDP/FSDP.

Where each idea lives:

- the tasks, each a :class:`~lomar.train.task.Task` and its config: :mod:`.pretrain` (:mod:`.config`),
  :mod:`.finetune`, :mod:`.detect`, :mod:`.segment` (each with its ``*_config``); the checks across settings the
  configs make (pretrain's data and methods, every task's ``--eval-only``, the warm-up): :mod:`.config_checks`;
- the lifecycle that runs them: :mod:`.lifecycle` (``run``: the loop, the optimizer step, checkpoints), the Task
  interface :mod:`.task`, the batches epoch after epoch :mod:`.epoch_stream`, what the loop checks: a loss or weights
  gone non-finite :mod:`.divergence`, the files skipped :mod:`.skipped_files`; ``--eval-only``'s scoring
  :mod:`.eval_only`; what a Task being built knows of its resume :mod:`.task_resume`;
- the run folder: :mod:`.run_state` (clean, checkpoint, resume from it), :mod:`.run_lock`, :mod:`.run_resume` (which
  checkpoint a resume reads), :mod:`.run_end` (a resume at the run's end), :mod:`.run_logs`, :mod:`.run_lines` (what
  a run prints at its start and end), :mod:`.rng`;
- settings, each declared once in :mod:`.settings`: its flags :mod:`.setting_flags`, the names typed
  :mod:`.setting_names`, a command's settings and their resolution :mod:`.task_config` (``TaskConfig``, which each
  task's config extends), what a resume may change :mod:`.settings_resume`, an encoder's settings
  :mod:`.encoder_settings`;
- the step's machinery: :mod:`.schedule`, :mod:`.precision`, :mod:`.runtime` (allocator, optimizer kernel, compiler,
  threads), :mod:`.distributed`, :mod:`.fsdp`, :mod:`.preemption`, :mod:`.monitor`.
"""
