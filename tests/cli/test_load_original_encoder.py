"""`lomar load-original` of a ViT's weights without a head (timm's ``num_classes=0``): the command a reader's
heads refusal names converts it, and the converted file is read as that encoder."""

import shlex

import pytest
import torch
from safetensors.torch import save_file

from lomar.checkpoints.formats import encoder_weights
from lomar.cli.app import main

timm = pytest.importorskip("timm")


def test_a_headless_timm_vit_converts_with_the_command_its_heads_refusal_names(tmp_path, capsys, labelled_folder):
    """A 24-wide, 1-deep ViT is no standard size: knn cannot tell its heads and names `load-original FILE --num-heads N
    --to FILE`, which reads it as the encoder it is (not as LoMaR pretraining, whose mask token and pixel head it
    lacks); knn then reads the converted file, its weights those of the timm model."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = TimmViT(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=3, num_classes=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "vit.pth")
    save_file(state, tmp_path / "vit.safetensors")
    knn = ["--data", str(labelled_folder), "--device", "cpu", "--workers", "0", "--k", "2"]
    for path in (tmp_path / "vit.pth", tmp_path / "vit.safetensors"):
        assert main(["knn", str(path), *knn]) == 2
        err = capsys.readouterr().err
        assert "convert it first: " in err, err
        command = shlex.split(err.split("convert it first: ")[1].strip())
        assert command[:3] == ["lomar", "load-original", str(path)]
        out = tmp_path / f"{path.suffix[1:]}.pt"
        command = [{"N": "3", "FILE": str(out)}.get(word, word) for word in command]
        assert main(command[1:]) == 0, capsys.readouterr().err
        assert "(encoder, 24 wide, 1 block, 3 heads" in capsys.readouterr().out
        weights = encoder_weights(out)
        assert weights.config.num_heads == 3 and weights.state.keys() == state.keys()
        assert all(torch.equal(weights.state[k], v) for k, v in state.items())
        assert main(["knn", str(out), *knn]) == 0, capsys.readouterr().err
        assert "top-1" in capsys.readouterr().out


def test_each_next_command_load_original_names_for_an_encoder_runs(tmp_path, capsys, labelled_folder):
    """An encoder has no pixel head to reconstruct with: the next steps printed (export, knn, visualize) are each
    commands that run on it, ROOT, DIR and IMAGE... filled in."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    state = TimmViT(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=3, num_classes=0).state_dict()
    torch.save(state, tmp_path / "vit.pth")
    assert main(["load-original", str(tmp_path / "vit.pth"), "--num-heads", "3", "--to", str(tmp_path / "e.pt")]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    commands = [shlex.split(part) for part in line.split("next: ")[1].split("   |   ")]
    assert [command[1] for command in commands] == ["export", "knn", "visualize"]
    fill = {"DIR": [str(tmp_path / "ex")], "ROOT": [str(labelled_folder)],
            "IMAGE...": [str(next((labelled_folder / "val" / "a").iterdir())), "--out", str(tmp_path / "figs")]}
    for command in commands:
        words = [part for word in command[1:] for part in fill.get(word, [word])]
        extra = ["--device", "cpu", "--workers", "0", "--k", "2"] if command[1] == "knn" else []
        assert main(words + extra) == 0, capsys.readouterr().err
    assert list((tmp_path / "figs").iterdir())
