"""Window sampling and in-window masks: properties and errors."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lomar.models.masking import (
    MaskingPlan,
    WindowsDoNotFit,
    check_window_request,
    grid_size,
    num_masked,
    sample_plan,
    tile_grid,
    window_token_index,
)


@st.composite
def requests(draw):
    hg = draw(st.integers(1, 16))
    wg = draw(st.integers(1, 16))
    k = draw(st.integers(1, min(hg, wg)))
    positions = (hg - k + 1) * (wg - k + 1)
    n = draw(st.integers(1, min(positions, 6)))
    tokens = k * k
    masked = draw(st.integers(1, max(1, tokens - 1)))
    ratio = (masked + 0.5) / tokens
    n_img = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return (hg, wg), k, n, ratio, n_img, seed


@settings(max_examples=60, deadline=None)
@given(requests())
def test_plan_properties(req):
    grid, k, n, ratio, n_img, seed = req
    if k == 1:  # a 1-token window cannot be partly masked
        with pytest.raises(ValueError):
            sample_plan(n_img, grid, k, n, ratio)
        return
    plan = sample_plan(n_img, grid, k, n, ratio, generator=torch.Generator().manual_seed(seed))
    assert plan.top_left.shape == (n_img, n, 2) and plan.mask.shape == (n_img, n, k * k)
    assert plan.top_left.dtype == torch.int64 and plan.mask.dtype == torch.bool
    # inside the grid
    assert (plan.top_left >= 0).all()
    assert (plan.top_left[..., 0] <= grid[0] - k).all() and (plan.top_left[..., 1] <= grid[1] - k).all()
    plan.validate(grid)
    # exact masked count per window
    assert (plan.mask.sum(-1) == num_masked(k, ratio)).all()
    # distinct windows per image
    for image in plan.top_left:
        assert len({tuple(t.tolist()) for t in image}) == n
    # same seed, same plan
    again = sample_plan(n_img, grid, k, n, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(plan.top_left, again.top_left) and torch.equal(plan.mask, again.mask)


def test_windows_are_independent_per_image():
    plan = sample_plan(64, (28, 28), 7, 4, 0.8, generator=torch.Generator().manual_seed(1))
    first = plan.top_left[0]
    # The original shares one draw across the batch (SPEC §6.1); ours must not.
    assert sum(torch.equal(first, other) for other in plan.top_left[1:]) == 0
    assert len({tuple(map(tuple, w.tolist())) for w in plan.top_left}) == 64
    # masks differ between windows too
    assert not torch.equal(plan.mask[0, 0], plan.mask[1, 0]) or not torch.equal(plan.mask[0, 1], plan.mask[1, 1])


@pytest.mark.parametrize("placement", ["permutation", "distinct"])
def test_every_window_of_every_image_draws_its_own_mask(placement):
    # SPEC §1.4: the masked tokens are drawn independently for every (image, window), the windows of one image
    # too; C(49, 39) ≈ 8e9 masks, so 64 independent draws repeat one with probability ~2e-7
    plan = sample_plan(16, (14, 14), 7, 4, 0.8, generator=torch.Generator().manual_seed(2), placement=placement)
    assert len({tuple(m) for m in plan.mask.flatten(0, 1).tolist()}) == 16 * 4


def test_positions_are_uniform():
    # 3x3 grid, 2x2 windows: 4 positions, each should be drawn ~1/4 of the time.
    plan = sample_plan(4000, (3, 3), 2, 1, 0.5, generator=torch.Generator().manual_seed(0))
    pos = plan.top_left[:, 0, 0] * 2 + plan.top_left[:, 0, 1]
    freq = torch.bincount(pos, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03)
    # every token masked ~ equally often
    token_freq = plan.mask[:, 0].float().mean(0)
    assert torch.allclose(token_freq, torch.full((4,), 0.5), atol=0.04)


def test_different_seeds_differ():
    a = sample_plan(4, (14, 14), 7, 4, 0.8, generator=torch.Generator().manual_seed(0))
    b = sample_plan(4, (14, 14), 7, 4, 0.8, generator=torch.Generator().manual_seed(1))
    assert not (torch.equal(a.top_left, b.top_left) and torch.equal(a.mask, b.mask))


def test_default_is_49_tokens_39_masked():
    assert num_masked(7, 0.8) == 39
    plan = sample_plan(2, (14, 14), generator=torch.Generator().manual_seed(0))
    assert plan.mask.sum(-1).eq(39).all()


def test_masked_count_floors_the_ratio_as_written_not_its_float_product():
    assert 100 * 0.29 < 29 and 100 * 0.57 < 57  # float products just below the integer
    assert num_masked(10, 0.29) == 29 and num_masked(10, 0.57) == 57 and num_masked(10, 0.58) == 58
    assert num_masked(10, 0.295) == 29 and num_masked(5, 0.5) == 12


def test_window_token_index_is_raster_order():
    idx = window_token_index(torch.tensor([[2, 3]]), 3, 10)
    assert idx.tolist() == [[23, 24, 25, 33, 34, 35, 43, 44, 45]]


def test_flat_rows_are_image_major():
    plan = sample_plan(3, (14, 14), 7, 2, 0.8, generator=torch.Generator().manual_seed(0))
    image, top_left, mask = plan.flat()
    assert image.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(top_left[3], plan.top_left[1, 1]) and torch.equal(mask[4], plan.mask[2, 0])


@pytest.mark.parametrize("kwargs, words", [
    (dict(grid=(6, 6), window_size=7, num_windows=1, mask_ratio=0.8),
     ["7x7", "6x6", "window_size=7", "pass window_size <= 6"]),
    (dict(grid=(8, 8), window_size=7, num_windows=5, mask_ratio=0.8),
     ["num_windows=5", "4 window positions", "pass num_windows <= 4"]),
    (dict(grid=(14, 14), window_size=7, num_windows=0, mask_ratio=0.8), ["num_windows must be a positive integer"]),
    (dict(grid=(14, 14), window_size=7, num_windows=1, mask_ratio=0.0),
     ["mask_ratio=0.0 masks 0 of the 49", "pass mask_ratio in [0.021, 0.979]"]),
    (dict(grid=(14, 14), window_size=7, num_windows=1, mask_ratio=1.0), ["49 of the 49"]),
    (dict(grid=(14, 14), window_size=7, num_windows=1, mask_ratio=0.01), ["0 of the 49"]),
])
def test_impossible_requests_raise(kwargs, words):
    with pytest.raises(ValueError) as info:
        check_window_request(**kwargs)
    message = str(info.value)
    assert "\n" not in message and "--" not in message  # the Python caller's parameters, never a flag
    for word in words:
        assert word in message


def test_image_size_not_divisible():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        grid_size(225, 16)
    assert grid_size((224, 448), 16) == (14, 28)


def test_a_numpy_integer_is_an_image_size():
    """A size read back from a file or computed with numpy: grid_size failed to unpack np.int64(224) (TypeError)."""
    assert grid_size(np.int64(224), 16) == (14, 14)
    with pytest.raises(ValueError, match=r"img_size must be an integer or a \(height, width\) pair of integers, got "
                                         r"224\.0"):
        grid_size(224.0, 16)


def test_a_traced_shape_is_an_image_size_and_stays_symbolic():
    """torch.export / make_fx trace a forward's image shape as SymInts (the ViT's image_grid, LoMaR's windows):
    int() of them would fix the traced size into the graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def patches(images):
        rows, cols = tile_grid(*images.shape[-2:], 16)
        return images.new_zeros(rows, cols)

    traced = make_fx(patches, tracing_mode="symbolic")(torch.zeros(1, 3, 32, 48))
    assert traced(torch.zeros(1, 3, 64, 16)).shape == (4, 1)


