"""Windows for every method (BEiT, MAE, LoMaR), the method registry, and the timm export of BEiT."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
import torch

from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lomar.methods import get_method, names, variant_name
from lomar.methods.base import method_runtime
from lomar.models.beit import BEiT, BEiTConfig
from lomar.models.beit_pretrain import BEiTPretrain, tokenizer_view
from lomar.models.mae_window import MAEWindow
from lomar.models.masking import MaskingPlan, sample_plan
from lomar.models.vit import model_config
from lomar.models.windows import sample_method_plan, window_geometry, with_block_masks
from lomar.tokenizers import DVAEConfig, DVAEEncoder, KMeansTokenizer
from lomar.window_counts import parse_windows

CFG = dict(img_size=48, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=16, drop_path_rate=0.0)


def _tokenizer(seed: int = 0) -> KMeansTokenizer:
    centroids = torch.randn(16, 3 * 8 * 8, generator=torch.Generator().manual_seed(seed))
    return KMeansTokenizer(centroids, patch=8, input_size=48)


def test_global_beit_on_a_plan_equals_the_beit_model():
    torch.manual_seed(0)
    model = BEiTPretrain(BEiTConfig(**CFG), _tokenizer(), num_windows=0).eval()
    images = torch.randn(2, 3, 48, 48)
    plan = model.sample_plan(images, torch.Generator().manual_seed(1))
    assert plan.window_size == 6 and plan.num_windows == 1 and int(plan.top_left.abs().sum()) == 0
    out = model(images, plan=plan)
    ids = model.tokens(images)
    mask = plan.mask[:, 0]
    ref = model.beit(images, mask, input_ids=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    # the original's budget on 6x6: round(75*36/196) = 14, never more
    assert 0 < int(mask.sum(1).max()) <= 14


def test_windowed_beit_reads_any_integer_ids_and_names_float_ones():
    model = BEiTPretrain(BEiTConfig(**CFG), _tokenizer(), window_size=3, num_windows=2).eval()
    images = torch.randn(2, 3, 48, 48)
    plan = model.sample_plan(images, torch.Generator().manual_seed(3))
    ids = torch.randint(0, 16, (2, 36))
    assert torch.equal(model(images, plan=plan, input_ids=ids.int()).loss, model(images, plan=plan, input_ids=ids).loss)
    grid_ids = ids.view(2, 6, 6)  # the (N, Gh, Gw) form its refusal names
    assert torch.equal(model(images, plan=plan, input_ids=grid_ids).loss, model(images, plan=plan, input_ids=ids).loss)
    with pytest.raises(TypeError, match="input_ids must be a tensor of integer token ids.*got torch.float32"):
        model(images, plan=plan, input_ids=ids.float())  # not torch's 'expected target dtype to be Long'


def test_a_plan_a_model_returned_is_checked_again_when_given_back_after_an_edit():
    """The plan in a model's output carried the marks of the check it had passed: edited in place (its tensors are
    the caller's) and given back, it skipped the checks a hand-made plan gets: a NaN loss, an IndexError."""
    from lomar.models.lomar import LoMaR

    vit = dict(img_size=48, depth=1)
    models = [LoMaR(model_config("vit_mini_patch8", **vit), window_size=3, num_windows=2),
              MAEWindow(model_config("vit_mini_patch8", pos="abs", **vit), window_size=3, num_windows=2,
                        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2),
              BEiTPretrain(BEiTConfig(**CFG), _tokenizer(), window_size=3, num_windows=2)]
    images = torch.randn(2, 3, 48, 48)
    for model in models:
        out = model(images, plan=sample_plan(2, (6, 6), 3, 2, 0.75, torch.Generator().manual_seed(0)))
        out.plan.top_left.fill_(5)  # a 3x3 window at row 5 leaves the 6x6 grid
        with pytest.raises(ValueError, match="plan has windows outside the 6x6 grid"):
            model(images, plan=out.plan)


