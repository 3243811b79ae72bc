"""Every figure kind lomar draws, rendered on tiny inputs as it is written: no two drawn texts
overlap and every text lies inside the figure."""

from __future__ import annotations

import itertools
from dataclasses import replace
from unittest import mock

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

import lomar.viz.reconstruction as reconstruction
from lomar import MAE, LoMaR, ViTConfig
from lomar.models.beit import BEiTConfig
from lomar.models.beit_pretrain import BEiTPretrain
from lomar.tokenizers import KMeansTokenizer
from lomar.viz.attention import draw_attention, window_attention
from lomar.viz.curves import draw_loss_curve
from lomar.viz.study import draw_ablation, draw_time_to_accuracy
from lomar.viz.tokens import draw_tokens

CONFIG = ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)


def drawn_texts(fig, tmp_path, dpi: int = 80) -> list[tuple[str, object]]:
    """(text, window extent) of every non-empty Text the figure draws, laid out as save_figure
    writes it (tight layout unless the figure has its own engine). Texts are collected while the
    canvas draws, so tick labels outside the view and hidden texts, which exist but are not
    drawn, are left out."""
    reconstruction.save_figure(fig, tmp_path / "figure.png", dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    drawn, draw = [], Text.draw

    def recording_draw(text, renderer):
        drawn.append(text)
        return draw(text, renderer)

    with mock.patch.object(Text, "draw", recording_draw):
        canvas.draw()
    renderer = canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in drawn
            if t.get_visible() and t.get_text().strip()]


def assert_clean_layout(fig, tmp_path) -> None:
    texts = drawn_texts(fig, tmp_path)
    assert texts
    width, height = fig.bbox.width, fig.bbox.height
    outside = [(s, b.bounds) for s, b in texts if b.x0 < -1 or b.y0 < -1 or b.x1 > width + 1 or b.y1 > height + 1]
    assert not outside, f"texts outside the {width:.0f}x{height:.0f} figure: {outside}"
    overlapping = [(s, t) for (s, a), (t, b) in itertools.combinations(texts, 2)
                   if a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1]
    assert not overlapping, f"overlapping texts: {overlapping}"


def _lomar():
    torch.manual_seed(0)
    return LoMaR(CONFIG, window_size=3, num_windows=2)


def _mae():
    torch.manual_seed(0)
    return MAE(replace(CONFIG, pos="abs"), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
               norm_pix_loss=False)


def _beit():
    torch.manual_seed(0)
    tokenizer = KMeansTokenizer(torch.randn(16, 3 * 8 * 8, generator=torch.Generator().manual_seed(0)),
                                patch=8, input_size=32)
    config = BEiTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, vocab_size=16)
    return BEiTPretrain(config, tokenizer, window_size=3, num_windows=2)


def _study_records(seeds: int) -> list[dict]:
    """results.json records: random init (no train loss) and two trained settings with long labels."""
    records = []
    for seed in range(seeds):
        for setting, base in (("random init", 0.31), ("method=lomar, window_size=7, windows=4", 0.60),
                              ("method=mae, mask_ratio=0.75", 0.59)):
            random_init = setting == "random init"
            for point, seconds in (("at-10s", 10.0), ("end", 30.0)):
                if random_init and point != "end":
                    continue
                records.append({"setting": setting, "seed": seed, "random_init": random_init, "point": point,
                                "step": 0 if random_init else int(seconds * 3),
                                "train_seconds": 0.0 if random_init else seconds,
                                "finetune": base + 0.2, "linprobe": base + 0.05, "knn": base + 0.004 * seed,
                                "heldout_loss": 0.5 + 0.01 * seed,
                                "train_loss": None if random_init else 0.7 - seconds / 100})
    return records


