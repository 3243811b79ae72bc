"""``benchmarks/gpu_check.sh`` in its tiny CPU mode: every part runs and reports ok.

A device is lent to few sessions and for minutes; the script must work the first time it meets one.
The CPU mode runs the same commands (bench, loader, pretrain, finetune, backbone, the CUDA-marked
tests) on a tiny model, so a renamed module or flag breaks this test instead of the device run.
Beside it: the summary script, the bench commands the check runs, a bad decode word, and each part's status
where bash is in POSIX mode.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gpu_check_stand_ins import SCRIPT, _stand_in

from helpers import load_benchmark
from lomar.bench.profile import KINDS

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
           # the device's 90 s per backbone run is a budget, not a check: a busy 2-core CPU can take longer
           "GPU_CHECK_T_BACKBONE": "240",
           # the device's 470 s plan, too: a loaded CPU can spend it before the bench parts, which would be skipped
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
