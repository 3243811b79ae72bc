"""The pretraining engine: schedule, decay groups, sampler, exact resume, atomic checkpoints,
non-finite loss, bad data, figures. Tiny models on tiny images, CPU, in-process."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, losses, pretrain, write_images
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.samplers import EpochSampler
from lomar.lr_schedule import lr_at, lr_at_whole_steps
from lomar.models import MAE, LoMaR
from lomar.models.vit import model_config
from lomar.train.run_state import checkpoints_to_prune
from lomar.train.schedule import param_groups, schedule_span, warmup_warning


def test_lr_schedule_warmup_then_cosine():
    total, warmup = schedule_span(steps_per_epoch=10, epochs=10, warmup_epochs=2)
    kw = dict(total_steps=total, warmup_steps=warmup, base_lr=1.0, min_lr=0.1)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(10, **kw) == pytest.approx(0.5)  # half-way through warm-up
    assert lr_at(20, **kw) == pytest.approx(1.0)  # peak
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(1000, **kw) == pytest.approx(0.1)  # past the end: stays at min_lr
    values = [lr_at(s, **kw) for s in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_a_schedule_over_steps_keeps_the_recipes_warmup_share():
    """400 epochs with 40 of warm-up, laid over 20 steps: 2 warm-up steps, the peak at step 2."""
    total, warmup = schedule_span(steps_per_epoch=7, epochs=400, warmup_epochs=40, schedule_steps=20)
    assert (total, warmup) == (20, 2)
    lrs = [lr_at(s, total, warmup, base_lr=1.0) for s in range(20)]
    assert lrs[2] == max(lrs) == 1.0 and lrs[1] == 0.5 and lrs[-1] < 0.01


def test_a_warmup_in_steps_is_laid_over_the_schedule_steps_or_the_epochs_and_cut_to_them():
    """detect's and segment's --warmup-steps: the schedule spans --schedule-steps if given, else --epochs' steps."""
    from types import SimpleNamespace

    from lomar.train.schedule import run_span

    def span(**settings):
        return run_span(SimpleNamespace(**{"epochs": 3, "schedule_steps": None, **settings}), steps_per_epoch=100)

    assert span(warmup_steps=50, schedule_steps=1000) == (1000.0, 50.0)
    assert span(warmup_steps=50) == (300.0, 50.0)
    assert span(warmup_steps=5000, schedule_steps=1000) == (1000.0, 1000.0)
    assert span(warmup_steps=None, warmup_epochs=1) == (300.0, 100.0)


def test_beits_schedule_is_its_linspace_warmup_then_the_same_cosine():
    """BEiT's cosine_scheduler: linspace(0, base, W) over the first W steps (the peak at step W - 1),
    then final + (base - final)(1 + cos(pi i / (T - W))) / 2 for i = step - W."""
    total, warmup, base, final = 50, 8, 1.5e-3, 1e-5
    expected = np.concatenate([np.linspace(0, base, warmup),
                               final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total - warmup)
                                                                          / (total - warmup)))])
    ours = [lr_at_whole_steps(s, total, warmup, base, final) for s in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)
    assert ours[warmup - 1] == base and lr_at(warmup - 1, total, warmup, base, final) < base  # MAE's peaks at W
    assert [lr_at_whole_steps(s, 10, 1, 1.0) for s in range(2)] == [0.0, 1.0]  # linspace(0, base, 1) is [0]


def test_the_warmup_warning_follows_the_runs_schedule():
    assert "peaks at 0.6 instead of 1" in warmup_warning(4, 100, 5, 1.0)  # steps 0-3 of MAE's: 0.6 at step 3
    assert warmup_warning(5, 100, 5, 1.0) is None  # a run that ends with its warm-up is not warned
    assert warmup_warning(8, 100, 8.4, 1.0, schedule=lr_at_whole_steps) is None  # 8 whole steps: the peak at 7
    assert warmup_warning(5, 100, 5, 1.0, schedule=lr_at_whole_steps) is None  # BEiT's peaks at step 4
    assert "peaks at 0.75" in warmup_warning(4, 100, 5, 1.0, schedule=lr_at_whole_steps)


