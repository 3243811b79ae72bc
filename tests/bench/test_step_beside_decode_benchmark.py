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
        assert record["profile"]["cuda_api_by_thread"] == {}
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


def test_cuda_calls_are_tallied_per_thread_with_the_steps_thread_named():
    bench = load_benchmark("step_beside_decode")

    def call(name, tid, us, cat="cuda_runtime"):
        return {"ph": "X", "cat": cat, "name": name, "tid": tid, "dur": us}

    events = [call("cudaLaunchKernel", 7, 4), call("cudaLaunchKernel", 7, 6), call("cuLaunchKernel", 7, 10,
                                                                                     "cuda_driver"),
              call("cudaFree", 9, 3000), call("cudaStreamSynchronize", 9, 1000), call("cudaFree", 9, 1000),
              {"ph": "X", "cat": "kernel", "name": "gemm", "tid": 7, "dur": 500},  # a kernel: not a host call
              {"ph": "i", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 7}]  # no duration: not a call
    summary = bench.runtime_calls(events, step_ids={7}, steps=2)
    assert set(summary) == {"step", "thread 9"}
    assert summary["step"]["total_ms"] == 0.01
    assert summary["step"]["cudaLaunchKernel"] == {"calls": 1.0, "ms": 0.005, "max_ms": 0.006}
    assert summary["step"]["cuLaunchKernel"] == {"calls": 0.5, "ms": 0.005, "max_ms": 0.01}
    other = summary["thread 9"]
    assert list(other)[:3] == ["total_ms", "cudaFree", "cudaStreamSynchronize"]  # costliest first
    assert other["total_ms"] == 2.5 and other["cudaFree"] == {"calls": 1.0, "ms": 2.0, "max_ms": 3.0}
    line = bench.profile_line({"wall_ms": 65.0, "kernel_ms_by_stream": {"7": 59.4}, "cuda_api_by_thread": summary})
    assert "wall 65.0 ms" in line and "thread 9: 2.5 ms in CUDA calls (cudaFree 1x 2.00 ms" in line
    assert len(bench.runtime_calls(events, step_ids={7}, steps=2, top=1)["thread 9"]) == 2  # total + 1
