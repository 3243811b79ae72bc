"""A cell's progress read from its run folder, and the pace that plans its next slice."""

from lomar.cli.study.progress import pace


def test_the_pace_is_the_latest_slices_not_the_mean_over_the_run():
    """A machine twice as busy since the second of three 10 s slices: 80 steps of 1/8 s, then 40 of 1/4 s. At the
    run's mean pace (6 steps a second) the last 10 s were planned as 60 steps, 15 s at 1/4 s a step: 5 s (17 %)
    past the 30 s budget; at the latest slice's, 40 steps, 10 s."""
    times = [0.125] * 80 + [0.25] * 40
    assert pace(times, window=10.0) == 4.0
    assert sum(times) + round(pace(times, window=10.0) * 10.0) * 0.25 == 30.0
    assert pace(times, window=15.0) == 80 / 15.0  # the latest 40 steps and the 40 before them
    assert pace([0.5, 0.125, 0.125], window=10.0) == 3 / 0.75  # fewer than the window: all of them
    assert pace([], window=10.0) is None
