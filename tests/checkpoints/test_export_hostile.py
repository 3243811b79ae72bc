"""Export folders edited by hand or taken from elsewhere: refused in one line, before any model is built."""

import json
import re

import pytest
import torch

from lomar.checkpoints.export_beit import create_timm_beit, export_beit_encoder
from lomar.checkpoints.formats import load_model
from lomar.errors import UsageError
from lomar.eval.features import load_pretrained_encoder
from lomar.models.beit import BEiT, BEiTConfig

BEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=16)


@pytest.fixture(scope="module")
def beit_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("beit")
    torch.manual_seed(0)
    export_beit_encoder(BEiT(BEiTConfig(**BEIT)).eval(), folder)
    return folder


def _edited(source, target, edit):
    target.mkdir()
    (target / "encoder.safetensors").write_bytes((source / "encoder.safetensors").read_bytes())
    config = json.loads((source / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("edit, message", [
    # timm's Beit was built from timm_args as written: a terabyte allocation, or a TypeError's traceback
    (lambda c: c["timm_args"].update(embed_dim=2**20), r"timm_args embed_dim=1048576 where beit_config gives 32"),
    (lambda c: c["timm_args"].update(foo=1), r"timm_args foo=1 where beit_config gives '\(none\)'"),
    (lambda c: c["timm_args"].update(depth="2"), r"timm_args depth='2' where beit_config gives 2"),
    (lambda c: c.pop("timm_args"), r"timm_args None, not an object"),
    (lambda c: c["beit_config"].update(depth=10**5), r"depth must be an int in \[1, 64\], got 100000"),
    (lambda c: c.update(beit_config=[1]), r"beit_config must be an object, got \[1\]"),
    (lambda c: c["beit_config"].update(qkv_bias="no"), r"qkv_bias must be true or false, got 'no'"),
    (lambda c: c.update(weights="../x/encoder.safetensors"), r"weights must be a file name in the same folder"),
])
def test_a_hand_edited_beit_export_is_refused_in_one_line_by_every_reader(beit_export, tmp_path, edit, message):
    folder = _edited(beit_export, tmp_path / "edited", edit)
    for read in (create_timm_beit, load_pretrained_encoder, load_model):
        with pytest.raises(UsageError, match=message) as caught:
            read(folder)
        assert "\n" not in str(caught.value)


def test_a_beit_export_whose_weights_are_another_models_is_refused_before_they_are_read(beit_export, tmp_path):
    from safetensors.torch import save_file

    folder = _edited(beit_export, tmp_path / "other", lambda c: None)
    save_file({"blocks.0.norm1.weight": torch.ones(64)}, str(folder / "encoder.safetensors"))
    with pytest.raises(UsageError, match=r"does not match .*config.json: missing \['blocks.0.attn.proj.bias'"):
        create_timm_beit(folder)


def test_a_deeply_nested_config_json_is_one_line_not_a_recursion_error(beit_export, tmp_path):
    from lomar import create_encoder

    folder = _edited(beit_export, tmp_path / "deep", lambda c: None)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    for read in (create_encoder, load_model):
        with pytest.raises(UsageError, match=r"config.json is not valid JSON \(nested too deeply\)"):
            read(folder)


def test_an_intact_beit_export_still_loads_everywhere(beit_export):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = create_timm_beit(beit_export).forward_features(images)
        torch.testing.assert_close(load_pretrained_encoder(beit_export).eval().forward_features(images), expected)
        torch.testing.assert_close(load_model(beit_export).eval().forward_features(images), expected)


def test_a_beit_export_refuses_settings_it_does_not_take_and_takes_its_own(beit_export):
    """A BEiT export dropped every override without a word (its config.json says all): another num_heads or a
    LoMaR window size built the export as saved; the heads it saved are taken."""
    message = f"{beit_export} is a BEiT export, which carries its own settings; drop num_heads=4 (it saved 2)"
    with pytest.raises(ValueError, match=re.escape(f"{message}, window_size=5 (LoMaR's window size)")):
        load_model(beit_export, num_heads=4, window_size=5)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pretrained_encoder(beit_export, num_heads=4)
    assert load_model(beit_export, num_heads=2, img_size=32).config.num_heads == 2


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_weights_of_a_dtype_no_encoder_is_saved_in_are_refused_not_cast(tmp_path, dtype):
    """Integers, booleans, complex numbers and float8 are refused by name, not cast into the float weights."""
    import timm
    from safetensors.torch import load_file, save_file

    import lomar.integrations.timm  # noqa: F401  (registers lomar_vit_*)
    from lomar import VisionTransformer, ViTConfig, create_encoder, export_encoder

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    export_encoder(VisionTransformer(config), tmp_path)
    weights = str(tmp_path / "model.safetensors")
    state = load_file(weights)
    save_file({**state, "cls_token": state["cls_token"].to(dtype)}, weights)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(UsageError, match=r"holds tensors in a dtype no weights are saved in: cls_token \("):
        create_encoder(tmp_path)
    with pytest.raises(ValueError, match=rf"weight cls_token is torch.{name}, which no weights are saved in"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    save_file({**state, "cls_token": state["cls_token"].half()}, weights)
    assert create_encoder(tmp_path).cls_token.dtype == torch.float32  # half precision is a dtype weights come in


def test_an_original_beit_checkpoint_is_named_by_the_lomar_and_mae_readers_not_asked_for_heads(tmp_path, capsys):
    """load-original on BEiT's checkpoint asked for --num-heads, then failed to load it as a LoMaR model; a finetuned
    BEiT (no lm_head) did the same in export, knn and finetune."""
    from helpers import reference_dir
    from lomar import load_original
    from lomar.cli.app import main

    beit = reference_dir() / "beit_112" / "beit_checkpoint.pth"
    with pytest.raises(ValueError, match=r"beit_checkpoint.pth is an original BEiT pretraining checkpoint, not a "
                                         r"LoMaR / MAE one: `lomar export`"):
        load_original(beit, num_heads=4)
    assert main(["load-original", str(beit), "--to", str(tmp_path / "x.pt")]) == 2
    assert "is an original BEiT pretraining checkpoint" in capsys.readouterr().err
    state = {k: v for k, v in torch.load(beit, weights_only=True)["model"].items()
             if not k.startswith(("lm_head.", "mask_token"))}
    torch.save({"model": {**state, "head.weight": torch.zeros(10, 48), "head.bias": torch.zeros(10)}},
               tmp_path / "ft.pth")
    for read in (load_model, load_pretrained_encoder):
        with pytest.raises(ValueError, match=r"ft.pth is a BEiT checkpoint without its lm_head"):
            read(tmp_path / "ft.pth")
    assert main(["export", str(beit), "--to", str(tmp_path / "ex")]) == 0  # the pretraining one still exports


def test_tokenizer_fit_and_convert_replace_an_existing_file_only_with_overwrite(tmp_path, capsys):
    """A BEiT run names its tokenizer by path: `tokenizer fit --out RUN/tokenizer.safetensors` replaced it unasked,
    and `pretrain --resume` then trained against another tokenizer's targets."""
    from PIL import Image

    from lomar.cli.app import main
    from lomar.tokenizers import DVAEConfig, DVAEEncoder

    for i in range(4):
        Image.new("RGB", (40, 40), (i * 60, 30, 60)).save(tmp_path / f"{i}.png")
    out = tmp_path / "tok.safetensors"
    out.write_bytes(b"the run's tokenizer")
    fit = ["tokenizer", "fit", "--data", str(tmp_path), "--vocab", "4", "--size", "16", "--out", str(out)]
    assert main(fit) == 2
    assert "tok.safetensors already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"the run's tokenizer"
    assert main([*fit, "--overwrite"]) == 0 and out.read_bytes() != b"the run's tokenizer"
    torch.save({"model": DVAEEncoder(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=10)).state_dict()},
               tmp_path / "dvae.pt")
    convert = ["tokenizer", "convert", str(tmp_path / "dvae.pt"), "--to", str(out)]
    assert main(convert) == 2 and "already exists" in capsys.readouterr().err
    assert main([*convert, "--overwrite"]) == 0


def test_export_drop_head_names_the_classifier_it_came_from(tmp_path, capsys):
    """--drop-head recorded and printed the source as a "visiontransformer": the encoder built to drop the head."""
    from lomar import VisionTransformer, ViTConfig, create_encoder
    from lomar.cli.app import main

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    classifier = VisionTransformer(config, num_classes=3)
    torch.save({"model": classifier.state_dict()}, tmp_path / "cls.pt")
    assert main(["export", str(tmp_path / "cls.pt"), "--to", str(tmp_path / "ex"), "--drop-head"]) == 0
    assert "(classifier, head dropped, final norm new (identity))" in capsys.readouterr().out
    assert json.loads((tmp_path / "ex" / "config.json").read_text())["method"] == "classifier"
    assert create_encoder(tmp_path / "ex").num_classes == 0


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(window_size=2, global_blocks=[1]), "model_args window_size=0 but window_size=2"),
    (lambda c: c["model_args"].update(window_size=2, global_blocks=[1]), "model_args window_size=2 but window_size=0"),
    (lambda c: c["model_args"].update(pos="none"), "model_args pos='none' but pos='rpe'"),
    (lambda c: c["model_args"].update(num_classes=4), "model_args num_classes=4 but num_classes=0"),
])
def test_an_export_whose_model_args_disagree_with_its_top_level_is_refused(tmp_path, edit, words):
    """timm builds from model_args, lomar from the top level: a window size edited in one place (no weight changes
    shape) gave two different models from one folder, without a word."""
    from lomar import VisionTransformer, ViTConfig, create_encoder, export_encoder

    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    export_encoder(VisionTransformer(vit), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=re.escape(words) + ".*timm builds from model_args and lomar from the top"):
        create_encoder(tmp_path)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["model_args"].pop("global_pool"), "model_args global_pool='avg' but global_pool='cls' (timm's "
                                                   "'token')"),
    (lambda c: c.pop("global_pool"), "model_args global_pool='token' but global_pool='avg' (timm's 'avg')"),
])
def test_a_classifier_export_whose_model_args_pool_another_way_is_refused(tmp_path, edit, words):
    """A hand-edited cls classifier's export loaded with one pooling in lomar and another in timm."""
    from lomar import VisionTransformer, ViTConfig, create_encoder, export_encoder

    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    export_encoder(VisionTransformer(vit, num_classes=3, global_pool="cls"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=re.escape(words) + "; timm builds from model_args and lomar from the top"):
        create_encoder(tmp_path)


def test_a_device_or_pipe_given_as_a_checkpoint_is_named_as_such_not_missing(tmp_path):
    """/dev/null is named as a device, not "checkpoint /dev/null does not exist; check the path"."""
    import os

    os.mkfifo(tmp_path / "pipe")
    for path in ("/dev/null", tmp_path / "pipe"):
        with pytest.raises(ValueError, match=r"is not a regular file \(a device, pipe or socket\)"):
            load_model(path)


def test_a_timm_model_folder_is_named_as_not_lomars(tmp_path):
    """A timm / Hugging Face folder (config.json + model.safetensors) is named as timm's model, not refused for its
    global_pool 'token'."""
    import timm
    from timm.models._hub import save_for_hf

    from lomar import create_encoder

    save_for_hf(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32), tmp_path)
    for read in (create_encoder, load_pretrained_encoder):
        with pytest.raises(UsageError, match=r"describes 'vit_tiny_patch16_224', not a lomar encoder"):
            read(tmp_path)


