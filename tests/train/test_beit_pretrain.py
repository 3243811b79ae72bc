"""`lomar pretrain --method beit` (global and windowed), windows for MAE and LoMaR, `lomar tokenizer`."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import yaml

from helpers import losses, pretrain
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main


def test_beit_pretrains_fits_its_tokenizer_and_resumes_exactly(tmp_path, image_dir, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pretrain("--data", str(image_dir), "--out", str(straight), "--method", "beit", "--max-steps", "4") == 0
    assert "k-means tokenizer" in capsys.readouterr().out
    assert pretrain("--data", str(image_dir), "--out", str(resumed), "--method", "beit", "--max-steps", "2") == 0
    saved = yaml.safe_load((resumed / "config.yaml").read_text())
    assert saved["tokenizer"] == str(resumed / "tokenizer.safetensors") and saved["windows"] == 2
    stamp = (resumed / "tokenizer.safetensors").stat().st_mtime_ns
    assert pretrain("--data", str(image_dir), "--out", str(resumed), "--max-steps", "4", "--resume", "auto") == 0
    assert (resumed / "tokenizer.safetensors").stat().st_mtime_ns == stamp  # reused, not fitted again
    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert a["step"] == b["step"] == 4
    assert not any("centroid" in k for k in a["model"])
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-7)
    assert losses(straight) == losses(resumed)
    assert all(math.isfinite(v) for v in losses(straight))
    records = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == 4 and all(0 <= r["masked_token_accuracy"] <= 1 for r in records)
    assert (straight / "encoder.safetensors").is_file() and (straight / "config.json").is_file()
    assert (straight / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"  # the token-map figure


def test_a_beit_run_started_with_a_relative_out_resumes_from_another_working_folder(tmp_path, image_dir, monkeypatch,
                                                                                     no_run_figures):
    """The fitted tokenizer's path is recorded absolute: recorded as given (runs/beit/tokenizer.safetensors), it was
    looked for under the working folder of the resume, and --tokenizer given again 'differed' from it."""
    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    assert pretrain("--data", str(image_dir), "--out", "runs/beit", "--method", "beit", "--max-steps", "2",
                    "--schedule-steps", "4") == 0
    monkeypatch.chdir(tmp_path)
    assert pretrain("--out", "first/runs/beit", "--max-steps", "4", "--resume", "auto") == 0
    assert safe_load(tmp_path / "first/runs/beit/last.pt")["step"] == 4


def test_beit_warms_up_as_its_code_does(tmp_path, image_dir, capsys, no_run_figures):
    """BEiT's lr reaches its peak at the warm-up's last step (linspace), where MAE's reaches it one step
    later: a 6-step warm-up of a 60-step schedule, stopped after 6 steps, has trained at the peak."""
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--method", "beit", "--max-steps", "6",
                    "--schedule-steps", "60", "--epochs", "20", "--warmup-epochs", "2", "--log-every", "1") == 0
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    peak = yaml.safe_load((out / "config.yaml").read_text())["lr"]
    assert lrs == pytest.approx([peak * s / 5 for s in range(6)], rel=1e-12)


@pytest.mark.parametrize("method,extra", [("beit", ["--windows", "global"]), ("beit", ["--mask-ratio", "0.5"]),
                                          ("mae", ["--decoder-embed-dim", "16", "--decoder-depth", "1",
                                                   "--decoder-num-heads", "2", "--mask-ratio", "0.5"]),
                                          ("lomar", ["--windows", "0", "--mask-ratio", "0.5"])])
def test_every_method_runs_global_or_windowed(tmp_path, image_dir, method, extra):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--method", method, "--max-steps", "2", *extra) == 0
    assert all(math.isfinite(v) for v in losses(out))
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(("masked_token_accuracy" in r) == (method == "beit") for r in logged) and len(logged) == 2


def test_given_tokenizer_is_used_and_its_vocabulary_sizes_the_head(tmp_path, image_dir, no_run_figures):
    tok = tmp_path / "tok.safetensors"
    assert main(["tokenizer", "fit", "--data", str(image_dir), "--vocab", "7", "--out", str(tok)]) == 0
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--method", "beit", "--tokenizer", str(tok),
                    "--max-steps", "1") == 0
    assert safe_load(out / "last.pt")["model"]["beit.lm_head.weight"].shape[0] == 7
    assert not (out / "tokenizer.safetensors").exists()


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("touch EVIL_MARKER",)


def test_malicious_tokenizer_pickle_is_refused_without_running(tmp_path, image_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "encoder.pkl"
    evil.write_bytes(pickle.dumps(_Evil()))
    code = pretrain("--data", str(image_dir), "--out", str(tmp_path / "run"), "--method", "beit",
                    "--tokenizer", str(evil), "--max-steps", "1")
    assert code == 2
    assert not (tmp_path / "EVIL_MARKER").exists()
    err = capsys.readouterr().err
    assert "refusing" in err and len(err.strip().splitlines()) == 1


def test_tokenizer_flag_needs_beit(tmp_path, capsys):
    assert pretrain("--out", str(tmp_path / "r"), "--tokenizer", "x.safetensors", "--print-config") == 2
    assert "--method beit" in capsys.readouterr().err


def test_tokenizer_cli_fit_and_convert(tmp_path, image_dir, capsys):
    from lomar.tokenizers import DVAEConfig, DVAEEncoder, load_tokenizer

    out = tmp_path / "tok.safetensors"
    assert main(["tokenizer", "fit", "--data", str(image_dir), "--vocab", "12", "--size", "32",
                 "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 12 and tok.tokens(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    assert main(["tokenizer", "fit", "--data", str(image_dir), "--vocab", "100000", "--out", str(out),
                 "--overwrite"]) == 2
    assert "vocab" in capsys.readouterr().err
    dvae = DVAEEncoder(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=10))
    state = tmp_path / "dvae.pt"
    torch.save({"model": dvae.state_dict()}, state)
    target = tmp_path / "dvae.safetensors"
    assert main(["tokenizer", "convert", str(state), "--to", str(target)]) == 0
    loaded = load_tokenizer(target)
    images = torch.rand(2, 3, 112, 112)
    assert torch.equal(loaded.tokens(images), dvae.eval().tokens(images))
