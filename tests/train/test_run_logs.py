"""A run's logs: metrics.jsonl cut back to a resume's step (lomar.train.run_logs), TensorBoard keeping every
step, failed log writes naming their file, and the printed step lines."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from lomar.train.run_logs import truncate_metrics


def test_metrics_truncation_drops_later_and_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    # lines that are no record of this log (damaged, or written by something else) never stop a resume: those after
    # the step's record go with the records past it, those before it stay (every reader of the log skips them)
    kept = b'{"step": 1}\n[1, 2]\n{"step": "a"}\n"text"\n\xff\xfe\n{"step": 2, "loss": 0.5}\n'
    path.write_bytes(kept + b'[3]\n\xff\n{"step": 3}\n{"step": "b"}\n')
    truncate_metrics(path, 2)
    assert path.read_bytes() == kept


def test_metrics_truncation_writes_nothing_when_nothing_follows_the_step(tmp_path):
    # every resume copied the whole log to drop nothing: 40 s at a million logged steps on a 2-core machine
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    os.utime(path, ns=(0, 0))
    inode = path.stat().st_ino
    truncate_metrics(path, 2)
    assert (path.stat().st_ino, path.stat().st_mtime_ns, path.read_text()) == (inode, 0, '{"step": 1}\n{"step": 2}\n')
    truncate_metrics(path, 1)  # cut in place, not copied
    assert (path.stat().st_ino, path.read_text()) == (inode, '{"step": 1}\n')
    path.write_text('{"step": 1}\n{"step": 2}')  # whole but for its line end: the next record would join its line
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.parametrize("block", [1, 5, 64])
def test_metrics_truncation_reads_backwards_across_blocks_and_keeps_records_without_a_step(tmp_path, monkeypatch,
                                                                                          block):
    from lomar.train import run_logs

    monkeypatch.setattr(run_logs, "_BLOCK", block)
    path = tmp_path / "metrics.jsonl"
    score = '{"box_AP": 1.5}'
    cases = {  # (log, step) -> what stays: a record without a step among the dropped ones is kept by a copy
        ('{"step": 1}\n{"step": 2}\n{"step": 3}\n', 2): '{"step": 1}\n{"step": 2}\n',
        ('{"step": 1}\n{"step": 2}\n{"step": 3}\n', 0): "",
        (f'{{"step": 1}}\n{score}\n{{"step": 3}}\n{score}\n{{"step": 4', 1): f'{{"step": 1}}\n{score}\n{score}\n',
        (f'{{"step": 1}}\n{{"step": 3}}\n{score}\n', 1): f'{{"step": 1}}\n{score}\n',
        (f'{{"step": 1}}\n{score}\n\n{{"step": 2}}\n\n', 5): f'{{"step": 1}}\n{score}\n\n{{"step": 2}}\n',
        ("\n", 3): "",
        ("", 3): "",
    }
    for (log, step), expected in cases.items():
        path.write_text(log)
        truncate_metrics(path, step)
        assert path.read_text() == expected, (log, step)


def test_metrics_truncation_keeps_records_without_a_step(tmp_path):
    # detect --eval-only appends its scores to --out's metrics.jsonl without a step; a resume of the run there
    # dropped them
    path = tmp_path / "metrics.jsonl"
    scores = json.dumps({"eval_only": True, "pretrained": "run/last.pt", "img_size": 64, "box_AP": 12.5})
    path.write_text(f'{{"step": 1}}\n{scores}\n{{"step": 3}}\n')
    truncate_metrics(path, 2)
    assert path.read_text() == f'{{"step": 1}}\n{scores}\n'


def test_metrics_truncation_holds_one_line_at_a_time_and_keeps_the_lines_as_they_were(tmp_path):
    # every resume held the whole log and its lines at once: a single-GPU ImageNet run logs 8 million steps
    import tracemalloc

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "note": "é ✓"}, ensure_ascii=False)
             for s in range(1, 4_001)]
    path.write_text("".join(line + "\n" for line in lines) + '{"step": 4001, "lo', encoding="utf-8")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        truncate_metrics(path, 3_600)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.read_bytes() == "".join(line + "\n" for line in lines[:3_600]).encode()
    assert peak - held < size / 4


@pytest.mark.slow
def test_tensorboard_keeps_every_step_of_a_run_that_stops_with_an_error(tmp_path):
    # such a run closes no Monitor, and at exit TensorBoard's writer thread dropped what it had not written yet: the
    # steps before the error (its writes slowed here, as a busy disk would: it then always had some left)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = (
        "import sys, time\n"
        "from tensorboard.summary.writer.record_writer import RecordWriter\n"
        "from lomar.train.monitor import Monitor\n"
        "write = RecordWriter.write\n"
        "RecordWriter.write = lambda self, data: (time.sleep(0.002), write(self, data))\n"
        "monitor = Monitor(__import__('pathlib').Path(sys.argv[1]), active=True, total=30, log_every=100)\n"
        "for step in range(1, 31):\n"
        "    monitor.step(step, 0, 1.0 / step, 1e-3, 10.0)\n"
        "raise SystemExit('the run stopped')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.endswith("the run stopped\n"), done.stderr[-2000:]
    logged = EventAccumulator(str(tmp_path / "tb"))
    logged.Reload()
    assert [event.step for event in logged.Scalars("train/loss")] == list(range(1, 31))


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO])
def test_a_log_write_that_fails_mid_run_names_the_file(tmp_path, code):
    # a write's OSError names no file: a folder gone read-only under metrics.jsonl was a traceback
    from lomar.cli.app import describe_os_error
    from lomar.train.monitor import Monitor

    class Refusing:
        def write(self, text):
            raise OSError(code, os.strerror(code))

        def close(self):
            pass

    monitor = Monitor(tmp_path, active=True, total=3, log_every=1)
    monitor.file.close()
    monitor.file = Refusing()
    with pytest.raises(OSError) as info:
        monitor.step(1, 0, 0.5, 1e-3, 10.0)
    monitor.close()
    assert info.value.errno == code and info.value.filename == str(tmp_path / "metrics.jsonl")
    message, _ = describe_os_error(info.value)
    assert str(tmp_path / "metrics.jsonl") in message and "\n" not in message


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_evaluation_record_on_a_full_disk_names_its_file(tmp_path, monkeypatch):
    # /dev/full: the kernel's ENOSPC at the flush, and again when the file is closed, which named nothing
    from lomar.train import monitor as monitor_module

    monitor = monitor_module.Monitor(tmp_path, active=True, total=3, log_every=1)
    monkeypatch.setattr(monitor_module, "open_in_place", lambda path, mode: open("/dev/full", mode))
    with pytest.raises(OSError) as info:
        monitor.evaluation("knn.jsonl", 1, 0, {"knn_top1": 0.5}, {}, "epoch 0")
    monitor.close()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "knn.jsonl")


def test_a_slow_steps_image_rate_is_printed_not_rounded_to_zero(tmp_path, capsys):
    # one decimal printed a slow CPU step's 0.04 img/s as "img/s 0.0"
    from lomar.train.monitor import Monitor

    monitor = Monitor(tmp_path, active=True, total=2, log_every=1)
    monitor.step(1, 0, 0.5, 1e-3, 0.04)
    monitor.step(2, 0, 0.5, 1e-3, 123.45)
    monitor.close()
    out = capsys.readouterr().out
    assert "img/s 0.04 " in out and "img/s 123.5 " in out, out


def test_a_monitor_whose_tensorboard_writer_fails_to_start_closes_its_metrics_file(tmp_path, monkeypatch):
    # metrics.jsonl is opened before TensorBoard's writer: a writer that failed (here: tb is a file, not a folder)
    # left it open, a ResourceWarning
    from lomar.train import monitor as monitor_module

    opened = []
    real_open = monitor_module.open_in_place
    monkeypatch.setattr(monitor_module, "open_in_place", lambda *args: opened.append(real_open(*args)) or opened[-1])
    (tmp_path / "tb").write_text("not a folder")
    with pytest.raises(OSError) as info:
        monitor_module.Monitor(tmp_path, active=True, total=3, log_every=1)
    assert info.value.filename == str(tmp_path / "tb")
    assert len(opened) == 1 and opened[0].closed