def test_the_window_cap_warning_of_an_original_checkpoint_loaded_at_a_non_square_size_is_logged(caplog):
    """The warning formats a (height, width) size as HxW: with %d, logging would print its own traceback instead."""
    import logging

    from helpers import reference_dir
    from lomar import load_original

    with caplog.at_level(logging.WARNING, logger="lomar.checkpoints"):
        model = load_original(reference_dir() / "lomar_112" / "checkpoint.pth", img_size=(112, 224))
    assert model.encoder.config.img_size == (112, 224)
    assert "capped at 1 on a 112x224 px image; loaded with 1" in caplog.text


def test_create_encoder_takes_a_height_width_tuple_and_blames_a_bad_setting_on_its_caller(tmp_path):
    """img_size=(h, w), as ViTConfig spells it, is taken as a JSON list is; a bad num_classes given to create_encoder
    is named as the caller's setting, not the file's (no "re-export the encoder")."""
    from lomar import VisionTransformer, ViTConfig, create_encoder, export_encoder

    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos="abs")
    export_encoder(VisionTransformer(vit), tmp_path)
    assert create_encoder(tmp_path, img_size=(32, 64)).config.img_size == (32, 64)
    with pytest.raises(UsageError, match=r"^the encoder settings given: num_classes must be an int in \[0, 1000000\], "
                                         r"got -1; pass another value$"):
        create_encoder(tmp_path, num_classes=-1)


