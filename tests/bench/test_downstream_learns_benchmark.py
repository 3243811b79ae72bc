"""``benchmarks/downstream_learns.py``: what it tells of a lomar command that fails, of a misspelled task and of a
run shortened below 10 steps (its learning figures are the benchmark's, not the test's)."""

import json
import sys

import pytest

from helpers import load_benchmark


def test_a_failing_lomar_command_shows_its_own_error_and_stops_in_one_line(tmp_path, monkeypatch, capsys):
    bench = load_benchmark("downstream_learns")
    fake = tmp_path / "python"  # stands in for the interpreter that runs `python -m lomar ...`
    fake.write_text("#!/bin/sh\necho 'lomar segment: error: --max-steps must be a positive integer, got 0' >&2\n"
                    "exit 2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(SystemExit) as stop:
        bench._lomar("segment", "--max-steps", "0")
    assert str(stop.value) == "downstream_learns: lomar segment stopped with exit status 2 (its output above)"
    assert "--max-steps must be a positive integer, got 0" in capsys.readouterr().err


def test_a_misspelled_task_is_refused_not_run_as_nothing(tmp_path, monkeypatch, capsys):
    bench = load_benchmark("downstream_learns")
    monkeypatch.setattr(sys, "argv", ["downstream_learns.py", "--work", str(tmp_path), "--tasks", "segmnt"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and "invalid choice: 'segmnt'" in capsys.readouterr().err


def test_the_loss_means_of_a_run_of_fewer_than_10_steps_are_over_its_steps(tmp_path):
    bench = load_benchmark("downstream_learns")
    records = [{"step": s, "loss": loss} for s, loss in enumerate([2.0, 1.0, 0.5, 0.5], 1)] + [{"step": 4, "mIoU": 50}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench._losses(tmp_path) == {"loss_first_10": 1.0, "loss_last_10": 1.0}
