"""``benchmarks/gpu_check.sh`` in its tiny CPU mode: every part runs and reports ok.

A device is lent to few sessions and for minutes; the script must work the first time it meets one.
The CPU mode runs the same commands (bench, loader, pretrain, finetune, backbone, the CUDA-marked
tests) on a tiny model, so a renamed module or flag breaks this test instead of the device run.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import BENCHMARKS, load_benchmark
from lomar.bench.profile import KINDS

SCRIPT = BENCHMARKS / "gpu_check.sh"
PARTS = "env tests loader pretrain finetune bench mfu backbone"


@pytest.mark.slow
@pytest.mark.longest
def test_every_part_of_the_gpu_check_runs_in_cpu_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_PARTS": PARTS, "GPU_CHECK_DECODE": "draft draft-inline-imagenet",
           # compiled bench runs: the mfu part's reduce-overhead one (the same bench_run); their merge into
           # ratios.json, one file per method: test_the_summary_merges_compiled_runs_of_one_file_per_method
           "GPU_CHECK_METHODS": "lomar mae", "GPU_CHECK_COMPILE_SIZES": "",
           # one child process per variant, ~5 s of imports each: one per part runs its command line (flex's skip
           # takes none, windowed is the relpos part's); every attention's and encoder's step runs in-process in
           # tests/bench/test_backbone_bench.py, and --encoders' choices are ENCODERS
           # (tests/cli/test_help_without_torch.py)
           "GPU_CHECK_BACKBONE_ATTENTION": "chunked flex", "GPU_CHECK_BACKBONE_ENCODERS": "mae+bias",
           # the sweep's compiled, profiled run (the device's sweep compiles every run); an eager --profile run is
           # tests/bench/test_profile.py's, in-process
           "GPU_CHECK_SWEEP": "2:reduce-overhead",
           # compiled by dynamo and AOT autograd, whole (one graph: tests/bench/test_compile_whole.py), without
           # inductor's C++ kernels: a cold cache builds ~25 with g++ (~100 s of a loaded 2-core CPU, past the part's
           # 200 s limit under more load), and the device's kernels are Triton's, not these; inductor compiling the
           # LoMaR step on CPU, reduce-overhead mode: test_pretrain.py's test_reduce_overhead_trains_as_eager_with_...
           "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager",
           # the selected tests are this suite's own, run here on this device: the script's selection is checked
           "GPU_CHECK_TESTS_COLLECT": "1",
           # hypothesis's pytest plugin imports hypothesis (~1-2 s) in each of the two collecting children; the
           # selected modules do not use it
           "PYTEST_ADDOPTS": "-p no:hypothesispytest",
           # the device's 90 s per backbone run is a budget, not a check: a busy 2-core CPU took longer
           "GPU_CHECK_T_BACKBONE": "240",
           # the device's 470 s plan, too: a loaded CPU spent it before the bench parts and they were skipped
           "GPU_CHECK_BUDGET": "100000",
           # this interpreter's environment, used as it is (the script installs nothing into it)
           "GPU_CHECK_VENV": sys.prefix, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "out" / "summary.log").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = {line.split("part ")[1].split(":")[0]: line for line in log.splitlines() if "] part " in line}
    expected = set(PARTS.split()) - {"bench"} | {"bench-64", "backbone-relpos", "mfu-tests", "mfu-2-reduce-overhead"}
    assert expected <= reports.keys(), log[-3000:]
    failed = [line for line in reports.values() if ": ok (rc 0)" not in line]
    assert not failed, "\n".join(failed) + "\n" + log[-3000:]

    out = tmp_path / "out"
    # the tests' whole output is kept (a failure's message, not only its name); each part selects its tests
    graph_tests, cuda_tests = (out / "cuda_graph_tests.log").read_text(), (out / "cuda_tests.log").read_text()
    assert "test_pretrain.py::test_reduce_overhead_trains_as_eager_with_accumulation[cpu]" in graph_tests
    assert "1/" in graph_tests and "tests collected" in graph_tests, graph_tests
    assert "test_pretrain.py::test_decode_gpu_trains_on_the_reference_pixels" in cuda_tests
    assert "test_device_decode.py::test_a_file_the_decoder_refuses_leaves_the_batch[cuda]" in cuda_tests  # nvjpeg's
    assert "test_dvae.py::test_dvae_case_on_cuda_runs_its_convs_in_fp16_as_the_original" in cuda_tests
    assert "deselected" in cuda_tests and "reduce_overhead" not in cuda_tests, cuda_tests
    ratios = json.loads((out / "ratios.json").read_text())
    assert [(r["compile"], r["other"], r["source"]) for r in ratios] == [(False, "mae", "bench-64.json")]
    assert all(r["ratio"] > 0 and r["img_size"] == 64 for r in ratios)
    pretrain = json.loads((out / "pretrain.json").read_text())
    assert pretrain["rc"] == 0 and pretrain["steps"] == 3 and pretrain["loss_last"] is not None
    assert pretrain["model_images_per_s"] > 0 and pretrain["input_bound"] in (True, False)
    assert 0 <= pretrain["median_input_wait"] <= 1
    assert pretrain["workers_decoded_share"] is None  # --decode gpu's line only (tests/train/test_pretrain.py)
    assert pretrain["cpu_decode_share_by_step"] == [None] * 3
    rates = pretrain["img_s_by_step"]  # the sustained rate weighs each step by its time, waits included
    assert len(rates) == len(pretrain["input_wait_by_step"]) == len(pretrain["epoch_by_step"]) == 3
    assert pretrain["sustained_images_per_s"] == pytest.approx(3 / sum(1 / r for r in rates))
    assert pretrain["photos"] == "camera"
    inline = json.loads((out / "pretrain-draft-inline-imagenet.json").read_text())  # a mode's own run
    assert inline["rc"] == 0 and inline["steps"] == 3 and inline["decode"] == "draft-inline-imagenet"
    assert inline["photos"] == "imagenet"  # the -imagenet word: ImageNet-size photos, no flag of its own
    settings = yaml.safe_load((tmp_path / "work" / "pretrain-draft-inline-imagenet" / "config.yaml").read_text())
    assert settings["decode"] == "draft" and settings["decode_ahead"] == 0
    assert Path(settings["data"]).name == "imagenet-repeated"
    # the backbone bench, one child process per variant: the attentions, then the encoders side by side
    backbone = json.loads((out / "backbone.json").read_text())
    records = {r["attention"]: r for r in backbone["records"]}
    assert list(records) == ["chunked", "flex"]
    rec = records["chunked"]
    assert rec["status"] == "ok" and rec["step_s"] > 0 and rec["peak_mem_bytes"] > 0, rec
    assert rec["grad_checkpointing"] and rec["task"] == "backbone" and rec["img_size"] == 64, rec
    assert records["flex"]["status"] == "skipped" and "CUDA" in records["flex"]["reason"]
    assert backbone["meta"]["task"] == "backbone" and len(backbone["meta"]["load_avg_before"]) == 3
    relpos = json.loads((out / "backbone-relpos.json").read_text())["records"]
    assert [r["encoder"] for r in relpos] == ["mae+bias"], relpos
    assert all(r["status"] == "ok" and r["step_s"] > 0 and r["attention"] == "windowed" for r in relpos), relpos
    loader = json.loads((out / "loader.json").read_text())
    assert {r["decode"] for r in loader["records"]} >= {"full", "draft"}
    # the MFU sweep: its run (profiled) and the bench part's LoMaR row, best MFU first
    sweep = json.loads((out / "mfu.json").read_text())
    assert sorted((r["source"], r["compile_mode"], r["compile"]) for r in sweep) == [
        ("bench-64.json", "default", False), ("mfu-2-reduce-overhead.json", "reduce-overhead", True)]
    assert [r["mfu"] for r in sweep] == sorted((r["mfu"] for r in sweep), reverse=True)
    assert all(r["source"].startswith("bench-") or tuple(r["time_shares"]) == KINDS for r in sweep)
    assert (out / "mfu-2-reduce-overhead-profile.json").exists() and "| 2 | reduce-overhead |" in (
        out / "mfu.md").read_text()


def test_the_summary_script_stands_alone_and_knows_the_profile_kinds(tmp_path, capsys):
    """benchmarks/gpu_summary.py merges the JSON of several device calls, wherever it runs (no lomar
    import): its copy of the profile kinds must stay lomar's."""
    summary = load_benchmark("gpu_summary")
    assert summary.KINDS == KINDS
    assert summary.main(["ratios", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "got ratios " in err and "missing" in err and err.count("\n") == 1
    assert summary.main(["mfu", str(tmp_path)]) == 1  # an empty folder: nothing to rank


def test_the_summary_merges_compiled_runs_of_one_file_per_method(tmp_path):
    """The compiled bench runs come one process, one file, per method: their LoMaR / other ratio is of two files,
    apart from the eager rows of one; the paper's windows win over a fixed count."""
    summary = load_benchmark("gpu_summary")

    def bench(name, compiled, *records):
        (tmp_path / name).write_text(json.dumps({"meta": {"compile": compiled}, "records": [
            {"img_size": 448, "window_setting": "fixed", "mfu": 0.3, **r} for r in records]}))

    bench("bench-448.json", False, dict(method="lomar", step_s=1.0), dict(method="mae", step_s=2.5))
    bench("bench-compile-448-lomar.json", True, dict(method="lomar", step_s=0.5),
          dict(method="lomar", step_s=0.4, window_setting="paper"))
    bench("bench-compile-448-mae.json", True, dict(method="mae", step_s=1.2))
    bench("bench-compile-448-beit.json", True, dict(method="beit", step_s=0.0))  # no step time: no row
    summary.main(["ratios", str(tmp_path)])
    rows = json.loads((tmp_path / "ratios.json").read_text())
    assert [(r["compile"], r["other"], r["ratio"], r["source"]) for r in rows] == [
        (False, "mae", 2.5, "bench-448.json"),
        (True, "mae", pytest.approx(3.0), "bench-compile-448-lomar.json, bench-compile-448-mae.json")]
    assert rows[0]["paper"] is not None
    # a bench cut short says so beside its ratios; a configuration that failed is listed with its error
    (tmp_path / "bench-384.json").write_text(json.dumps({"meta": {"compile": False, "complete": False}, "records": [
        dict(method="lomar", img_size=384, step_s=1.0, status="partial"),
        dict(method="beit", img_size=384, step_s=None, status="failed", error="timed step 2: OutOfMemoryError: x")]}))
    bench("bench-compile-448-beit.json", True, dict(method="beit", step_s=None, status="failed", error="build: E"))
    lines = summary.ratios(tmp_path)
    assert lines[-2:] == ["- beit 384 px (bench-384.json (incomplete)): timed step 2: OutOfMemoryError: x",
                          "- beit 448 px (bench-compile-448-beit.json): build: E"]


def test_an_unknown_decode_word_stops_the_check_before_any_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_DECODE": "draft gpu-hw-grpahs"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert ("GPU_CHECK_DECODE mode gpu-hw-grpahs: unknown word grpahs (inline, alone, hw, graphs, imagenet)"
            in done.stderr)
    assert not (tmp_path / "work").exists()


def _stub_testset(tmp_path: Path, source: str) -> Path:
    """A package lomar.bench whose testset module is ``source``, under the folder returned (for PYTHONPATH)."""
    stub = tmp_path / "stub" / "lomar" / "bench"
    stub.mkdir(parents=True)
    for package in (stub.parent, stub):
        (package / "__init__.py").write_text("")
    (stub / "testset.py").write_text(source)
    return tmp_path / "stub"


def _sets_on(stub: Path) -> str:
    """A stand-in python (see _stand_in) that makes each test set with ``stub``'s make_test_set, in this interpreter;
    every other command succeeds."""
    return f'case $2 in *make_test_set*) PYTHONPATH={stub}:$PYTHONPATH exec {sys.executable} "$@";; esac\nexit 0\n'


def _ended(pid: int, within: float) -> bool:
    """Whether process ``pid`` ends within ``within`` seconds: gone, or a zombie (killed, not yet reaped)."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _stand_in(tmp_path: Path, script: str, **settings: str) -> dict[str, str]:
    """The check's CPU-mode environment whose venv's python is ``script`` (bash), standing in for each part's command;
    ``settings`` are added (``OUT`` is ``tmp_path/gc`` unless given)."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/usr/bin/env bash\n" + script)
    python.chmod(0o755)
    return {**os.environ, "OUT": str(tmp_path / "gc"), "GPU_CHECK_WORK": str(tmp_path / "work"),
            "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_VENV": str(python.parents[1]), **settings}