def test_windowed_beit_sees_only_its_windows_and_gathers_their_tokens():
    torch.manual_seed(0)
    model = BEiTPretrain(BEiTConfig(**CFG), _tokenizer(), window_size=3, num_windows=2).eval()
    images = torch.randn(2, 3, 48, 48)
    plan = model.sample_plan(images, torch.Generator().manual_seed(3))
    ids = torch.randint(0, 16, (2, 36))
    out = model(images, plan=plan, input_ids=ids)
    inside = torch.zeros(2, 6, 6, dtype=torch.bool)
    for i in range(2):
        for r, c in plan.top_left[i].tolist():
            inside[i, r:r + 3, c:c + 3] = True
    outside = (~inside).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand(-1, 3, -1, -1)
    changed = images.clone()
    changed[outside] = 5.0
    again = model(changed, plan=plan, input_ids=ids)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=1e-6)
    image, top_left, mask = plan.flat()
    expected = []
    for row in range(image.shape[0]):
        r0, c0 = top_left[row].tolist()
        window = ids[image[row]].view(6, 6)[r0:r0 + 3, c0:c0 + 3].flatten()
        expected.append(window[mask[row]])
    assert torch.equal(out.targets, torch.cat(expected))
    # BEiT's mlm_acc counts the masked tokens only: padding slots that agree with the model's guess
    # would raise it if they counted.
    uneven = plan.mask.clone()
    uneven[0, 0, int(uneven[0, 0].int().argmax())] = False  # one window masks a token less: a padding slot
    slotted = model(images, plan=MaskingPlan(plan.top_left, uneven, 3), input_ids=ids)
    hits = (slotted.logits.argmax(-1) == slotted.targets).float().mean()
    guessed = slotted.slot_logits.argmax(-1)
    padding_agrees = slotted._replace(slot_targets=torch.where(slotted.slot_mask, slotted.slot_targets, guessed))
    assert int((~slotted.slot_mask).sum()) == 1 and 0 <= float(hits) < 1
    assert torch.equal(slotted.accuracy, hits) and torch.equal(padding_agrees.accuracy, hits)
    assert float(slotted._replace(slot_targets=guessed).accuracy) == 1.0
    out.loss.backward()
    assert model.beit.lm_head.weight.grad is not None


def test_tokenizer_stays_out_of_the_state_dict_and_parameters():
    model = BEiTPretrain(BEiTConfig(**CFG), _tokenizer(), num_windows=0)
    assert not any("centroid" in k for k in model.state_dict())
    assert all(p is not model.tokenizer.centroids for p in model.parameters())


def test_blockwise_window_masks_are_seeded_and_scaled():
    grid = (6, 6)
    a = sample_method_plan(4, grid, 5, 2, None, torch.Generator().manual_seed(7))
    b = sample_method_plan(4, grid, 5, 2, None, torch.Generator().manual_seed(7))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.top_left, b.top_left)
    counts = a.mask.sum(-1)
    assert int(counts.max()) <= round(75 * 25 / 196) and int(counts.min()) > 0
    rand = sample_method_plan(4, grid, 5, 2, 0.4, torch.Generator().manual_seed(7))
    assert bool((rand.mask.sum(-1) == 10).all())  # random in-window masking: floor(25 * 0.4)
    plan = sample_plan(1, grid, 3, 1, 0.5, generator=torch.Generator().manual_seed(0))
    blocked = with_block_masks(plan, random.Random(0))
    assert torch.equal(blocked.top_left, plan.top_left) and blocked.mask.shape == plan.mask.shape


def test_window_geometry_and_windows_flag():
    assert window_geometry((14, 14), 7, 0) == (14, 1)
    assert window_geometry((14, 14), 7, 4) == (7, 4)
    with pytest.raises(ValueError, match=r"^windows=0 \(one global window\) needs a square patch grid, got 4x6; use a "
                                         r"square image size or pass windows=N \(N local windows\)$"):
        window_geometry((4, 6), 3, 0)
    assert parse_windows("global") == 0 and parse_windows("3") == 3
    with pytest.raises(ValueError, match="--windows"):
        parse_windows("-1")
    assert [variant_name(m, w) for m, w in [("beit", 0), ("beit", 4), ("mae", 2), ("lomar", 0)]] == \
        ["beit", "beit_window", "mae_window", "lomar_global"]


