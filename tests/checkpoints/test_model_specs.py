"""A checkpoint stores a model spec that rebuilds its model without training code: `lomar.load_model` gives the
model of each kind lomar writes (pretraining single-file and sharded, a classifier of `lomar finetune` or of
`pretrain_checkpoint`, an export folder, a `lomar linprobe --save` probe on its encoder), in a process that never
imports lomar.train, lomar.methods or lomar.cli; a classifier saved before specs still loads. A detector's or
segmenter's checkpoint is rebuilt there as README's Python section says, in its words, in a process that imports no
lomar.integrations either."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import detector_file, redrawn, segmenter_file
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.export import export_encoder
from lomar.checkpoints.formats import load_model
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.eval.linear_probe import probe_checkpoint
from lomar.models.lomar import LoMaR
from lomar.models.probe_classifier import LinearProbe
from lomar.models.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
CLASSES = ["a", "b", "c"]


def _finetune_checkpoint(model: VisionTransformer) -> dict:
    """What `lomar finetune` saves of a classifier (best.pt: the weights, the task's state, the position)."""
    from lomar.train.finetune import FinetuneTask  # the writer itself; the rebuilding process never imports it

    task = SimpleNamespace(model=model, classes=CLASSES,
                           config=SimpleNamespace(global_pool=model.global_pool, to_dict=lambda: {}))
    return {"model": model.state_dict(), **FinetuneTask.state(task), "epoch": 0, "step": 1}


def _before_specs(checkpoint: dict) -> dict:
    """``checkpoint`` as the writers saved it before specs: the same, without ``model_spec``."""
    assert "model_spec" in checkpoint
    return {k: v for k, v in checkpoint.items() if k != "model_spec"}


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("writer, pool", [(_finetune_checkpoint, "cls"), (pretrain_checkpoint, "avg")])
def test_a_classifier_saves_its_spec_and_is_rebuilt_from_it_as_trained(tmp_path, pool, writer):
    classifier = redrawn(VisionTransformer(TINY, num_classes=len(CLASSES), global_pool=pool))
    checkpoint = writer(classifier)
    assert checkpoint["model_spec"] == {"arch": "lomar.models.vit:VisionTransformer", "config": TINY.to_dict(),
                                        "args": {"num_classes": 3, "global_pool": pool}, "prefix": ""}
    for name, saved in (("new.pt", checkpoint), ("old.pt", _before_specs(checkpoint))):  # old: its config alone
        atomic_save(saved, tmp_path / name)
        rebuilt = load_model(tmp_path / name).eval()
        assert type(rebuilt) is VisionTransformer and (rebuilt.num_classes, rebuilt.global_pool) == (3, pool)
        assert torch.equal(rebuilt(_images()), classifier(_images()))


@pytest.mark.parametrize("change, words", [
    ({"args": {"num_classes": 5, "global_pool": "avg"}}, "its model_spec's args {'num_classes': 5, 'global_pool': "
                                                         "'avg'} do not describe its weights (a head of 3 classes"),
    ({"args": {"num_classes": 3, "global_pool": "avg", "drop": 1}}, "its model_spec's args"),
    ({"arch": "lomar.models.lomar:LoMaR"}, "its model_spec names 'lomar.models.lomar:LoMaR', not "
                                           "'lomar.models.vit:VisionTransformer', though its weights are a ViT's"),
    ({"config": None}, "its model_spec holds no config mapping (its ViTConfig)"),
    ({"config": {**TINY.to_dict(), "depth": 3}}, "its saved model_spec does not describe its weights: depth 3 (its "
                                                 "weights: 2)"),
])
def test_a_classifier_spec_that_does_not_describe_its_weights_is_refused_in_one_line(tmp_path, change, words):
    checkpoint = pretrain_checkpoint(VisionTransformer(TINY, num_classes=3))
    atomic_save({**checkpoint, "model_spec": {**checkpoint["model_spec"], **change}}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'c.pt'}: {words}")) as refused:
        load_model(tmp_path / "c.pt")
    assert "\n" not in str(refused.value)


def test_a_spec_and_a_saved_config_that_differ_where_no_weight_tells_are_refused_in_one_line(tmp_path):
    """ViTDet windows change no weight: a spec and the config beside it that disagree on them would be rebuilt as the
    spec says by load_model and scored as the config says by --eval-only; neither is taken without a word."""
    windowed = replace(TINY, window_size=1, global_blocks=(1,))
    checkpoint = _finetune_checkpoint(redrawn(VisionTransformer(windowed, num_classes=3)))
    atomic_save({**checkpoint, "config": {**checkpoint["config"], "window_size": 0, "global_blocks": ()}},
                tmp_path / "c.pt")
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'c.pt'}: its saved model_spec and config describe other encoders (window_size 1 and 0, "
            f"global_blocks (1,) and ()); delete the one it was not trained as")):
        load_model(tmp_path / "c.pt")
    atomic_save(checkpoint, tmp_path / "same.pt")
    assert load_model(tmp_path / "same.pt").config == replace(windowed, attention="auto", drop_path=0.0)


