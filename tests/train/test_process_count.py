"""A resume on another number of processes: the same run where the global batch (batch x accum x processes) is kept,
a one-line refusal naming the values that keep it where it is not."""

from __future__ import annotations

import json
import shutil

import pytest

from lomar.train.config import PretrainConfig
from lomar.train.process_count import process_change
from lomar.train.settings import ConfigError
from lomar.train.settings_resume import resume_values


def _step_losses(out) -> dict[int, float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_the_refusal_names_the_batch_that_keeps_the_global_batch():
    saved = {"batch_size": 4, "accum_steps": 1}
    said = process_change(saved, 2, saved, 1)
    assert said.startswith("--resume: this run was trained by 2 process(es) and this launch has 1; its global batch "
                           "(4 x accum 1 x 2 = 8)") and "\n" not in said
    assert "keep the global batch with --batch-size 8 or --accum-steps 2 on 1 process(es)" in said
    assert "launch it with 2 (torchrun --nproc-per-node 2" in said
    one = process_change({"batch_size": 4, "accum_steps": 1}, 1, {"batch_size": 4, "accum_steps": 1}, 2)
    assert "keep the global batch with --batch-size 2 on 2 process(es)" in one
    assert one.endswith("launch it as one process, without torchrun, or start a new run with another --out")
    assert "--accum-steps 3 " in process_change({"batch_size": 3, "accum_steps": 2}, 3, {"batch_size": 3,
                                                                                          "accum_steps": 2}, 2)
    assert "keep the global batch" not in process_change(saved, 2, saved, 3)  # 8 over 3: none keeps it, none named
    for kept in ({"batch_size": 8, "accum_steps": 1}, {"batch_size": 4, "accum_steps": 2},
                 {"batch_size": 2, "accum_steps": 4}):
        assert process_change(saved, 2, kept, 1) is None


def test_a_resume_on_another_number_of_processes_takes_a_batch_that_keeps_the_global_batch(monkeypatch):
    saved = {"batch_size": 4, "accum_steps": 1, "max_steps": 3}
    monkeypatch.setenv("WORLD_SIZE", "1")
    values = resume_values(PretrainConfig, saved, "last.pt", {"batch_size": 8}, processes=2)
    assert (values["batch_size"], values["accum_steps"]) == (8, 1)
    values = resume_values(PretrainConfig, saved, "last.pt", {"accum_steps": 2}, processes=2)
    assert (values["batch_size"], values["accum_steps"]) == (4, 2)
    with pytest.raises(ConfigError, match=r"trained by 2 process\(es\) and this launch has 1; .* keep the global "
                                          r"batch with --batch-size 8 or --accum-steps 2 on 1 process"):
        resume_values(PretrainConfig, saved, "last.pt", {}, processes=2)
    with pytest.raises(ConfigError, match=r"has 1; .* keep the global batch with --batch-size 8 on 1 process"):
        resume_values(PretrainConfig, saved, "last.pt", {"batch_size": 6}, processes=2)  # 8 / 6: no --accum-steps
    monkeypatch.setenv("WORLD_SIZE", "2")  # the same number: the global batch is kept by the same values
    assert resume_values(PretrainConfig, saved, "last.pt", {"batch_size": 2, "accum_steps": 2},
                         processes=2)["batch_size"] == 2
    with pytest.raises(ConfigError, match=r"--batch-size 8 differs from 4 in the run being resumed"):
        resume_values(PretrainConfig, saved, "last.pt", {"batch_size": 8}, processes=2)


def _one_step_on_a_shard(tmp_path, image_dir, *args: str) -> tuple:
    """The run folder and checkpoint of a 1-step run (helpers.TINY, ``args``) on one tar shard of ``image_dir``."""
    import tarfile

    from helpers import pretrain
    from lomar.checkpoints.io import safe_load

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for image in sorted(image_dir.iterdir()):
            tar.add(image, arcname=image.name)
    out = tmp_path / "run"
    assert pretrain("--data", str(shard), "--out", str(out), "--max-steps", "1", *args) == 0
    return out, safe_load(out / "last.pt")


@pytest.mark.slow
def test_tar_shards_stopped_mid_epoch_are_not_resumed_on_another_number_of_processes(tmp_path, image_dir, capsys):
    """Tar shards are dealt to the processes: another number mid-epoch would read another stream of samples. The
    checkpoint is made a 2-process one (batch 4) as such a run saves it; one process with batch 8 keeps its global
    batch, and is refused for the shards alone."""
    from helpers import pretrain
    from lomar.checkpoints.io import atomic_save, safe_load

    out, ckpt = _one_step_on_a_shard(tmp_path, image_dir, "--batch-size", "8")
    assert ckpt["batches_done"] == 1  # of the epoch's 2
    ckpt["rng_ranks"], ckpt["config"]["batch_size"] = ckpt["rng_ranks"] * 2, 4
    atomic_save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert pretrain("--out", str(out), "--resume", "auto", "--max-steps", "2", "--batch-size", "8") == 2
    assert capsys.readouterr().err.strip().endswith(
        "--resume: this run reads tar shards, dealt to its 2 process(es) when it stopped in the middle of epoch 0; "
        "1 would repeat or miss samples of that epoch: launch it with 2 process(es) (torchrun --nproc-per-node 2)")
    assert safe_load(out / "last.pt")["step"] == 1


@pytest.mark.slow
def test_tar_shards_stopped_mid_epoch_keep_their_batch_size_where_loader_workers_deal_them(tmp_path, image_dir, capsys):
    """Shards are dealt to the loader's workers a batch at a time: another --batch-size mid-epoch, even on the same
    number of processes with the global batch kept (batch 4 x accum 2 -> 8 x 1), reads other samples in each step and
    repeats or misses some; at an epoch's start it goes on, saying that it is the same run statistically only. The
    checkpoint is made one of 2 workers (their cost left out), as such a run saves it."""
    from helpers import pretrain
    from lomar.checkpoints.io import atomic_save, safe_load

    out, ckpt = _one_step_on_a_shard(tmp_path, image_dir, "--accum-steps", "2")
    assert (ckpt["batches_done"], ckpt["config"]["batch_size"]) == (2, 4)  # of the epoch's 4
    ckpt["config"]["workers"] = 2
    atomic_save(ckpt, out / "last.pt")
    capsys.readouterr()
    resume = ("--out", str(out), "--resume", "auto", "--max-steps", "2", "--workers", "2")
    assert pretrain(*resume, "--batch-size", "8", "--accum-steps", "1") == 2
    assert capsys.readouterr().err.strip().endswith(
        "--batch-size 8: this run reads tar shards, dealt to 2 loader workers a batch at a time, in batches of 4 when "
        "it stopped in the middle of epoch 0; another size may repeat or miss samples of that epoch: resume with "
        "--batch-size 4 --accum-steps 2")
    assert safe_load(out / "last.pt")["step"] == 1
    ckpt["epoch"], ckpt["batches_done"] = 1, 0  # at an epoch's start instead: it goes on, saying it is not exact
    atomic_save(ckpt, out / "last.pt")
    assert pretrain(*resume, "--batch-size", "8", "--accum-steps", "1") == 0
    assert "lomar pretrain: note: --batch-size 8 (the run's was 4), the global batch kept: tar shards are dealt to " \
           "2 loader workers a batch at a time, so each step from epoch 1 on reads other samples than it would have; " \
           "the run goes on as the same run statistically, not bit for bit" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_of_two_processes_goes_on_as_one_with_the_same_global_batch(tmp_path):
    """2 processes x batch 4 stopped at step 3 of 4 (mid-epoch), resumed by one with batch 8, by one with batch 4 x
    accum 2, and by two with batch 2 x accum 2; and back (1 -> 2), one with batch 8 stopped mid-epoch again, after step
    5, resumed by two with batch 4: each step reads the same samples (each seeded by its index), so the losses of steps
    4-6 (the second epoch's first two too) are the uninterrupted 2-process run's, up to the order of sums."""
    from helpers import TINY, as_torchrun, write_images

    data = write_images(tmp_path / "images", 36)  # 4 steps of 8 an epoch on any number of processes

    def pretrain(world: int, out, *args: str) -> str:
        ranks = as_torchrun(["pretrain", *TINY, "--data", str(data), "--out", str(out), *args], world, tmp_path,
                            timeout=240)
        log = "".join(printed + said for _, printed, said in ranks)
        assert [code for code, _, _ in ranks] == [0] * world, log[-3000:]
        return log

    pretrain(2, tmp_path / "straight", "--max-steps", "6")
    straight = _step_losses(tmp_path / "straight")
    pretrain(2, tmp_path / "stopped", "--max-steps", "3")
    for copy in ("accum", "same", "back"):
        shutil.copytree(tmp_path / "stopped", tmp_path / copy)
    for world, out, batch in ((1, tmp_path / "stopped", ["--batch-size", "8"]),
                              (1, tmp_path / "accum", ["--accum-steps", "2"]),
                              (2, tmp_path / "same", ["--batch-size", "2", "--accum-steps", "2"])):
        log = pretrain(world, out, "--resume", "auto", "--max-steps", "6", *batch)
        if world == 1:
            assert "2 → 1 process(es) after step 3, the global batch kept" in log and "same samples" in log, log[-3000:]
        resumed = _step_losses(out)
        assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
        assert [resumed[s] for s in range(1, 4)] == [straight[s] for s in range(1, 4)]  # the 2-process steps
        assert [resumed[s] for s in range(4, 7)] == pytest.approx([straight[s] for s in range(4, 7)], rel=1e-5)
    # and back, 1 -> 2: one process (batch 8) stops in the second epoch, after step 5; two of batch 4 take step 6
    pretrain(1, tmp_path / "back", "--resume", "auto", "--max-steps", "5", "--batch-size", "8")
    log = pretrain(2, tmp_path / "back", "--resume", "auto", "--max-steps", "6", "--batch-size", "4")
    assert "1 → 2 process(es) after step 5, the global batch kept (4 x accum 1 x 2 = 8)" in log, log[-3000:]
    resumed = _step_losses(tmp_path / "back")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in range(4, 7)] == pytest.approx([straight[s] for s in range(4, 7)], rel=1e-5)


