"""A toy run in two forked processes (gloo): each rank's random stream resumed, its batch-norm statistics the saved
ones, a rank with nothing to learn still joining the step, and a signal to one rank during an evaluation or the main
rank's start stopping both right after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_run import ToyConfig, ToyTask, _losses, run_two_ranks

from helpers import free_port
from lomar.checkpoints.io import safe_load
from lomar.train.lifecycle import run


class Dropping(ToyTask):
    """Dropout in the model: every step draws from the global torch stream of its rank."""

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        self.model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))
        self.train_loader.generator = torch.Generator()  # as every task's: a new iterator draws from it, not the stream


def _ddp_run(rank: int, world: int, port: int, out: str, max_steps: int, resume: bool) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    config = ToyConfig(out=out, max_steps=max_steps, resume="auto" if resume else None, accum_steps=1)
    code = run(config, Dropping)
    os._exit(code)  # skip the interpreter's teardown, which gloo's threads can abort (lomar.cli.app.run)


@pytest.mark.slow
def test_a_resumed_ddp_run_continues_every_ranks_own_random_stream(tmp_path):
    import torch.multiprocessing as mp

    def launch(out, max_steps, resume=False):
        # forked: neither process imports torch, lomar and this module afresh, as spawned ones did (3-4 s a launch)
        mp.start_processes(_ddp_run, args=(2, free_port(), str(out), max_steps, resume), nprocs=2,
                           start_method="fork")
        return safe_load(out / "last.pt")

    straight = launch(tmp_path / "straight", 6)
    launch(tmp_path / "resumed", 3)
    resumed = launch(tmp_path / "resumed", 6, resume=True)
    assert len(resumed["rng_ranks"]) == 2 and not torch.equal(resumed["rng_ranks"][0]["torch"],
                                                              resumed["rng_ranks"][1]["torch"])
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


class EmptyOnRankOne(ToyTask):
    """Rank 1's second batch has nothing to learn from (as when all its images are unreadable)."""

    calls = 0

    def loss(self, batch):
        self.calls += 1
        if torch.distributed.get_rank() == 1 and self.calls == 2:
            return None
        return super().loss(batch)


class BatchNormed(ToyTask):
    """A BatchNorm before the regression: each rank's statistics move with its own batches."""

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        self.model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
        self.out = Path(config.out)

    def evaluate(self):
        self.model.eval()
        torch.save(self.model[0].running_mean, self.out / f"mean{torch.distributed.get_rank()}.pt")
        scores = super().evaluate()
        self.model.train()
        return scores


@pytest.mark.slow
def test_every_ddp_rank_evaluates_with_the_batch_norm_statistics_it_saves(tmp_path):
    """DDP gives the ranks rank 0's buffers before a training forward only: rank 1 scored its share with the
    statistics of its own last batch, neither the saved model's nor rank 0's (segment on CPU: 10 % of its pixels
    predicted otherwise than by the checkpoint)."""
    run_two_ranks(BatchNormed, tmp_path, "a rank left the other waiting", epochs=1)
    saved = safe_load(tmp_path / "last.pt")["model"]["0.running_mean"]
    assert torch.equal(torch.load(tmp_path / "mean0.pt", weights_only=True), saved)
    assert torch.equal(torch.load(tmp_path / "mean1.pt", weights_only=True), saved)


@pytest.mark.slow
def test_a_ddp_rank_with_nothing_to_learn_joins_the_step_with_an_idle_loss(tmp_path):
    # Its backward, weighted 0, is what lets the other rank's all-reduce finish: without it the run hangs.
    run_two_ranks(EmptyOnRankOne, tmp_path, "a rank without a loss left the other waiting in the all-reduce",
                  max_steps=3)
    assert safe_load(tmp_path / "last.pt")["step"] == 3 and len(_losses(tmp_path)) == 3


class SignalledOnRank1InAnEvaluation(ToyTask):
    """Evaluated every 2 steps; rank 1 alone gets SIGUSR1 during step 2's evaluation (a scheduler's signal to one
    process)."""

    eval_steps = 2

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        self.rank = info.rank

    def evaluate(self):
        if self.rank == 1 and self.progress.step == 2 and not self.finished:
            import signal

            self.finished = True
            signal.raise_signal(signal.SIGUSR1)
        return super().evaluate()


@pytest.mark.slow
def test_a_signal_to_one_rank_during_an_evaluation_stops_every_rank_right_after_it(tmp_path):
    run_two_ranks(SignalledOnRank1InAnEvaluation, tmp_path, "a rank left the other waiting after the evaluation")
    state = safe_load(tmp_path / "last.pt")
    assert (state["step"], state["evaluated_step"]) == (2, 2) and len(_losses(tmp_path)) == 2


class SignalledInBeginOnMain(ToyTask):
    """The main rank gets SIGUSR1 while it draws the start's figure (begin, the main rank's alone), the other rank
    waiting for it."""

    def begin(self):
        import signal

        signal.raise_signal(signal.SIGUSR1)


@pytest.mark.slow
def test_a_signal_to_the_main_rank_during_its_start_stops_every_rank_before_the_first_step(tmp_path):
    run_two_ranks(SignalledInBeginOnMain, tmp_path, "a rank left the other waiting after the start")
    assert safe_load(tmp_path / "last.pt")["step"] == 0 and _losses(tmp_path) == []