def test_mae_window_encoder_sees_only_visible_window_tokens():
    torch.manual_seed(0)
    model = MAEWindow(model_config("vit_tiny_patch8", depth=1, img_size=48, pos="abs"), 3, 2, 0.5,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).eval()
    images = torch.randn(2, 3, 48, 48)
    out = model(images, generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (4, 9, 8 * 8 * 3)
    # Masked and out-of-window patches never reach the model: changing them leaves pred unchanged.
    image, top_left, mask = out.plan.flat()
    seen = torch.zeros(2, 6, 6, dtype=torch.bool)
    for row in range(image.shape[0]):
        r0, c0 = top_left[row].tolist()
        seen[image[row], r0:r0 + 3, c0:c0 + 3] |= (~mask[row]).view(3, 3)
    hidden = (~seen).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand(-1, 3, -1, -1)
    changed = images.clone()
    changed[hidden] = -3.0
    again = model(changed, plan=out.plan)
    torch.testing.assert_close(again.pred, out.pred, rtol=0, atol=1e-6)
    assert set(model.state_dict()) == set(super(MAEWindow, model).state_dict())
    assert not any("window_pos" in k for k in model.state_dict())


def test_mae_window_on_one_window_over_the_whole_grid_is_mae():
    # one 4x4 window on a 4x4 grid: its sin-cos tables are the image's, and noise ordering the visible tokens first
    # in raster order (then the masked ones) makes MAE encode and decode what MAEWindow does
    from lomar.models.mae import MAE

    torch.manual_seed(0)
    settings = dict(mask_ratio=0.75, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    window = MAEWindow(model_config("vit_tiny_patch8", depth=1, img_size=32, pos="abs"), 4, 1, **settings).eval()
    mae = MAE(window.config, **settings).eval()
    mae.load_state_dict(window.state_dict())
    images = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, torch.randperm(16)[:12]] = True
    ours = window(images, plan=MaskingPlan(torch.zeros(1, 1, 2, dtype=torch.long), mask[:, None], 4))
    theirs = mae(images, noise=mask.float() + torch.arange(16) / 100)
    torch.testing.assert_close(ours.pred, theirs.pred)
    torch.testing.assert_close(ours.loss, theirs.loss)


class _Config:
    """The fields of PretrainConfig the registry reads."""

    def __init__(self, **kw):
        self.__dict__.update(dict(method="lomar", img_size=32, window_size=3, windows=2, mask_ratio=0.8,
                                  knn_every=0), **kw)


def test_registry_maskers_draw_what_the_engine_drew_before():
    gen = functools.partial(torch.Generator().manual_seed, 5)
    lomar = method_runtime(_Config(), 8).masker(gen())
    plan = sample_plan(1, (4, 4), 3, 2, 0.8, generator=gen())
    assert torch.equal(lomar["top_left"], plan.top_left[0]) and torch.equal(lomar["mask"], plan.mask[0])
    mae = method_runtime(_Config(method="mae", windows=0, mask_ratio=0.75), 8).masker(gen())
    assert torch.equal(mae["noise"], torch.rand(16, generator=gen()))
    glob = method_runtime(_Config(windows=0), 8)
    drawn = glob.masker(gen())
    assert drawn["mask"].shape == (1, 16) and int(drawn["mask"].sum()) == 12
    kwargs = glob.forward_kwargs({"top_left": drawn["top_left"][None], "mask": drawn["mask"][None]},
                                 torch.device("cpu"))
    assert isinstance(kwargs["plan"], MaskingPlan) and kwargs["plan"].window_size == 4
    with pytest.raises(ValueError, match="unknown"):
        get_method("simclr")


@pytest.mark.parametrize("name, patch", [*((name, 16) for name in names()), ("beit", 8)])
def test_a_method_serves_window_decoding_only_if_its_loss_reads_nothing_outside_the_windows(name, patch):
    """--decode windows leaves every pixel outside the plan's windows blank (lomar.data.fast_decode): a method
    serves it (Method.reads_outside_windows None) only if those pixels leave its loss as it is. BEiT's k-means
    tokenizer of 8 px patches labels each patch alone on 8 px patches (the view is the crop itself); on 16 px
    patches it reads the crop resized to half, which changes inside the windows."""
    method = get_method(name)
    config = _Config(method=name, img_size=96, windows=2, mask_ratio=0.5, norm_pix_loss=True, decoder_embed_dim=16,
                     decoder_depth=1, decoder_num_heads=2, tokenizer=None, layer_scale_init=0.1)
    vit = model_config("vit_mini_patch8", img_size=96, patch_size=patch, depth=1, pos=method.only_pos or "none")
    torch.manual_seed(0)
    model = method.build(config, vit, *([_tokenizer()] if name == "beit" else [])).eval()
    runtime = method_runtime(config, patch)
    gen = torch.Generator().manual_seed(1)
    draws = [runtime.masker(gen) for _ in range(2)]
    batch = {key: torch.stack([draw[key] for draw in draws]) for key in draws[0]}
    k = math.isqrt(batch["mask"].shape[-1])
    inside = torch.zeros(2, 96, 96, dtype=torch.bool)
    for i, top_left in enumerate(batch["top_left"] * patch):
        for r, c in top_left.tolist():
            inside[i, r:r + k * patch, c:c + k * patch] = True
    images = torch.randn(2, 3, 96, 96, generator=gen)
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)  # --decode windows' zeros, normalised
    blank = torch.where(inside[:, None], images, black[:, None, None])
    with torch.no_grad():
        losses = [model(x, **runtime.forward_kwargs(batch, torch.device("cpu"))).loss for x in (images, blank)]
    assert bool((~inside).any()) and torch.isfinite(losses[0])
    outside = method.reads_outside_windows(config, patch)
    if outside is None:
        assert torch.equal(*losses), (name, patch, losses)
        if name == "beit":  # every token of a window, masked or not
            window_patches = inside[:, ::patch, ::patch].flatten(1)
            assert torch.equal(model.tokens(images)[window_patches], model.tokens(blank)[window_patches])
    else:
        assert (name, patch) == ("beit", 16), f"check here that --method {name} reads what it declares: {outside}"
        assert "8 px patches read the crop resized for the model's 16 px patches" in outside
        moved = (tokenizer_view(images, 48) - tokenizer_view(blank, 48)).abs().amax(1)
        assert float(moved[inside[:, ::2, ::2]].max()) > 0.05