def test_a_subclass_from_outside_lomar_models_saves_no_spec_of_its_parent():
    """timm's LomarVisionTransformer builds itself otherwise than VisionTransformer: its parent's spec would describe
    another model."""
    from lomar.integrations.timm import LomarVisionTransformer
    from lomar.models.spec import model_spec

    model = LomarVisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="LomarVisionTransformer has no model spec"):
        model_spec(model)
    assert "model_spec" not in pretrain_checkpoint(model) and "vit_config" in pretrain_checkpoint(model)


_REBUILD = """
import sys, torch, lomar
torch.set_num_threads(int(sys.argv[2]))  # the test's: how many threads share a sum changes its last bits
outputs = {}
for name in sys.argv[3:]:
    model = lomar.load_model(f"{sys.argv[1]}/{name}").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        classifier = type(model).__name__ in ("VisionTransformer", "ProbeClassifier") and model.num_classes
        outputs[name] = model(images) if classifier else getattr(model, "encoder", model).forward_features(images)
for name, images in (("segment.pt", torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))),
                     ("detect.pt", torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)))):
    recipe = {"lomar": lomar, "path": f"{sys.argv[1]}/{name}"}  # README's, statement by statement, on their own
    exec("\\n".join(RECIPE[name]), recipe)
    model = recipe["model"]
    with torch.no_grad():
        outputs[name] = model(images) if name == "segment.pt" else model.backbone(images)
training = sorted(m for m in sys.modules if m.split(".")[:2] in (["lomar", "train"], ["lomar", "methods"],
                                                                 ["lomar", "cli"], ["lomar", "integrations"]))
assert not training, training
torch.save(outputs, f"{sys.argv[1]}/outputs.pt")
"""

# README's words for a `lomar detect` / `lomar segment` checkpoint: each statement as README writes it
# (test_readme_writes_the_dense_recipe_run_here), run by the fresh process of _REBUILD.
RECIPE = {name: ["model = lomar.load_model(path)", "model.eval()"] for name in ("detect.pt", "segment.pt")}
_REBUILD = f"RECIPE = {RECIPE!r}\n{_REBUILD}"


def test_readme_writes_the_dense_recipe_run_here():
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    for statement in {s for recipe in RECIPE.values() for s in recipe}:
        assert f"`{statement}`" in readme, statement


@pytest.mark.slow
def test_each_kind_of_checkpoint_rebuilds_its_model_in_a_process_without_training_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    pretrained = redrawn(LoMaR(TINY, window_size=2, num_windows=1, mask_ratio=0.5))
    single = pretrain_checkpoint(pretrained)
    atomic_save(single, tmp_path / "last.pt")
    # a `--fsdp` run's folder: the weights in DCP's shards, the rest (model_spec among it) in meta.pt
    dcp.save({"model": pretrained.state_dict()}, checkpoint_id=str(tmp_path / "checkpoint-000001.dcp"), no_dist=True)
    atomic_save({k: v for k, v in single.items() if k != "model"}, tmp_path / "checkpoint-000001.dcp" / "meta.pt")
    classifier = redrawn(VisionTransformer(TINY, num_classes=3))
    atomic_save(_finetune_checkpoint(classifier), tmp_path / "best.pt")
    atomic_save(pretrain_checkpoint(classifier), tmp_path / "classifier.pt")
    export_encoder(pretrained.encoder, tmp_path / "export")
    probe = redrawn(LinearProbe(TINY.embed_dim, 3)).eval()  # a `lomar linprobe --save` file: on the pretrained encoder
    atomic_save(probe_checkpoint(pretrained.encoder, probe, "mean", CLASSES, 0.5, 32, "last.pt"), tmp_path / "probe.pt")
    segmenter, detector = _dense_checkpoints(tmp_path)
    names = ["last.pt", "checkpoint-000001.dcp", "best.pt", "classifier.pt", "export", "probe.pt"]
    subprocess.run([sys.executable, "-c", _REBUILD, str(tmp_path), str(torch.get_num_threads()), *names], check=True)
    outputs = safe_load(tmp_path / "outputs.pt")
    images = _images()
    with torch.no_grad():
        encoded, classified = pretrained.encoder.forward_features(images), classifier(images)
        probed = probe(pretrained.encoder.eval().forward_features(images)[:, 1:].mean(dim=1))
        segmented = segmenter(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
        pyramid = detector.backbone(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    for name, expected in zip(names, (encoded, encoded, classified, classified, encoded, probed)):
        assert torch.equal(outputs[name], expected), name
    assert torch.equal(outputs["segment.pt"], segmented)
    assert outputs["detect.pt"].keys() == pyramid.keys() and all(torch.equal(outputs["detect.pt"][k], v)
                                                                 for k, v in pyramid.items())


def _dense_checkpoints(folder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A segmenter and a detector as `lomar segment` and `lomar detect` save them, written to ``folder`` (segment.pt,
    detect.pt)."""
    from lomar.models.mask_rcnn import ViTMaskRCNN
    from lomar.models.segmenter import UperNetSegmenter

    config = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)
    segmenter = redrawn(UperNetSegmenter(VisionTransformer(config), 5, channels=16))
    segmenter_file(folder / "segment.pt", segmenter)
    detector = redrawn(ViTMaskRCNN(VisionTransformer(config), 3, 64))
    detector_file(folder / "detect.pt", detector)
    return segmenter, detector
