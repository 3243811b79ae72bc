"""``lomar bench --task backbone``: records per (size, attention), skips with reasons, memory estimates."""

import json

import pytest

from lomar.bench.backbone import bench_backbone, estimate_bytes, model_flops
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


@pytest.mark.slow
def test_backbone_bench_runs_each_variant(tmp_path):
    out = tmp_path / "bb.json"
    assert main(["bench", "--task", "backbone", "--tiny", "--sizes", "32", "--attention", "dense", "chunked",
                 "windowed", "flex", "--batch-size", "1", "--grad-checkpointing", "--steps", "1",
                 "--warmup", "0", "--threads", "1", "--quiet", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    records = {r["attention"]: r for r in data["records"]}
    assert list(records) == ["dense", "chunked", "windowed", "flex"]
    for name in ("dense", "chunked", "windowed"):
        rec = records[name]
        assert rec["status"] == "ok", rec
        assert rec["step_s"] > 0 and rec["peak_mem_bytes"] > 0 and rec["grad_checkpointing"]
        assert rec["method"] == "vit_base_patch16" and rec["task"] == "backbone" and rec["img_size"] == 32
    assert records["flex"]["status"] == "skipped" and "CUDA" in records["flex"]["reason"]
    assert data["meta"]["task"] == "backbone" and len(data["meta"]["load_avg_before"]) == 3


@pytest.mark.slow
def test_mae_encoders_with_and_without_a_relative_position_term_are_timed_side_by_side(tmp_path):
    out = tmp_path / "bb.json"
    assert main(["bench", "--task", "backbone", "--tiny", "--sizes", "64", "--attention", "windowed",
                 "--encoders", "lomar", "mae", "mae+decomposed", "mae+bias", "--batch-size", "1", "--steps", "1",
                 "--warmup", "0", "--threads", "1", "--quiet", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["encoder"] for r in records] == ["lomar", "mae", "mae+decomposed", "mae+bias"]
    assert all(r["status"] == "ok" and r["step_s"] > 0 and r["attention"] == "windowed" for r in records), records


def test_bad_sizes_are_one_line_errors(capsys):
    assert main(["bench", "--task", "backbone", "--sizes", "1000", "--attention", "dense"]) == 2
    assert "multiples of the patch size 16" in capsys.readouterr().err


def test_sizes_above_the_image_bound_and_grids_below_a_window_are_one_line_errors(capsys):
    assert main(["bench", "--model", "vit_tiny_patch8", "--sizes", "100000", "--device", "cpu"]) == 2
    assert "--sizes must be <= 8192" in capsys.readouterr().err
    assert main(["bench", "--model", "vit_tiny_patch8", "--sizes", "32", "--windows", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("lomar bench: error: 32px: bench's 7x7 windows do not fit its 4x4 patch grid; "
                                       "drop 32 from --sizes (the least is 56)\n")
