"""What a saved reconstruction figure shows, read back from its PNG: every panel in its place with the pixels it
stands for (masked patches grey), and save_figure's PNG the one savefig draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lomar import LoMaR, ViTConfig
from lomar.models.masking import sample_plan
from lomar.viz.curves import draw_loss_curve
from lomar.viz.reconstruction import draw_reconstruction, reconstruct, save_figure

CONFIG = ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
COLUMNS = ["original", "sampled windows", "masked input", "reconstruction"]


def _model():
    torch.manual_seed(0)
    return LoMaR(CONFIG, window_size=3, num_windows=1)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_every_panel_shows_its_pixels_and_the_masked_patches_grey(tmp_path):
    model, images = _model(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plan = sample_plan(2, (4, 4), 3, 1, 0.5, generator=torch.Generator().manual_seed(3))
    parts = reconstruct(model, images, plan=plan)
    views = [parts["original"], parts["original"], parts["masked"], parts["reconstruction"]]
    fig = draw_reconstruction(model, images, plan=plan)
    png = _pixels(save_figure(fig, tmp_path / "r.png", dpi=80))
    height, width = png.shape[:2]
    assert [ax.get_title() for ax in fig.axes] == COLUMNS
    grey = 0
    for col, ax in enumerate(fig.axes):
        assert len(ax.images) == 2  # one per row
        boxes = [image.get_window_extent() for image in ax.images]
        assert boxes[0].y0 > boxes[1].y1  # the first image's row above the second's
        for row, image in enumerate(ax.images):
            box = image.get_window_extent().transformed(fig.transFigure.inverted())  # as a fraction of the figure
            expected = views[col][row].permute(1, 2, 0).numpy()  # (32, 32, 3) in [0, 1]
            # the centre of each patch's middle pixel, away from the windows' yellow edges on the patch borders
            for y in range(4, 32, 8):
                for x in range(4, 32, 8):
                    px = int((box.x0 + (x + 0.5) / 32 * box.width) * width)
                    py = int((1 - box.y1 + (y + 0.5) / 32 * box.height) * height)
                    want = np.round(expected[y, x] * 255)
                    assert np.abs(png[py, px] - want).max() <= 3, (COLUMNS[col], row, y, x, png[py, px], want)
                    grey += col == 2 and bool(np.all(want == 128))
    assert grey == int(parts["masked"].eq(0.5).all(1)[:, 4::8, 4::8].sum()) > 0  # masked patches drawn grey


@pytest.mark.parametrize("figure", ["reconstruction", "loss curve"])
def test_saved_png_has_the_pixels_savefig_draws(figure, tmp_path):
    def draw():
        if figure == "loss curve":
            return draw_loss_curve(list(range(1, 51)), [2.0 / s for s in range(1, 51)])
        return draw_reconstruction(_model(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))

    saved = save_figure(draw(), tmp_path / "saved.png", dpi=80)
    reference = draw()
    if reference.get_layout_engine() is None:
        reference.tight_layout()  # as save_figure lays out a figure without an engine
    reference.savefig(tmp_path / "reference.png", dpi=80)
    assert np.array_equal(_pixels(saved), _pixels(tmp_path / "reference.png"))


@pytest.mark.parametrize("images, words", [
    (torch.randn(3, 32, 32), "got (3, 32, 32); add the batch dimension (images[None])"),
    (torch.randn(1, 32, 32, 3), "channels come first: images.permute(0, 3, 1, 2)"),
    (torch.randn(1, 3, 30, 30), "image size 30x30 is not divisible by the patch size 8"),
])
def test_reconstruct_refuses_images_the_model_does_not_take_as_the_model_does(images, words):
    # reconstruct cuts the images into patches before the model reads them: torch's reshape error came first
    with pytest.raises(ValueError) as info:
        reconstruct(_model(), images)
    assert words in str(info.value)
    with pytest.raises(TypeError, match="cannot draw reconstructions for VisionTransformer: pass a LoMaR or MAE"):
        reconstruct(_model().encoder, torch.randn(1, 3, 32, 32))


def test_a_compiled_model_draws_the_figure_of_the_module_it_wraps():
    # torch.compile's OptimizedModule is no LoMaR: it was refused as 'cannot draw reconstructions for OptimizedModule'
    model, images = _model(), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model)  # compiles nothing until called, and the figure calls the module it wraps
    assert torch.equal(reconstruct(compiled, images)["reconstruction"], reconstruct(model, images)["reconstruction"])
    assert draw_reconstruction(compiled, images).get_suptitle().startswith("LoMaR reconstruction")
