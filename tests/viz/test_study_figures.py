"""The study's figures and tables: one colour per setting in every panel, accuracies in percent on
an axis not zoomed to seed noise, no '± 0.0' for a single seed; the captions and legends the
token and reconstruction figures carry."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from matplotlib.colors import to_hex
from PIL import Image
from test_figure_layout import _beit, _lomar, _mae, _study_records

from lomar.cli.study.results import mean_sd, table, write_figures
from lomar.viz.reconstruction import draw_reconstruction
from lomar.viz.study import draw_ablation, draw_time_to_accuracy
from lomar.viz.tokens import draw_tokens


def _colours_by_label(ax) -> dict[str, str]:
    """setting -> colour of its line (errorbar) or bar in one panel."""
    found = {}
    for container in ax.containers:
        label = container.get_label()
        if label.startswith("_"):  # a bar's own error bar
            continue
        if hasattr(container, "patches"):
            found[label] = to_hex(container.patches[0].get_facecolor(), keep_alpha=False)
        else:
            found[label] = to_hex(container.lines[0].get_color())
    return found


def _panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title))


def test_a_setting_keeps_its_colour_in_the_train_loss_panel():
    records = _study_records(2)  # random init, first in the study, has no train loss
    for draw in (draw_time_to_accuracy, draw_ablation):
        fig = draw(records, "t")
        knn, train = _colours_by_label(_panel(fig, "k-NN")), _colours_by_label(_panel(fig, "train loss"))
        assert "random init" in knn and "random init" not in train
        assert len(set(knn.values())) == 3
        assert all(train[s] == knn[s] for s in train) and len(train) == 2, (draw.__name__, knn, train)


def test_accuracies_in_percent_on_an_axis_wider_than_the_noise():
    records = [{"setting": s, "point": "end", "train_seconds": 30.0, "knn": v, "random_init": False}
               for s, v in (("lomar", 0.589), ("mae", 0.605), ("lomar", 0.591), ("mae", 0.601))]
    ax = _panel(draw_time_to_accuracy(records, "t"), "k-NN")
    assert ax.get_title() == "k-NN top-1 (%)"
    assert ax.get_xlabel() == "time in training steps (s)"  # the cells' clock, as results.md says, not wall time
    assert [round(y, 1) for c in ax.containers for y in c.lines[0].get_ydata()] == [59.0, 60.3]
    low, high = ax.get_ylim()
    assert high - low >= 10 - 1e-9 and 0 <= low < 59 and 60.3 < high <= 100
    bars = _panel(draw_ablation(records, "t"), "k-NN")
    assert bars.get_xlim() == (0, 100)
    assert sorted(round(b.patches[0].get_width(), 1) for b in bars.containers if hasattr(b, "patches")) == [59.0, 60.3]


def test_single_seed_shows_no_spread():
    assert mean_sd([0.5], percent=True) == "50.0"
    assert mean_sd([0.25], percent=False) == "0.250"
    assert mean_sd([0.5, 0.7], percent=True) == "60.0 ± 14.1"
    rows = table(_study_records(1), "end")
    assert rows[2].startswith("| random init | 51.0 | 36.0 | 31.0 | 0.500 | – |") and "±" not in "".join(rows)
    assert "±" in "".join(table(_study_records(2), "end"))


def test_write_figures_writes_both_pngs(tmp_path):
    spec = SimpleNamespace(name="tiny", budget="30s", seeds=[0])
    written = write_figures(_study_records(1), spec, tmp_path)
    assert [p.name for p in written] == ["time_to_accuracy.png", "ablation.png"]
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width > 500
    assert write_figures([{"setting": "x", "point": "end"}], spec, tmp_path / "none") == []


def test_token_figure_has_a_legend():
    fig = draw_tokens(_beit(), torch.randn(1, 3, 32, 32))
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["correct prediction", "wrong prediction", "not masked (not predicted)"]
    assert "one fixed colour per token id" in legend.get_title().get_text()


def test_reconstruction_caption_says_predictions_are_rescaled():
    caption = draw_reconstruction(_lomar(), torch.randn(1, 3, 32, 32))._supxlabel.get_text()
    assert "rescaled with the true patch's mean and std" in caption.replace("\n", " ")
    assert "dimmed: outside every window" in caption.replace("\n", " ")
    plain = draw_reconstruction(_mae(), torch.randn(1, 3, 32, 32))._supxlabel.get_text()  # norm_pix_loss=False
    assert "rescaled" not in plain and "masked patches show the prediction" in plain