def _bench_records() -> list[dict]:
    return [{"method": method, "window_setting": setting, "windows": windows, "img_size": size,
             "step_s": 0.01 * (size / 64) ** 2 * factor}
            for size in (64, 128, 224)
            for method, setting, windows, factor in (("mae", "-", None, 3.0), ("lomar", "paper", 4, 1.0),
                                                     ("lomar", "fixed", 2, 0.5))]


def _attention(context: str, depth: int, tmp_path):
    torch.manual_seed(0)
    model = LoMaR(ViTConfig(img_size=48, patch_size=16, embed_dim=16, depth=depth, num_heads=2),
                  window_size=3, num_windows=1)
    image = torch.randn(3, 48, 48)
    if context == "window":
        result = window_attention(model, image, masked=True)
    else:
        result = window_attention(model.encoder, image, window_size=3)
    return draw_attention(result, image.sigmoid(), 16, title="a-photo-with-a-rather-long-file-name.png")


def _bench_figure(tmp_path):
    from lomar.bench import report

    captured = []  # plot_times imports the writer when it draws
    with mock.patch.object(reconstruction, "save_figure", lambda fig, path, dpi: captured.append(fig) or path):
        report.plot_times(_bench_records(), tmp_path / "bench.png", subtitle="cpu, 2 threads")
    return captured[0]


FIGURES = {
    "reconstruction-lomar-1": lambda tmp: reconstruction.draw_reconstruction(_lomar(), torch.randn(1, 3, 32, 32)),
    "reconstruction-lomar-3": lambda tmp: reconstruction.draw_reconstruction(_lomar(), torch.randn(3, 3, 32, 32)),
    "reconstruction-mae": lambda tmp: reconstruction.draw_reconstruction(_mae(), torch.randn(2, 3, 32, 32),
                                                                       title="a title\nof two lines"),
    "attention-window-2-rows": lambda tmp: _attention("window", 9, tmp),
    "attention-image-2-rows": lambda tmp: _attention("image", 9, tmp),
    "attention-image-1-row": lambda tmp: _attention("image", 1, tmp),
    "tokens-1": lambda tmp: draw_tokens(_beit(), torch.randn(1, 3, 32, 32)),
    "tokens-3": lambda tmp: draw_tokens(_beit(), torch.randn(3, 3, 32, 32)),
    "loss-curve": lambda tmp: draw_loss_curve(list(range(1, 101)), [2.0 / s for s in range(1, 101)]),
    "study-time-1-seed": lambda tmp: draw_time_to_accuracy(_study_records(1), "tiny: against pretraining time"),
    "study-time-3-seeds": lambda tmp: draw_time_to_accuracy(_study_records(3), "tiny: against pretraining time "
                                                                              "(mean ± sd over seeds)"),
    "study-ablation-1-seed": lambda tmp: draw_ablation(_study_records(1), "tiny: end of a 30s budget"),
    "study-ablation-3-seeds": lambda tmp: draw_ablation(_study_records(3), "tiny: end of a 30s budget "
                                                                          "(mean ± sd over seeds)"),
    "study-ablation-train-loss-only": lambda tmp: draw_ablation(
        [{k: v for k, v in r.items() if k not in ("finetune", "linprobe", "knn", "heldout_loss")}
         for r in _study_records(2)], "tiny: train loss only"),
    "bench-times": _bench_figure,
}


@pytest.mark.parametrize("kind", list(FIGURES))
def test_texts_neither_overlap_nor_leave_the_figure(kind, tmp_path):
    assert_clean_layout(FIGURES[kind](tmp_path), tmp_path)


def test_the_check_sees_overlapping_and_clipped_texts(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    fig.text(0.1, 0.5, "one text")
    fig.text(0.15, 0.5, "another text")
    with pytest.raises(AssertionError, match="overlapping texts"):
        assert_clean_layout(fig, tmp_path)
    fig = Figure(figsize=(3, 2))
    fig.text(0.9, 0.5, "runs off the right edge")
    with pytest.raises(AssertionError, match="outside"):
        assert_clean_layout(fig, tmp_path)