def test_sample_plan_rejects_bad_counts():
    with pytest.raises(ValueError, match="images"):
        sample_plan(0, (14, 14))


def test_validate_rejects_outside_and_bad_shapes():
    k = 7
    some = torch.zeros(1, 1, 49, dtype=torch.bool)
    some[..., :39] = True
    plan = MaskingPlan(torch.tensor([[[8, 0]]]), some, k)
    with pytest.raises(ValueError, match="outside the 14x14 grid"):
        plan.validate((14, 14))
    with pytest.raises(ValueError, match="must hold integers"):
        MaskingPlan(torch.tensor([[[0.0, 0.0]]]), some, k).validate((14, 14))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        MaskingPlan(torch.tensor([[[0, 0]]]), some.float(), k).validate((14, 14))
    with pytest.raises(ValueError, match="masks no token"):
        MaskingPlan(torch.tensor([[[0, 0]]]), torch.zeros_like(some), k).validate((14, 14))
    plan = MaskingPlan(torch.tensor([[[0, 0]]]), torch.zeros(1, 1, 48, dtype=torch.bool), k)
    with pytest.raises(ValueError, match="plan.mask must have shape"):
        plan.validate((14, 14))


@pytest.mark.parametrize("top_left", [torch.zeros(2, dtype=torch.long), torch.tensor(3)])
def test_a_top_left_of_too_few_dims_is_named_by_its_shape(top_left):
    """A (N,) or 0-d top_left ended in Python's 'not enough values to unpack' (or an IndexError in the model)."""
    from lomar import LoMaR, model_config

    plan = MaskingPlan(top_left, torch.ones(2, 1, 9, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match=r"plan.top_left must have shape \(N, n, 2\)"):
        plan.validate((8, 8))
    model = LoMaR(model_config("vit_mini_patch8", img_size=32, depth=1), window_size=3, num_windows=1)
    shape = re.escape(str(tuple(top_left.shape)))
    with pytest.raises(ValueError, match=rf"plan.top_left must have shape \(N, n, 2\).*got {shape}"):
        model(torch.randn(2, 3, 32, 32), plan=plan)


def test_ratio_errors_print_bounds_that_are_valid():
    with pytest.raises(ValueError, match="must be a number") as nan_error:
        num_masked(7, float("nan"))
    with pytest.raises(ValueError, match=r"pass mask_ratio in \[") as error:
        num_masked(7, 0.01)
    for message in (str(nan_error.value), str(error.value)):
        low, high = (float(x) for x in message.rsplit("[", 1)[1].split("]")[0].split(","))
        assert 0 < num_masked(7, low) and num_masked(7, high) < 49


@pytest.mark.parametrize("call, named", [
    (lambda: sample_plan("2", (8, 8), 3, 2, 0.5), "num_images must be a positive integer, got '2'"),
    (lambda: sample_plan(2.0, (8, 8), 3, 2, 0.5), "num_images must be a positive integer, got 2.0"),
    (lambda: sample_plan(True, (8, 8), 3, 2, 0.5), "num_images must be a positive integer, got True"),
    (lambda: sample_plan(2, 8, 3, 2, 0.5), "grid must be the patch grid (rows, columns)"),
    (lambda: sample_plan(2, (8, 8, 8), 3, 2, 0.5), "grid must be the patch grid (rows, columns)"),
    (lambda: sample_plan(2, (8.0, 8.0), 3, 2, 0.5), "got (8.0, 8.0)"),
    (lambda: sample_plan(2, (-8, 8), 3, 2, 0.5), "got (-8, 8)"),
    (lambda: sample_plan(2, (8, 8), 3, 2, "0.5"), "mask_ratio must be a number in [0.112, 0.888], got '0.5'"),
    (lambda: sample_plan(2, (8, 8), 3, 2, None), "mask_ratio must be a number"),
    (lambda: sample_plan(2, (8, 8), 3, 2, 0.5, 0), "generator must be a torch.Generator or None, got int"),
    (lambda: MaskingPlan(torch.zeros(1, 1, 2).long(), torch.ones(1, 1, 9).bool(), "3"),
     "MaskingPlan.window_size must be a positive integer (K of K×K windows), got '3'"),
    (lambda: MaskingPlan([[[0, 0]]], torch.ones(1, 1, 9).bool(), 3), "MaskingPlan.top_left must be a torch.Tensor"),
])
def test_wrong_argument_types_are_named(call, named):
    # Unchecked, they raise torch's or Python's errors from deep inside (rand()'s signature, "cannot unpack",
    # "'int' object has no attribute 'device'"), or a plan of window_size "3" is refused as
    # "plan has 3x3 windows but the model uses 3x3".
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert named in str(info.value)


def test_a_plan_of_another_type_is_named():
    from lomar.models.lomar import LoMaR
    from lomar.models.vit import ViTConfig

    model = LoMaR(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2), 2, 2, 0.5)
    plan = sample_plan(1, (4, 4), 2, 2, 0.5)
    with pytest.raises(TypeError, match="plan must be a lomar.MaskingPlan .* got dict"):  # not an AttributeError
        model(torch.randn(1, 3, 32, 32), plan={"top_left": plan.top_left, "mask": plan.mask})


