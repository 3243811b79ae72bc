"""``lomar bench --task backbone``: records per (size, attention), skips with reasons, memory estimates.

The command's child processes (one per variant, ~5 s of imports apiece) run in ``benchmarks/gpu_check.sh``'s
CPU mode (``tests/bench/test_gpu_check_script.py``, one child per part); each encoder's and each attention's timed
step is checked here in this process.
"""

import json
import sys

import pytest
import torch

from lomar.bench import backbone_plan
from lomar.bench.backbone import run_variant
from lomar.bench.backbone_plan import ELEMENT_BYTES, ENCODERS, bench_backbone, estimate_bytes, format_table, model_flops
from lomar.bench.report import describe, machine_name
from lomar.bench.timing import DTYPES
from lomar.cli.app import main


def test_estimates_show_the_memory_wall_and_its_removal():
    gib = 2**30
    dense = estimate_bytes("dense", "vit_base_patch16", 2048, 1, grad_checkpointing=True)
    chunked = estimate_bytes("chunked", "vit_base_patch16", 2048, 1, grad_checkpointing=True)
    assert dense > 24 * gib > 16 * gib > chunked  # dense at 2048 px cannot run on a 24 GiB machine
    assert estimate_bytes("dense", "vit_base_patch16", 1024, 1, False) > estimate_bytes(
        "dense", "vit_base_patch16", 1024, 1, True)
    assert model_flops("vit_base_patch16", 448, 1) > 4 * model_flops("vit_base_patch16", 224, 1)


def test_a_variant_too_large_for_this_machine_gets_a_record_not_a_crash():
    (rec,) = bench_backbone("vit_base_patch16", [16384], ["dense"], 1, True, "cpu")
    assert rec["status"] == "skipped" and "GiB available" in rec["reason"]
    assert rec["task"] == "backbone" and rec["attention"] == "dense" and rec["step_s"] is None


def test_every_encoder_and_attention_is_timed_and_flex_is_skipped_with_its_reason_on_cpu():
    # lomar, mae, mae+decomposed, mae+bias: ViTDet windows over a 64 px tiny model; then the global attentions
    for variant, encoder in [*(("windowed", e) for e in ENCODERS), ("dense", "lomar"), ("chunked", "lomar")]:
        out = run_variant(dict(model="vit_base_patch16", img_size=64, variant=variant, encoder=encoder, batch_size=1,
                               device="cpu", grad_checkpointing=True, precision="fp32", steps=1, warmup=0, tiny=True))
        assert len(out["step_times_s"]) == 1 and out["step_times_s"][0] > 0, (variant, encoder)
        assert out["peak_mem_kind"] == "cpu_rss_growth"
        assert out["runtime"] == dict(torch=torch.__version__, threads=torch.get_num_threads(),
                                      machine=machine_name(torch.device("cpu")))
    (rec,) = bench_backbone("vit_base_patch16", [64], ["flex"], 1, True, "cpu", tiny=True)
    assert rec["status"] == "skipped" and "CUDA" in rec["reason"]


def test_bad_sizes_are_one_line_errors(capsys):
    assert main(["bench", "--task", "backbone", "--sizes", "1000", "--attention", "dense"]) == 2
    assert "multiples of the patch size 16" in capsys.readouterr().err


