"""Original-checkpoint loading: safety, inference, key conversion, clear errors."""

import argparse
import os
import pickle

import pytest
import torch

import lomar
from helpers import fill_disk
from lomar import MAE, LoMaR, load_original, lomar_from_original, lomar_to_original, model_config
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.checkpoints.keys import classifier_from_original, encoder_keys
from lomar.checkpoints.original import infer_original_config
from lomar.models.vit import VisionTransformer, ViTConfig

TINY = dict(embed_dim=48, depth=2, num_heads=4)


def _original_lomar_state(model: LoMaR) -> dict:
    state = lomar_to_original(model.state_dict())
    state["pos_embed"] = torch.zeros(1, 197, 48)  # present but unused in the original
    return state


def test_key_round_trip():
    model = LoMaR(model_config("vit_tiny_patch16", **TINY))
    original = lomar_to_original(model.state_dict())
    assert "blocks.1.attn.rpe_k.lookup_table_weight" in original
    assert "encoder_pred.weight" in original and "mask_token" in original
    assert not any(k.startswith("encoder.") for k in original)
    back = lomar_from_original(original)
    assert back.keys() == model.state_dict().keys()


def test_the_original_lomars_unused_position_table_is_dropped_unless_asked_for():
    """The original LoMaR keeps an absolute table its RPE encoder never reads: dropped by default, kept (under
    ``encoder.``) for an encoder that has one."""
    original = _original_lomar_state(LoMaR(model_config("vit_tiny_patch16", **TINY)))
    assert "pos_embed" not in lomar_from_original(original) and "encoder.pos_embed" not in lomar_from_original(original)
    kept = lomar_from_original(original, keep_pos_embed=True)
    assert kept["encoder.pos_embed"] is original["pos_embed"] and "pos_embed" not in kept


def test_an_original_classifiers_position_table_is_kept_only_for_a_model_that_has_one():
    table, head = torch.zeros(1, 197, 48), torch.zeros(10, 48)
    state = {"pos_embed": table, "norm.weight": torch.ones(48), "head.weight": head,
             "blocks.0.attn.rpe_k.lookup_table_weight": torch.zeros(1, 12, 50)}
    for pos, kept in (("abs", {"pos_embed": table}), ("rpe", {})):
        model = VisionTransformer(ViTConfig(pos=pos, **TINY))
        assert set(classifier_from_original(state, model)) == {"head.weight", "blocks.0.attn.rpe.table", *kept}


def test_encoder_keys_are_a_pretraining_models_encoder_or_a_vits_own_keys():
    """A pretraining model's ``encoder.*`` (its other parts dropped), or a ViT's keys as they are, the original iRPE
    table renamed and pretraining-only parts dropped in both."""
    table, head = torch.zeros(1, 12, 50), torch.zeros(10, 48)
    ours = {"encoder.blocks.0.attn.rpe.table": table, "encoder.cls_token": head, "decoder_pred.weight": head,
            "mask_token": head}
    assert encoder_keys(ours) == {"blocks.0.attn.rpe.table": table, "cls_token": head}
    plain = {"cls_token": head, "blocks.0.attn.rpe_k.lookup_table_weight": table, "mask_token": head}
    assert encoder_keys(plain) == {"cls_token": head, "blocks.0.attn.rpe.table": table}


def test_load_original_with_args_namespace(tmp_path):
    model = LoMaR(model_config("vit_tiny_patch16", **TINY), window_size=5, num_windows=3, mask_ratio=0.6)
    args = argparse.Namespace(model="lomar_vit_custom", input_size=224, window_size=5, num_window=3,
                              mask_ratio=0.6, norm_pix_loss=True)
    path = tmp_path / "orig.pth"
    torch.save({"model": _original_lomar_state(model), "args": args, "epoch": 3}, path)
    loaded = load_original(path)
    assert isinstance(loaded, LoMaR)
    assert (loaded.window_size, loaded.num_windows, loaded.mask_ratio) == (5, 3, 0.6)
    assert loaded.config.num_heads == 4  # from the RPE table's head_dim
    x = torch.randn(1, 3, 224, 224)
    plan = model.sample_plan(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.eval()(x, plan=plan).pred, model.eval()(x, plan=plan).pred)


def test_load_original_keeps_the_originals_capped_window_count_and_says_so(tmp_path, caplog):
    model = LoMaR(model_config("vit_tiny_patch16", img_size=112, **TINY), window_size=5)
    args = argparse.Namespace(model="lomar_vit_custom", input_size=112, window_size=5, num_window=4,
                              mask_ratio=0.8, norm_pix_loss=True)
    path = tmp_path / "orig.pth"
    state = _original_lomar_state(model)
    state["pos_embed"] = torch.zeros(1, 50, 48)
    torch.save({"model": state, "args": args}, path)
    with caplog.at_level("WARNING", logger="lomar.checkpoints"):
        loaded = load_original(path)
    assert loaded.num_windows == 3  # a 7x7 grid holds 3 5x5 windows with the original's placement
    assert "ask for 4 5x5 windows, which the original capped at 3" in caplog.text