def test_every_bench_command_of_the_check_is_one_lomar_bench_accepts(tmp_path):
    """A compiled run times one method in its own process: MAE's got --windows, which lomar bench refuses where
    no method reads it: with a GPU_CHECK_WINDOWS other than paper that part of the device run failed."""
    from lomar.cli.app import build_parser
    from lomar.cli.bench_plan import plan_configurations

    env = _stand_in(tmp_path, f'echo "$@" >> {tmp_path / "calls"}\n',  # records the commands instead of running them
                    OUT=str(tmp_path / "out"), GPU_CHECK_PARTS="bench", GPU_CHECK_METHODS="lomar mae",
                    GPU_CHECK_COMPILE_SIZES="64")
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    commands = [line.split()[2:] for line in (tmp_path / "calls").read_text().splitlines() if " bench " in line]
    assert [c[c.index("--methods") + 1] for c in commands] == ["lomar", "lomar", "mae"]
    for command in commands:
        plan_configurations(build_parser(["bench"]).parse_args(command))  # UsageError where bench would refuse it


def test_a_test_set_that_cannot_be_made_leaves_the_others_made(tmp_path):
    """Each test set is made by a process of its own: one that fails (here the camera set) is said in the log and
    the next ones are still made."""
    stub = _stub_testset(tmp_path, "from pathlib import Path\n"  # a lomar.bench.testset whose camera set fails
                                   "def make_test_set(out, kind, count):\n"
                                   "    if Path(out).name == 'camera':\n"
                                   "        raise OSError('no room for the camera set')\n"
                                   "    Path(out).mkdir(parents=True)\n"
                                   "    (Path(out) / f'{kind}-{count}').touch()\n")
    env = _stand_in(tmp_path, _sets_on(stub), GPU_CHECK_PARTS="loader finetune")
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert done.returncode == 0, done.stderr
    assert "OSError: no room for the camera set" in log and "camera test set: 0 JPEGs" in log, log
    ft = tmp_path / "work" / "ft"
    assert sorted(p.relative_to(ft).as_posix() for p in ft.rglob("imagenet-*")) == [
        "train/a/imagenet-8", "train/b/imagenet-8", "val/a/imagenet-4", "val/b/imagenet-4"], log


