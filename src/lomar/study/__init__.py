"""``lomar study``: grids of pretraining cells and their evaluations as one resumable job.

The study drives the ordinary commands (``lomar pretrain``, ``knn``, ``linprobe``, ``finetune``)
through their command-line interfaces, so every cell is an ordinary run folder.
"""

from lomar.study.spec import Budget, StudySpec, load_spec, parse_spec

__all__ = ["Budget", "StudySpec", "load_spec", "parse_spec"]
