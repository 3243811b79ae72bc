"""A training run's stop handlers (lomar.train.preemption.StopFlag)."""

import os
import signal
import time

from lomar.train.preemption import StopFlag


def _sent(flag: StopFlag, sent: int) -> StopFlag:
    """``flag`` with its handlers installed, ``sent`` sent to this process and handled, and the handlers given back."""
    try:
        flag.install()
        os.kill(os.getpid(), sent)
        time.sleep(0.05)
    finally:
        flag.restore()
    return flag


def test_a_run_leaves_a_ctrl_c_its_parent_ignores_ignored():
    """A shell starts a background job with SIGINT ignored, so that a Ctrl-C meant for the foreground spares it: a
    training run in such a job takes SIGTERM to save and stop, and leaves Ctrl-C ignored, as every command does."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    flag = StopFlag()
    try:
        flag.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == flag._handle
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert flag.signal is None
    finally:
        flag.restore()
        signal.signal(signal.SIGINT, before)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_run_takes_ctrl_c_to_save_and_stop():
    flag = StopFlag()
    before = signal.getsignal(signal.SIGINT)
    try:
        flag.install()
        assert signal.getsignal(signal.SIGINT) == flag._handle
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert flag.signal == signal.SIGINT
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_is_answered_at_once_with_what_the_run_does(capfd):
    """The step, save and figures take seconds to minutes (14 s at 448 px on 2 CPU cores): a silent terminal invites a
    second Ctrl-C, the one that stops without the checkpoint, so the first is answered at once."""
    _sent(StopFlag(command="pretrain"), signal.SIGINT)
    assert capfd.readouterr().err == ("lomar pretrain: Ctrl-C: saving a checkpoint at the end of this step, then "
                                      "stopping (Ctrl-C again stops at once, without it)\n")


def test_a_ctrl_c_whose_stderr_is_gone_still_stops_the_run_with_its_checkpoint():
    """`lomar pretrain ... 2>&1 | tee log`: the Ctrl-C ends tee too, and an error writing the line to a pipe without
    a reader would be raised from the handler inside whatever the step is doing, failing the run without its save."""
    read, write = os.pipe()
    os.close(read)
    saved, flag = os.dup(2), StopFlag(command="pretrain")
    try:
        os.dup2(write, 2)
        flag.install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write)
        flag.restore()
    assert flag.signal == signal.SIGINT


def test_the_ctrl_c_line_is_the_first_process_of_a_machines_and_not_a_sigterms(monkeypatch, capfd):
    """torchrun hands a terminal's Ctrl-C to every process of the machine: one line, not one per process; a scheduler's
    SIGTERM gets none (the stop line says why the run stopped)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, sent in (("1", signal.SIGINT), ("0", signal.SIGTERM)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert _sent(StopFlag(command="pretrain"), sent).signal == sent
    assert capfd.readouterr().err == ""


def test_a_ctrl_c_after_the_training_is_done_is_answered_with_what_the_run_still_does(tmp_path, image_dir, monkeypatch,
                                                                                     capfd):
    """Past the last step there is no step to end and nothing stops: the run finishes its last checkpoint, evaluation
    and export, the same Ctrl-C's line says so."""
    from helpers import pretrain  # the tests' own helpers, as test_engine takes them
    from lomar.train import lifecycle

    evaluate_end = lifecycle.evaluate_end

    def interrupted(run):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return evaluate_end(run)

    monkeypatch.setattr(lifecycle, "evaluate_end", interrupted)
    assert pretrain("--data", str(image_dir), "--out", str(tmp_path / "run"), "--max-steps", "1") == 0
    assert ("lomar pretrain: Ctrl-C: the training is done; finishing the run's last checkpoint, evaluation and files "
            "(Ctrl-C again stops at once, without them)\n") in capfd.readouterr().err
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


def test_a_ctrl_c_under_torchrun_says_when_torchrun_would_kill_the_run_before_its_checkpoint(monkeypatch, capfd):
    """A terminal's Ctrl-C reaches torchrun, which passes it on and kills its processes 30 s later (its
    --shutdown-timeout): a step of about a minute lost the checkpoint the line promised (2 gloo processes, checked).
    The line says so where the run's own step and save take that long, and only there."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)

    def said(steps, save, torchrun=True, grace=None, evaluation=None) -> str:
        for name, value in (("TORCHELASTIC_RUN_ID", "run" if torchrun else None),
                            ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", grace)):
            monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
        flag = StopFlag(command="pretrain")
        flag.steps.extend(steps)
        flag.save_s, flag.evaluating = save, evaluation is not None
        flag.evaluations.extend([evaluation] if evaluation else [])  # the intervals of the steps after an evaluation
        _sent(flag, signal.SIGINT)
        return capfd.readouterr().err

    promise = ("lomar pretrain: Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops "
               "at once, without it)")
    assert said([20.0, 58.2, 40.0], 6.4) == (
        f"{promise}; but torchrun kills its processes 30 s after a Ctrl-C (its --shutdown-timeout's default) and a "
        f"step and a save take about 1m5s here: unless it was launched with a --shutdown-timeout over 65, the "
        f"checkpoint may be lost\n")
    assert said([58.2], 6.4, grace="45") == (
        f"{promise}; but torchrun kills its processes 45 s after a Ctrl-C (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and a step "
        f"and a save take about 1m5s here: unless it was launched with a --shutdown-timeout over 65, the checkpoint "
        f"may be lost\n")
    assert said([2.0], 6.4, evaluation=88.6) == (
        "lomar pretrain: Ctrl-C: saving a checkpoint at the end of this evaluation, then stopping (Ctrl-C again stops "
        "at once, without it); but torchrun kills its processes 30 s after a Ctrl-C (its --shutdown-timeout's default) "
        "and an evaluation and a save take about 1m35s here: unless it was launched with a --shutdown-timeout over 95, "
        "the checkpoint may be lost\n")
    assert said([58.2], 6.4, grace="300") == said([1.5], 6.4) == said([58.2], 6.4, torchrun=False) == promise + "\n"
    from torch.distributed.launcher.api import LaunchConfig

    monkeypatch.delitem(LaunchConfig.__dataclass_fields__, "shutdown_timeout")  # a torch before the option
    assert said([58.2], 6.4, grace="300") == (
        f"{promise}; but torchrun kills its processes 30 s after a Ctrl-C (fixed in this torch release) and a step "
        f"and a save take about 1m5s here: the checkpoint may be lost (this torch's torchrun has no "
        f"--shutdown-timeout)\n")


def test_a_ctrl_c_under_torchrun_in_the_first_step_or_evaluation_says_it_cannot_tell_yet(monkeypatch, capfd):
    """The run's first step (its loader's start-up, a compile) and its first evaluation have no earlier one to time,
    and a compile's first step can outlast torchrun's wait: the line says it cannot tell yet, or once the time so far
    passes the wait, that it does."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)

    def said(so_far: float, steps=(), evaluation: bool = False) -> str:
        flag = StopFlag(command="finetune")
        flag.steps.extend(steps)
        flag.save_s, flag.evaluating = 0.2, evaluation
        try:
            flag.install()
            flag.mark -= so_far  # the step (or, after the step before it, the evaluation) began so_far s ago
            flag.after_work = evaluation  # as the step before an evaluation leaves it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        finally:
            flag.restore()
        return capfd.readouterr().err

    promise = "lomar finetune: Ctrl-C: saving a checkpoint at the end of this {}, then stopping (Ctrl-C again stops " \
              "at once, without it)"
    wait = "; but torchrun kills its processes 30 s after a Ctrl-C (its --shutdown-timeout's default)"
    cannot = "cannot be told yet: unless it was launched with a --shutdown-timeout over the time they take, the " \
             "checkpoint may be lost\n"
    assert said(4.0) == (f"{promise.format('step')}{wait}, and how long the run's first step (4s so far) and a save "
                         f"take {cannot}")
    assert said(40.0) == f"{promise.format('step')}{wait} and a step and a save take over 40s here: unless it was " \
                         f"launched with a --shutdown-timeout over 41, the checkpoint may be lost\n"
    assert said(2.0, [0.5], evaluation=True) == (
        f"{promise.format('evaluation')}{wait}, and how long the run's first evaluation (2s so far) and a save take "
        f"{cannot}")
    assert said(2.0, [0.5]) == promise.format("step") + "\n"  # a step timed, and this one short of the wait
