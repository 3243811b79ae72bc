"""``benchmarks/step_beside_decode.py`` on CPU: a tiny step timed alone and beside the CPU-side loads,
each load's own rate recorded; an unknown load or folder is a one-line error."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import load_benchmark


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"photo{i}.jpg")
    return root


def test_cpu_mode_times_the_step_beside_each_load(photos, tmp_path):
    bench = load_benchmark("step_beside_decode")
    out = tmp_path / "beside.json"
    assert bench.main(["--data", str(photos), "--device", "cpu", "--img-size", "128", "--windows", "2",
                       "--batch", "2", "--photos", "3", "--workers", "1", "--seconds", "0.5",
                       "--profile", "--json", str(out)]) == 0
    records = {r["load"]: r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {"none", "cpu-drafting", "thread-python", "thread-decode-crop"}
    assert records["none"]["step_images_per_s"] > 0
    for name in ("cpu-drafting", "thread-python", "thread-decode-crop"):
        record = records[name]
        assert "error" not in record, record
        assert record["step_images_per_s"] > 0 and record["load_per_s"] > 0 and record["load_alone_per_s"] > 0
        assert record["profile"]["wall_ms"] > 0 and record["profile"]["kernel_ms_by_stream"] == {}  # no CUDA here
        assert record["step_rate_kept"] == pytest.approx(record["step_images_per_s"]
                                                         / records["none"]["step_images_per_s"])


def test_an_unknown_load_or_folder_is_one_line(photos, tmp_path, capsys):
    bench = load_benchmark("step_beside_decode")
    with pytest.raises(SystemExit, match="no load thread-hw-decode here"):
        bench.main(["--data", str(photos), "--device", "cpu", "--img-size", "128", "--windows", "2",
                    "--batch", "2", "--loads", "thread-hw-decode"])
    with pytest.raises(SystemExit) as stop:
        bench.main(["--data", str(tmp_path / "missing"), "--device", "cpu"])
    assert stop.value.code == 2 and "no such folder" in capsys.readouterr().err
