"""BEiT: blockwise masking and visual-token targets from a frozen tokenizer
(:class:`lomar.models.beit_pretrain.BEiTPretrain`); with ``--windows N``, Table 5's BEiT + windows.

The target comes from ``--tokenizer`` (the DALL-E dVAE encoder or a k-means file). Without one,
:func:`prepare` -- an explicit step the pretraining command runs before building -- fits the
built-in k-means tokenizer (:mod:`lomar.tokenizers.kmeans`) on a seeded sample of the training
crops, vocabulary ``min(8192, patches / 4)``, saves it as ``OUT/tokenizer.safetensors`` and names
it in the config, so a resumed run reuses it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from lomar.checkpoints.export_beit import export_beit_encoder
from lomar.checkpoints.file_names import FITTED_TOKENIZER
from lomar.data.folder import build_pretrain_dataset
from lomar.data.shard_members import read_ahead
from lomar.data.shards import TarShardDataset, is_shard_pattern, shard_paths
from lomar.errors import first_on_machine
from lomar.lr_schedule import lr_at_whole_steps
from lomar.methods.base import Method, check_windows, plan_kwargs, plan_masker
from lomar.models.beit import BEiTConfig
from lomar.models.beit_pretrain import BEiTPretrain, tokenizer_view
from lomar.models.masking import grid_size
from lomar.tokenizers import KMeansTokenizer, fit_kmeans_tokenizer, load_tokenizer, tokenizer_format
from lomar.tokenizers.kmeans import FORMAT as KMEANS_FORMAT
from lomar.tokenizers.kmeans import kmeans_settings
from lomar.viz.tokens import token_figure

__all__ = ["METHOD", "RECIPE", "prepare", "fit_on_training_images", "layer_scale_init", "resume_settings",
           "run_record", "kept_digest", "resume_refusal", "not_trained_with", "same_tokenizer", "tokenizer_for",
           "outside_windows", "FIT_IMAGES", "MAX_VOCAB"]

FIT_IMAGES = 64  # sample of training crops the built-in tokenizer is fitted on
MAX_VOCAB = 8192  # BEiT's vocabulary
KMEANS_PATCH = 8  # pixels per token on the tokenizer's view (the dVAE's stride)

# BEiT-base's pretraining recipe (BEIT_SPEC §4: the published ImageNet-1k command of
# beit/README.md and run_beit_pretraining.py). The lr is absolute, not scaled by the batch (1.5e-3 at
# 2048 images), so blr is unused; layer_scale_init None = by model size (layer_scale_init below).
RECIPE = dict(epochs=800, betas=(0.9, 0.999), blr=1.5e-4, lr=1.5e-3, warmup_epochs=10, min_lr=1e-5, weight_decay=0.05,
              clip_grad=3.0, crop_scale=(0.08, 1.0), color_jitter=0.4, layer_scale_init=None)
RECIPE_SOURCE = "BEiT's pretraining recipe (BEIT_SPEC §4: beit/README.md ImageNet-1k command, run_beit_pretraining.py)"
LARGE_WIDTH = 1024  # ViT-L's width: BEiT starts layer scale at 1e-5 from there (README), 0.1 below


def layer_scale_init(embed_dim: int) -> float:
    """BEiT's layer-scale start by model size: 0.1 for ViT-B and smaller, 1e-5 for ViT-L and wider."""
    return 1e-5 if embed_dim >= LARGE_WIDTH else 0.1


def validate(config, grid) -> None:
    check_windows(config, grid, config.mask_ratio)
    if config.knn_every:
        raise ValueError("--knn-every is not available for --method beit yet; drop it and run "
                         "`lomar knn` on the exported encoder")