def test_the_warmup_warning_names_the_setting_that_made_the_warm_up():
    from types import SimpleNamespace

    detect = SimpleNamespace(warmup_steps=250, schedule_steps=None)  # detect, segment: no --warmup-epochs
    assert warmup_warning(10, 1000, 250, 1.0, config=detect).endswith("lower --warmup-steps to at most --max-steps")
    given = SimpleNamespace(schedule_steps=400)
    assert "lower --schedule-steps" in warmup_warning(2, 400, 40, 1.0, config=given)
    assert "pass --max-steps 41 or more" in warmup_warning(2, 400, 40.5, 1.0, config=given, resumed=True)
    assert "drop --epochs" in warmup_warning(2, 400, 40, 1.0, config=SimpleNamespace(schedule_steps=None))
    # epochs and warmup_epochs from a --config file: the fix named flags the user had not given
    in_file = SimpleNamespace(schedule_steps=None, in_file={"epochs": "my.yaml", "warmup_epochs": "my.yaml"})
    assert warmup_warning(2, 400, 40, 1.0, config=in_file).endswith(
        "drop epochs from my.yaml to lay the schedule over --max-steps, or lower warmup_epochs in my.yaml")


def test_a_warm_up_cut_to_the_schedule_is_said_with_both_lengths():
    """run_span cuts --warmup-steps to the schedule (1500 in a 200-step run): the whole run warms up, never decays."""
    from types import SimpleNamespace

    segment = SimpleNamespace(warmup_steps=1500, schedule_steps=None)
    said = warmup_warning(200, 200, 200, 1.0, config=segment)  # it ends with its (cut) warm-up: 0.995 at step 199
    assert said.startswith("--warmup-steps 1500 is longer than this run's 200-step lr schedule") and \
        "peaks at 0.995 instead of 1" in said and said.endswith("lower --warmup-steps below 200 (e.g. 20)")
    assert warmup_warning(1, 1, 1, 1.0, config=segment).endswith("below 1 (e.g. 0)")  # 0: no warm-up, a valid fix
    # --max-steps 50 in a 1000-step schedule: the fix must end the warm-up before the run stops, not the schedule
    longer = SimpleNamespace(warmup_steps=1500, schedule_steps=1000)
    said = warmup_warning(50, 1000, 1000, 1.0, config=longer)
    assert said.endswith("never decays, and this run stops at step 50; lower --warmup-steps below 50 (e.g. 5)"), said
    assert warmup_warning(50, 1000, 5, 1.0, config=SimpleNamespace(warmup_steps=5, schedule_steps=1000)) is None
    assert warmup_warning(200, 200, 200, 1.0, config=SimpleNamespace(warmup_steps=200)) is None  # as asked
    assert warmup_warning(200, 200, 200, 1.0, config=segment, resumed=True) is None  # told at its start


def test_decay_groups_follow_the_original_rule():
    model = LoMaR(model_config("vit_tiny_patch16", depth=1, img_size=112), 7, 1)
    no_decay, decay = param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"mask_token", "encoder.cls_token", "encoder.blocks.0.attn.rpe.table"} <= decayed
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in skipped)
    assert "encoder.blocks.0.norm1.weight" in skipped and "head.bias" in skipped
    assert len(decayed) + len(skipped) == len(names)


