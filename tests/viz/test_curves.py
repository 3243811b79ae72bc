"""The run's loss curve (loss.png from metrics.jsonl) and the numbered reconstruction snapshots."""

from __future__ import annotations

import json
import tracemalloc
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lomar import LoMaR, ViTConfig
from lomar.viz.curves import draw_loss_curve, loss_curve, loss_summary, read_losses
from lomar.viz.reconstruction import reconstruction_snapshot


def _metrics(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_read_losses_keeps_training_records_only(tmp_path):
    metrics = _metrics(tmp_path / "metrics.jsonl", [
        {"step": 1, "epoch": 0, "loss": 1.5, "lr": 1e-3},
        {"step": 1, "epoch": 0, "knn_top1": 0.5},  # not a loss
        {"step": 2, "epoch": 0, "loss": float("nan")},  # never plotted
        {"step": 3, "epoch": 0, "loss": 0.75},
    ], tail='{"step": 4, "lo')  # a torn last line
    assert read_losses(metrics) == ([1, 3], [1.5, 0.75])
    assert loss_summary(metrics) == "loss 1.5000 at step 1 -> 0.7500 at step 3"
    assert loss_summary(tmp_path / "missing.jsonl") is None


def test_loss_curve_png_and_its_smoothed_line(tmp_path):
    records = [{"step": s, "loss": 2.0 / s} for s in range(1, 101)]
    path = loss_curve(_metrics(tmp_path / "metrics.jsonl", records), tmp_path / "loss.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file
    fig = draw_loss_curve(*read_losses(tmp_path / "metrics.jsonl"))
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2  # raw and running mean (over 100 // 20 = 5 steps)
    smooth = lines[1].get_ydata()
    assert smooth[4] == sum(2.0 / s for s in range(1, 6)) / 5


def test_no_loss_yet_writes_no_curve(tmp_path):
    assert loss_curve(_metrics(tmp_path / "metrics.jsonl", []), tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_snapshot_writes_the_numbered_figure_and_the_latest(tmp_path):
    torch.manual_seed(0)
    model = LoMaR(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2), 3, 1)
    images = torch.randn(2, 3, 32, 32)
    first = reconstruction_snapshot(model, images, tmp_path, step=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # a different model draws a different picture
    last = reconstruction_snapshot(model, images, tmp_path, step=12)
    assert (first.name, last.name) == ("reconstruction-000000.png", "reconstruction-000012.png")
    assert (tmp_path / "reconstruction.png").read_bytes() == last.read_bytes() != first.read_bytes()


class _Counted(float):
    """A loss that counts the additions it takes part in."""

    adds = 0

    def __add__(self, other):
        _Counted.adds += 1
        return _Counted(float(self) + float(other))

    __radd__ = __add__


def test_running_mean_adds_each_loss_a_bounded_number_of_times():
    """The curve is redrawn at every checkpoint and its window is 5 % of the run: summing each window anew was
    O(steps²) (8 s a figure at 100,000 logged steps), now each loss is added a fixed number of times."""
    n = 2000  # window 100
    losses = [_Counted(1.0 + (i % 7) / 7 + 1e6 * (i == 0)) for i in range(n)]  # a huge first loss too
    _Counted.adds = 0
    fig = draw_loss_curve(list(range(1, n + 1)), losses)
    assert _Counted.adds <= 4 * n  # summing every window: ~n * 100
    smooth = fig.axes[0].get_lines()[1].get_ydata()
    for i in (0, 98, 99, 100, 1234, n - 1):
        window = [float(x) for x in losses[max(0, i - 99):i + 1]]
        assert abs(smooth[i] - sum(window) / len(window)) < 1e-12  # the huge first loss leaves no rounding behind


def test_read_losses_holds_one_line_at_a_time(tmp_path):
    # the run's main process reads the whole log at every checkpoint (loss.png): the file held at once, and its
    # lines, were 2.5x its size more (300 MiB per million steps), which the training process's heap keeps
    records = [{"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-4, "img_s": 123.45, "input_wait": 0.01}
               for s in range(1, 10_001)]
    metrics = _metrics(tmp_path / "metrics.jsonl", records)
    tracemalloc.start()
    try:
        steps, losses = read_losses(metrics)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert steps == list(range(1, 10_001)) and losses[-1] == 1e-4
    assert peak - held < metrics.stat().st_size / 4


@pytest.mark.parametrize("method, label", [("beit", "masked-token cross-entropy"), ("lomar", "reconstruction loss"),
                                           ("mae", "reconstruction loss")])
def test_pretrain_curve_names_the_methods_loss(method, label, tmp_path, monkeypatch):
    """BEiT's logged loss is a cross-entropy over visual tokens: its loss.png called it a reconstruction loss."""
    import lomar.viz.curves as curves
    from lomar.train.pretrain import PretrainTask

    drawn = []
    monkeypatch.setattr(curves, "draw_loss_curve", lambda *a: drawn.append(draw_loss_curve(*a)) or drawn[-1])
    _metrics(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 4)])
    PretrainTask.draw_curves(SimpleNamespace(method=method), tmp_path)
    assert (tmp_path / "loss.png").is_file()
    assert drawn[0].axes[0].get_title() == f"{method} training loss"
    assert drawn[0].axes[0].get_ylabel() == label