@pytest.mark.slow  # the check's bash and a python process: ~2 s
def test_a_test_set_that_hangs_is_stopped_at_its_own_limit_and_the_others_are_made(tmp_path):
    """Each set has a limit of its own (GPU_CHECK_T_SET): one that hangs (here the camera set, and a writer process of
    its own) is stopped at it with its writer, and the next sets are made (with one limit for all the sets, a hung one
    took the whole of it and the sets after it were never made)."""
    import signal

    writer = tmp_path / "writer"
    stub = _stub_testset(tmp_path, "import subprocess, sys, time\n"  # a lomar.bench.testset whose camera set hangs
                                   "from pathlib import Path\n"
                                   "def make_test_set(out, kind, count):\n"
                                   "    if Path(out).name == 'camera':\n"
                                   "        child = subprocess.Popen([sys.executable, '-c', 'import time; "
                                   "time.sleep(120)'])\n"
                                   f"        Path({str(writer)!r}).write_text(str(child.pid))\n"
                                   "        time.sleep(120)\n"
                                   "    Path(out).mkdir(parents=True)\n"
                                   "    (Path(out) / f'{kind}-{count}').touch()\n")
    env = _stand_in(tmp_path, _sets_on(stub), GPU_CHECK_PARTS="loader finetune", GPU_CHECK_T_SET="1")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        code = check.wait(timeout=60)  # the camera set's default limit: 120 s
        writer_ended = _ended(int(writer.read_text()), within=10)  # looked at before the clean-up below kills it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the set's group, if it outlived it
            os.killpg(os.getpgid(int(writer.read_text())), signal.SIGKILL)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert code == 0, log
    assert f"test set {tmp_path / 'work' / 'camera'}: not made within 1 s (GPU_CHECK_T_SET); stopped" in log, log
    ft = tmp_path / "work" / "ft"
    assert sorted(p.relative_to(ft).as_posix() for p in ft.rglob("imagenet-*")) == [
        "train/a/imagenet-8", "train/b/imagenet-8", "val/a/imagenet-4", "val/b/imagenet-4"], log
    assert writer_ended  # the set's writer was stopped with it


