"""``lomar pretrain``'s Task: the method's model and masked-image data, unreadable images, figures, k-NN, export.

Every sample's crop and masking is seeded by (seed, epoch, index), so a resumed run continues exactly (the rest is
:mod:`lomar.train.lifecycle`'s). With ``--fsdp`` the model is sharded (``lomar.train.fsdp``) instead of wrapped in
DDP, checkpoints are sharded folders, and the main process consolidates the last one to ``last.pt`` at the end.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from lomar.checkpoints.convert import method_metadata
from lomar.checkpoints.export import export_encoder
from lomar.checkpoints.file_names import CONFIG_NAME, KNN_LOG, LAST, LOSS_CURVE, METRICS, RUN_CONFIG, RUN_ENCODER
from lomar.checkpoints.io import safe_load
from lomar.checkpoints.kinds import PRETRAIN_FORMAT
from lomar.checkpoints.sharded import consolidate
from lomar.data.device_decode import decode_dataset
from lomar.data.folder import build_pretrain_dataset
from lomar.data.samplers import EpochSampler
from lomar.data.shards import is_shard_pattern
from lomar.errors import FULL_DISK, UNWRITABLE, UsageError, said_by_first_on_machine
from lomar.eval.knn import KnnMonitor
from lomar.methods import get_method
from lomar.methods.base import method_runtime
from lomar.models.spec import model_spec
from lomar.train.config import PretrainConfig, build_model, prepare_method
from lomar.train.distributed import DistInfo
from lomar.train.fsdp import shard_model
from lomar.train.lifecycle import run
from lomar.train.precision import run_precision
from lomar.train.preemption import ignore_stop_signals
from lomar.train.process_count import processes_of
from lomar.train.run_lines import say_notes
from lomar.train.run_resume import listing_change, listing_record
from lomar.train.run_state import newest_state
from lomar.train.schedule import param_groups
from lomar.train.task import Task
from lomar.values import command_line, counted
from lomar.viz.curves import loss_curve
from lomar.viz.reconstruction import reconstruction_snapshot, settle_latest, snapshot_path

__all__ = ["PretrainTask", "train"]


class PretrainTask(Task):
    name = "pretrain"
    eval_log = KNN_LOG
    skips_warned = False  # the loader reports unreadable files in the batch; the run's count warns of them
    outputs = (RUN_CONFIG, KNN_LOG, RUN_ENCODER, CONFIG_NAME, "reconstruction*.png", LOSS_CURVE)
    final_outputs = (RUN_ENCODER, CONFIG_NAME)
    curves = (LOSS_CURVE,)

    def __init__(self, config: PretrainConfig, info: DistInfo, device: torch.device):
        self.config, self.info, self.device = config, info, device
        self.crop_size = config.img_size  # an image under it on its shorter side is upscaled: the run counts them
        self.figure_failures: set[str] = set()  # the lines said of figures that could not be drawn
        self.betas = tuple(config.betas)  # the method's recipe unless set
        self.model = build_model(config, prepare_method(config)).to(device)
        self.patch = self.model.config.patch_size
        self.runtime = method_runtime(config, self.patch)
        self.step_metrics = tuple(self.runtime.method.step_metrics)
        self.lr_schedule = self.lr_schedule_of(config)
        self.sharded, self.spec = config.fsdp, model_spec(self.model)  # the spec: of the class, before sharding
        self.run_record = self.runtime.method.run_record(self.model)  # a resume checks it (BEiT: the tokenizer)
        if config.fsdp:  # before the optimizer: it must hold the sharded parameters
            precision = run_precision(config, device)  # a resumed run's auto: the one it trained in
            shard_model(self.model, "bf16" if precision == "bf16" else "fp32")
        # Every process lists --data (a folder, a list, every shard's headers) and finds the same files left out or
        # shards damaged: the first of each machine says it. The reference dataset draws the figures; the one the
        # loader reads follows --decode.
        with said_by_first_on_machine():
            self.base_dataset = build_pretrain_dataset(config.data, config.img_size, config.seed, config.crop_scale,
                                                       masker=self.runtime.masker, color_jitter=config.color_jitter,
                                                       rank=info.rank, world_size=info.world_size)
            share = None if config.cpu_decode_share == "auto" else config.cpu_decode_share
            self.decoding = decode_dataset(self.base_dataset, config.decode, self.patch, config.window_size,
                                           config.windows, device, share, config.workers, config.gpu_decoder)
            self.dataset = self.decoding.dataset
            self.iterable = isinstance(self.dataset, IterableDataset)
            self.size = self.dataset.count_samples() if self.iterable else len(self.dataset)
        self.per_rank = self.size // info.world_size
        sampler = None if self.iterable else EpochSampler(self.size, config.seed, info.rank, info.world_size)
        self.train_loader = DataLoader(
            self.dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
            collate_fn=self.decoding.collate, drop_last=True, pin_memory=device.type == "cuda",
            persistent_workers=config.workers > 0, worker_init_fn=ignore_stop_signals if config.workers > 0 else None,
            # Its own generator: each new iterator (one more after a resume) then leaves the global RNG,
            # which drop path draws from, untouched.
            generator=torch.Generator().manual_seed(config.seed))
        self.knn = None
        if config.knn_every:  # on every process: each extracts its share of the k-NN features
            # its workers, forked for each scoring, leave a stop signal sent to the process group to the run
            # the main process says the k-NN images the resize upscales, every process's counted (as knn says them)
            say = functools.partial(_say_knn_note, config) if info.is_main else None
            self.knn = KnnMonitor(config.knn_data, img_size=config.img_size, workers=min(config.workers, 4),
                                  worker_init_fn=ignore_stop_signals, decode=config.knn_decode, rank=info.rank,
                                  world_size=info.world_size, say=say)

    # ---- the lifecycle's hooks -----------------------------------------------------------
    @classmethod
    def lr_schedule_of(cls, config: PretrainConfig):
        return get_method(config.method).lr_schedule  # BEiT's whole-step warm-up; None: MAE's and LoMaR's

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.config.weight_decay)

    def batches_per_epoch(self) -> int:
        if not self.size:  # every shard or file unreadable: the batch size is not what to change
            raise ValueError(f"--data {self.config.data} holds no image that could be read (see the skipped files "
                             f"above); fix the data")
        if self.per_rank < self.config.batch_size * self.config.accum_steps:
            raise ValueError(f"{counted(self.size, 'image')} cannot fill one step of batch {self.config.batch_size} "
                             f"x accum {self.config.accum_steps} x {self.info.world_size} process(es); lower "
                             "--batch-size" + (" or --accum-steps" if self.config.accum_steps > 1 else ""))
        return self.per_rank // self.config.batch_size

    def set_epoch(self, epoch: int, skip_batches: int, epochs: int = 1, batches: int | None = None) -> int:
        if not self.iterable:
            return super().set_epoch(epoch, skip_batches, epochs, batches)
        bs = self.config.batch_size
        self.dataset.set_epoch(epoch, skip=skip_batches * bs, batch_size=bs,  # shards: one epoch per iterator
                               batches=self.batches_per_epoch() if batches is None else batches)
        return 1

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        c = self.config
        preset = {"demo": "preset demo (a small model for a few CPU minutes; --preset paper: the paper's recipe)",
                  "paper": "preset paper (the original recipe; --preset demo: a small model for a few CPU minutes)"}
        data = f"{counted(self.size, 'image')} in {c.data}" if c.data else \
            f"{self.size} crops an epoch of the demo photographs"
        if not c.data and c.resume == "auto" and (c.resume_point is None or c.resume_point.path is None):
            # as documented, but a mistyped --out looks the same: a run meant to go on would start over on the demo
            data = (f"a new run (--resume auto found no checkpoint in {c.out}) on the demo photographs (no --data), "
                    f"{self.size} crops an epoch")
        # what --windows auto chose (the count the settings resolved it to) is a step's cost: said here, not only in
        # config.yaml
        windows = f"{counted(c.windows, 'window')} of {c.window_size}x{c.window_size} patches, " if c.windows else ""
        return (f"{preset.get(c.preset, 'no preset')}; {data}; "
                f"{c.method} {c.model} "
                f"({self.model.config.embed_dim} wide, {counted(self.model.config.depth, 'block')}, {c.img_size} px, "
                f"{windows}{params:.1f}M params)")

    def batches(self):
        return self.decoding.batches(self.train_loader, self.device, self.config.decode_ahead)

    def sources(self, batch: dict) -> list[tuple[str, int, int]]:
        # every decode path's items carry their image's size (lomar.data.transforms.source_size); none when all failed
        sizes = batch["source"].tolist() if "source" in batch else []
        return [(path, height, width) for path, (height, width) in zip(batch["paths"], sizes)]

    def skipped(self, batch: dict) -> list[str]:
        why = batch.get("why", {})  # the size limit, a truncated file: the warning and a run's final error say it
        return [f"{path} ({why[path]})" if path in why else path for path in batch["bad"]]

    def loss(self, batch: dict) -> torch.Tensor | dict[str, torch.Tensor] | None:
        if not batch["images"].numel():  # every image of the batch was unreadable
            return None
        images = batch["images"].to(self.device, non_blocking=True)
        output = self.net(images, **self.runtime.forward_kwargs(batch, self.device))
        if not self.step_metrics:
            return output.loss
        with torch.no_grad():
            metrics = {name: metric(output) for name, metric in self.runtime.method.step_metrics.items()}
        return {"loss": output.loss, **metrics}

    def evaluate(self) -> dict[str, float]:
        """k-NN top-1 on --knn-data every --knn-every epochs and at the end (a collective: every process extracts
        its share of the features, and gets the score)."""
        p, every = self.progress, self.config.knn_every
        if self.knn is None or not (p.final or (p.batches_done == 0 and p.epoch % every == 0)):
            return {}
        return {"knn_top1": self.knn(self.model.encoder, self.device)}

    @classmethod
    def scores_end(cls, config: PretrainConfig) -> bool:
        return bool(config.knn_every)

    def state(self) -> dict:
        # tar shards: samples seeded by their names under the shards' folder, which a resume keeps (absent: by path,
        # as in runs saved before, which go on so)
        seeds = {"shard_seed_root": "common"} if self.iterable and self.dataset.seed_root else {}
        return {"config": self.config.to_dict(), "model_spec": self.spec, "format": PRETRAIN_FORMAT, **self.run_record,
                "data_listing": self.listing, **seeds}

    @functools.cached_property
    def listing(self) -> dict:
        """What a sample index points at (:func:`~lomar.train.run_resume.listing_record`): the files of --data in
        their order, or its tar shards, or the demo photographs (a demo run resumed on a --data trains on other
        images). Read on the first save or resume (1.28M files: 3.5 s on a loaded 2-core machine)."""
        data, base = self.config.data, self.base_dataset
        shards = getattr(base, "shards", None)
        names = map(str, shards) if shards is not None else map(base.paths.text, range(len(base.paths)))
        # shards: under their common folder, which a pattern's folder part ('shards/*/*.tar') is not (a run saved
        # before that folder seeded its samples, seed_root '', listed under the pattern's folder, and goes on so)
        root = (os.path.dirname(base.paths.text(0)) if data is None else  # the demo's: where scikit-image is
                data if os.path.isdir(data) else getattr(base, "seed_root", "") or os.path.dirname(data))
        return listing_record(names, root, self.size)

    def load(self, state: dict) -> None:
        if refusal := self.runtime.method.resume_refusal(self.config, self.run_record, state):
            raise UsageError(refusal)
        # no shard_seed_root: a shard run saved before it, its samples seeded by path, which go on so (a run that read
        # no shards, resumed on them, seeds them as a new run does)
        read = (state.get("config") or {}).get("data")
        if self.iterable and state.get("shard_seed_root") != "common" and read and is_shard_pattern(str(read)):
            self.base_dataset.seed_root = self.dataset.seed_root = ""
        # --data may change on resume; a sample index then points at another file: the run goes on, not exactly
        listed = state.get("data_listing")  # none in runs saved before it was kept
        if listed is not None and self.info.is_main and (
                change := listing_change(listed, self.listing, self.config.data, state)):
            print(f"lomar pretrain: warning: {change}", file=sys.stderr, flush=True)
        # Tar shards are dealt to the loader's workers: another count mid-epoch reads another stream of samples
        was, now = max(1, state.get("config", {}).get("workers") or 0), max(1, self.config.workers)
        if self.iterable and state.get("batches_done") and was != now:
            raise UsageError(f"--workers {self.config.workers}: this run reads tar shards, dealt to {was} loader "
                             f"worker(s) when it stopped in the middle of epoch {state['epoch']}; another count may "
                             f"repeat or miss samples of that epoch: resume with --workers {was}")
        shards_mid_epoch = self.iterable and state.get("batches_done")
        if shards_mid_epoch and (ran := processes_of(state)) not in (None, now := self.info.world_size):
            raise UsageError(f"--resume: this run reads tar shards, dealt to its {ran} process(es) when it stopped in "
                             f"the middle of epoch {state['epoch']}; {now} would repeat or miss samples of that "
                             f"epoch: launch it with {ran} process(es) (torchrun --nproc-per-node {ran})")
        # and a batch at a time, in turn: another --batch-size, its global batch kept, splits them otherwise
        batch, workers = state.get("config", {}).get("batch_size"), self.config.workers
        if shards_mid_epoch and workers > 1 and batch not in (None, self.config.batch_size):
            accum = state["config"].get("accum_steps") or 1
            raise UsageError(f"--batch-size {self.config.batch_size}: this run reads tar shards, dealt to {workers} "
                             f"loader workers a batch at a time, in batches of {batch} when it stopped in the middle "
                             f"of epoch {state['epoch']}; another size may repeat or miss samples of that epoch: "
                             f"resume with --batch-size {batch}" + (f" --accum-steps {accum}" if accum > 1 else ""))
        # at an epoch's start: on another number of processes, the lifecycle's note says so already
        if self.iterable and workers > 1 and batch not in (None, self.config.batch_size) and self.info.is_main and \
                processes_of(state) in (None, self.info.world_size):
            print(f"lomar pretrain: note: --batch-size {self.config.batch_size} (the run's was {batch}), the global "
                  f"batch kept: tar shards are dealt to {workers} loader workers a batch at a time, so each step from "
                  f"epoch {state['epoch']} on reads other samples than it would have; the run goes on as the same run "
                  f"statistically, not bit for bit", file=sys.stderr, flush=True)

    def draws_per_process(self) -> bool:  # each sample's crop and mask are seeded by its index; drop path is not
        return any(getattr(module, "drop_prob", 0) for module in self.model.modules())

    def begin(self) -> None:
        # the untrained model, what the last figure is compared with; on a resume, the figures of the checkpoint it
        # resumes from where a kill or a rewind left none or another step's; sharded: at the end
        if self.progress.step == 0:
            self.figure()
        else:
            self._settle_figures()

    def _settle_figures(self) -> None:
        """The figures of the step the run is at: its reconstruction-STEP.png where a kill between its checkpoint and
        that figure left none; reconstruction.png and loss.png where they show another step, left by a kill between
        the numbered figure and its copy or by a rewind to an earlier checkpoint (whose numbered figure stays).
        Sharded, a step without a figure keeps none (drawing one needs the whole model): reconstruction.png is then
        the latest earlier figure, as the run would show had it gone straight to this step."""
        out = Path(self.config.out)
        if not self.sharded and not snapshot_path(out, self.progress.step).exists():
            self.figure()
            return
        with self._drawing(f"reconstruction.png and {LOSS_CURVE}"):
            if settle_latest(out, self.progress.step):  # loss.png, drawn after that copy: from the log cut back to here
                self.draw_curves(self.config, out)

    def saved(self, path: Path) -> None:
        self.figure()

    def stopped(self, out: Path) -> None:
        self._consolidate(out)

    def finish(self, out: Path) -> None:
        model = self._consolidate(out)
        # a resume at the end finishes a run killed between its last checkpoint and that checkpoint's figures
        self._settle_figures()
        meta = {**method_metadata(model, self.config.method), "step": self.progress.step}  # as `lomar export` writes
        if self.runtime.method.export is not None:
            self.runtime.method.export(model, out, meta)
        else:
            export_encoder(model.encoder, out, weights_name=RUN_ENCODER, metadata=meta)

    def step_info(self) -> dict[str, float]:
        share = self.decoding.share  # --decode gpu: the workers' share of the decoding, as balanced so far
        return {} if share is None else {"cpu_decode_share": round(share.value, 3)}

    def final_line(self) -> str:
        out = Path(self.config.out)
        share = self.decoding.share
        workers = "" if share is None or share.decoded_share is None else (
            f"; the workers decoded {share.decoded_share:.0%} of the photos the device could have decoded "
            f"(--cpu-decode-share {'auto, last ' if share.auto else ''}{share.value:.2f})")
        last = out / LAST
        return (f"encoder {out / RUN_ENCODER}, figures {out}/reconstruction-*.png and {LOSS_CURVE}"
                f"{workers}. Next: {command_line('lomar', 'visualize', last, '--attention')}; "
                f"{command_line('lomar', 'export', last, '--to', 'DIR')}")

    # ---- outputs -------------------------------------------------------------------------
    def _consolidate(self, out: Path):
        """The whole model: a sharded run's last checkpoint gathered into ``last.pt`` (and its figure)."""
        if not self.sharded:
            return self.model
        model = build_model(self.config).to(self.device)
        model.load_state_dict(safe_load(consolidate(newest_state(out), out / LAST))["model"])
        self.figure(model)
        return model

    def figure(self, model=None) -> None:
        """reconstruction-STEP.png (+ reconstruction.png, the latest) and loss.png; ``model``: an
        unsharded copy when the run is sharded (FSDP)."""
        if self.sharded and model is None:
            return  # the figure needs the whole model: drawn at the end only
        out, step = Path(self.config.out), self.progress.step
        with self._drawing("the reconstruction figure"):
            reconstruction_snapshot(model or self.model, self.fixed_images(), out, step, seed=self.config.seed,
                                    title=f"{self.config.method} step {step}", draw=self.runtime.method.figure)
            self.draw_curves(self.config, out)

    @contextlib.contextmanager
    def _drawing(self, what: str):
        """Around drawing ``what`` into the run folder: a failure is said in one line, and the run goes on."""
        out = Path(self.config.out)
        try:
            yield
        except Exception as exc:  # a figure must never kill a run, but a run folder that takes no more files
            # (full, read-only) does: its next save would fail the same way, after training on for nothing. Another
            # file's (a font matplotlib cannot read, a full temporary folder) is no reason to stop
            if isinstance(exc, OSError) and exc.errno in (*FULL_DISK, *UNWRITABLE) and exc.filename is not None \
                    and Path(exc.filename).parent == out:
                raise
            said = f"lomar {self.name}: could not draw {what}: {exc}"
            if said not in self.figure_failures:  # a font it cannot read fails every figure: said once
                self.figure_failures.add(said)
                print(said, file=sys.stderr)

    @staticmethod
    def draw_curves(config: PretrainConfig, out: Path) -> None:
        loss_curve(out / METRICS, out / LOSS_CURVE, f"{config.method} training loss",
                   get_method(config.method).loss_name)

    def fixed_images(self) -> torch.Tensor:
        items, data = [], self.base_dataset
        source = iter(data) if self.iterable else (data[(i, 0)] for i in range(len(data)))
        for item in source:
            if item["image"] is not None:
                items.append(item["image"])
            if len(items) == self.config.figure_images:
                break
        if not items:
            raise ValueError(f"none of the {self.size} training images could be read")
        return torch.stack(items).to(self.device)


def _say_knn_note(config: PretrainConfig, line: str) -> None:
    """A --knn-data split's images smaller than the k-NN's resize, as a note (once a study, as finetune's)."""
    say_notes(config, "pretrain", [f"--knn-data {line}"])


def train(config: PretrainConfig) -> int:
    """Run (or resume) a pretraining; returns the process exit code."""
    return run(config, PretrainTask)
