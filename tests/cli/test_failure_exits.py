"""A command that fails or is stopped while it works: OS errors naming the path, a full disk (exit 1), Ctrl-C (130),
SIGTERM and SIGUSR1 outside training (143), a killed loader worker, and torchrun ranks that say a failure once."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from error_checks import _fail_with, _one_error_line

from lomar.cli import app
from lomar.cli.app import main


@pytest.mark.parametrize("exc, code, named", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.pt"), 2, "/data/x.pt does not exist"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/d"), 2, "/data/d is a folder"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/f/x"), 2, "not a folder"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, "permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 2, "read-only"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a/.tmp", None, "/b/x"), 2, "/b/x"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left"),
])
def test_os_errors_name_the_path(exc, code, named, monkeypatch, capsys):
    _fail_with(monkeypatch, exc)
    assert main(["export", "ckpt", "--to", "out"]) == code
    assert named in _one_error_line(capsys.readouterr().err, "export")


def test_full_disk_is_one_line_with_exit_1(monkeypatch, capsys):
    def run(args):
        with open("/dev/full", "w") as handle:
            handle.write("x")

    monkeypatch.setattr("lomar.cli.export.run", run)
    assert main(["export", "ckpt", "--to", "out"]) == 1
    assert "no space left" in _one_error_line(capsys.readouterr().err, "export")


@pytest.mark.parametrize("rank, printed", [(None, True), ("0", True), ("1", False)])
def test_a_failed_save_is_printed_once_across_torchrun_ranks(rank, printed, monkeypatch, capsys):
    from lomar.cli.common import report_run_failure
    from lomar.train.run_state import SaveError

    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert report_run_failure("pretrain", SaveError("no space left on the device to write last.pt")) == 1
    err = capsys.readouterr().err
    assert err == ("lomar pretrain: error: no space left on the device to write last.pt\n" if printed else "")
    assert report_run_failure("pretrain", ValueError("only this rank knows")) == 1  # not a shared failure
    assert capsys.readouterr().err == "lomar pretrain: error: only this rank knows\n"


@pytest.mark.parametrize("command", ["knn", "linprobe"])
@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_knn_and_linprobe_under_torchrun_check_their_flags_first_said_once_a_machine(command, local_rank, tmp,
                                                                                     monkeypatch, capsys):
    # every process meets the same bad flag before any joins the process group (tests/eval/test_knn_shared.py runs
    # them under torchrun): the first process of each machine says it, the others wait for torchrun to stop them
    import time

    from lomar import errors
    from lomar.train import distributed

    waited = []
    monkeypatch.setattr(time, "sleep", waited.append)  # as if the first process had not failed yet
    monkeypatch.setattr(distributed, "init_distributed", lambda *args: pytest.fail("joined before the checks"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert main([command, str(tmp / "ckpt.pt"), "--data", str(tmp / "file"), "--json", str(tmp / "s.json")]) == 2
    assert _one_error_line(capsys.readouterr().err, command) == (
        f"lomar {command}: error: --data {tmp / 'file'} is not a folder; pass an ImageFolder root")
    assert waited == ([errors.FIRST_PROCESS_WAIT] if local_rank == "1" else []) and not (tmp / "s.json").exists()
    if command == "linprobe":  # a protocol's flag, refused before the rest is checked
        waited.clear()
        assert main([command, str(tmp / "ckpt.pt"), "--data", str(tmp / "data"), "--weight-decay", "0.5",
                     "--protocol", "mae"]) == 2
        assert "--weight-decay is for --protocol adamw" in _one_error_line(capsys.readouterr().err, command)
        assert waited == ([errors.FIRST_PROCESS_WAIT] if local_rank == "1" else [])


@pytest.mark.parametrize("local_rank, said", [(None, True), ("0", True), ("1", False)])
def test_interrupt_exits_130(local_rank, said, monkeypatch, capsys):
    # Ctrl-C reaches every process of a torchrun launch: each one printed the line
    if local_rank is not None:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert main(["export", "ckpt", "--to", "out"]) == 130
    assert capsys.readouterr().err == ("lomar export: interrupted\n" if said else "")


@pytest.mark.slow
def test_sigterm_outside_training_cleans_up_and_exits_143(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "digits"
    proc = subprocess.Popen([sys.executable, "-m", "lomar", "compose-digits", "--out", str(out), "--images",
                             "1000000", "--img-size", "32"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".digits.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".digits.tmp-*")), "the composition never started"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.endswith("lomar compose-digits: terminated (SIGTERM)\n"), err
    assert list(tmp_path.iterdir()) == []  # its temporary folder removed, nothing half-written


def test_the_sigterm_handler_is_given_back(monkeypatch):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    _fail_with(monkeypatch, ValueError("any end"))
    with pytest.raises(ValueError):
        main(["export", "ckpt", "--to", "out"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigusr1_outside_training_unwinds_as_sigterm_does(monkeypatch, capsys):
    """A scheduler's early warning (SLURM --signal=USR1) that comes before the training loop, which checkpoints on
    it, ends the command with one line and its clean-up instead of killing it unannounced."""
    import os
    import signal
    import time

    def run(args):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(10)  # the handler interrupts this
        return 0

    monkeypatch.setattr("lomar.cli.export.run", run)
    def ignored(*_):  # should lomar leave the signal alone, pytest survives it
        pass

    before = signal.signal(signal.SIGUSR1, ignored)
    try:
        code = main(["export", "ckpt", "--to", "out"])
        assert signal.getsignal(signal.SIGUSR1) is ignored  # given back
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert code == 128 + signal.SIGUSR1 and capsys.readouterr().err == "lomar export: terminated (SIGUSR1)\n"
    assert f"{code} SIGUSR1" in app.EXIT_CODES  # lomar --help lists it


def test_a_rank_whose_peer_died_says_so_in_one_line(monkeypatch, capsys):
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:24990: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
                        "application. Check the logs of the remote worker before reporting an error. GLHF!")
    _fail_with(monkeypatch, gloo)
    with pytest.raises(RuntimeError):  # one process: no peer to lose, so a bug, kept as a traceback
        main(["export", "ckpt", "--to", "out"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["export", "ckpt", "--to", "out"]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "rank 0: another process of this run stopped (connection reset by peer)" in line
    assert line.endswith("its own error says why; fix that, then relaunch every process")  # export takes no --resume
    monkeypatch.setattr("lomar.cli.train.pretrain_run", lambda args: (_ for _ in ()).throw(gloo))
    assert main(["pretrain"]) == 1  # a training run is resumed
    assert _one_error_line(capsys.readouterr().err, "pretrain").endswith(
        "relaunch every process with --resume auto (from the last checkpoint, if one was written)")
    _fail_with(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError):  # any other failure under torchrun keeps its traceback
        main(["export", "ckpt", "--to", "out"])


def test_a_sigterm_while_a_rank_reports_its_lost_peer_leaves_the_one_line(monkeypatch, capsys):
    """torchrun SIGTERMs the processes that outlive a failed one: a rank already reporting its lost peer ends with
    its one line and exit 1, with no Terminated traceback after the line."""
    import os
    import signal

    _fail_with(monkeypatch, RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer."))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    describe = app.describe_lost_peer

    def described_then_stopped(exc, command):
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun stopping this survivor while it reports
        return describe(exc, command)

    monkeypatch.setattr(app, "describe_lost_peer", described_then_stopped)
    try:
        code = main(["export", "ckpt", "--to", "out"])
    except KeyboardInterrupt as exc:  # Terminated: caught here, else it would stop pytest itself
        pytest.fail(f"the SIGTERM after the command had failed escaped as {exc!r}")
    assert code == 1
    assert "rank 0: another process of this run stopped" in _one_error_line(capsys.readouterr().err, "export")


def test_a_rank_that_lost_its_peer_leaves_the_why_to_the_first_process(monkeypatch, capsys):
    """Rank 0's full disk on metrics.jsonl under torchrun: its line, then rank 1's 'another process of this run
    stopped', two lines for one failure. Rank 1 waits for torchrun to stop it (silently); one still running says it."""
    import os
    import signal

    _fail_with(monkeypatch, RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer."))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    waits = []
    monkeypatch.setattr("lomar.errors.time.sleep", lambda seconds: (waits.append(seconds),
                                                                    os.kill(os.getpid(), signal.SIGTERM)))
    assert main(["export", "ckpt", "--to", "out"]) == 128 + signal.SIGTERM  # torchrun's SIGTERM during the wait
    assert capsys.readouterr().err == "" and waits
    monkeypatch.setattr("lomar.errors.time.sleep", lambda seconds: None)  # not stopped: it says it after all
    assert main(["export", "ckpt", "--to", "out"]) == 1
    assert "rank 1: another process of this run stopped" in _one_error_line(capsys.readouterr().err, "export")


def test_a_killed_loader_worker_is_one_line_in_every_command_and_only_training_ones_say_resume():
    from lomar.cli.app import describe_dead_worker

    killed = RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. ")
    assert describe_dead_worker(killed, "knn") == ("DataLoader worker (pid 7) is killed by signal: Killed. (the system "
                                                   "kills a worker that runs out of memory: lower --workers or "
                                                   "--batch-size)")
    assert describe_dead_worker(killed, "finetune").endswith(
        "; resume with --resume auto (from the last checkpoint, if one was written)")
    assert describe_dead_worker(RuntimeError("Caught ValueError in DataLoader worker process 0."), "knn") is None
