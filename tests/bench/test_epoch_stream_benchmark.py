"""``benchmarks/epoch_stream.py``: both runs go through the real lifecycle and report every step
(the figures themselves are the benchmark's, not the test's)."""

import argparse

from helpers import load_benchmark


def test_both_iterator_policies_run_through_the_lifecycle():
    bench = load_benchmark("epoch_stream")
    args = argparse.Namespace(workers=1, batch_size=2, item_ms=1.0, step_ms=1.0, steps_per_epoch=3, epochs=2)
    spanning, per_epoch = bench.measure(args, True), bench.measure(args, False)
    assert (spanning["iterator"], per_epoch["iterator"]) == ("one for the run", "one per epoch")
    for record in (spanning, per_epoch):
        assert record["steps"] == 2 * 3 - 1 and record["images_per_s"] > 0
        assert len(record["longest_waits_s"]) == 2 and all(w >= 0 for w in record["longest_waits_s"])
