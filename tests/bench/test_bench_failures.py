"""``lomar bench`` when a run goes wrong: stopped mid-way it leaves its rows and table, a failing configuration is a
row and the next one runs, a size's runners are freed before the next, a bug keeps its traceback, and host readings
fall back where the OS lacks them. Nothing here is timed."""

import json
import types

import pytest
import torch
from bench_device import CPU

from lomar.bench import timing
from lomar.bench.timing import build_runner
from lomar.cli.app import main

_SMALL = ["bench", "--tiny", "--sizes", "112", "128", "--windows", "1", "--methods", "lomar", "mae", "--batch-size",
          "1", "--steps", "1", "--warmup", "0", "--device", "cpu", "--quiet"]


@pytest.fixture
def uncounted(monkeypatch):
    """A plain step where the bench counts FLOPs (a third of these tests' time under the counter): the tests using it
    check rows, files and exit codes; the counts are the tests' above."""

    def plain_step(runner):
        runner.step()
        runner.flops = 10**6
        return runner.flops

    monkeypatch.setattr(timing.StepRunner, "count_flops", plain_step)


def test_a_bench_stopped_mid_way_leaves_its_rows_and_table(tmp_path, monkeypatch, capsys, uncounted):
    timed = timing.timed

    def stop_in_the_second_round_at_128(fn, device):  # Ctrl-C between 128 px's timed steps
        runner = getattr(fn, "__self__", None)
        if isinstance(runner, timing.StepRunner) and runner.img_size == 128 and runner.times:
            raise KeyboardInterrupt
        return timed(fn, device)

    monkeypatch.setattr(timing, "timed", stop_in_the_second_round_at_128)
    out = tmp_path / "bench.json"
    assert main([*_SMALL, "--steps", "2", "--json", str(out)]) == 130
    data = json.loads(out.read_text())
    assert [(r["method"], r["img_size"], r["status"], len(r["step_times_s"])) for r in data["records"]] == [
        ("lomar", 112, "ok", 2), ("mae", 112, "ok", 2), ("lomar", 128, "partial", 1), ("mae", 128, "partial", 1)]
    assert all(r["step_s"] > 0 and r["mfu"] > 0 for r in data["records"])
    assert data["meta"]["complete"] is False
    assert data["meta"]["left"] == [dict(method="lomar", img_size=128, windows=1),
                                    dict(method="mae", img_size=128, windows=None)]
    assert [c["img_size"] for c in data["comparisons"]] == [112, 128]
    captured = capsys.readouterr()
    assert "1 step(s): stopped" in captured.out and "MAE / LoMaR per size" in captured.out
    assert "stopped before its end" in captured.err


def test_a_failing_configuration_is_a_row_and_the_next_one_runs(tmp_path, monkeypatch, capsys, uncounted):
    built, measure = timing.build_runner, timing.StepRunner.measure_memory

    def no_lomar_at_128(method, model, size, *args, **kwargs):
        if (method, size) == ("lomar", 128):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return built(method, model, size, *args, **kwargs)

    def mae_out_of_memory(runner):
        if runner.method == "mae" and runner.img_size == 112:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        measure(runner)

    from lomar.bench import profile

    def no_profile_of_mae(runner):  # the profiler's memory: the configuration's timed row stands
        if runner.method == "mae":
            raise torch.OutOfMemoryError("CUDA out of memory (profiler)")
        return dict(shares={"gemm": 1.0}, total_ms=1.0, clock="CPU")  # a real profile: tests/bench/test_profile.py

    monkeypatch.setattr(timing, "build_runner", no_lomar_at_128)
    monkeypatch.setattr(timing.StepRunner, "measure_memory", mae_out_of_memory)
    monkeypatch.setattr(profile, "profile_step", no_profile_of_mae)
    monkeypatch.delattr("os.getloadavg")  # Windows has none: the run goes on without the load average
    out, profiles = tmp_path / "bench.json", tmp_path / "profile.json"
    assert main([*_SMALL, "--json", str(out), "--profile", str(profiles)]) == 1
    data = json.loads(out.read_text())
    rows = {(r["method"], r["img_size"]): r for r in data["records"]}
    assert {key: r["status"] for key, r in rows.items()} == {("lomar", 112): "ok", ("mae", 112): "failed",
                                                             ("lomar", 128): "failed", ("mae", 128): "ok"}
    assert rows["mae", 112]["error"] == "memory step: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows["lomar", 128]["error"] == "build: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert rows["mae", 112]["step_s"] is None and rows["mae", 128]["step_s"] > 0
    # a failure that may be a bug keeps where it was raised; running out of memory, its line alone
    assert "in no_lomar_at_128\n" in rows["lomar", 128]["traceback"] and "traceback" not in rows["mae", 112]
    assert data["meta"]["complete"] is True and data["meta"]["left"] == []
    assert data["meta"]["load_avg_before"] is None
    captured = capsys.readouterr()
    assert "mae          112     - failed at its memory step: OutOfMemoryError" in captured.out
    assert "2 of 4 configurations failed" in captured.err
    assert captured.err.count("Traceback (most recent call last)") == 1 and "in no_lomar_at_128\n" in captured.err
    assert "no profile of mae 128px: OutOfMemoryError: CUDA out of memory (profiler)" in captured.err
    assert [(p["method"], p["img_size"]) for p in json.loads(profiles.read_text())["profiles"]] == [("lomar", 112)]
    assert "time_shares" in rows["lomar", 112] and "time_shares" not in rows["mae", 128]


