"""`lomar load-original`, `lomar visualize` and the in-window attention maps."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import pretrain, reference_dir, segmenter_file, write_images
from lomar import MAE, LoMaR, VisionTransformer, ViTConfig, export_encoder, load_original, model_config
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.formats import load_model
from lomar.checkpoints.io import atomic_save
from lomar.cli.app import main
from lomar.models.rpe import bucket_table
from lomar.viz.attention import attention_probs, attention_request, block_attention, window_attention

ORIGINAL = reference_dir() / "lomar_224_4win" / "checkpoint.pth"
ORIGINAL_MAE = reference_dir() / "mae_64" / "mae_checkpoint.pth"
needs_reference = pytest.mark.skipif(not ORIGINAL.is_file(), reason="reference checkpoints not available")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The reference original checkpoint converted with `lomar load-original`, and two small photos."""
    if not ORIGINAL.is_file():
        pytest.skip("reference checkpoints not available")
    root = tmp_path_factory.mktemp("vis")
    assert main(["load-original", str(ORIGINAL), "--to", str(root / "conv.pt"), "--num-heads", "4"]) == 0
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (150, 100)), ("b.jpg", (90, 120))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    return root


def _with_rpe(config: ViTConfig) -> VisionTransformer:
    torch.manual_seed(0)
    encoder = VisionTransformer(config).eval()
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rpe.table.normal_(std=0.3)
    return encoder


def test_attention_probs_reproduce_the_fast_path():
    encoder = _with_rpe(ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=4))
    attn = encoder.blocks[0].attn
    x = torch.randn(2, 17, 32)
    buckets = bucket_table((4, 4))
    probs = attention_probs(attn, x, buckets)
    assert probs.shape == (2, 4, 17, 17)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17))
    v = attn.qkv(x).view(2, 17, 3, 4, 8)[:, :, 2].transpose(1, 2)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(out, attn(x, buckets), atol=1e-6, rtol=1e-5)
    assert len(block_attention(encoder, torch.randn(1, 17, 32), (4, 4))) == 1