def test_the_window_cap_warning_speaks_of_args_only_when_there_are_some(tmp_path, caplog):
    model = LoMaR(model_config("vit_mini_patch8", img_size=32), window_size=2, num_windows=3)
    state = lomar_to_original(model.state_dict())
    state["pos_embed"] = torch.zeros(1, 17, 128)
    path = tmp_path / "noargs.pth"
    torch.save({"model": state}, path)  # no args: the original's default of 4 windows, capped at 3
    with caplog.at_level("WARNING", logger="lomar.checkpoints"):
        assert load_original(path, img_size=32, window_size=2, num_windows=2).num_windows == 2
        assert not caplog.text  # the explicit count was loaded: no cap to report
        assert load_original(path, img_size=32, window_size=2).num_windows == 3
    assert "its args ask" not in caplog.text
    assert "no window count in its args, and the original's default of 4 2x2 windows is capped at 3" in caplog.text


def test_unpickling_arbitrary_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": {}, "payload": Evil()}, handle)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        safe_load(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_corrupt_checkpoint_gives_one_line_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content is None:  # truncated real checkpoint
        torch.save({"model": LoMaR(model_config("vit_tiny_patch16", **TINY)).state_dict()}, path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_original(path)
    assert "cannot read checkpoint" in str(info.value) and "\n" not in str(info.value)


def test_a_safetensors_file_cut_short_is_named_as_one(tmp_path):
    """torch.load reads a whole safetensors file (lomar export takes one); cut short, it was 'a file in an unknown
    format, expected a PyTorch checkpoint written by torch.save (.pt / .pth)'."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ValueError, match=r"it is a safetensors file that is cut short or damaged \(copy or export "
                                         r"it again\)$"):
        safe_load(path)


def test_a_whole_safetensors_file_torch_load_does_not_read_is_not_called_cut_short(tmp_path, monkeypatch):
    """torch.load reads a safetensors file only by its name (an older PyTorch not at all): a whole one named model.pt,
    or any on such a PyTorch, was 'cut short or damaged (copy or export it again)', which copying cannot mend."""
    from safetensors.torch import save_file

    whole = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, whole)
    (tmp_path / "model.pt").write_bytes(whole.read_bytes())
    with pytest.raises(ValueError, match=r"it is a whole safetensors file, which torch.load reads only under a name "
                                         r"ending in .safetensors; rename it to model.safetensors$"):
        safe_load(tmp_path / "model.pt")
    (tmp_path / "trailing.safetensors").write_bytes(whole.read_bytes() + bytes(8))  # the reader refuses it too
    with pytest.raises(ValueError, match=r"it is a safetensors file that is cut short or damaged"):
        safe_load(tmp_path / "trailing.safetensors")

    def older_torch_load(*args, **kwargs):
        raise pickle.UnpicklingError("invalid load key, '\\x80'.")

    monkeypatch.setattr(torch, "load", older_torch_load)
    with pytest.raises(ValueError, match=r"it is a whole safetensors file, which torch.load of PyTorch \S+ does not "
                                         r"read$"):
        safe_load(whole)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_original("/nonexistent/ckpt.pth")


def test_load_original_finetuned_lomar_classifier(tmp_path):
    # the original finetuned model: RPE tables under their original names, fc_norm + head, and
    # no final `norm` (deleted when pooling patch tokens)
    model = lomar.VisionTransformer(model_config("vit_tiny_patch16", img_size=64, **TINY), num_classes=7).eval()
    state = {k.replace("attn.rpe.table", "attn.rpe_k.lookup_table_weight"): v
             for k, v in model.state_dict().items() if not k.startswith("norm.")}
    path = tmp_path / "finetuned.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="vit_base_patch16", input_size=64)}, path)
    loaded = load_original(path, num_heads=4).eval()
    assert loaded.num_classes == 7 and loaded.config.pos == "rpe"
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))


def test_load_original_rejects_unknown_overrides_and_names_mismatched_keys(tmp_path):
    model = LoMaR(model_config("vit_tiny_patch16", **TINY))
    path = tmp_path / "orig.pth"
    torch.save({"model": _original_lomar_state(model)}, path)
    with pytest.raises(ValueError, match="unknown override.*num_head;? .*accepted: .*num_heads"):
        load_original(path, num_head=4)
    state = _original_lomar_state(model)
    del state["blocks.1.attn.proj.bias"]
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="blocks.1.attn.proj.bias"):
        load_original(path, num_heads=4)


def test_mae_needs_heads_for_nonstandard_width(tmp_path):
    model = MAE(model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY),
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    state = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="pass num_heads=... to load_original"):
        load_original(path)
    with pytest.raises(ValueError, match="pass decoder_num_heads=..."):
        load_original(path, num_heads=4)
    loaded = load_original(path, num_heads=4, decoder_num_heads=4)
    assert isinstance(loaded, MAE) and loaded.config.img_size == 64


def test_an_img_size_off_the_mae_tables_grid_names_the_size_it_was_trained_at(tmp_path, capsys):
    """--img-size is the pretraining size; another one read 'does not match the inferred mae model: size mismatch for
    decoder_pos_embed: copying a param with shape ...; pass overrides to load_original', no word of the value."""
    from lomar.cli.app import main

    model = MAE(model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY),
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    path = tmp_path / "mae.pth"
    torch.save({"model": {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(ValueError, match=r"^img_size=96 makes a 6x6 grid of patch_size 16, but the checkpoint's "
                                         r"position table is a 4x4 grid; pass img_size=64, the size it was trained at"):
        load_original(path, num_heads=4, decoder_num_heads=4, img_size=96)
    flags = ["--num-heads", "4", "--decoder-num-heads", "4", "--img-size", "64", "96", "--to", str(tmp_path / "o")]
    assert main(["export", str(path), *flags]) == 2 and not (tmp_path / "o").exists()
    assert "error: --img-size 64 96 makes a 4x6 grid of patch_size 16, but the checkpoint's position table is a 4x4 " \
           "grid; pass --img-size 64, the size it was trained at, or leave --img-size out\n" in capsys.readouterr().err


def test_standard_sizes_are_inferred_without_args():
    dim, depth = 192, 12
    state = {"patch_embed.proj.weight": torch.zeros(dim, 3, 16, 16),
             "blocks.0.mlp.fc1.weight": torch.zeros(4 * dim, dim),
             **{f"blocks.{i}.norm1.weight": torch.zeros(dim) for i in range(depth)},
             "decoder_embed.weight": torch.zeros(512, dim), "pos_embed": torch.zeros(1, 197, dim),
             "cls_token": torch.zeros(1, 1, dim)}
    method, settings = infer_original_config({"model": state})
    assert method == "mae" and settings["config"].num_heads == 3 and settings["decoder_num_heads"] == 16


def test_an_mlp_whose_width_over_the_embedding_is_no_exact_float_is_read_back(tmp_path):
    """88 * (120 / 88) is 119.99... in floats: the inferred ratio builds the checkpoint's 120-wide MLP, not 119."""
    from lomar.checkpoints.formats import load_model

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=88, depth=1, num_heads=2, mlp_ratio=1.364)
    torch.save({"model": VisionTransformer(config).state_dict()}, tmp_path / "odd.pt")
    assert load_model(tmp_path / "odd.pt").blocks[0].mlp.fc1.out_features == 120


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_package_api():
    assert lomar.__version__
    assert "vit_base_patch16" in lomar.list_models()


def test_a_full_disk_under_torch_save_surfaces_as_enospc_naming_the_file(tmp_path, monkeypatch):
    """torch.save's zip writer turns the disk's ENOSPC into its own RuntimeError; atomic_save
    reports the OSError behind it, for the target (not the temporary), and keeps the old file."""
    import errno

    target = tmp_path / "state.pt"
    atomic_save({"step": 1}, target)
    fill_disk(monkeypatch, room=64)
    with pytest.raises(OSError) as info:
        atomic_save({"w": torch.zeros(1000)}, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert isinstance(info.value.__cause__, RuntimeError)  # what torch.save itself raised
    monkeypatch.undo()
    assert safe_load(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_an_error_raised_from_none_keeps_its_own_type(tmp_path):
    """Only an OSError the writer let through (as cause or context) becomes the reported error."""
    def refuses(handle):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise ValueError("not this one") from None

    with pytest.raises(ValueError, match="not this one"):
        lomar.checkpoints.io.atomic_write(tmp_path / "f.bin", refuses)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_or_one_of_our_checkpoints_given_as_an_original_says_what_it_is(tmp_path, pretrained):
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file"):
        safe_load(tmp_path)
    with pytest.raises(ValueError, match="it is one of lomar's own: lomar.eval.features.load_pretrained_encoder"):
        load_original(pretrained)


@pytest.mark.parametrize("path", [5, None, b"ckpt.pth", ["a.pth"]])
def test_load_original_names_a_path_that_is_not_one(path):
    with pytest.raises(TypeError, match=r"load_original takes the checkpoint's path \(a str or Path\), got "):
        load_original(path)