def _sample_views(config, view_size: int, count: int, skipped: list[str] | None = None) -> torch.Tensor:
    """(n, 3, view, view) in [0, 1]: epoch-0 crops of a seeded sample drawn across the training images, the same
    whichever process draws them; ``skipped`` gets the unreadable files passed over."""
    dataset = build_pretrain_dataset(config.data, config.img_size, config.seed, config.crop_scale,
                                     color_jitter=config.color_jitter)
    if isinstance(dataset, TarShardDataset):
        source = dataset.spread(count)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed)).tolist()
        source = (dataset[(i, 0)] for i in order)
    images = []
    for item in source:
        if item["image"] is not None:
            images.append(item["image"])
        elif skipped is not None:
            skipped.append(str(item.get("path")))
        if len(images) == count:
            break
    if not images:
        raise ValueError("no readable training image to fit the k-means tokenizer on; check --data")
    return tokenizer_view(torch.stack(images), view_size)


def _process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _share_centroids(centroids: torch.Tensor | None) -> torch.Tensor:
    """Rank 0's centroids (vocab, dim), sent to every process (``None`` on the others): each fitting its own, on
    another machine's CPU, could round a tie another way and train against other targets than the saved ones."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    shape = torch.tensor(centroids.shape if centroids is not None else (0, 0), dtype=torch.int64, device=device)
    dist.broadcast(shape, src=0)
    sent = centroids.to(device) if centroids is not None else torch.empty(*shape.tolist(), device=device)
    dist.broadcast(sent, src=0)
    return sent.cpu()


def fit_on_training_images(config, grid: tuple[int, int], count: int = FIT_IMAGES):
    """A k-means tokenizer for the run's patch grid, fitted on ``count`` training crops (under torchrun by the
    first process, and sent to the others)."""
    view = grid[0] * KMEANS_PATCH
    if _process_group() and torch.distributed.get_rank() != 0:
        if config.data and is_shard_pattern(config.data):  # the run counts them next: read while the first draws
            read_ahead(shard_paths(config.data))
        return KMeansTokenizer(_share_centroids(None), patch=KMEANS_PATCH, input_size=view)
    skipped: list[str] = []
    images = _sample_views(config, view, count, skipped)
    patches = images.shape[0] * grid[0] * grid[1]
    vocab = max(2, min(MAX_VOCAB, patches // 4))
    if first_on_machine():  # WORLD_SIZE set without a process group: every process fits, one a machine says so
        unusable = f"; {len(skipped)} unusable image(s) skipped, e.g. {skipped[0]}" if skipped else ""
        print(f"lomar pretrain: no --tokenizer: fitting the built-in k-means tokenizer (vocabulary {vocab} = min(8192, "
              f"patches/4), {images.shape[0]} training crops of {config.img_size} px, which the tokenizer reads at "
              f"{view} px{unusable}); it is not the paper's dVAE",
              flush=True)
    tokenizer = fit_kmeans_tokenizer(images, vocab_size=vocab, patch=KMEANS_PATCH, seed=config.seed, input_size=view)
    if _process_group():
        _share_centroids(tokenizer.centroids)
    return tokenizer


def prepare(config, grid) -> dict:
    """Without ``config.tokenizer``: fit one, save it as OUT/tokenizer.safetensors (main process) and
    set ``config.tokenizer``; -> ``{"tokenizer": ...}`` for :func:`build`, so that no process reads
    the file before the main one has written it."""
    if config.tokenizer:
        return {}
    tokenizer = fit_on_training_images(config, grid)
    path = Path(config.out) / FITTED_TOKENIZER
    if int(os.environ.get("RANK", "0")) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
        print(f"lomar pretrain: tokenizer saved to {path}", flush=True)
    config.tokenizer = str(path.absolute())
    return {"tokenizer": tokenizer}


def not_trained_with(name: str, digest: str, kept: str, run: str, then: str, recorded: str | None = None) -> str | None:
    """The refusal of a tokenizer (``name``: how to name it, e.g. "--tokenizer FILE"; ``digest``: its tensors') other
    than the one ``run`` (e.g. "the run being resumed (CKPT)") trained with, whose digest is ``kept`` (its file:
    ``recorded``, where another); ``then``: what it would change, and the fix. None when it is that tokenizer."""
    if digest == kept:
        return None
    trained = f"{run} trained with" + (f", {recorded}" if recorded else "")
    return f"{name} (tensors' sha256 {digest[:12]}) is not the tokenizer {trained} ({kept[:12]}): {then}"


def same_tokenizer(given: str, recorded: str, kept: str | None, source: str) -> str:
    """Check that ``given``, a --tokenizer other than the file ``recorded`` by the run being resumed (from ``source``),
    holds the same tokenizer (a moved file, or one `lomar tokenizer convert` rewrote): the digest of its tensors is
    ``kept``, the one the run's checkpoint keeps, else (None) the recorded file's. -> the note to print; ValueError
    naming both otherwise."""
    def digest(path: str, what: str) -> str:
        try:
            return load_tokenizer(path).digest()
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"{what}: {exc}") from None

    if kept is None and not Path(recorded).is_file():
        raise ValueError(f"--tokenizer {given} differs from {recorded} in the run being resumed ({source}), which is "
                         f"gone, and the run kept no digest to check it against; restore {recorded}, or start a new "
                         f"run with another --out")
    kept = kept or digest(recorded, "the run's recorded tokenizer")
    if refusal := not_trained_with(f"--tokenizer {given}", digest(given, "--tokenizer"), kept,
                                   f"the run being resumed ({source})", f"its targets would change mid-run; pass "
                                   f"--tokenizer {recorded} (or a copy, or its conversion), or start a new run with "
                                   f"another --out", recorded):
        raise ValueError(refusal)
    return f"--tokenizer {given} holds the tokenizer the run recorded as {recorded} (the same tensors, sha256 " \
           f"{kept[:12]}): the run reads it from there"


def resume_settings(saved: dict, source: str, checkpoint: dict | None, explicit: dict) -> str | None:
    """The tokenizer a resumed run reads (:attr:`Method.resume_settings`): its fitted one where the run folder now
    is, or a ``--tokenizer`` given again that holds the same tokenizer (:func:`same_tokenizer`, against the digest
    the run's ``checkpoint`` keeps; None: no checkpoint)."""
    if not saved.get("tokenizer"):
        return None
    # The fitted tokenizer lives in the run's folder, recorded by its absolute path: a run folder moved since reads
    # it where the checkpoint now is, not what is at the old place (gone, or another run's there since); the
    # checkpoint's tokenizer digest still checks that it is the one the run trained with.
    recorded, beside = Path(saved["tokenizer"]), Path(source).parent / FITTED_TOKENIZER
    if recorded.name == FITTED_TOKENIZER and beside.is_file():
        saved["tokenizer"] = str(beside.absolute())
    if not (given := explicit.get("tokenizer")) or given == saved["tokenizer"]:
        return None
    note = same_tokenizer(given, saved["tokenizer"], kept_digest(checkpoint or {}), source)
    saved["tokenizer"] = given
    return note


def run_record(model: BEiTPretrain) -> dict:
    """:attr:`Method.run_record`: the digest of the tokenizer's tensors. The settings name its file by path only, and a
    file replaced in place keeps that path: only the digest shows that the targets would change."""
    return {_DIGEST: model.tokenizer.digest()}


_DIGEST = "tokenizer_digest"  # run_record's entry, in the checkpoint's top level


def kept_digest(checkpoint: dict) -> str | None:
    """The digest of the tokenizer a BEiT run's ``checkpoint`` (or its metadata) trained with, as :func:`run_record`
    keeps it; None in runs saved before it was kept."""
    return checkpoint.get(_DIGEST)


def resume_refusal(config, record: dict, checkpoint: dict) -> str | None:
    """:attr:`Method.resume_refusal`: the tokenizer loaded (its digest in ``record``) is not the one the run trained
    with (the digest ``checkpoint`` keeps), as --tokenizer's and lomar visualize's refusals say it
    (:func:`not_trained_with`)."""
    if (saved := kept_digest(checkpoint)) is None:
        return None
    return not_trained_with(f"--resume: the tokenizer {config.tokenizer}", kept_digest(record), saved,
                            "this run", "its targets would change mid-run; restore that file, or start a new run "
                                        "with another --out")


def tokenizer_for(config, grid, tokenizer=None):
    """``config.tokenizer`` loaded (or the one :func:`prepare` fitted), its view set to grid × stride px
    (both kinds are convolutional / per patch, so any multiple of the stride works)."""
    if tokenizer is None:
        if not config.tokenizer:
            raise ValueError("--method beit needs a tokenizer: pass --tokenizer FILE, or let `lomar pretrain` "
                             "fit the built-in one")
        try:
            tokenizer = load_tokenizer(config.tokenizer)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"--tokenizer: {exc}") from None
    tokenizer.input_size = grid[0] * tokenizer.stride
    if hasattr(tokenizer, "config") and hasattr(tokenizer.config, "input_size"):  # the dVAE checks its own
        tokenizer.config = replace(tokenizer.config, input_size=tokenizer.input_size)
    return tokenizer


def outside_windows(config, patch_size: int) -> str | None:
    """:attr:`Method.outside_windows` of a windowed BEiT run with ``patch_size`` px patches: None where each target
    reads its own patch's pixels alone, which is a k-means tokenizer of the model's patch size: its view is then the
    crop itself (grid x stride px, no resize), un-normalised and clamped pixel by pixel, and each patch normalised
    over its own pixels before its nearest centroid names it. A dVAE's convolutions read around each patch; a
    k-means tokenizer of another patch size reads a view resized from the crop, whose antialiased bicubic kernel
    blends neighbouring patches."""
    if config.tokenizer:
        try:
            # headers only: this runs with the settings, before a k-means file's centroids or a dVAE's weights load
            kmeans = tokenizer_format(config.tokenizer) == KMEANS_FORMAT
            stride = kmeans_settings(config.tokenizer)["patch"] if kmeans else None
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"--tokenizer: {exc}") from None
        named = f"the k-means tokenizer {config.tokenizer}"
    else:
        stride, named = KMEANS_PATCH, "the built-in k-means tokenizer"
    if stride == patch_size:
        return None
    reads = (f"--tokenizer {config.tokenizer}, which is no k-means tokenizer (a DALL-E dVAE's convolutions read "
             f"pixels around each patch)"
             if stride is None else f"{named}, whose {stride} px patches read the crop resized for the model's "
                                    f"{patch_size} px patches, a resize that blends neighbouring patches")
    return (f"labels its targets with {reads}: blank pixels outside the windows would change the targets inside "
            f"them (a k-means tokenizer of {patch_size} px patches, `lomar tokenizer fit --patch {patch_size}`, "
            f"labels each patch from its own pixels)")


