"""Checkpoints and exports: the files that hold a model's weights, and the safe writing and reading every file lomar
writes goes through.

Where each idea lives:

- writing and reading any file safely (atomic writes, weights-only loads): :mod:`.io`; a writer's own temporary
  file or folder beside what it writes: :mod:`.own_names`; the names of a run or export
  folder's files: :mod:`.file_names`; what a checkpoint says it is (its format, the command that wrote it):
  :mod:`.kinds`; a folder's lock: :mod:`.file_lock`;
- reading every format (one reader per format, detected once): :mod:`.formats` (its
  :func:`~lomar.checkpoints.formats.load_model` gives any checkpoint's model), the readers' shared pieces
  :mod:`.reader`, BEiT's readers :mod:`.formats_beit`, ``lomar detect``'s and ``lomar segment``'s
  :mod:`.formats_dense`, the original code's :mod:`.original`, their key maps
  :mod:`.keys` and :mod:`.keys_beit`, timm's ViT layouts lomar's keys lack :mod:`.timm_layout`, a sharded ``--fsdp``
  folder :mod:`.sharded`;
- writing an encoder for downstream use (safetensors + config.json): :mod:`.export` (BEiT's: :mod:`.export_beit`;
  the two files swapped in together: :mod:`.export_write`, :mod:`.export_leftovers`); what ``lomar export`` and
  ``lomar load-original`` take of a model and our checkpoint of one: :mod:`.convert`.
"""
