"""``benchmarks/digits.py``: its summary of the study's records and its report (the study itself
is tested in tests/study; the real run takes many minutes)."""

import json

import pytest

from helpers import load_benchmark


def _record(setting, seed, point, step, score):
    return {"setting": setting, "seed": seed, "point": point, "step": step, "train_seconds": 60.0 if step else 0.0,
            "wall_seconds": 70.0, "load_1min": 3.0, "train_loss": 0.5, "random_init": setting == "random init",
            "knn": score, "linprobe": score + 0.01, "finetune": score + 0.02, "heldout_loss": 1.0 - score}


def test_summary_has_per_seed_lists_at_equal_time_and_steps(tmp_path):
    digits = load_benchmark("digits")
    records = []
    for seed in (1, 0):  # out of order on purpose: the lists follow the seeds
        records += [_record("random init", seed, "end", 0, 0.5 + seed / 100),
                    _record("method=lomar", seed, "end", 400, 0.8 + seed / 100),
                    _record("method=lomar", seed, "equal_steps", 400, 0.8 + seed / 100),
                    _record("method=mae", seed, "end", 900, 0.9 + seed / 100),
                    _record("method=mae", seed, "equal_steps", 400, 0.7 + seed / 100)]
    summary = digits.summarise(records)
    assert set(summary) == {"lomar", "mae", "random"}
    assert summary["mae"]["knn"] == [0.9, 0.91] and summary["mae"]["finetune"] == pytest.approx([0.92, 0.93])
    assert summary["mae"]["equal_steps"]["knn"] == [0.7, 0.71] and summary["mae"]["equal_steps"]["steps"] == [400] * 2
    assert summary["lomar"]["linear_probe"] == pytest.approx([0.81, 0.82]) and summary["lomar"]["seeds"] == [0, 1]
    assert summary["random"]["equal_steps"]["knn"] == summary["random"]["knn"] == [0.5, 0.51]
    digits.write_report(tmp_path, summary, records, "python benchmarks/digits.py --budget 60s", 12.0)
    assert json.loads((tmp_path / "digits.json").read_text()) == summary
    report = (tmp_path / "digits.md").read_text()
    equal_time, equal_steps = report.split("## At equal pretraining steps")
    assert "| MAE (pretrained) | 92.5 ± 0.7 | 91.5 ± 0.7 | 90.5 ± 0.7 |" in equal_time
    assert "| MAE (pretrained) | 72.5 ± 0.7 | 71.5 ± 0.7 | 70.5 ± 0.7 |" in equal_steps
    assert "Command: `python benchmarks/digits.py --budget 60s`" in report
    # the flags as `lomar finetune` takes them
    assert "--aa none --workers 0 --crop-scale 0.5 1.0 --threads 1` (last epoch's" in report