def build(config, vit, tokenizer=None) -> BEiTPretrain:
    tokenizer = tokenizer_for(config, grid_size(vit.img_size, vit.patch_size), tokenizer)
    init = config.layer_scale_init if config.layer_scale_init is not None else layer_scale_init(vit.embed_dim)
    beit = replace(BEiTConfig.from_vit(vit, tokenizer.vocab_size), init_values=init)
    return BEiTPretrain(beit, tokenizer, config.window_size, config.windows, config.mask_ratio)


METHOD = Method(
    "beit", default_mask_ratio=None, default_pos="none", default_windows=0,
    validate=validate, prepare=prepare, build=build, masker=plan_masker, forward_kwargs=plan_kwargs,
    export=lambda model, out, metadata: export_beit_encoder(model.beit, out, metadata=metadata),
    figure=token_figure, step_metrics={"masked_token_accuracy": lambda output: output.accuracy},
    loss_name="masked-token cross-entropy",
    recipe=RECIPE, recipe_source=RECIPE_SOURCE, lr_schedule=lr_at_whole_steps, reads=("tokenizer", "layer_scale_init"),
    resume_settings=resume_settings, run_record=run_record, resume_refusal=resume_refusal,
    layer_scale_by_width=layer_scale_init, outside_windows=outside_windows)
