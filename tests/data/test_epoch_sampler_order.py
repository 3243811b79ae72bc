"""The data order :class:`lomar.data.samplers.EpochSampler` draws: a new permutation every epoch, and another one for
another seed (runs of two seeds see their data in different orders); a rank's share and resuming are tested with the
training engine (tests/train/test_engine_resume.py)."""

from __future__ import annotations

from lomar.data.samplers import EpochSampler


def _order(seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    sampler = EpochSampler(40, seed, rank, world_size, keys=False)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_epoch_draws_a_new_order_of_all_the_items():
    orders = [_order(3, epoch) for epoch in range(4)]
    assert all(sorted(order) == list(range(40)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4
    assert _order(3, 2) == orders[2]  # a pure function of (seed, epoch): a resumed run sees the same order


def test_another_seed_draws_another_order():
    assert _order(0, 0) != _order(1, 0) and _order(0, 5) != _order(1, 5)
    assert _order(0, 1, rank=1, world_size=2) != _order(1, 1, rank=1, world_size=2)


def test_the_keys_name_each_items_epoch():
    sampler = EpochSampler(40, 3)
    sampler.set_epoch(2, epochs=2)
    keys = list(sampler)
    assert [index for index, _ in keys] == _order(3, 2) + _order(3, 3)
    assert [epoch for _, epoch in keys] == [2] * 40 + [3] * 40
