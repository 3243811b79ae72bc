"""``benchmarks/jpeg_engines.py`` on CPU: torchvision's decoder is timed, the nvImageCodec backends
say why they were not (they need CUDA), and a missing folder is a one-line error."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import load_benchmark


def test_cpu_mode_times_torchvision_and_reports_the_rest(tmp_path, capsys):
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"photo{i}.jpg")
    bench = load_benchmark("jpeg_engines")
    out = tmp_path / "engines.json"
    assert bench.main(["--data", str(tmp_path), "--device", "cpu", "--batch", "2", "--json", str(out)]) == 0
    records = {r["decoder"]: r for r in json.loads(out.read_text())["records"]}
    assert records["torchvision"]["alone_images_per_s"] > 0 and records["torchvision"]["photos"] == 3
    assert {f"nvimgcodec-{kind}" for kind in bench.NVIMGCODEC_BACKENDS} < records.keys()
    assert all(r["error"] == "RuntimeError: needs CUDA" for name, r in records.items() if name != "torchvision")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--data", str(tmp_path / "missing"), "--device", "cpu"])
    assert stop.value.code == 2 and "no such folder" in capsys.readouterr().err