def test_a_sizes_runners_are_freed_before_the_next_sizes_are_built(tmp_path, monkeypatch, uncounted):
    """With --profile the profiling loop's variable kept the size's last runner (model, AdamW state, batch; on a GPU
    its memory) alive through the next size's build, memory step and timing: a larger size's peak memory counted it
    and it could run out of memory where it fits."""
    import gc
    import weakref

    from lomar.bench import profile

    built, alive_at_build = [], []

    def tracked(method, model, size, *args, **kwargs):
        gc.collect()
        alive_at_build.append((size, [(m, s) for m, s, ref in built if ref() is not None]))
        runner = build_runner(method, model, size, *args, **kwargs)
        built.append((method, size, weakref.ref(runner)))
        return runner

    monkeypatch.setattr(timing, "build_runner", tracked)
    monkeypatch.setattr(profile, "profile_step", lambda runner: dict(shares={"gemm": 1.0}, total_ms=1.0, clock="CPU"))
    assert main([*_SMALL, "--json", str(tmp_path / "bench.json"), "--profile", str(tmp_path / "profile.json")]) == 0
    assert alive_at_build == [(112, []), (112, [("lomar", 112)]), (128, []), (128, [("lomar", 128)])]


def test_a_step_that_raises_a_bug_keeps_its_traceback():
    """A shape mismatch in a method's step is a RuntimeError, as running out of memory is: it keeps its traceback."""
    runner = build_runner("mae", "vit_base_patch16", 112, None, 1, CPU, "fp32", False, tiny=True)

    def mismatched(flops=None):
        return torch.zeros(2, 3) @ torch.zeros(4, 5)

    runner.step = mismatched
    timing.interleaved_times([runner], 1, 0)
    assert runner.error.startswith("FLOP-counting step: RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert runner.trace.startswith("Traceback") and "in mismatched\n" in runner.trace and runner.model is None


def test_host_readings_fall_back_where_the_os_lacks_them(monkeypatch):
    from lomar.bench import host

    class Usage:
        ru_maxrss = 1000

    monkeypatch.setattr(host, "resource", types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: Usage))
    monkeypatch.setattr(host.sys, "platform", "darwin")
    assert host.peak_rss_bytes() == 1000  # macOS counts bytes
    monkeypatch.setattr(host.sys, "platform", "linux")
    assert host.peak_rss_bytes() == 1000 * 1024  # Linux KiB
    monkeypatch.delattr("os.getloadavg")
    assert host.load_average() is None
    monkeypatch.setattr(host, "resource", None)  # Windows: no resource module, no procfs
    monkeypatch.setattr(timing, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError(a[0])), raising=False)
    assert timing.resident_bytes() is None
    runner = build_runner("mae", "vit_base_patch16", 112, None, 1, CPU, "fp32", False, tiny=True)
    runner.measure_memory()  # the step runs, its memory unknown
    assert runner.peak_mem == (-1, "none")
    from lomar.bench import backbone_plan

    monkeypatch.setattr(backbone_plan, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError(a[0])),
                        raising=False)
    monkeypatch.delattr("os.sysconf")  # Windows; macOS's lacks SC_AVPHYS_PAGES (ValueError)
    assert backbone_plan.available_bytes("cpu") is None  # unknown: the variant runs, no estimate can skip it