@pytest.mark.slow
def test_a_finetune_of_two_processes_goes_on_as_one_saying_it_is_not_bit_for_bit(pretrained, labelled_folder,
                                                                                 tmp_path):
    """Mixup and drop path draw from each process's own stream: the same run statistically, and the start says so."""
    from helpers import as_torchrun

    out = tmp_path / "run"

    def finetune(world: int, *args: str) -> tuple[list[int], str]:
        ranks = as_torchrun(["finetune", "--out", str(out), "--max-steps", "3", *args], world, tmp_path, timeout=240)
        return [code for code, _, _ in ranks], "".join(printed + said for _, printed, said in ranks)

    codes, log = finetune(2, "--pretrained", str(pretrained), "--data", str(labelled_folder), "--img-size", "32",
                          "--batch-size", "2", "--workers", "0", "--threads", "1", "--device", "cpu", "--epochs", "2",
                          "--max-steps", "1")  # step 1 of an epoch's 2 (8 images, 2 x 2 a step)
    assert codes == [0, 0], log[-3000:]
    codes, log = finetune(1, "--resume", "auto")
    assert codes == [2] and "keep the global batch with --batch-size 4 or --accum-steps 2 on 1 process(es)" in log
    codes, log = finetune(1, "--resume", "auto", "--batch-size", "4")
    assert codes == [0], log[-3000:]
    assert "2 → 1 process(es) after step 1, the global batch kept (4 x accum 1 x 1 = 4): each process draws from its " \
           "own random stream (drop path, mixup), so it goes on as the same run statistically, not bit for bit" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_what_the_built_run_checks_of_the_checkpoint():
    """The lifecycle's check (a Python caller's settings skip the resolution's): the run's --accum-steps to convert
    the micro-batches done, and the refusals; finetune's "config" is its model's, its settings "settings"."""
    from lomar.train.process_count import other_processes

    two = {"rng_ranks": [{}, {}], "config": {"batch_size": 4, "accum_steps": 1}}
    assert other_processes(two, 8, 1, 1) == (2, 1)
    assert other_processes(two, 4, 2, 1) == (2, 1)
    assert other_processes(two, 2, 2, 2) == (2, 1)  # the same number, another --accum-steps
    assert other_processes(two, 4, 1, 2) is None
    assert other_processes({"config": two["config"]}, 8, 1, 1) is None  # no count saved
    with pytest.raises(ValueError, match=r"has 1; its global batch \(4 x accum 1 x 2 = 8\).* --batch-size 8 or "):
        other_processes(two, 4, 1, 1)
    tuned = {"rng_ranks": [{}, {}], "config": {"embed_dim": 32}, "settings": {"batch_size": 2, "accum_steps": 2}}
    assert other_processes(tuned, 4, 2, 1) == (2, 2)
