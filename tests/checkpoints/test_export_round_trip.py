"""One export of a tiny pretraining checkpoint (the ``pretrained`` fixture) read back: by create_encoder and timm with
the same features, the lines `lomar export` prints, and its refusal of a folder that holds an export already (one
written while it loaded included)."""

import ast
import json
import re

import pytest
import torch
from export_models import TINY, X, _perturb

from lomar import LoMaR, VisionTransformer, ViTConfig, create_encoder, export_encoder
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.io import atomic_save
from lomar.cli.app import main

timm = pytest.importorskip("timm")
import timm.optim  # noqa: E402,F811  (not imported by `import timm`)

import lomar.integrations.timm  # noqa: E402,F401  (registers lomar_vit_* in timm)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny LoMaR written as our pretraining checkpoint, and its export."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = _perturb(LoMaR(TINY, window_size=3, num_windows=2))
    atomic_save(pretrain_checkpoint(model), root / "last.pt")
    assert main(["export", str(root / "last.pt"), "--to", str(root / "exp")]) == 0
    return model, root


def test_export_round_trip(pretrained):
    model, root = pretrained
    config = json.loads((root / "exp" / "config.json").read_text())
    assert config["architecture"] == "lomar_vit_tiny_patch16" and config["model_args"]["embed_dim"] == 32
    encoder = create_encoder(root / "exp").eval()
    assert encoder.state_dict().keys() == model.encoder.state_dict().keys()
    assert torch.equal(encoder.forward_features(X), model.encoder.forward_features(X))


def test_each_line_an_export_prints_names_its_command(pretrained, tmp_path, capsys):
    assert main(["export", str(pretrained[1] / "last.pt"), "--to", str(tmp_path / "exp")]) == 0
    lines = capsys.readouterr().out.splitlines()  # as its errors do: 'lomar export: error: ...'
    assert [line.split(": ", 1)[0] for line in lines] == ["lomar export", "lomar export"], lines


def test_the_lines_to_copy_after_an_export_keep_an_odd_path_one_argument(pretrained, tmp_path, capsys):
    """The Python of its 'load with' line reads back the folder as it is, with a space and a quote in its name."""
    out = tmp_path / "it's mine"
    assert main(["export", str(pretrained[1] / "last.pt"), "--to", str(out)]) == 0
    load = capsys.readouterr().out.splitlines()[-1]
    calls = re.fullmatch(r"lomar export: load with lomar\.create_encoder\((.*)\) or, after `import "
                         r"lomar\.timm_models`, timm\.create_model\((.*), pretrained=True\)", load)
    assert calls and [ast.literal_eval(arg) for arg in calls.groups()] == [str(out), f"local-dir:{out}"], load


def test_export_refuses_to_overwrite_and_bad_input(pretrained, tmp_path, capsys):
    _, root = pretrained
    assert main(["export", str(root / "last.pt"), "--to", str(root / "exp")]) == 2
    assert main(["export", str(tmp_path / "missing.pt"), "--to", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_timm_round_trip_identical_features(pretrained):
    model, root = pretrained
    ours = model.encoder
    named = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=32, depth=2, num_heads=2,
                              img_size=64, pretrained_cfg_overlay=dict(file=str(root / "exp" / "model.safetensors")))
    local = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True)
    for m in (named.eval(), local.eval()):
        assert isinstance(m, lomar.integrations.timm.LomarVisionTransformer)
        assert m.num_classes == 0 and m.num_features == 32 and m.pretrained_cfg["num_classes"] == 0
        feats = m.forward_features(X)
        assert feats.shape == (2, 1 + 4 * 6, 32)
        assert torch.equal(feats, ours.forward_features(X))
        assert torch.equal(m(X), ours(X))  # mean of normed patch tokens
        assert torch.equal(m.forward_head(feats, pre_logits=True), ours(X))


def test_timm_forward_intermediates_and_features_only(pretrained):
    _, root = pretrained
    m = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True).eval()
    final, maps = m.forward_intermediates(X, indices=[0, -1])
    assert torch.equal(final, m.forward_features(X))
    assert [tuple(t.shape) for t in maps] == [(2, 32, 4, 6)] * 2
    tokens = m.forward_intermediates(X, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
    assert torch.equal(tokens[0], final[:, 1:])
    with_cls = m.forward_intermediates(X, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert with_cls[0][1].shape == (2, 1, 32)
    features = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True, features_only=True,
                                 out_indices=(0, 1)).eval()
    assert [tuple(t.shape) for t in features(X)] == [(2, 32, 4, 6)] * 2
    assert features.feature_info.reduction() == [16, 16]


def test_timm_adapts_the_stem_of_pretrained_weights_to_other_input_channels(pretrained):
    """timm's in_chans=1 sums an RGB stem over its channels (load_pretrained, after the filter); the filter refused
    the 3-channel weight, telling the user to create the model with the exported architecture."""
    model, root = pretrained
    gray = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True, in_chans=1).eval()
    stem = model.encoder.patch_embed.proj.weight
    assert torch.allclose(gray.patch_embed.proj.weight, stem.sum(1, keepdim=True))
    assert torch.allclose(gray(X[:, :1]), model.encoder(X[:, :1].expand(-1, 3, -1, -1)), atol=1e-5)


def test_timm_refuses_an_export_whose_model_args_ask_for_a_huge_image(pretrained, tmp_path):
    """timm builds from config.json's model_args alone: 100,000 px with an absolute table would be ~120 GB."""
    import shutil

    _, root = pretrained
    shutil.copytree(root / "exp", tmp_path / "exp")
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    config["model_args"]["img_size"] = 100_000  # an RPE encoder builds cheaply at any size: only the bound stops it
    (tmp_path / "exp" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"img_size must be at most 8192 \(lomar.limits.MAX_IMG_SIZE\), got 100000"):
        timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True)
    with pytest.raises(ValueError, match="img_size must be at most 8192"):
        ViTConfig(img_size=(16, 8208))
    assert ViTConfig(img_size=8192).img_size == 8192


def test_lomar_export_refuses_a_folder_another_export_wrote_while_it_loaded(pretrained, tmp_path, monkeypatch,
                                                                           capsys):
    """`lomar export` without --overwrite looks at --to again under the folder's lock, held through the write: an
    export into the folder that ends while it loads its checkpoint is kept and the command refused (rc 2), not
    replaced with rc 0."""
    from lomar.cli import export as cli_export

    _, root = pretrained
    load = cli_export.load_for_cli

    def load_while_another_exports(*args, **kwargs):
        found = load(*args, **kwargs)
        export_encoder(VisionTransformer(TINY), tmp_path)
        return found

    monkeypatch.setattr(cli_export, "load_for_cli", load_while_another_exports)
    assert main(["export", str(root / "last.pt"), "--to", str(tmp_path)]) == 2  # not 0: refused
    assert capsys.readouterr().err.strip() == (f"lomar export: error: {tmp_path / 'model.safetensors'} already exists; "
                                               f"pass --overwrite to replace it, or another --to")
    assert "source" not in json.loads((tmp_path / "config.json").read_text())  # the other export's, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