def test_window_attention_lomar_and_image_context():
    config = ViTConfig(img_size=96, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    model = LoMaR(config, window_size=3, num_windows=2).eval()
    image = torch.randn(3, 96, 96)
    result = window_attention(model, image, target=(0, 5))
    assert result.maps.shape == (2, 3, 3) and result.context == "window"
    assert result.top_left == (0, 3) and result.target_in_window == (0, 2)  # window shifted into the grid
    torch.testing.assert_close(result.maps.flatten(1).sum(1) + result.cls, torch.ones(2))
    masked = window_attention(model, image, target=(2, 2), masked=True, seed=3)
    assert masked.mask.sum() == 7 and masked.mask[4]  # floor(9 * 0.8), the centre target among them
    whole = window_attention(model.encoder, image, target=(2, 2), window_size=3)
    assert whole.context == "image" and bool((whole.inside <= 1 + 1e-6).all())
    with pytest.raises(ValueError, match="outside"):
        window_attention(model, image, target=(6, 0))


def test_attention_window_defaults_to_the_checkpoints_own_or_what_the_grid_holds(tmp_path, capsys):
    config = model_config("vit_mini_patch8", img_size=32)  # a 4x4 patch grid: 7 does not fit
    assert attention_request(LoMaR(config, window_size=2, num_windows=3), (4, 4))[0] == 2
    mae = MAE(replace(config, pos="abs"), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    assert attention_request(mae.encoder, (4, 4))[0] == 4 and attention_request(mae, (9, 8))[0] == 7
    atomic_save(pretrain_checkpoint(mae), tmp_path / "mae.pt")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    run = ["visualize", str(tmp_path / "mae.pt"), str(tmp_path / "a.png"), "--attention", "--out", str(tmp_path)]
    assert main(run) == 0  # the command a pretraining run suggests
    assert (tmp_path / "attention-00-a.png").is_file()
    assert main([*run, "--attention-window", "5"]) == 2
    assert capsys.readouterr().err.endswith("a 5x5 window does not fit the 4x4 patch grid of "
                                            f"{tmp_path / 'mae.pt'}; pass --attention-window 4 or less\n")


def test_attention_of_a_windowed_encoder_is_refused_in_the_commands_words(tmp_path, capsys):
    # a finetune --window-size 2 --global-blocks 0 encoder: block 1 attends inside 2x2 windows
    config = model_config("vit_mini_patch8", img_size=32, depth=2, window_size=2, global_blocks=(0,))
    encoder = VisionTransformer(config)
    with pytest.raises(ValueError, match="use an encoder with window_size=0"):  # the Python caller's parameter
        block_attention(encoder, torch.zeros(1, 17, encoder.config.embed_dim), (4, 4))
    export_encoder(encoder, tmp_path / "ft")
    assert main(["visualize", str(tmp_path / "ft"), "--attention", "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err == (f"lomar visualize: error: --attention: {tmp_path / 'ft'} has block 1 attending "
                                       "inside 2x2 windows (a finetune's --window-size), whose attention maps are not "
                                       "drawn; pass the checkpoint it was finetuned from\n")


@needs_reference
def test_load_original_output_is_our_pretrain_checkpoint(converted):
    from lomar.checkpoints.io import safe_load
    from lomar.eval.features import load_pretrained_encoder

    ckpt = safe_load(converted / "conv.pt")
    assert ckpt["format"] == "lomar-pretrain-2" and ckpt["config"]["method"] == "lomar"
    assert (ckpt["config"]["embed_dim"], ckpt["config"]["num_heads"], ckpt["config"]["img_size"]) == (48, 4, 224)
    ours, original = load_model(converted / "conv.pt"), load_original(ORIGINAL, num_heads=4)
    assert isinstance(ours, LoMaR)
    for key, value in original.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    encoder = load_pretrained_encoder(converted / "conv.pt", num_classes=10)  # as finetune's --pretrained
    assert torch.equal(encoder.blocks[1].attn.rpe.table, original.encoder.blocks[1].attn.rpe.table)
    assert main(["load-original", str(ORIGINAL), "--to", str(converted / "conv.pt")]) == 2  # exists


@needs_reference
def test_load_original_mae_needs_and_takes_overrides(tmp_path, capsys):
    # A non-standard width: the encoder's heads are asked for first, then the decoder's.
    assert main(["load-original", str(ORIGINAL_MAE), "--to", str(tmp_path / "m.pt")]) == 2
    assert "pass --num-heads" in capsys.readouterr().err
    assert main(["load-original", str(ORIGINAL_MAE), "--to", str(tmp_path / "m.pt"), "--num-heads", "4"]) == 2
    assert "pass --decoder-num-heads" in capsys.readouterr().err
    assert main(["load-original", str(ORIGINAL_MAE), "--to", str(tmp_path / "m.pt"),
                 "--num-heads", "4", "--decoder-num-heads", "4"]) == 0
    assert isinstance(load_model(tmp_path / "m.pt"), MAE)


@needs_reference
def test_visualize_writes_pngs(converted, capsys):
    out = converted / "figs"
    a, b = str(converted / "a.png"), str(converted / "b.jpg")  # an image after the flags joins those before them
    assert main(["visualize", str(converted / "conv.pt"), a, "--out", str(out), "--seed", "1",
                 "--attention", "--target-patch", "3", "4", "--masked", b]) == 0
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == ["attention-00-a.png", "attention-01-b.png", "reconstruction.png"]
    for name in written:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 300 and png.height > 200
    lines = capsys.readouterr().out.splitlines()  # each line names its command, as its errors do
    assert len(lines) == 3 and all(line.startswith("lomar visualize: wrote ") for line in lines), lines


@needs_reference
def test_visualize_errors_are_one_line(converted, tmp_path, capsys):
    conv = str(converted / "conv.pt")
    assert main(["visualize", conv, str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert main(["visualize", conv, str(converted / "a.png"), "--attention", "--target-patch", "20", "0",
                 "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "reconstruction.png").exists()  # refused before any figure is drawn
    assert main(["export", conv, "--to", str(tmp_path / "exp")]) == 0
    assert main(["visualize", str(tmp_path / "exp"), str(converted / "a.png"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("lomar visualize: error:") == 3 and "outside the 14x14 patch grid" in err
    assert main(["export", conv, "--to", str(tmp_path / "exp2"), "--img-size", "448", "--windows", "2"]) == 2
    assert capsys.readouterr().err.endswith("carries its own settings; drop --img-size 448 (it saved 224), --windows 2 "
                                            "(it saved 4)\n")  # not silently ignored


def test_visualize_a_run_folder_draws_its_reconstruction(pretrained, tmp_path, capsys):
    """Given the run folder, as knn and linprobe take it, its export (an encoder without a pixel head, or none
    yet while the run has not finished) was read: 'cannot reconstruct ... pass a pretraining checkpoint'."""
    run = pretrained.parent
    assert (run / "encoder.safetensors").is_file()
    assert main(["visualize", str(run), "--out", str(tmp_path / "figs")]) == 0, capsys.readouterr().err
    assert (tmp_path / "figs" / "reconstruction.png").stat().st_size > 1000


def test_visualize_prepares_an_image_at_a_height_and_width(pretrained, tmp_path, capsys):
    """--img-size H W: the photo resized to cover both sides and centre-cropped to them; one side: the shorter side
    resized and a square cropped, as eval transforms do."""
    from torchvision.transforms.v2 import functional as TF

    from lomar.cli.visualize import prepare_image
    from lomar.data.decode import load_image

    write_images(tmp_path / "photo", 1, size=(70, 50))
    photo = next((tmp_path / "photo").iterdir())
    image = load_image(photo)
    square = TF.center_crop(TF.resize(image, [32], interpolation=TF.InterpolationMode.BICUBIC, antialias=True),
                            [32, 32]).float() / 255.0
    torch.testing.assert_close(prepare_image(photo, 32).mul(torch.tensor([0.229, 0.224, 0.225])[:, None, None])
                               .add(torch.tensor([0.485, 0.456, 0.406])[:, None, None]), square)
    assert prepare_image(photo, (32, 64)).shape == prepare_image(photo, [32, 64]).shape == (3, 32, 64)
    assert prepare_image(photo, (64, 32)).shape == (3, 64, 32)
    assert main(["visualize", str(pretrained), str(photo), "--img-size", "32", "32", "--out", str(tmp_path / "f")]) \
        == 0, capsys.readouterr().err
    assert (tmp_path / "f" / "reconstruction.png").is_file()


def test_visualize_draws_the_images_of_a_folder_given(pretrained, tmp_path, capsys, monkeypatch):
    """A folder of one's own photos, as lomar predict takes one: its images (recursively, sorted) beside a file
    given, each once."""
    import lomar.cli.visualize as visualize

    write_images(tmp_path / "photos" / "sub", 2)
    write_images(tmp_path / "more", 1)
    lone = next((tmp_path / "more").iterdir())
    drawn = []
    prepare = visualize.prepare_image
    monkeypatch.setattr(visualize, "prepare_image", lambda path, size: drawn.append(path) or prepare(path, size))
    assert main(["visualize", str(pretrained), str(tmp_path / "photos"), str(lone), str(lone),
                 "--out", str(tmp_path / "figs")]) == 0, capsys.readouterr().err
    assert drawn == [*sorted((tmp_path / "photos" / "sub").iterdir()), lone]
    assert (tmp_path / "figs" / "reconstruction.png").is_file()
    (tmp_path / "none").mkdir()
    assert main(["visualize", str(pretrained), str(tmp_path / "none"), "--out", str(tmp_path / "f2")]) == 2
    assert f"no images found in {tmp_path / 'none'}" in capsys.readouterr().err
    write_images(tmp_path / "many", 65, size=(8, 8))
    assert main(["visualize", str(pretrained), str(tmp_path / "many"), "--out", str(tmp_path / "f3")]) == 2
    assert ("more than 64 distinct images in the files and folders given; pass fewer, or a folder with fewer images "
            "(at most 64: one figure row each)") in capsys.readouterr().err


def test_visualize_counts_distinct_images_not_the_names_given(pretrained, tmp_path, capsys, monkeypatch):
    """A file named 65 times, or named beside the folder it is in, is one image; 65 distinct files are refused, and
    a folder past the limit is not listed whole to say so."""
    import lomar.data.image_search as image_search

    photos = write_images(tmp_path / "photos", 2, size=(8, 8))
    one = photos / "img000.png"
    assert main(["visualize", str(pretrained), *[str(one)] * 65, "--out", str(tmp_path / "f")]) == 0, \
        capsys.readouterr().err
    assert main(["visualize", str(pretrained), str(photos), *[str(one)] * 63, "--out", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    many = write_images(tmp_path / "many", 65, size=(4, 4))
    assert main(["visualize", str(pretrained), *map(str, sorted(many.iterdir())), "--out", str(tmp_path / "h")]) == 2
    assert capsys.readouterr().err.endswith("more than 64 distinct images given; pass fewer (at most 64: one figure "
                                            "row each)\n")
    for name in "abc":
        write_images(tmp_path / "huge" / name, 40, size=(4, 4))
    walked, walk = [], image_search.walk
    monkeypatch.setattr(image_search, "walk", lambda *a: (walked.append(w[0]) or w for w in walk(*a)))
    assert main(["visualize", str(pretrained), str(tmp_path / "huge"), "--out", str(tmp_path / "i")]) == 2
    assert "more than 64 distinct images in the files and folders given" in capsys.readouterr().err
    assert str(tmp_path / "huge" / "c") not in walked  # the search stopped at b, past 64


def test_visualize_skips_a_folders_unreadable_image_and_refuses_one_named(pretrained, tmp_path, capsys):
    """A folder's damaged file is skipped with a warning, as lomar predict skips one: the others are drawn. A file
    named that cannot be read, or a folder of which none can, is one line."""
    write_images(tmp_path / "photos", 2, size=(8, 8))
    (tmp_path / "photos" / "bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "figs"
    assert main(["visualize", str(pretrained), str(tmp_path / "photos"), "--attention", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped image: cannot decode image" in err and "bad.jpg" in err
    assert sorted(p.name for p in out.glob("attention-*.png")) == ["attention-00-img000.png", "attention-01-img001.png"]
    assert main(["visualize", str(pretrained), str(tmp_path / "photos" / "bad.jpg"), "--out", str(out)]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"")
    assert main(["visualize", str(pretrained), str(tmp_path / "broken"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of the images found in the folders given can be read (1 image skipped above)" in err


def test_visualize_titles_name_the_checkpoint_step(pretrained, tmp_path, monkeypatch):
    """A figure of last.pt said nothing of how far the run had trained; the checkpoint records its step."""
    import lomar.viz.attention as attention
    import lomar.viz.reconstruction as reconstruction

    titles = []
    for module, name in ((reconstruction, "reconstruction_figure"), (attention, "attention_figure")):
        draw = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _draw=draw, **k: titles.append(k["title"]) or _draw(*a, **k))
    image = write_images(tmp_path / "img", 1, (40, 40)) / "img000.png"
    assert main(["visualize", str(pretrained), str(image), "--attention", "--out", str(tmp_path / "figs")]) == 0
    assert titles == ["LoMaR reconstruction of last.pt at step 1, seed 0", "LoMaR last.pt at step 1: img000.png"]


def test_visualize_reads_a_finetune_run_folder_as_its_best_pt(tmp_path, monkeypatch):
    """A run folder without an export is its best.pt, else last.pt, for visualize as for every reader (load_model,
    predict, --pretrained), not its last.pt."""
    import lomar.viz.attention as attention
    from lomar.checkpoints.kinds import FINETUNE_FORMAT

    config, run = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), tmp_path / "ft"
    for name in ("last.pt", "best.pt"):
        model = VisionTransformer(config, num_classes=2)
        atomic_save({"model": model.state_dict(), "config": config.to_dict(), "format": FINETUNE_FORMAT, "step": 1},
                    run / name)
    titles = []
    monkeypatch.setattr(attention, "attention_figure", lambda *a, **k: titles.append(k["title"]))
    image = write_images(tmp_path / "img", 1, (32, 32)) / "img000.png"
    assert main(["visualize", str(run), str(image), "--attention", "--out", str(tmp_path / "figs")]) == 0
    assert [title.split(" at step")[0] for title in titles] == ["encoder best.pt"]


def test_visualize_draws_a_beit_runs_token_figure(image_dir, tmp_path, capsys, monkeypatch):
    """A BEiT pretraining checkpoint was refused ('cannot reconstruct; pass --attention') though its run's tokenizer
    gives the figure BEiT has: true against predicted tokens of the masked patches. Its export has no tokenizer.
    A title given to the figure keeps the accuracy line (a training snapshot's 'beit step N' replaced it)."""
    import lomar.viz.tokens as tokens

    figures, draw = [], tokens.draw_tokens
    monkeypatch.setattr(tokens, "draw_tokens", lambda *a: figures.append(draw(*a)) or figures[-1])
    run = tmp_path / "beit"
    assert pretrain("--data", str(image_dir), "--out", str(run), "--method", "beit", "--max-steps", "1") == 0
    printed = capsys.readouterr().out.splitlines()  # the run's lines name its command, the tokenizer's fit too
    fitted = [line for line in printed if "tokenizer" in line]
    assert fitted[0].startswith("lomar pretrain: no --tokenizer: fitting the built-in k-means tokenizer"), printed
    assert fitted[1] == f"lomar pretrain: tokenizer saved to {run / 'tokenizer.safetensors'}", printed
    assert main(["visualize", str(run), "--out", str(tmp_path / "figs")]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.split() == ["lomar", "visualize:", "wrote", str(tmp_path / "figs" / "tokens.png")]
    title = figures[-1]._suptitle.get_text().split("\n")
    assert title[0] == "BEiT token prediction of last.pt at step 1, seed 0"
    assert re.fullmatch(r"accuracy \d+\.\d% on masked tokens, loss \d+\.\d{3}", title[1]), title
    assert main(["visualize", str(run / "encoder.safetensors"), "--out", str(tmp_path / "figs")]) == 2
    assert "without its pretraining run's tokenizer" in capsys.readouterr().err
    # another tokenizer where the run's was (a moved folder reads the recorded path) scored other tokens silently
    from lomar.tokenizers import load_tokenizer

    other = load_tokenizer(run / "tokenizer.safetensors")
    other.centroids += 1
    other.save(run / "tokenizer.safetensors")
    assert main(["visualize", str(run), "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err
    assert (f"the tokenizer {run / 'tokenizer.safetensors'} (tensors' sha256 {other.digest()[:12]}) is not the "
            f"tokenizer the run of {run / 'last.pt'} trained with (" in err and err.count("\n") == 1), err


@pytest.mark.parametrize("flags, message", [
    # the flag's own words, not the library's (which name neither the flag nor the fix)
    (["--target-patch", "4", "0"], "--target-patch 4 0 is outside the 4x4 patch grid of .*; pass a row below 4 and "
                                   "a column below 4"),
    (["--masked", "--context", "image"], "--masked masks the window with LoMaR's mask token, in window context; "
                                         "drop --context image"),
])
def test_visualize_attention_errors_name_the_flag_and_the_fix(pretrained, tmp_path, capsys, flags, message):
    assert main(["visualize", str(pretrained), "--attention", *flags, "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(f"lomar visualize: error: {message}$", err.strip())
    assert not (tmp_path / "f").exists()


def _beit(**overrides):
    from lomar.models.beit import BEiT, BEiTConfig

    torch.manual_seed(0)
    beit = BEiT(BEiTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=4, vocab_size=16,
                           use_rel_pos_bias=True, **overrides)).eval()
    with torch.no_grad():  # the tables and q/v biases start at zero: make each of them count
        for name, p in beit.named_parameters():
            if "relative_position" in name or name.endswith(("q_bias", "v_bias")):
                p.normal_(std=0.5)
    return beit


def test_beit_attention_probs_reproduce_its_fast_path():
    from lomar.viz.attention import beit_attention_probs

    beit = _beit()
    attn, x = beit.blocks[1].attn, torch.randn(2, 17, 32)
    bias = beit.rel_pos_bias_for_grid((4, 4))[1]  # the shared table and the block's own
    probs = beit_attention_probs(attn, x, bias)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17))
    v = (x @ attn.qkv.weight.T).view(2, 17, 3, 4, 8)[:, :, 2].transpose(1, 2) + attn.v_bias.view(4, 1, 8)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(out, attn(x, beit.rel_pos_bias((4, 4)), (4, 4)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("abs_pos", [False, True])
def test_window_attention_of_a_beit_in_both_contexts(abs_pos):
    beit, image = _beit(use_abs_pos_emb=abs_pos), torch.randn(3, 64, 64)
    window = window_attention(beit, image, target=(3, 3), window_size=3, context="window")
    assert window.maps.shape == (2, 3, 3) and window.top_left == (1, 1) and window.target_in_window == (2, 2)
    torch.testing.assert_close(window.maps.flatten(1).sum(1) + window.cls, torch.ones(2))
    whole = window_attention(beit, image, target=(3, 3), window_size=3)
    assert whole.context == "image" and bool((whole.maps.flatten(1).sum(1) + whole.cls < 1).all())
    # the window context is the forward on cls + the window's tokens at their places, as BEiT + windows trains
    index = torch.tensor([5, 6, 7, 9, 10, 11, 13, 14, 15])
    tokens = beit.prepare_tokens(beit.patch_embed(image[None])[:, index], None, index[None])
    row = block_attention(beit, tokens, (3, 3))[0][0, :, 1 + 8].mean(0)
    torch.testing.assert_close(window.maps[0].flatten(), row[1:])


def test_visualize_refuses_a_whole_detector_or_segmenter_as_other_encoder_readers_do(tmp_path, capsys):
    """load_model rebuilds a `lomar segment` checkpoint, but no figure draws a segmenter: the refusal names the
    encoder its run started from, not a pixel head it lacks."""
    from lomar.models.segmenter import UperNetSegmenter

    segmenter_file(tmp_path / "best.pt", UperNetSegmenter(VisionTransformer(ViTConfig(
        img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2)), 3, channels=8, aux_channels=8))
    assert main(["visualize", str(tmp_path / "best.pt"), "--out", str(tmp_path / "fig")]) == 2
    assert capsys.readouterr().err == (f"lomar visualize: error: checkpoint {tmp_path / 'best.pt'} is a whole `lomar "
                                       f"segment` model, not an encoder; pass the encoder that run started from (its "
                                       f"--pretrained), or a pretraining checkpoint or export\n")
    assert not (tmp_path / "fig").exists()