def test_beit_reads_outside_its_windows_unless_a_k_means_tokenizer_of_its_patch_labels_them(tmp_path):
    """A --tokenizer file decides: a dVAE's convolutions read around each patch even at its own stride (its logits
    inside the windows move with the pixels outside them); a k-means file serves the patch size it was fitted at."""
    beit = get_method("beit")
    dvae = DVAEEncoder(DVAEConfig(n_hid=16, n_blk_per_group=1, vocab_size=64)).eval()
    torch.save({"model": dvae.state_dict()}, tmp_path / "dvae.pt")
    outside = beit.reads_outside_windows(_Config(method="beit", tokenizer=str(tmp_path / "dvae.pt")), 8)
    assert outside.startswith(f"labels its targets with --tokenizer {tmp_path / 'dvae.pt'}, which is no k-means "
                              f"tokenizer (a DALL-E dVAE's convolutions read pixels around each patch)")
    images = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    blank = images.clone()
    blank[..., 24:, :] = 0  # outside a window of token rows 0-2
    with torch.no_grad():
        logits = [dvae(x)[..., :3, :] for x in (images, blank)]
    assert not torch.equal(*logits)
    kmeans = KMeansTokenizer(torch.randn(4, 3 * 16 * 16), patch=16, input_size=32).save(tmp_path / "k16.safetensors")
    config = _Config(method="beit", tokenizer=str(kmeans))
    assert beit.reads_outside_windows(config, 16) is None
    assert "whose 16 px patches read the crop resized for the model's 8 px patches" in beit.reads_outside_windows(
        config, 8)
    with pytest.raises(ValueError, match="^--tokenizer: tokenizer file .* does not exist"):
        beit.reads_outside_windows(_Config(method="beit", tokenizer=str(tmp_path / "gone.safetensors")), 8)


def test_beit_windows_check_reads_tokenizer_headers_only_and_refuses_what_is_no_tokenizer(tmp_path, monkeypatch):
    """The check runs with the settings: a k-means file's stride comes from its header, not its centroids (25 MB
    at 16 px patches); a text file is refused as no tokenizer; a pickle (a dVAE, or whatever its loader will refuse)
    is named as no k-means tokenizer, not said to be a dVAE."""
    beit = get_method("beit")
    kmeans = KMeansTokenizer(torch.randn(4, 3 * 16 * 16), patch=16, input_size=32).save(tmp_path / "k16.safetensors")
    monkeypatch.setattr(KMeansTokenizer, "load", lambda *a: pytest.fail("loaded the centroids"))
    assert beit.reads_outside_windows(_Config(method="beit", tokenizer=str(kmeans)), 16) is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(kmeans.read_bytes().replace(b'"patch":"16"', b'"patch":"1x"'))
    with pytest.raises(ValueError, match=r"^--tokenizer: .*bad\.safetensors: metadata patch='1x' is not a positive "
                                         r"whole number; the file is damaged; fit a new one") as info:
        beit.reads_outside_windows(_Config(method="beit", tokenizer=str(bad)), 16)
    assert "\n" not in str(info.value)
    (tmp_path / "notes.txt").write_text("tokenizer: see the wiki\n")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"^--tokenizer: {tmp_path / 'notes.txt'} is a text file, not a tokenizer "
                                         f"file; a tokenizer file is a k-means tokenizer from `lomar tokenizer fit`"):
        beit.reads_outside_windows(_Config(method="beit", tokenizer=str(tmp_path / "notes.txt")), 8)
    dvae = DVAEEncoder(DVAEConfig(n_hid=16, n_blk_per_group=1, vocab_size=64))
    torch.save(dvae.state_dict(), tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    for name in ("legacy.pkl", "other.pt"):  # a pickle's kind is its loader's to judge: no k-means tokenizer either way
        assert beit.reads_outside_windows(_Config(method="beit", tokenizer=str(tmp_path / name)), 8).startswith(
            f"labels its targets with --tokenizer {tmp_path / name}, which is no k-means tokenizer (a DALL-E dVAE's")


def test_beit_export_loads_in_timm_with_equal_features(tmp_path):
    from lomar.checkpoints.export_beit import create_timm_beit, export_beit_encoder

    torch.manual_seed(0)
    beit = BEiT(BEiTConfig(**CFG)).eval()
    with torch.no_grad():  # a non-zero shared table, so that the per-block copy matters
        beit.rel_pos_bias.relative_position_bias_table.normal_()
    export_beit_encoder(beit, tmp_path)
    timm_model = create_timm_beit(tmp_path)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(images), beit.forward_features(images),
                                   rtol=1e-5, atol=1e-5)


