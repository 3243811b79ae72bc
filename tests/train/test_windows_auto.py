"""`--windows auto`: the paper's windows per image (4 at 224 px, 6 at 384, 9 at 448), one rule for
`lomar pretrain` and `lomar bench`."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from lomar.cli.app import main
from lomar.window_counts import paper_windows


def _print_config(tmp_path, capsys, *args: str) -> tuple[dict, str]:
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *args,
                 "--print-config"]) == 0
    text = capsys.readouterr().out
    return yaml.safe_load(text), text


@pytest.mark.parametrize("size, windows", [(224, 4), (384, 6), (448, 9)])
def test_auto_is_the_default_and_hits_the_papers_three_points(tmp_path, capsys, size, windows):
    config, text = _print_config(tmp_path, capsys, "--img-size", str(size))
    assert config["windows"] == windows
    assert f"# --windows auto = {windows} at --img-size {size}" in text


def test_a_count_given_is_not_printed_as_autos(tmp_path, capsys):
    """--windows 1 printed '# --windows auto = 4 at --img-size 224 ...' above 'windows: 1', as if auto gave it."""
    config, text = _print_config(tmp_path, capsys, "--windows", "1")
    assert config["windows"] == 1 and "--windows auto = " not in text
    assert "# --windows 1 as set (auto: 4) at --img-size 224, patch 16, window 7: the paper's count" in text


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_auto_is_one_global_window_for_the_global_methods(tmp_path, capsys, method):
    # MAE and BEiT mask the whole image in their papers; K x K windows are asked for with --windows N
    config, _ = _print_config(tmp_path, capsys, "--method", method)
    assert config["windows"] == 0


def test_other_sizes_scale_with_the_grid_area_and_stay_monotone():
    counts = [paper_windows(s) for s in range(96, 900, 16)]
    assert counts == sorted(counts)
    assert paper_windows(320) == 5  # between 224 (4) and 384 (6), linear in area: 4 + 2 * 204/380
    assert paper_windows(896) == 36  # 4x the 448 area: 4x its 9 windows
    assert paper_windows(112) == 1  # a quarter of 224's area: 1 of its 4
    assert paper_windows(96, patch_size=8) == 3  # the grid, not the pixels, counts: 12x12 of 14x14
    assert paper_windows((224, 448)) == 5  # 14x28 = 392 patches: 4 + 2 * 196/380 = 5.03 -> 5


def test_a_numpy_size_counts_as_its_integer():
    assert paper_windows(np.int64(384)) == paper_windows((np.int64(224), 448), np.int64(16)) + 1 == 6


@pytest.mark.parametrize("window, windows", [(5, 8), (7, 4), (9, 3), (11, 2), (14, 1)])
def test_auto_follows_the_papers_window_size_ablation_at_224(tmp_path, capsys, window, windows):
    config, text = _print_config(tmp_path, capsys, "--window-size", str(window))
    assert config["windows"] == windows
    assert f"window {window}: the paper's count" in text


def test_other_window_sizes_take_49_over_k_squared_of_the_7x7_count():
    assert paper_windows(448, 16, 5) == 18  # 9 * 49/25 = 17.6
    assert paper_windows(448, 16, 14) == 2  # 9 * 49/196 = 2.25
    assert paper_windows(384, 16, 5) == 12  # 6 * 49/25 = 11.8
    assert paper_windows(224, 16, 10) == 2  # 4 * 49/100 = 1.96
    assert paper_windows(224, 16, 12) == 1  # 4 * 49/144 = 1.36
    assert paper_windows(224, 16, 3) == 12  # 4 * 49/9 = 21.8, but a 14x14 grid holds 12 3x3 windows (permutation)


def test_auto_never_asks_for_more_windows_than_the_grid_has():
    # a 10x10 grid has 16 positions for a 7x7 window; the area rule alone would also give 2 here
    assert paper_windows(160, 16, window_size=7) == 2
    assert paper_windows(160, 16, window_size=10) == 1


def test_explicit_count_wins_and_auto_on_resume_keeps_the_saved_count(tmp_path, capsys):
    config, _ = _print_config(tmp_path, capsys, "--img-size", "384", "--windows", "2")
    assert config["windows"] == 2
    config, _ = _print_config(tmp_path, capsys, "--img-size", "384", "--windows", "auto")
    assert config["windows"] == 6


@pytest.mark.parametrize("value, message", [("abc", "is not a window count, 'auto' or 'global'"),
                                            ("paper", "pass --windows auto for the paper's counts"),
                                            ("-1", "is negative")])
def test_bad_windows_are_one_line_errors(tmp_path, capsys, value, message):
    assert main(["pretrain", "--windows", value, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err and value in err and err.count("\n") == 1


def test_the_start_line_says_how_many_windows_a_step_trains_on(tmp_path, capsys):
    """--windows auto grows with the image (9 at 448 px, 36 at 896): the run's first line says the count,
    which config.yaml alone said."""
    from helpers import pretrain, write_images

    data = write_images(tmp_path / "images", 4, (64, 64))
    assert pretrain("--data", str(data), "--out", str(tmp_path / "run"), "--img-size", "64", "--windows", "auto",
                    "--max-steps", "1", "--figure-images", "1") == 0
    first = capsys.readouterr().out.splitlines()[0]
    count = paper_windows(64, 8, 3)
    assert first.startswith("lomar pretrain:") and f", {count} windows of 3x3 patches, " in first, first