def test_a_bad_value_in_an_original_checkpoints_saved_args_names_the_checkpoint(tmp_path):
    """norm_pix_loss='no' in the run's args is named as the checkpoint's, not as if a flag had been given wrong."""
    import argparse

    from helpers import reference_dir
    from lomar import load_original

    state = torch.load(reference_dir() / "lomar_112" / "checkpoint.pth", weights_only=True)["model"]
    torch.save({"model": state, "args": argparse.Namespace(norm_pix_loss="no")}, tmp_path / "orig.pth")
    with pytest.raises(ValueError, match=r"^checkpoint .*orig.pth: norm_pix_loss must be True or False, got 'no' "
                                         r"\(from its saved args, or an override given\)$"):
        load_original(tmp_path / "orig.pth")


def test_timm_gives_a_beit_export_a_fresh_head_of_the_classes_asked_for(beit_export):
    """timm.create_model('local-dir:EXPORT', pretrained=True, num_classes=10), the start of a timm finetuning, builds
    a fresh head: the export's pretrained_cfg names its classifier, so no strict load's 'Missing key(s): head.weight,
    head.bias'."""
    import timm

    plain = timm.create_model(f"local-dir:{beit_export}", pretrained=True).eval()
    ten = timm.create_model(f"local-dir:{beit_export}", pretrained=True, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert ten(x).shape == (2, 10)
        assert torch.equal(ten.forward_features(x), plain.forward_features(x))


def test_load_original_given_lomars_own_checkpoint_or_export_says_it_needs_no_conversion(tmp_path, capsys):
    """A pretraining checkpoint read 'lomar.eval.features.load_pretrained_encoder reads its encoder' (a Python call) and
    an export's weights file a strict load's 'Missing key(s) ... mask_token ...; pass overrides to load_original'."""
    from lomar import LoMaR, ViTConfig, export_encoder
    from lomar.checkpoints.convert import pretrain_checkpoint
    from lomar.checkpoints.io import atomic_save
    from lomar.cli.app import main

    model = LoMaR(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), window_size=2,
                  num_windows=1)
    atomic_save(pretrain_checkpoint(model), tmp_path / "last.pt")
    export_encoder(model, tmp_path / "ex")
    # torch's legacy (non-zip) format, which a mapped read refuses: read whole, not let through to the conversion
    torch.save(pretrain_checkpoint(model), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for path, kind in ((tmp_path / "last.pt", "lomar-pretrain"), (tmp_path / "legacy.pt", "lomar-pretrain"),
                       (tmp_path / "ex" / "model.safetensors", "export")):
        assert main(["load-original", str(path), "--to", str(tmp_path / "c.pt")]) == 2
        err = capsys.readouterr().err
        assert f"{path} is lomar's own ({kind} format), not an original LoMaR / MAE checkpoint: it needs no " \
               f"conversion; pass it as it is to lomar export" in err
        assert "load_pretrained_encoder" not in err and "pass overrides" not in err
    assert not (tmp_path / "c.pt").exists()


def test_load_original_refuses_lomars_own_finetune_or_classifier_checkpoint_in_one_line(tmp_path, capsys):
    """A `lomar finetune` best.pt has an original finetuned model's keys: converted as one, its saved image size (64)
    would read as 224 and its class names be dropped. It is refused in one line naming load_model, which reads it."""
    from lomar import VisionTransformer, ViTConfig, load_original
    from lomar.checkpoints.convert import pretrain_checkpoint
    from lomar.checkpoints.io import atomic_save
    from lomar.cli.app import main

    config = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    classifier = VisionTransformer(config, num_classes=3)
    atomic_save({"model": classifier.state_dict(), "config": config.to_dict(), "num_classes": 3,
                 "classes": ["a", "b", "c"], "format": "lomar-finetune-1", "global_pool": "avg"},
                tmp_path / "best.pt")
    atomic_save(pretrain_checkpoint(classifier), tmp_path / "cls.pt")
    for path, kind in ((tmp_path / "best.pt", "lomar-finetune-1"), (tmp_path / "cls.pt", "lomar-classifier-1")):
        with pytest.raises(ValueError, match=rf"lomar's own \({kind} format\), not an original .*load_model reads"):
            load_original(path)
        assert main(["load-original", str(path), "--to", str(tmp_path / "c.pt")]) == 2
        assert capsys.readouterr().err == (
            f"lomar load-original: error: {path} is lomar's own ({kind} format), not an original LoMaR / MAE "
            f"checkpoint: it needs no conversion; pass it as it is to lomar export, knn, linprobe or finetune "
            f"--pretrained\n")
    assert not (tmp_path / "c.pt").exists()


def test_hand_written_label_names_are_quoted_short_on_one_line(tmp_path):
    """An export's label_names may hold a name a megabyte long or with a line break: a refusal of them, or the load
    line that names one the data lacks, quotes it cut short on one line."""
    from lomar.checkpoints.export import create_encoder, export_encoder
    from lomar.models.vit import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    head = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), num_classes=2)
    long = "x" * 10**6
    for names in ([long, long], "cat\ndog"):
        export_encoder(head, tmp_path / "dup", metadata={"label_names": names}, overwrite=True)
        with pytest.raises(UsageError, match=r"label_names (name 'xxx|must be).*; re-export") as caught:
            create_encoder(tmp_path / "dup")
        assert len(str(caught.value)) < 500 and "\n" not in str(caught.value)
    export_encoder(head, tmp_path / "other", metadata={"label_names": [long, "cat"]})
    summary = load_pretrained_encoder(tmp_path / "other", num_classes=2, classes=["cat", "dog"]).load_report.summary()
    assert "trained on other classes (2, e.g. 'xxx" in summary and len(summary) < 1000


def test_create_encoder_names_a_beit_export_and_what_loads_it(beit_export):
    """lomar.create_encoder of `lomar export`'s own BEiT folder names it as a BEiT export and lomar.load_model as what
    loads it, not 'not a lomar encoder (a timm or Hugging Face folder?)'."""
    from lomar import create_encoder

    with pytest.raises(UsageError, match=re.escape(f"{beit_export} is a BEiT export (timm's Beit layout), not a ViT "
                                                   f"encoder's; load it with lomar.load_model(DIR)")):
        create_encoder(beit_export)
