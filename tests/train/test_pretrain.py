"""`lomar pretrain`: exact resume across an epoch boundary with gradient accumulation.

The other engine guarantees are tested in test_engine*.py and tests/cli/test_pretrain_cli_*.py.
"""

import collections
import json
import pickle
import re
import shutil
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from helpers import BENCHMARKS
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data import device_decode, fast_decode
from lomar.data.device_decode import decode_batch
from lomar.data.gpu_jpeg import nvimgcodec_missing
from lomar.train import lifecycle, preemption, pretrain
from lomar.train.distributed import DistInfo
from lomar.train.run_resume import listing_change, listing_record

GPU_CHECK = BENCHMARKS / "gpu_check.sh"
TINY = ["--model", "vit_tiny_patch8", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
        "--img-size", "32", "--window-size", "3", "--windows", "2", "--batch-size", "2",
        "--workers", "0", "--device", "cpu", "--epochs", "3", "--warmup-epochs", "1", "--lr", "1e-3",
        "--figure-images", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def _run(*args) -> int:
    return main(["pretrain", *TINY, *map(str, args)])


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_what_a_spawned_loader_worker_is_given_pickles_and_loads_the_batches_of_in_process_loading(data, tmp_path,
                                                                                                  monkeypatch):
    """macOS and Windows start loader workers by spawn: a fresh interpreter given the dataset, collate_fn and
    worker_init_fn pickled (the sampler stays in the training process). Each must pickle as spawn pickles it, and the
    copies load every batch of an epoch as the originals do. A real spawned worker would add only the state the training
    process sets at run time, which a fresh interpreter lacks and no loader worker reads (lomar.data reads the
    environment, which a spawned process inherits, and sets its warning filters in place), at the cost of importing
    torch there (seconds)."""
    built = []
    monkeypatch.setattr(pretrain, "run", lambda config, make_task: built.append(  # the task alone, no training
        make_task(config, DistInfo(), torch.device("cpu"))) or 0)
    assert _run("--data", data, "--out", tmp_path / "run", "--workers", 1) == 0
    loader = built[0].train_loader
    dataset, collate, init = pickle.loads(ForkingPickler.dumps((loader.dataset, loader.collate_fn,
                                                                loader.worker_init_fn)))  # as spawn's Process pickles
    assert init is loader.worker_init_fn  # by name: the one function a fresh interpreter imports

    def epoch(dataset, collate):
        return list(DataLoader(dataset, loader.batch_size, sampler=loader.sampler, collate_fn=collate, drop_last=True))

    copies, originals = epoch(dataset, collate), epoch(loader.dataset, loader.collate_fn)
    assert len(originals) == 4 and [b.keys() for b in copies] == [b.keys() for b in originals]
    assert all(torch.equal(c[k], o[k]) if torch.is_tensor(o[k]) else c[k] == o[k]
               for c, o in zip(copies, originals) for k in o)


def test_resume_across_epoch_boundary_with_accumulation(data, tmp_path, no_run_figures):
    # 8 images, batch 2, accum 2: 2 optimizer steps per epoch; stop at 3 = mid-epoch 1.
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--data", data, "--accum-steps", "2")
    assert _run(*args, "--out", one, "--max-steps", "5") == 0
    assert _run(*args, "--out", two, "--max-steps", "3") == 0
    assert _run(*args, "--out", two, "--max-steps", "5", "--resume", "auto") == 0
    assert _losses(one) == _losses(two) and len(_losses(one)) == 5
    assert torch.equal(safe_load(one / "last.pt")["model"]["head.weight"],
                       safe_load(two / "last.pt")["model"]["head.weight"])


def test_resume_auto_alone_continues_with_the_saved_settings(data, tmp_path, capsys, no_run_figures):
    # Non-default data, model and batch size; the resume names only --out and --max-steps.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--data", data, "--batch-size", "4")
    assert _run(*args, "--out", straight, "--max-steps", "4") == 0
    assert _run(*args, "--out", resumed, "--max-steps", "2") == 0
    assert main(["pretrain", "--out", str(resumed), "--resume", "auto", "--max-steps", "4"]) == 0
    assert safe_load(resumed / "last.pt")["step"] == 4
    assert _losses(resumed) == _losses(straight)  # the same run, as if never stopped
    capsys.readouterr()
    code = main(["pretrain", "--out", str(resumed), "--resume", "auto", "--max-steps", "6", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size 2 differs from 4" in err and err.count("\n") == 1
    assert safe_load(resumed / "last.pt")["step"] == 4  # nothing was done


def test_resume_from_a_checkpoint_path_uses_its_out_and_a_finished_one_builds_nothing(data, tmp_path, capsys,
                                                                                       monkeypatch):
    out = tmp_path / "run"
    assert _run("--data", data, "--out", out, "--max-steps", "1") == 0
    assert "lomar vit_tiny_patch8 (32 wide, 1 block, 32 px, " in capsys.readouterr().out  # TINY's depth: not '1 blocks'
    assert main(["pretrain", "--resume", str(out / "last.pt"), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["out"] == str(out) and resolved["data"] == str(data) and resolved["embed_dim"] == 32
    # the run is at its end: the resume built the model to say so, and did not draw a deleted loss.png again

    def build(*args):
        raise AssertionError("the run was built")

    (out / "loss.png").unlink()
    monkeypatch.setattr(pretrain.PretrainTask, "__init__", build)
    assert main(["pretrain", "--out", str(out), "--resume", "auto"]) == 0
    assert "nothing to do, the run is at step 1" in capsys.readouterr().out
    assert Image.open(out / "loss.png").size == (600, 350)


def test_a_resume_reads_its_checkpoint_and_run_folder_once(data, tmp_path, monkeypatch):
    # the settings, the refusals and the run's end are told from one mapped read; the weights are read once more.
    # --resume auto searches the folder twice: for the settings, and under the run's lock (a save may have come)
    out = tmp_path / "run"
    assert _run("--data", data, "--out", out, "--max-steps", "2") == 0
    loads, listings = collections.Counter(), collections.Counter()
    load, glob = torch.load, Path.glob

    def counted_load(f, *args, **kwargs):
        loads[Path(f).name, "mapped" if kwargs.get("mmap") else "whole"] += 1
        return load(f, *args, **kwargs)

    def counted_glob(self, pattern, *args, **kwargs):
        listings[pattern] += 1
        return glob(self, pattern, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted_load)
    monkeypatch.setattr(Path, "glob", counted_glob)
    assert main(["pretrain", "--out", str(out), "--resume", "auto", "--max-steps", "4"]) == 0
    assert loads == {("last.pt", "mapped"): 1, ("last.pt", "whole"): 1} and listings["checkpoint-*"] == 2
    loads.clear(), listings.clear()
    assert main(["pretrain", "--resume", str(out / "last.pt"), "--max-steps", "4"]) == 0  # nothing to do
    assert loads == {("last.pt", "mapped"): 1} and listings["checkpoint-*"] == 1


def test_a_resume_on_data_that_changed_warns_that_it_does_not_continue_exactly(data, tmp_path, capsys, no_run_figures):
    """--data may change on resume, but a sample index then points at another file: one file renamed (one removed,
    one added: the same count) left the resume silent."""
    images, out = tmp_path / "imgs", tmp_path / "run"
    shutil.copytree(data, images)
    assert _run("--data", images, "--out", out, "--max-steps", "2") == 0  # 4 steps an epoch: stopped in epoch 0
    (images / "img03.png").rename(images / "img99.png")
    capsys.readouterr()
    assert _run("--data", images, "--out", out, "--max-steps", "3", "--resume", "auto") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--data" in line]
    assert warnings == [f"lomar pretrain: warning: --data {images} has changed since this checkpoint was saved (8 "
                        f"images as then, but not the same files): samples are drawn by their place in the listing, "
                        f"so the rest of epoch 0 reads other images than the stopped run would have; the resume does "
                        f"not continue exactly where it stopped"]


def test_a_demo_run_resumed_on_data_warns_that_it_does_not_continue_exactly(data, tmp_path, capsys, no_run_figures):
    """The demo photographs are a listing too: a demo run resumed with --data trains on other images. Its start under
    --resume auto into a folder of no checkpoint (a mistyped --out looks the same) names the new run and the demo."""
    assert _run("--out", tmp_path, "--max-steps", "1", "--resume", "auto") == 0
    assert (f"; a new run (--resume auto found no checkpoint in {tmp_path}) on the demo photographs (no --data), 120 "
            f"crops an epoch; ") in capsys.readouterr().out
    assert _run("--data", data, "--out", tmp_path, "--max-steps", "2", "--resume", "auto") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "has changed" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"lomar pretrain: warning: --data {data} has changed since "
                                                         f"this checkpoint was saved (8 images now, "), warnings


def test_the_listing_a_checkpoint_keeps_is_the_same_for_a_moved_folder_and_differs_for_other_files():
    names = [f"cat/{i}.jpg" for i in range(3)]
    here = listing_record([f"/data/{n}" for n in names], "/data", 3)
    assert here == listing_record([f"/mnt/new/{n}" for n in names], "/mnt/new", 3)
    assert listing_change(here, here, "/data", {"epoch": 0, "batches_done": 2}) is None
    assert listing_change(None, here, "/data", {}) is None  # a checkpoint saved before the record was kept
    assert listing_change(here, listing_record([], "/x", 4), None, {"epoch": 0}).startswith(
        "the data (the demo photographs: no --data) has changed since this checkpoint was saved (4 images now, 3 then)")
    grown = listing_record([f"/data/{n}" for n in [*names, "cat/3.jpg"]], "/data", 4)
    change = listing_change(here, grown, "/data", {"epoch": 2, "batches_done": 0})
    assert change.startswith("--data /data has changed since this checkpoint was saved (4 images now, 3 then): from "
                             "epoch 2 on the run trains on the listing as it is now; the resume does not continue")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """Photos large enough for reduced-size decoding (a 32 px crop of 2-8x that)."""
    root = tmp_path_factory.mktemp("jpegs")
    y, x = np.mgrid[0:300, 0:400]
    for i in range(8):
        pixels = np.stack([(x * (i + 1)) % 256, (y * 2) % 256, ((x + y + 40 * i) // 2) % 256], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"photo{i}.jpg", quality=90)
    return root


def test_decode_gpu_trains_on_the_reference_pixels(jpegs, tmp_path, monkeypatch):
    """--decode gpu's batch decoding, run on CPU (torchvision's CPU decoder): the run is the
    reference run, loss for loss. On a CUDA machine --device auto takes the GPU path itself."""
    monkeypatch.setattr(device_decode, "DEVICE_DECODE_TYPES", ("cuda", "cpu"))
    decoded = []
    monkeypatch.setattr(device_decode, "decode_batch", lambda batch, *args: decoded.append(len(batch["encoded"]))
                        or decode_batch(batch, *args))
    assert _run("--data", jpegs, "--out", tmp_path / "full", "--max-steps", 5) == 0
    assert not decoded
    assert _run("--data", jpegs, "--out", tmp_path / "gpu", "--max-steps", 5, "--device", "auto",
                "--decode", "gpu") == 0
    # every batch went through the batched decoder; it reads up to two batches past the last step
    assert 5 <= len(decoded) <= 7 and set(decoded) == {2}
    if not torch.cuda.is_available():
        assert _losses(tmp_path / "gpu") == _losses(tmp_path / "full")
    assert (tmp_path / "gpu" / "reconstruction.png").exists()
    decoded.clear()  # decoded just in time: exactly the batches trained on, the same run
    assert _run("--data", jpegs, "--out", tmp_path / "inline", "--max-steps", 5, "--device", "auto",
                "--decode", "gpu", "--decode-ahead", 0) == 0
    assert decoded == [2] * 5
    if not torch.cuda.is_available():
        assert _losses(tmp_path / "inline") == _losses(tmp_path / "gpu")


@pytest.mark.parametrize("share, words", [("0.5", "decoded 50% of the photos the device could have decoded "
                                                   "(--cpu-decode-share 0.50)"),
                                          ("auto", "(--cpu-decode-share auto, last ")])
def test_decode_gpu_shares_the_photos_with_the_workers(jpegs, tmp_path, monkeypatch, capsys, share, words):
    monkeypatch.setattr(device_decode, "DEVICE_DECODE_TYPES", ("cuda", "cpu"))
    assert _run("--data", jpegs, "--out", tmp_path / "run", "--max-steps", 4, "--device", "auto", "--decode", "gpu",
                "--workers", 1, "--cpu-decode-share", share) == 0
    printed = capsys.readouterr().out
    assert words in printed
    # benchmarks/gpu_check.sh reads the shares from this line into pretrain.json
    pattern = re.search(r're\.search\(r"(.+?)", open\(printed\)', GPU_CHECK.read_text())[1]
    found = re.search(pattern, printed)
    assert found and 0 <= int(found[1]) <= 100 and 0 <= float(found[2]) <= 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 <= row["cpu_decode_share"] <= 1 for row in rows)  # the balance as it moved


@pytest.mark.skipif(not torch.cuda.is_available() or nvimgcodec_missing() is not None,
                    reason="needs CUDA and nvImageCodec")
def test_decode_gpu_on_the_hardware_decoder_trains_as_torchvisions_does(jpegs, tmp_path):
    for decoder in ("torchvision", "nvimgcodec"):
        assert _run("--data", jpegs, "--out", tmp_path / decoder, "--max-steps", 5, "--device", "cuda",
                    "--decode", "gpu", "--gpu-decoder", decoder, "--cpu-decode-share", 0) == 0
    hardware, reference = _losses(tmp_path / "nvimgcodec"), _losses(tmp_path / "torchvision")
    # the same crops, flips and plans; pixels a few levels apart (tests/data/test_gpu_jpeg.py)
    assert len(hardware) == 5 and all(abs(a - b) <= 0.05 * abs(b) for a, b in zip(hardware, reference)), (
        hardware, reference)


@pytest.mark.parametrize("decode", ["draft", "windows"])
def test_reduced_decoding_trains_and_resumes_exactly(jpegs, tmp_path, decode, no_run_figures):
    full = tmp_path / "full"
    assert _run("--data", jpegs, "--out", full, "--decode", decode, "--max-steps", 6) == 0
    assert _run("--data", jpegs, "--out", tmp_path / "cut", "--decode", decode, "--max-steps", 3) == 0
    assert _run("--out", tmp_path / "cut", "--resume", "auto", "--max-steps", 6) == 0
    assert _losses(tmp_path / "cut") == _losses(full)
    assert all(np.isfinite(_losses(full)))
    # the reduced decode does change pixels: the run is not the reference one
    assert _run("--data", jpegs, "--out", tmp_path / "ref", "--max-steps", 6) == 0
    assert _losses(tmp_path / "ref") != _losses(full)


@pytest.mark.parametrize("method, flags", [("mae", ("--decoder-embed-dim", 16, "--decoder-depth", 1,
                                                    "--decoder-num-heads", 2)),
                                           ("beit", ("--color-jitter", 0))])
def test_windows_decoding_trains_with_windows_as_draft_does(jpegs, tmp_path, monkeypatch, method, flags):
    """--decode windows resamples the windows as --decode draft's crop has them and leaves the rest blank: MAE with
    windows, which reads nothing else (as LoMaR; tests/models/test_methods_windows.py), and BEiT with its built-in
    k-means tokenizer of the model's 8 px patches (each target from its own patch's pixels), train loss for loss
    as on draft's whole crops."""
    monkeypatch.setattr(pretrain.PretrainTask, "figure", lambda self, model=None: None)  # most of a run's time
    resampled = []
    resample = fast_decode.resample_windows
    monkeypatch.setattr(fast_decode, "resample_windows", lambda *a: resampled.append(1) or resample(*a))
    for decode in ("draft", "windows"):
        assert _run("--data", jpegs, "--out", tmp_path / decode, "--method", method, *flags, "--decode", decode,
                    "--max-steps", 3) == 0
    assert len(resampled) >= 6  # the windows run's samples had blank pixels around their windows
    assert _losses(tmp_path / "windows") == _losses(tmp_path / "draft") and len(_losses(tmp_path / "draft")) == 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need CUDA"))])
def test_reduce_overhead_trains_as_eager_with_accumulation(data, tmp_path, device, monkeypatch):
    """``--compile-mode reduce-overhead`` on CUDA replays the step as CUDA graphs, whose outputs the
    next replay overwrites: the logged loss and the accumulated gradient must not be. A large lr makes
    a wrong gradient show in the losses within a few steps; fp32, so compiling changes only rounding.
    The gradients stay allocated between steps (a None .grad would adopt the graphs' output memory,
    pytorch/pytorch#169545): checked on every device, since only CUDA shows the failure."""
    torch._dynamo.reset()
    monkeypatch.setattr(pretrain.PretrainTask, "figure", lambda self, model=None: None)  # no assertion reads one
    kept = []
    step = lifecycle._Run._optimizer_step

    def checked_step(run):
        done = step(run)
        kept.append(all(p.grad is not None for p in run.task.model.parameters() if p.requires_grad))
        return done

    monkeypatch.setattr(lifecycle._Run, "_optimizer_step", checked_step)
    args = ("--data", data, "--accum-steps", "2", "--lr", "1e-2", "--max-steps", "4", "--device", device,
            "--precision", "fp32")
    assert _run(*args, "--out", tmp_path / "eager") == 0
    assert kept == [False] * 4  # eager frees them, as torch's default does
    kept.clear()
    compiled = preemption.compile_seconds()
    assert _run(*args, "--out", tmp_path / "graphs", "--compile", "--compile-mode", "reduce-overhead") == 0
    assert kept == [True] * 4
    assert preemption.compile_seconds() > compiled  # the time limit's margin leaves it out: torch times it as read
    assert _losses(tmp_path / "graphs") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-3)
    assert len(set(_losses(tmp_path / "eager"))) == 4


def test_compile_mode_needs_compile(capsys):
    assert _run("--data", "unused", "--compile-mode", "reduce-overhead") == 2
    err = capsys.readouterr().err
    assert "--compile-mode reduce-overhead applies to a compiled model only; add --compile" in err
    assert err.count("\n") == 1