def test_sampler_ranks_together_form_the_single_process_batches():
    size, batch = 37, 3
    single = list(EpochSampler(size, seed=5))
    ranks = [list(EpochSampler(size, seed=5, rank=r, world_size=2)) for r in range(2)]
    for b in range(len(ranks[0]) // batch):
        together = {k for r in ranks for k in r[b * batch:(b + 1) * batch]}
        assert together == set(single[b * 2 * batch:(b + 1) * 2 * batch])
    assert not set(ranks[0]) & set(ranks[1])
    assert all(epoch == 0 for _, epoch in single)
    sampler = EpochSampler(size, seed=5)
    sampler.set_epoch(3)
    epoch3 = list(sampler)
    assert epoch3 != single and {e for _, e in epoch3} == {3}
    sampler.set_epoch(3, skip=6)
    assert list(sampler) == epoch3[6:] and len(sampler) == size - 6


def test_one_sampler_pass_runs_through_several_epochs_as_separate_passes_would():
    size, rank, world = 37, 1, 2
    sampler = EpochSampler(size, seed=5, rank=rank, world_size=world)

    def epoch(e, skip=0, first=None):
        sampler.set_epoch(e)
        return list(sampler)[skip:first]

    sampler.set_epoch(2, skip=4, epochs=3, per_epoch=15)  # 18 items a rank an epoch, the first 15 of each
    assert list(sampler) == epoch(2, 4, 15) + epoch(3, 0, 15) + epoch(4, 0, 15)
    sampler.set_epoch(2, skip=4, epochs=3, per_epoch=15)
    assert len(sampler) == 3 * 15 - 4
    for skip, epochs, per_epoch in [(0, 1, 19), (0, 1, 0), (16, 1, 15), (-1, 1, None), (0, 0, None)]:
        with pytest.raises(ValueError, match="does not fit an epoch of 18 items"):
            sampler.set_epoch(0, skip=skip, epochs=epochs, per_epoch=per_epoch)


@pytest.fixture(scope="module")
def image_shard(image_dir, tmp_path_factory) -> Path:
    """The same 16 images as one WebDataset-style tar shard."""
    import tarfile

    path = tmp_path_factory.mktemp("shards") / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for image in sorted(image_dir.iterdir()):
            tar.add(image, arcname=image.name)
    return path


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_exact_resume_matches_an_uninterrupted_run(tmp_path, image_dir, image_shard, kind):
    # 16 images, batch 4: the resume at step 2 is in the middle of epoch 0
    data = str(image_dir if kind == "folder" else image_shard)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pretrain("--data", data, "--out", str(straight), "--max-steps", "4") == 0
    assert pretrain("--data", data, "--out", str(resumed), "--max-steps", "2") == 0
    assert safe_load(resumed / "last.pt")["step"] == 2
    assert pretrain("--data", data, "--out", str(resumed), "--max-steps", "4", "--resume", "auto") == 0
    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert a["step"] == b["step"] == 4
    assert b.get("shard_seed_root") == ("common" if kind == "tar" else None)  # seeded by names under its folder
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-7)
    assert losses(straight) == losses(resumed)
    assert len(losses(resumed)) == 4


@pytest.fixture(scope="module")
def shard_folders(image_dir, tmp_path_factory) -> Path:
    """The same 16 images as two shards, in SETS/a and SETS/b: returns SETS."""
    import tarfile

    root, images = tmp_path_factory.mktemp("sets"), sorted(image_dir.iterdir())
    for part, name in enumerate("ab"):
        (root / name).mkdir()
        with tarfile.open(root / name / "shard.tar", "w") as tar:
            for image in images[part * 8:part * 8 + 8]:
                tar.add(image, arcname=image.name)
    return root


def test_shards_in_sub_folders_copied_elsewhere_resume_unwarned(tmp_path, shard_folders, capsys):
    """The listing a checkpoint keeps named shards under their pattern's folder, SETS/* for 'SETS/*/shard.tar', no
    folder at all: the same shards copied elsewhere, which resume exactly, were said to have changed."""
    moved = tmp_path / "moved"
    shutil.copytree(shard_folders, moved)
    assert pretrain("--data", f"{shard_folders}/*/shard.tar", "--out", str(tmp_path / "run"), "--max-steps", "1") == 0
    capsys.readouterr()
    assert pretrain("--data", f"{moved}/*/shard.tar", "--out", str(tmp_path / "run"), "--max-steps", "2",
                    "--resume", "auto") == 0
    assert "has changed" not in capsys.readouterr().err and len(losses(tmp_path / "run")) == 2


