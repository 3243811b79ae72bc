"""``benchmarks/digits.py`` end to end with a fixed, tiny step count (the real run takes minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "digits.py"


@pytest.mark.slow
def test_digits_writes_the_result_table_and_json(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--steps", "3", "--seeds", "0", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "digits.json").read_text())
    assert set(results) == {"lomar", "mae", "random"}
    for scores in results.values():
        assert set(scores) == {"linear_probe", "knn"}
        for accs in scores.values():
            assert len(accs) == 1 and 0.0 <= accs[0] <= 1.0
    table = (tmp_path / "digits.md").read_text()
    assert "| LoMaR (pretrained) |" in table and "| random init" in table
    runs = [json.loads(line) for line in table.splitlines() if line.startswith('{"method"')]
    assert {r["method"]: r["steps"] for r in runs if r["method"] in ("lomar", "mae")} == {"lomar": 3, "mae": 3}