def test_a_plan_checked_where_it_was_built_is_not_checked_again_on_the_device(monkeypatch):
    # The training loop's plans are checked on the host by plan_kwargs: validated again on the GPU at every
    # step, each bool(tensor.any()) would wait for the device.
    import types

    from lomar.methods.base import plan_kwargs

    plan = sample_plan(2, (8, 8), 3, 2, 0.5, torch.Generator().manual_seed(0))
    config = types.SimpleNamespace(window_size=3, windows=2)
    built = plan_kwargs(config, (8, 8))({"top_left": plan.top_left, "mask": plan.mask}, torch.device("cpu"))["plan"]
    assert built.checked_grid == (8, 8) and built == plan
    bad = MaskingPlan(plan.top_left + 6, plan.mask, 3)
    with pytest.raises(ValueError, match="outside the 8x8 grid"):  # still checked, on the host
        plan_kwargs(config, (8, 8))({"top_left": bad.top_left, "mask": bad.mask}, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(MaskingPlan, "validate", lambda self, grid: calls.append(grid) or (1, 1))
    images = torch.zeros(2, 3, 64, 64)
    built.for_batch(images, 3, (8, 8))
    assert calls == []
    built.for_batch(images, 3, (9, 8))  # another grid than the one it was checked for
    plan.for_batch(images, 3, (8, 8))  # sampled (its tensors may have been edited since): checked here
    assert calls == [(9, 8), (8, 8)]


def test_a_checked_plan_carries_its_masked_counts():
    # MAE with windows and BEiT size a tensor by these counts: read from a plan on a GPU, each would be a
    # wait for the device at every eager step.
    drawn = sample_plan(2, (8, 8), 3, 2, 0.5, torch.Generator().manual_seed(0))
    assert drawn.masked_range is None and drawn.masked_counts() == (4, 4)
    mask = drawn.mask.clone()
    mask[0, 0, :] = True
    mask[1, 1, :] = False
    by_hand = MaskingPlan(drawn.top_left, mask, 3)
    assert by_hand.masked_counts() == (0, 9)
    checked = by_hand.checked((8, 8))
    assert checked.masked_range == (0, 9) and checked.to("cpu").masked_range == (0, 9)
    assert by_hand.for_batch(torch.zeros(2, 3, 64, 64), 3, (8, 8)).masked_range == (0, 9)
    drawn.mask[0, 0, 0] = not drawn.mask[0, 0, 0]  # edited in place after sampling: counted when given
    assert drawn.for_batch(torch.zeros(2, 3, 64, 64), 3, (8, 8)).masked_range in {(3, 4), (4, 5)}


def test_mae_with_windows_names_a_plan_with_differing_counts():
    from lomar.models.mae_window import MAEWindow
    from lomar.models.vit import ViTConfig

    model = MAEWindow(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, pos="abs"), 2, 2, 0.5,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    plan = sample_plan(1, (4, 4), 2, 2, 0.5, torch.Generator().manual_seed(0))
    mask = plan.mask.clone()
    mask[0, 0] = torch.tensor([True, True, True, False])
    with pytest.raises(ValueError, match="same number of masked tokens .* mask 2 to 3"):
        model(torch.randn(1, 3, 32, 32), plan=MaskingPlan(plan.top_left, mask, 2))


def test_checking_a_plan_reads_its_values_once():
    # On a GPU each read waits for the device, so a hand-made plan given to a model is read once, not once
    # per check and again by MAE with windows or BEiT for its masked counts.
    from helpers import host_reads

    plan = sample_plan(2, (8, 8), 3, 2, 0.5, torch.Generator().manual_seed(0))
    with host_reads() as reads:
        checked = MaskingPlan(plan.top_left, plan.mask, 3).checked((8, 8))
        checked.masked_counts()
    assert reads == {"tolist": 1}


def test_a_request_the_grid_cannot_hold_says_what_fits_and_survives_a_pickle():
    import pickle

    with pytest.raises(WindowsDoNotFit) as info:
        check_window_request((8, 8), 7, 5, 0.8, "permutation")
    error = pickle.loads(pickle.dumps(info.value))  # as a loader worker's error comes back
    assert (error.param, error.most, str(error)) == ("num_windows", 2, str(info.value))
    assert str(error).endswith("hold at most 2; pass num_windows <= 2, placement='distinct', or use a larger image")


def test_a_request_the_grid_cannot_hold_is_still_a_valueerror_from_a_loader_worker():
    # a DataLoader re-raises a worker's error as its type called with one message: a type that required its fields
    # came back as a RuntimeError, past callers catching ValueError
    from torch.utils.data import DataLoader

    class Plans(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return check_window_request((8, 8), 7, 5, 0.8, "permutation")

    with pytest.raises(WindowsDoNotFit, match=r"Caught WindowsDoNotFit in DataLoader worker process 0(.|\n)*pass "
                                              r"num_windows <= 2, placement='distinct', or use a larger image"):
        next(iter(DataLoader(Plans(), num_workers=1)))