def test_a_shard_run_saved_seeding_by_path_resumes_so(tmp_path, shard_folders, monkeypatch, capsys):
    """Runs saved before samples were seeded by their names under the shards' folder go on seeding by path (and
    listing the shards under their pattern's folder, as they did)."""
    from lomar.data.shards import TarShardDataset

    made = TarShardDataset.__init__

    def by_path(self, *args, **kwargs):  # the older lomar's seeding: its checkpoints hold no shard_seed_root
        made(self, *args, **kwargs)
        self.seed_root = ""

    monkeypatch.setattr(TarShardDataset, "__init__", by_path)
    straight, resumed, data = tmp_path / "straight", tmp_path / "resumed", f"{shard_folders}/*/shard.tar"
    assert pretrain("--data", data, "--out", str(straight), "--max-steps", "4") == 0
    assert pretrain("--data", data, "--out", str(resumed), "--max-steps", "2") == 0
    assert "shard_seed_root" not in safe_load(resumed / "last.pt")
    monkeypatch.setattr(TarShardDataset, "__init__", made)
    capsys.readouterr()
    assert pretrain("--out", str(resumed), "--max-steps", "4", "--resume", "auto") == 0
    assert "has changed" not in capsys.readouterr().err
    assert losses(resumed) == losses(straight)
    assert "shard_seed_root" not in safe_load(resumed / "last.pt")  # and its later resumes alike


def test_a_folder_run_resumed_on_shards_seeds_them_by_name_under_their_folder(tmp_path, image_dir, image_shard):
    """A checkpoint without shard_seed_root is a shard run's saved before it, or a run that read no shards: one of a
    folder, resumed on shards (--data may change), seeded them by path ever after, so moved they trained otherwise."""
    out = str(tmp_path / "run")
    assert pretrain("--data", str(image_dir), "--out", out, "--max-steps", "1") == 0
    assert pretrain("--data", str(image_shard), "--out", out, "--max-steps", "2", "--resume", "auto") == 0
    assert safe_load(tmp_path / "run" / "last.pt")["shard_seed_root"] == "common"


def test_a_mid_epoch_resume_on_tar_shards_keeps_the_worker_count(tmp_path, image_shard, capsys):
    """Tar shards are dealt to the loader's workers: resumed in the middle of an epoch with another --workers, the
    run went on with another stream of samples than the uninterrupted run's, without a word."""
    out = tmp_path / "run"
    assert pretrain("--data", str(image_shard), "--out", str(out), "--max-steps", "2") == 0
    capsys.readouterr()
    assert pretrain("--out", str(out), "--max-steps", "4", "--resume", "auto", "--workers", "2") == 2
    assert capsys.readouterr().err.strip().endswith(
        "--workers 2: this run reads tar shards, dealt to 1 loader worker(s) when it stopped in the middle of epoch 0; "
        "another count may repeat or miss samples of that epoch: resume with --workers 1")
    assert safe_load(out / "last.pt")["step"] == 2 and len(losses(out)) == 2
    assert pretrain("--out", str(out), "--max-steps", "4", "--resume", "auto", "--workers", "1") == 0  # 1 reader too


def test_a_min_lr_above_the_peak_lr_that_blr_gives_is_refused(tmp_path, image_dir, capsys):
    """--min-lr above --lr is refused, but with the lr from --blr (1e-3 x 4 / 256 here) nothing compared them: the
    'cosine' rose from the peak to --min-lr 0.5 and the run diverged (loss 1.9 -> 127 in 6 steps)."""
    i = TINY.index("--lr")
    flags = [*TINY[:i], *TINY[i + 2:], "--data", str(image_dir), "--blr", "1e-3"]
    assert main(["pretrain", *flags, "--out", str(tmp_path / "a"), "--min-lr", "0.5", "--max-steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lomar pretrain: error: --min-lr 0.5 is above the peak lr 1.56e-05 (--blr 0.001 x effective batch / 256): "
        "the lr would rise to it; lower --min-lr or raise --blr")
    assert not (tmp_path / "a").exists()
    assert main(["pretrain", *flags, "--out", str(tmp_path / "b"), "--min-lr", "1e-6", "--max-steps", "2"]) == 0


def test_checkpoint_contents_load_weights_only(tmp_path, image_dir):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "1") == 0
    ckpt = safe_load(out / "last.pt")  # weights_only=True: nothing but tensors and plain data
    assert {"model", "optimizer", "scaler", "step", "epoch", "batches_done", "config", "rng"} <= set(ckpt)
    assert ckpt["config"]["window_size"] == 3 and isinstance(ckpt["config"], dict)
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert (out / "encoder.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "reconstruction.png").stat().st_size > 1000
    assert list(out.glob("checkpoint-*.pt"))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "epoch", "loss", "lr", "img_s"} <= set(record)