def test_each_part_reports_its_own_status_where_bash_is_in_posix_mode(tmp_path):
    """POSIXLY_CORRECT (or bash run as sh): a pid's status, once a `wait` gave it, is gone (a second wait: 127),
    so each part's status is the one its command exited with, ok or failed, not 'failed (rc 127)'."""
    # pytest imports; the tests exit 3; each bench writes its JSON
    env = _stand_in(tmp_path, 'case " $* " in *" -m pytest "*) exit 3;; *" -c "*) exit 0;; esac\n'
                              'for a; do [ "$prev" = --json ] && echo {} > "$a"; prev=$a; done\n',
                    GPU_CHECK_PARTS="tests bench", GPU_CHECK_SIZES="64", POSIXLY_CORRECT="1")
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert done.returncode == 0, done.stderr
    assert "part tests: failed (rc 3)" in log and "part bench-64: ok (rc 0)" in log, log


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_check_stopped_mid_part_leaves_every_finished_part_in_its_archive(stop, tmp_path):
    """A device call killed at its limit (SIGKILL: no trap runs, no last tar) or an outer `timeout` (SIGTERM to the
    script's process group): GPU_CHECK_ARCHIVE, kept current after every part and every few seconds, holds the
    finished part, the one cut short as far as it wrote, and the log; a SIGTERM stops the bench part at once."""
    import signal
    import tarfile
    import time

    archive = tmp_path / "gc.tgz"
    # a bench that writes its JSON; at 96 px it then hangs
    env = _stand_in(tmp_path, 'for a; do [ "$prev" = --json ] && json=$a; prev=$a; done\n'
                              'case " $* " in *" --sizes 96 "*) echo \'{"meta": {"complete": false}}\' > "$json"; '
                              f'echo $$ > {tmp_path}/hung; exec sleep 60;; esac\n'
                              'echo \'{"meta": {"complete": true}}\' > "$json"\n',
                    GPU_CHECK_PARTS="bench", GPU_CHECK_SIZES="64 96", GPU_CHECK_ARCHIVE=str(archive),
                    GPU_CHECK_ARCHIVE_EVERY="0.2")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)

    def names() -> set[str]:
        try:
            with tarfile.open(archive) as tar:
                return set(tar.getnames())
        except (OSError, tarfile.TarError):
            return set()

    try:
        deadline = time.monotonic() + 30
        while "gc/bench-96.json" not in names() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(check.pid, getattr(signal, stop))
        code = check.wait(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the hung bench, if it outlived it
            os.kill(int((tmp_path / "hung").read_text()), signal.SIGKILL)
    assert code == (-9 if stop == "SIGKILL" else 143)
    assert {"gc/summary.log", "gc/bench-64.json", "gc/bench-96.json"} <= names()
    with tarfile.open(archive) as tar:
        log = tar.extractfile("gc/summary.log").read().decode()
        cut_short = json.loads(tar.extractfile("gc/bench-96.json").read())
    assert "part bench-64: ok (rc 0)" in log
    assert ("stopped by SIGTERM" in log) == (stop == "SIGTERM")
    assert cut_short["meta"]["complete"] is False
    assert not list(tmp_path.glob("gc.tgz.*.tmp"))


@pytest.mark.parametrize("case", ["pretrain", "stuck-tests", "stuck-tests-own-limit"])
def test_a_stop_reaches_the_running_part_at_once_and_kills_one_that_ignores_it(case, tmp_path):
    """An outer `timeout`'s SIGTERM reaches the running part although its own `timeout` gives it a process group of
    its own: a pretraining run saves and ends within a second, and the check ends after it, without starting
    another part. A part that ignores SIGTERM (stuck in C code) is killed GPU_CHECK_KILL_AFTER s later, whether
    the signal was the outer one or its own limit's."""
    import signal
    import time

    own_limit = case.endswith("own-limit")
    # a pretraining run that saves on SIGTERM; tests that ignore it
    env = _stand_in(tmp_path, 'case " $* " in\n'
                              f'  *" pretrain "*) trap \'echo saved > {tmp_path}/saved; exit 0\' TERM\n'
                              f'    echo $$ > {tmp_path}/running; while :; do sleep 0.05; done;;\n'
                              f'  *" -m pytest "*) trap \'\' TERM; echo $$ > {tmp_path}/running; exec sleep 30;;\n'
                              'esac\n',
                    GPU_CHECK_KILL_AFTER="1", GPU_CHECK_PARTS="pretrain tests" if case == "pretrain" else "tests bench",
                    GPU_CHECK_T_TESTS="0.5" if own_limit else "30", GPU_CHECK_SIZES="64")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    running = tmp_path / "running"
    try:
        deadline = time.monotonic() + 20
        while not running.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.exists(), "the part did not start"
        signalled = time.monotonic()
        if not own_limit:
            os.killpg(check.pid, signal.SIGTERM)
        code = check.wait(timeout=10)
        took = time.monotonic() - signalled
        try:  # a zombie (killed, its parent gone, not yet reaped) has ended
            stat = Path(f"/proc/{running.read_text().strip()}/stat").read_text()
            part_alive = stat.rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            part_alive = False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the part's own group, if it outlived it
            os.killpg(os.getpgid(int(running.read_text())), signal.SIGKILL)
    log = (tmp_path / "gc" / "summary.log").read_text()
    if case == "pretrain":
        assert (tmp_path / "saved").exists() and took < 3, (took, log)
        assert code == 143 and "stopped by SIGTERM" in log and "part pretrain: ok (rc 0) stopped by the signal" in log
        assert "part tests" not in log
    else:
        assert 1 <= took < 4, (took, log)  # SIGKILL GPU_CHECK_KILL_AFTER s after the SIGTERM
        assert code == (0 if own_limit else 143), log
        assert ("part bench-64" in log) == own_limit, log  # the next part starts only after a part's own limit
        assert "part tests: killed (rc 137)" in log, log
    assert not part_alive


_TIMEOUT_THAT_DROPS_THE_STOP = """\
import os, signal, subprocess, sys
# coreutils' timeout as it leaves its command in a race (coreutils issue #82, seen with 9.1 under load): a group of
# its own, its command in it, and a SIGTERM that ends it without passing the signal on
os.setpgid(0, 0)
signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(143))
sys.exit(subprocess.call(sys.argv[4:]))
"""


@pytest.mark.slow  # the check's bash and a python process: ~1 s
def test_a_stop_reaches_the_part_where_its_timeout_drops_the_signal(tmp_path):
    """A SIGTERM that reaches coreutils' timeout just as it starts its command can end it without passing the signal
    on: the stop goes to the part's process group too, so the command, in that group, still gets it (here a
    pretraining run that saves on SIGTERM); the check ends, where it waited on the command to its own end."""
    import signal
    import time

    fake = tmp_path / "bin" / "timeout"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n" + _TIMEOUT_THAT_DROPS_THE_STOP)
    fake.chmod(0o755)
    env = _stand_in(tmp_path, 'case " $* " in\n'
                              f'  *" pretrain "*) trap \'echo saved > {tmp_path}/saved; exit 0\' TERM\n'
                              f'    echo $$ > {tmp_path}/running; while :; do sleep 0.05; done;;\n'
                              'esac\n',
                    GPU_CHECK_PARTS="pretrain", PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    running = tmp_path / "running"
    try:
        deadline = time.monotonic() + 20
        while not (running.exists() and running.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.exists(), "the part did not start"
        os.killpg(check.pid, signal.SIGTERM)
        code = check.wait(timeout=10)  # the run stops with the check, which does not wait on it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the run, if it outlived the check
            os.kill(int(running.read_text()), signal.SIGKILL)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert code == 143 and (tmp_path / "saved").exists(), log
    assert "stopped by SIGTERM" in log, log


@pytest.mark.parametrize("ignores", [False, True], ids=["stops", "ignores-term"])
def test_a_stop_while_a_test_set_is_made_exits_143_leaving_no_set_running(ignores, tmp_path):
    """An outer stop (SIGTERM to the check's process group) while a set is made: the set's process and its writer,
    in the process group of the set's own `timeout`, stop with it; the check exits 143, without a traceback, and
    makes no further set. A set that ignores the stop is killed GPU_CHECK_KILL_AFTER s later, and the log does not
    blame its own limit for it."""
    import signal
    import time

    pids = tmp_path / "pids"
    stub = _stub_testset(tmp_path, "import os, signal, subprocess, sys, time\n"  # a set that hangs, with a writer
                                   "from pathlib import Path\n"
                                   "def make_test_set(out, kind, count):\n"
                                   f"    {'signal.signal(signal.SIGTERM, signal.SIG_IGN)' if ignores else 'pass'}\n"
                                   "    child = subprocess.Popen([sys.executable, '-c', 'import time; "
                                   "time.sleep(60)'])\n"
                                   f"    Path({str(pids)!r} + '.tmp').write_text(f'{{os.getpid()}} {{child.pid}}')\n"
                                   f"    os.replace({str(pids)!r} + '.tmp', {str(pids)!r})\n"
                                   "    time.sleep(60)\n")
    env = _stand_in(tmp_path, _sets_on(stub), GPU_CHECK_PARTS="loader finetune", GPU_CHECK_KILL_AFTER="1")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pids.exists(), "the set was not started"
        os.killpg(check.pid, signal.SIGTERM)
        code = check.wait(timeout=20)
        alive = [pid for pid in map(int, pids.read_text().split()) if not _ended(pid, within=10)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the set's group, if it outlived it
            os.killpg(os.getpgid(int(pids.read_text().split()[0])), signal.SIGKILL)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert code == 143 and "Traceback" not in log, log
    assert not alive  # the set and its writer
    assert "stopped by SIGTERM" in log and not (tmp_path / "work" / "ft").exists(), log  # the next sets: not begun
    assert "not made within" not in log, log


def test_a_stop_after_a_part_has_returned_leaves_its_subshell_going():
    """part's trap outlives the call in the subshell that ran it, where its local pid is gone: under the script's
    set -u a stop there must not end the subshell (reporting the finished part as failed)."""
    part = re.search(r"^part\(\) \{.*?^\}$", SCRIPT.read_text(), re.S | re.M)[0]
    code = f"set -u\n{part}\n( part 5 true; kill -TERM $BASHPID; echo going on )\n"
    result = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30)
    assert "going on" in result.stdout, result.stderr