def test_token_figure_marks_masked_predictions(tmp_path):
    from lomar.viz.tokens import token_figure, token_maps

    torch.manual_seed(0)
    model = BEiTPretrain(BEiTConfig(**CFG), _tokenizer(), window_size=3, num_windows=2)
    images = torch.randn(2, 3, 48, 48)
    maps = token_maps(model, images, seed=1)
    assert torch.equal(maps["true"].flatten(1), model.tokens(images))
    assert bool((maps["predicted"][maps["masked"]] >= 0).all())
    assert bool((maps["predicted"][~maps["masked"]] == -1).all())
    assert 0 < int(maps["masked"].sum()) <= int(maps["plan"].mask.sum())  # overlapping windows share cells
    assert model.training  # restored
    path = token_figure(model, images, tmp_path / "tokens.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_beit_decay_groups_follow_the_original():
    from lomar.train.schedule import param_groups

    model = BEiTPretrain(BEiTConfig(**CFG), _tokenizer(), num_windows=0)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "beit.cls_token" in skipped and "beit.blocks.0.gamma_1" in skipped
    assert {"beit.mask_token", "beit.rel_pos_bias.relative_position_bias_table", "beit.lm_head.weight"} <= decayed


@pytest.mark.parametrize("images, ids, named", [
    # input_ids one column short: the windows' token positions would index past its rows' end, or not
    (torch.randn(2, 3, 48, 48), torch.zeros(2, 35, dtype=torch.long), "input_ids must be (N, L) = (2, 36)"),
    # not 'not enough values', nor a resize for images of the right size in another layout
    (torch.randn(3, 48, 48), None, "images must be (N, 3, 48, 48), got (3, 48, 48); add the batch dimension"),
    (torch.randn(2, 48, 48, 3), None, "got (2, 48, 48, 3); channels come first: images.permute(0, 3, 1, 2)"),
    (torch.randn(2, 3, 40, 40), None, "got (2, 3, 40, 40); resize to img_size=48 or build with that img_size"),
    (np.zeros((2, 3, 48, 48), np.float32), None, "images must be a torch.Tensor (N, 3, 48, 48), got ndarray"),
    (torch.randn(2, 1, 48, 48), None, "images must be (N, 3, 48, 48)"),  # not the matmul's 'mat1 and mat2 shapes'
    (torch.zeros(2, 3, 48, 48, dtype=torch.uint8), None, "images are torch.uint8 but the model's weights are "
                                                          "torch.float32"),
])
def test_beit_pretraining_names_wrong_images_and_ids(images, ids, named):
    model = BEiTPretrain(BEiTConfig(**CFG), _tokenizer(), window_size=3, num_windows=2)
    with pytest.raises((ValueError, TypeError)) as info:
        model(images, generator=torch.Generator().manual_seed(0), input_ids=ids)
    assert named in str(info.value)


@pytest.mark.parametrize("overrides, named", [
    (dict(img_size="48"), "BEiTConfig.img_size must be an integer, got '48'"),  # not 'not all arguments converted'
    (dict(img_size=(48, 48)), "BEiTConfig.img_size must be an integer, got (48, 48)"),
    (dict(vocab_size=16.0), "BEiTConfig.vocab_size must be an integer, got 16.0"),
])
def test_beit_config_names_a_non_integer_size(overrides, named):
    with pytest.raises(ValueError) as info:
        BEiTConfig(**{**CFG, **overrides})
    assert named in str(info.value)
    model = BEiT(BEiTConfig(**CFG))
    with pytest.raises(ValueError, match="images are torch.float64 but the model's weights are torch.float32"):
        model(torch.randn(1, 3, 48, 48, dtype=torch.float64), torch.zeros(1, 36, dtype=torch.bool))