def test_keep_last_prunes_old_checkpoints(tmp_path, image_dir):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "3", "--save-every", "1",
                    "--keep-last", "2") == 0
    assert len(list(out.glob("checkpoint-*.pt"))) == 2


def test_pruning_goes_by_step_number_and_spares_other_files():
    names = ["checkpoint-999998.pt", "checkpoint-999999.pt", "checkpoint-1000000.pt", "checkpoint-best.pt"]
    pruned = checkpoints_to_prune([Path(n) for n in names], keep=2)
    assert [p.name for p in pruned] == ["checkpoint-999998.pt"]


def test_failed_save_leaves_the_previous_last_pt_intact(tmp_path, image_dir, monkeypatch):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "2") == 0
    before = (out / "last.pt").read_bytes()

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("lomar.checkpoints.io.torch.save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "3", "--resume", "auto")
    assert (out / "last.pt").read_bytes() == before
    assert safe_load(out / "last.pt")["step"] == 2
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_non_finite_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path, image_dir, monkeypatch,
                                                                        capsys):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "2") == 0
    capsys.readouterr()
    real = LoMaR.forward_windows

    def exploding(self, *args):
        loss, pred = real(self, *args)
        return loss * float("nan"), pred

    monkeypatch.setattr(LoMaR, "forward_windows", exploding)
    code = pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "4", "--resume", "auto")
    err = capsys.readouterr().err
    assert code == 1
    assert "step 3" in err and "nan" in err and "last.pt" in err
    assert safe_load(out / "last.pt")["step"] == 2


def test_bad_files_are_skipped_and_counted(tmp_path, capsys):
    data = write_images(tmp_path / "data", 20)
    (data / "empty.png").write_bytes(b"")
    (data / "garbage.jpg").write_bytes(b"not an image at all")
    assert pretrain("--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "2 unusable image(s) skipped, e.g. " in out
    assert f"{data / 'empty.png'} (cannot decode image {data / 'empty.png'}: the file is empty (0 bytes))" in out


def test_too_many_bad_files_is_a_clear_error(tmp_path, capsys):
    data = write_images(tmp_path / "data", 16)
    for i in range(8):
        (data / f"broken{i}.png").write_bytes(b"\x89PNG truncated")
    code = pretrain("--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2")
    err = capsys.readouterr().err
    assert code == 1
    assert "could not be used" in err and "broken" in err


def test_mae_method_trains(tmp_path, image_dir):
    out = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--method", "mae", "--decoder-embed-dim", "16",
                    "--decoder-depth", "1", "--decoder-num-heads", "2", "--max-steps", "2", "--windows", "0") == 0
    assert all(math.isfinite(v) for v in losses(out))
    assert (out / "reconstruction.png").is_file()