def test_sizes_above_the_image_bound_and_grids_below_a_window_are_one_line_errors(capsys):
    assert main(["bench", "--model", "vit_tiny_patch8", "--sizes", "100000", "--device", "cpu"]) == 2
    assert "--sizes must be <= 8192" in capsys.readouterr().err
    assert main(["bench", "--model", "vit_tiny_patch8", "--sizes", "32", "--windows", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("lomar bench: error: 32px: bench's 7x7 windows do not fit its 4x4 patch grid; "
                                       "drop 32 from --sizes (the least is 56)\n")


def test_the_table_says_what_its_figures_are_and_how_far_apart_the_steps_lay():
    """On 2 busy cores the dense encoder measured 4.94 s at 224 px and 2.68 s at 448 px, with no word of the steps,
    the order or the load behind either figure."""
    meta = dict(model="vit_tiny_patch16", batch_size=2, precision="fp32", device="cpu", threads=2, steps=3, warmup=1,
                load_avg_before=(2.5, 2.0, 1.0), load_avg_after=(3.25, 2.0, 1.0), timed="forward + backward passes",
                order="one after another")
    assert describe(meta) == ("vit_tiny_patch16, batch 2, fp32, cpu, 2 threads: s/step is the median of 3 timed "
                              "forward + backward passes per configuration, one after another, after 1 warm-up "
                              "step(s) (load average before, after: 2.50, 3.25)")
    table = format_table([dict(img_size=224, attention="dense", encoder="lomar", status="ok", step_s=2.0,
                               step_times_s=[1.0, 2.0, 3.0], peak_mem_bytes=2**20, estimated_bytes=2**20)])
    assert table.splitlines()[0].split()[5] == "spread" and " 2.00   100% " in table
    assert table.endswith("spread: (slowest - fastest) / median of the timed steps")


def test_the_planner_sizes_elements_as_the_children_do():
    assert ELEMENT_BYTES == {name: dtype.itemsize for name, dtype in DTYPES.items()}


def test_a_cpu_run_plans_and_writes_its_records_without_torch(tmp_path, monkeypatch, capsys):
    """The parent only plans, starts one child per variant and writes what they measured: torch (~5 s a process)
    is the children's. Here an import of torch fails (None in sys.modules), the child is a stand-in giving what
    run_variant gives, and the meta's torch, threads and machine are the child's."""
    specs = []

    def child(spec):
        specs.append(spec)
        return dict(status="ok", step_times_s=[0.5], peak_mem_bytes=2**20, peak_mem_kind="cpu_rss_growth",
                    runtime=dict(torch="9.9", threads=3, machine="a CPU, 3 threads"))

    monkeypatch.setattr(backbone_plan, "_child", child)
    monkeypatch.setitem(sys.modules, "torch", None)
    out = tmp_path / "b.json"
    assert main(["bench", "--task", "backbone", "--model", "vit_tiny_patch8", "--sizes", "64", "--attention",
                 "chunked", "flex", "--device", "cpu", "--precision", "fp32", "--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["attention"], r["status"]) for r in result["records"]] == [("chunked", "ok"), ("flex", "skipped")]
    assert "runtime" not in result["records"][0] and result["records"][0]["step_s"] == 0.5
    assert [s["variant"] for s in specs] == ["chunked"]
    meta = result["meta"]
    assert (meta["torch"], meta["threads"], meta["machine"], meta["device"]) == ("9.9", 3, "a CPU, 3 threads", "cpu")
    assert "3 threads" in capsys.readouterr().out


def test_a_cpu_run_whose_every_variant_is_skipped_still_says_what_it_ran_on(tmp_path, monkeypatch, capsys):
    """No child runs (flex has no CPU backward), so none reports torch, threads and machine: the parent reads them
    itself at the end, and the meta and the summary line name them rather than null and 'None threads'."""
    monkeypatch.setattr(backbone_plan, "_child", lambda spec: pytest.fail(f"no variant should run: {spec}"))
    out = tmp_path / "b.json"
    assert main(["bench", "--task", "backbone", "--model", "vit_tiny_patch8", "--sizes", "64", "--attention", "flex",
                 "--device", "cpu", "--precision", "fp32", "--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    meta, threads = result["meta"], torch.get_num_threads()
    assert [r["status"] for r in result["records"]] == ["skipped"]
    assert (meta["torch"], meta["threads"]) == (torch.__version__, threads)
    assert meta["machine"].endswith(f", {threads} threads")
    assert "None threads" not in capsys.readouterr().out
