"""Window placement: the original's two-permutation draw (the training default) and the
distinct-cells option, and the paper's window counts for every configuration it reports."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml

from lomar.cli.app import main
from lomar.models.masking import max_windows, sample_plan
from lomar.window_counts import PAPER_COUNTS, paper_windows, windows_source


def test_permutation_windows_never_share_a_row_or_a_column():
    grid, k, n = (14, 12), 7, 5  # 8 top rows, 6 left columns
    plan = sample_plan(3000, grid, k, n, 0.8, generator=torch.Generator().manual_seed(0), placement="permutation")
    tops, lefts = plan.top_left[..., 0], plan.top_left[..., 1]
    for values in (tops, lefts):
        assert all(len(set(row.tolist())) == n for row in values)
    plan.validate(grid)
    assert int(tops.max()) == 7 and int(lefts.max()) == 5


def test_permutation_matches_the_originals_distribution():
    # The original: tops = permutation(rows)[:n], lefts = permutation(cols)[:n], independently.
    # Then every ordered pair of distinct tops (window 0, window 1) is equally likely, and so is
    # every (top, left) of a window: test both against those uniform laws (chi-square, 4000 draws).
    rows = cols = 4  # 6x6 grid, 3x3 windows
    draws = 6000
    plan = sample_plan(draws, (6, 6), 3, 2, 0.5, generator=torch.Generator().manual_seed(1), placement="permutation")
    t = plan.top_left
    pairs = list(itertools.permutations(range(rows), 2))
    counts = torch.tensor([int(((t[:, 0, 0] == a) & (t[:, 1, 0] == b)).sum()) for a, b in pairs], dtype=torch.float)
    expected = draws / len(pairs)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 35.2  # 11 degrees of freedom, p = 0.0002
    cells = torch.bincount(t[:, 0, 0] * cols + t[:, 0, 1], minlength=rows * cols).float()
    expected = draws / (rows * cols)
    assert float(((cells - expected) ** 2 / expected).sum()) < 40.0  # 15 degrees of freedom, p = 0.0005
    # the distinct-cells option can put two windows on one row
    distinct = sample_plan(500, (6, 6), 3, 2, 0.5, generator=torch.Generator().manual_seed(1), placement="distinct")
    assert bool((distinct.top_left[:, 0, 0] == distinct.top_left[:, 1, 0]).any())


def test_how_many_windows_a_grid_holds():
    assert max_windows((14, 14), 7, "permutation") == 8 and max_windows((14, 14), 7, "distinct") == 64
    with pytest.raises(ValueError, match="pass num_windows <= 2, placement='distinct', or use a larger image"):
        sample_plan(1, (8, 8), 7, 3, 0.8, placement="permutation")
    assert sample_plan(1, (8, 8), 7, 3, 0.8, placement="distinct").num_windows == 3


def _config(tmp_path, capsys, *args: str) -> tuple[int, dict | str]:
    code = main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *args, "--print-config"])
    captured = capsys.readouterr()
    return code, (yaml.safe_load(captured.out) if code == 0 else captured.err)


def test_training_default_is_the_originals_and_refuses_what_it_cannot_place(tmp_path, capsys):
    code, config = _config(tmp_path, capsys, "--img-size", "96", "--model", "vit_small_patch8")
    assert code == 0 and config["window_placement"] == "permutation"
    code, err = _config(tmp_path, capsys, "--img-size", "96", "--model", "vit_small_patch8", "--windows", "7")
    assert code == 2 and "at most 6" in err and "--window-placement distinct" in err and err.count("\n") == 1
    assert "pass --windows <= 6," in err and "num_windows" not in err and "placement=" not in err  # in its flags
    code, err = _config(tmp_path, capsys, "--img-size", "96", "--model", "vit_small_patch8", "--window-size", "13")
    assert code == 2 and err.endswith("at --img-size 96: --window-size 13: a 13x13 window does not fit the 12x12 "
                                      "patch grid; pass --window-size <= 12 or use a larger image\n"), err
    code, config = _config(tmp_path, capsys, "--img-size", "96", "--model", "vit_small_patch8", "--windows", "7",
                           "--window-placement", "distinct")
    assert code == 0 and config["windows"] == 7


@pytest.mark.parametrize("patch, size", sorted(PAPER_COUNTS))
def test_auto_gives_every_count_the_paper_reports(tmp_path, capsys, patch, size):
    assert windows_source(size, patch) == "paper"
    assert paper_windows(size, patch, 7) == PAPER_COUNTS[(patch, size)]
    code, config = _config(tmp_path, capsys, "--model", f"vit_base_patch{patch}", "--img-size", str(size))
    assert code == 0 and config["windows"] == PAPER_COUNTS[(patch, size)]


def test_the_paper_counts_are_its_numbers():
    # ViT-B/16: 4 / 6 / 9 windows at 224 / 384 / 448 px; ViT-B/8 at 224 px: 4 (not the 9 of its 28x28 area)
    assert PAPER_COUNTS == {(16, 224): 4, (16, 384): 6, (16, 448): 9, (8, 224): 4}
    assert windows_source(320, 16) == "rule" and windows_source(384, 8) == "rule"