@pytest.mark.parametrize("method", ["lomar", "mae"])
def test_reconstruction_figure_is_written(tmp_path, method):
    from lomar.viz.reconstruction import reconstruct, reconstruction_figure

    if method == "lomar":
        model = LoMaR(model_config("vit_tiny_patch8", depth=1, img_size=48), 3, 2)
    else:
        model = MAE(model_config("vit_tiny_patch8", depth=1, img_size=48, pos="abs"), 16, 1, 2)
    images = torch.randn(2, 3, 48, 48)
    parts = reconstruct(model, images, seed=0)
    for key in ("original", "masked", "reconstruction"):
        assert parts[key].shape == images.shape
        assert 0 <= float(parts[key].min()) and float(parts[key].max()) <= 1
    path = reconstruction_figure(model, images, tmp_path / "fig.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_reconstruction_figure_uses_a_given_plan(tmp_path):
    from lomar.models.masking import sample_plan
    from lomar.viz.reconstruction import reconstruct, reconstruction_figure

    model = LoMaR(model_config("vit_tiny_patch8", depth=1, img_size=48), 3, 2)
    images = torch.randn(2, 3, 48, 48)
    plan = sample_plan(2, (6, 6), 3, 2, 0.8, generator=torch.Generator().manual_seed(7))
    parts = reconstruct(model, images, seed=123, plan=plan)
    assert torch.equal(parts["plan"].top_left, plan.top_left) and torch.equal(parts["plan"].mask, plan.mask)
    assert reconstruction_figure(model, images, tmp_path / "fig.png", plan=plan).is_file()


def test_an_accumulation_window_without_readable_images_is_skipped(tmp_path, image_dir, monkeypatch, capsys):
    import lomar.data.collate
    from lomar.data.collate import BadDataTracker, collate_pretrain

    calls = []

    def collate_some_unreadable(items):  # the 3rd and 4th batches (the 2nd optimizer step) fail to decode
        calls.append(1)
        if len(calls) in (3, 4):
            items = [dict(item, image=None) for item in items]
        return collate_pretrain(items)

    monkeypatch.setattr(lomar.data.collate, "collate_pretrain", collate_some_unreadable)  # what --decode full uses
    monkeypatch.setattr(BadDataTracker, "check", lambda self, threshold=0.1: None)  # 50 % bad is the point
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "1", "--accum-steps", "2") == 0
    assert len(losses(out)) == 1 and math.isfinite(losses(out)[0])  # one real step, the empty one skipped
    assert "8 unusable image(s) skipped" in capsys.readouterr().out


def test_knn_every_epoch(tmp_path, image_dir, capsys):
    root = tmp_path / "knn"
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(root / split / label, 3, size=(32, 32))
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--knn-every", "1", "--knn-data", str(root)) == 0
    records = [json.loads(line) for line in (out / "knn.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(0 <= r["knn_top1"] <= 1 for r in records)
    assert "k-NN top-1" in capsys.readouterr().out
    assert pretrain("--data", str(image_dir), "--out", str(tmp_path / "r2"), "--knn-every", "1") == 2
    assert "--knn-data" in capsys.readouterr().err
    # the reverse: a k-NN set with no schedule would be read by nothing; a resumed run keeps what it saved
    assert pretrain("--data", str(image_dir), "--out", str(tmp_path / "r3"), "--knn-data", str(root)) == 2
    assert capsys.readouterr().err.strip().endswith("--knn-data is used only with --knn-every N (a k-NN evaluation "
                                                    "every N epochs); add --knn-every 1, or drop --knn-data")
    assert not (tmp_path / "r3").exists()


def test_the_knn_loader_workers_leave_a_group_sigterm_to_the_run(tmp_path, image_dir, monkeypatch):
    """A scheduler's SIGTERM reaches every process of the group, the k-NN scoring's loader workers too: they
    leave it to the run (which checkpoints at its next step) instead of dying of it, which failed the run."""
    import os
    import signal

    from torch.utils.data import get_worker_info

    import lomar.eval.features as features

    root = tmp_path / "knn"
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(root / split / label, 3, size=(32, 32))
    item = features.LabelledImageFolder.__getitem__

    def signalled(self, index):  # in a worker, as a signal to the process group reaches it
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return item(self, index)

    monkeypatch.setattr(features.LabelledImageFolder, "__getitem__", signalled)
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--knn-every", "1", "--knn-data", str(root),
                    "--workers", "1", "--epochs", "1") == 0
    assert [json.loads(line)["epoch"] for line in (out / "knn.jsonl").read_text().splitlines()] == [1]
