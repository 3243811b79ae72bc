"""Figure layout and the absence of import-time global state in the library."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from lomar import MAE, LoMaR, ViTConfig
from lomar.viz.reconstruction import draw_reconstruction, reconstruction_figure, save_figure

SRC = Path(__file__).resolve().parents[2] / "src" / "lomar"
CONFIG = ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)


def _model(method: str):
    torch.manual_seed(0)
    if method == "lomar":
        return LoMaR(CONFIG, window_size=3, num_windows=1)
    return MAE(replace(CONFIG, pos="abs"), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


@pytest.mark.parametrize("rows", [1, 7, 12])
@pytest.mark.parametrize("method", ["lomar", "mae"])
def test_title_clears_the_column_headers(rows, method, tmp_path):
    images = torch.randn(rows, 3, 32, 32)
    fig = draw_reconstruction(_model(method), images, title="a title\nof two lines")
    save_figure(fig, tmp_path / "r.png", dpi=20)  # lays the figure out as written
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    columns = 4 if method == "lomar" else 3  # MAE's figure has no windows column
    headers = [ax.title.get_window_extent(renderer) for ax in fig.axes[:columns]]
    assert all(h.y1 <= title.y0 for h in headers), (title, headers)
    assert all(fig.axes[0].get_window_extent(renderer).y1 <= h.y0 + 1 for h in headers)


def test_figure_is_written_whole(tmp_path):
    path = reconstruction_figure(_model("lomar"), torch.randn(2, 3, 32, 32), tmp_path / "sub" / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["r.png"]  # no temporary file left


_GLOBAL_CALLS = {("matplotlib", "use"), ("warnings", "filterwarnings"), ("warnings", "simplefilter"),
                 ("torch", "set_num_threads"), ("torch", "set_default_dtype"),
                 ("torch", "set_float32_matmul_precision"),
                 ("torch", "set_grad_enabled"), ("torch", "manual_seed")}


def _module_level_calls(tree: ast.Module):
    """Calls run at import: in the module body, outside functions and classes."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name):
            yield node.func.value.id, node.func.attr, node.lineno
        stack.extend(ast.iter_child_nodes(node))


def test_library_modules_change_no_global_state_on_import():
    found = [f"{path.relative_to(SRC)}:{line} {mod}.{attr}"
             for path in sorted(SRC.rglob("*.py"))
             for mod, attr, line in _module_level_calls(ast.parse(path.read_text()))
             if (mod, attr) in _GLOBAL_CALLS or (mod == "torch" and attr.startswith("set_"))]
    assert not found, found


@pytest.mark.parametrize("method, note", [
    ("lomar", "1 window of 3x3 patches, 7 of each window's 9 masked (mask ratio 0.8)"),
    ("mae", "12 of the image's 16 patches masked (mask ratio 0.75)"),
])
def test_reconstruction_title_says_how_the_image_was_masked(method, note):
    """A title naming the checkpoint only left the window size and mask ratio of what is shown unsaid."""
    fig = draw_reconstruction(_model(method), torch.randn(1, 3, 32, 32), title="run")
    assert fig._suptitle.get_text().split("\n")[1] == note
    columns = ["original", "sampled windows", "masked input", "reconstruction"]
    if method == "mae":  # no windows to draw: the column would repeat the original
        columns.remove("sampled windows")
    assert [ax.get_title() for ax in fig.axes] == columns


def test_reconstruction_title_describes_a_given_plan():
    """A plan given to the figure was described by the model's own sampling: 2 windows, 7 of 9 masked, for 1 window
    with 4 masked drawn."""
    from lomar.models.masking import sample_plan

    torch.manual_seed(0)
    model = LoMaR(replace(CONFIG, img_size=48), window_size=3, num_windows=2)
    plan = sample_plan(2, (6, 6), 3, 1, 0.5, generator=torch.Generator().manual_seed(7))
    title = draw_reconstruction(model, torch.randn(2, 3, 48, 48), plan=plan)._suptitle.get_text()
    assert title.split("\n")[1] == "1 window of 3x3 patches, 4 of each window's 9 masked"
