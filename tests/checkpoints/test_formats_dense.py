"""`lomar.load_model` of a `lomar detect` / `lomar segment` checkpoint (lomar.checkpoints.formats_dense): the model
spec its writer saves rebuilds the detector or segmenter with its weights, as does what one saved before specs kept
(encoder_config, settings, categories); a spec of another model, or an encoder read out of one, is refused in one
line."""

from __future__ import annotations

import re
import shlex

import pytest
import torch

from helpers import detector_file, redrawn, segmenter_file
from lomar.checkpoints.formats import load_model
from lomar.checkpoints.io import atomic_save
from lomar.models.mask_rcnn import ViTMaskRCNN
from lomar.models.segmenter import UperNetSegmenter
from lomar.models.vit import VisionTransformer, ViTConfig

CONFIG = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, pos="abs", window_size=2,
                   global_blocks=(3,), rel_pos="bias")


def _detector_file(path, model=None, settings=None) -> tuple[ViTMaskRCNN, dict]:
    model = model or redrawn(ViTMaskRCNN(VisionTransformer(CONFIG), 3, 64, detections_per_image=7))
    return model, detector_file(path, model, settings)


def _segmenter_file(path, model=None) -> tuple[UperNetSegmenter, dict]:
    model = model or redrawn(UperNetSegmenter(VisionTransformer(CONFIG), 5, channels=16, aux_channels=8))
    return model, segmenter_file(path, model)


def _outputs(model: torch.nn.Module):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if isinstance(model, UperNetSegmenter):
            return [model(images)]
        model.roi_heads.score_thresh = 0.0  # every box scored, however little trained
        return [model.backbone(images)[k] for k in ("p2", "p6")] + [
            value for found in model(list(images)) for value in found.values()]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_outputs(a), _outputs(b), strict=True))


@pytest.mark.parametrize("write", [_detector_file, _segmenter_file])
def test_a_dense_checkpoint_saves_its_spec_and_load_model_rebuilds_it(tmp_path, write):
    model, checkpoint = write(tmp_path / "best.pt")
    spec = checkpoint["model_spec"]
    assert spec["config"] == CONFIG.to_dict() == checkpoint["encoder_config"] and spec["prefix"] == ""
    if isinstance(model, ViTMaskRCNN):
        assert spec["arch"] == "lomar.models.mask_rcnn:ViTMaskRCNN"
        assert spec["args"] == {"num_classes": 3, "size": 64, "out_channels": 256, "detections_per_image": 7,
                                "rois_per_image": 512}
    else:
        assert spec["arch"] == "lomar.models.segmenter:UperNetSegmenter"
        assert spec["args"] == {"num_classes": 5, "out_indices": [0, 1, 2, 3], "channels": 16, "aux_weight": 0.4,
                                "aux_channels": 8}
    rebuilt = load_model(tmp_path / "best.pt").eval()
    assert type(rebuilt) is type(model) and rebuilt.encoder.config == CONFIG
    assert _same(rebuilt, model)


def test_a_segmenter_without_its_auxiliary_head_is_rebuilt_without_one(tmp_path):
    model, checkpoint = _segmenter_file(tmp_path / "s.pt", redrawn(UperNetSegmenter(VisionTransformer(CONFIG), 5,
                                                                                    channels=16, aux_weight=0)))
    assert checkpoint["model_spec"]["args"] == {"num_classes": 5, "out_indices": [0, 1, 2, 3], "channels": 16,
                                                "aux_weight": 0}
    assert load_model(tmp_path / "s.pt").aux_head is None


@pytest.mark.parametrize("write", [_detector_file, _segmenter_file])
def test_a_dense_checkpoint_saved_before_specs_is_rebuilt_from_what_it_kept(tmp_path, write):
    model, checkpoint = write(tmp_path / "new.pt")
    if isinstance(model, UperNetSegmenter):  # the commands' own head: its auxiliary head at its default width
        model, checkpoint = write(tmp_path / "new.pt", redrawn(UperNetSegmenter(VisionTransformer(CONFIG), 5,
                                                                                channels=16)))
    else:  # at the commands' own detections per image
        model, checkpoint = write(tmp_path / "new.pt", redrawn(ViTMaskRCNN(VisionTransformer(CONFIG), 3, 64)))
    atomic_save({k: v for k, v in checkpoint.items() if k != "model_spec"}, tmp_path / "old.pt")
    rebuilt = load_model(tmp_path / "old.pt").eval()
    assert type(rebuilt) is type(model) and _same(rebuilt, model)


def test_a_detector_is_rebuilt_with_the_rois_its_training_sampled(tmp_path):
    """--rois-per-image is its RoI sampler's size, which a loaded detector trained further samples too."""
    model = redrawn(ViTMaskRCNN(VisionTransformer(CONFIG), 3, 64, rois_per_image=32))
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    _, checkpoint = _detector_file(tmp_path / "new.pt", model, settings={"rois_per_image": 32})
    assert checkpoint["model_spec"]["args"]["rois_per_image"] == 32
    atomic_save({k: v for k, v in checkpoint.items() if k != "model_spec"}, tmp_path / "old.pt")
    for path in (tmp_path / "new.pt", tmp_path / "old.pt"):
        assert load_model(path).roi_heads.fg_bg_sampler.batch_size_per_image == 32


def _refused(path, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)) as refused:
        load_model(path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("change, words", [
    ({"arch": "lomar.models.segmenter:UperNetSegmenter"}, "its model_spec names 'lomar.models.segmenter:"
                                                          "UperNetSegmenter', not 'lomar.models.mask_rcnn:ViTMaskRCNN',"
                                                          " though it is a `lomar detect` checkpoint"),
    ({"arch": "lomar.train.detect:DetectTask"}, "its model_spec names 'lomar.train.detect:DetectTask', not"),
    ({"args": {"num_classes": 3, "size": 64, "out_channels": 128}},
     "weights do not fit its model spec (lomar.models.mask_rcnn:ViTMaskRCNN): missing [], unexpected [], wrong shape"),
    ({"args": {"num_classes": 3, "size": 60}, "settings": {"img_size": 60}},
     "model spec of lomar.models.mask_rcnn:ViTMaskRCNN does not fit ViTMaskRCNN: the input size must be a multiple of "
     "32"),
    ({"args": {"num_classes": 3, "size": 64, "heads": 2}}, "model spec of lomar.models.mask_rcnn:ViTMaskRCNN does not "
                                                           "fit ViTMaskRCNN: ViTMaskRCNN.__init__() got an unexpected "
                                                           "keyword argument 'heads'"),
    ({"config": {**CONFIG.to_dict(), "depth": 3}}, "its model_spec's config and its encoder_config describe other "
                                                   "encoders; delete the one it was not trained as"),
    ({"args": {"num_classes": 7, "size": 64}}, "its model_spec's num_classes 7 differs from the 3 its settings and "
                                               "categories give --eval-only; delete the one it was not trained with"),
    ({"args": {"num_classes": 3, "size": 32}}, "its model_spec's size 32 differs from the 64 its settings"),
    ({"args": {"num_classes": 3, "size": 64, "rois_per_image": 64}}, "its model_spec's rois_per_image 64 differs "
                                                                     "from the 512 its settings"),
])
def test_a_spec_that_does_not_fit_its_detector_is_refused_in_one_line(tmp_path, change, words):
    """``change``: to its model_spec, a ``settings`` entry to its settings (an --eval-only rebuild of the same head)."""
    _, checkpoint = _detector_file(tmp_path / "d.pt")
    settings = {**checkpoint["settings"], **change.pop("settings", {})}
    atomic_save({**checkpoint, "model_spec": {**checkpoint["model_spec"], **change}, "settings": settings},
                tmp_path / "bad.pt")
    _refused(tmp_path / "bad.pt", f"{tmp_path / 'bad.pt'}: {words}")


def test_what_a_dense_checkpoint_cannot_be_rebuilt_from_is_named(tmp_path):
    _, detector = _detector_file(tmp_path / "d.pt")
    _, segmenter = _segmenter_file(tmp_path / "s.pt")
    old = {k: v for k, v in segmenter.items() if k not in ("model_spec", "encoder_config")}
    (tmp_path / "my runs").mkdir()  # the command to paste keeps a path with a space one argument
    atomic_save(old, tmp_path / "my runs" / "s0.pt")
    _refused(tmp_path / "my runs" / "s0.pt", f"{tmp_path / 'my runs' / 's0.pt'}: a `lomar segment` checkpoint saved "
                                             f"without its encoder's layout (no model_spec, no encoder_config); "
                                             f"`lomar segment --eval-only --pretrained "
                                             f"{shlex.quote(str(tmp_path / 'my runs' / 's0.pt'))}` scores it")
    old = {k: v for k, v in detector.items() if k not in ("model_spec", "categories")}
    atomic_save(old, tmp_path / "d0.pt")
    _refused(tmp_path / "d0.pt", "a `lomar detect` checkpoint saved without a model_spec and without its categories")
    old = {**{k: v for k, v in segmenter.items() if k != "model_spec"}, "settings": {"num_classes": 5}}
    atomic_save(old, tmp_path / "s1.pt")
    _refused(tmp_path / "s1.pt", "saved without a model_spec and without its settings' head_channels")
    _refused_override = "a `lomar detect` model, which carries its own settings; drop num_heads=4 (it saved 2)"
    with pytest.raises(ValueError, match=re.escape(_refused_override)):
        load_model(tmp_path / "d.pt", num_heads=4)


def test_its_encoder_alone_is_refused_where_an_encoder_is_read(tmp_path):
    """lomar export, the dense backbones' loader and every encoder reader name the encoder the run started from."""
    from lomar.checkpoints.convert import export_model
    from lomar.checkpoints.formats import encoder_weights
    from lomar.integrations.dense import load_encoder

    _segmenter_file(tmp_path / "s.pt")
    words = (f"checkpoint {tmp_path / 's.pt'} is a whole `lomar segment` model, not an encoder; pass the encoder "
             f"that run started from")
    for read in (export_model, load_encoder, encoder_weights):
        with pytest.raises(ValueError, match=re.escape(words)):
            read(tmp_path / "s.pt")


_COMPARE = """
import sys, torch, lomar
torch.set_num_threads(int(sys.argv[2]))  # the scoring's: how many threads share a sum changes its last bits
saved = torch.load(sys.argv[1], weights_only=True)
for name, path in (("detect", sys.argv[3]), ("segment", sys.argv[4])):
    model = lomar.load_model(path).eval()
    if name == "detect":
        model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        found = model(list(saved["detect_images"])) if name == "detect" else model(saved["segment_images"])
    expected = saved[name]
    if name == "detect":
        assert [d.keys() for d in found] == [d.keys() for d in expected] and all(
            torch.equal(d[k], e[k]) for d, e in zip(found, expected) for k in d), name
        assert all(len(d["boxes"]) for d in found)  # boxes to compare, however little trained
    else:
        assert torch.equal(found, expected), name
    print(name, type(model).__name__)
imported = sorted(m for m in sys.modules if m.split(".")[:2] in (["lomar", "train"], ["lomar", "methods"],
                                                                 ["lomar", "cli"], ["lomar", "integrations"]))
assert not imported, imported
"""


@pytest.mark.slow
def test_a_trained_detector_and_segmenter_load_as_their_eval_only_builds_them(tmp_path, monkeypatch, dense_runs):
    """Trained by the commands on compose-digits, each best.pt gives the model `--eval-only` scores: the same outputs
    in eval mode, in a process that imports no training code and no lomar.integrations."""
    import subprocess
    import sys

    from torchvision.models.detection.rpn import RegionProposalNetwork

    import lomar.train.detect as detect
    import lomar.train.segment as segment
    from lomar.cli.app import main

    data, one_val, det, seg = dense_runs
    built = {}

    def recording(score_only):
        def scored(config, make_task):
            built[make_task.name] = score_only(config, make_task)
            return built[make_task.name]
        return scored

    for module in (detect, segment):  # the model each --eval-only builds and scores
        monkeypatch.setattr(module, "score_only", recording(module.score_only))
    own = RegionProposalNetwork.post_nms_top_n
    with pytest.MonkeyPatch.context() as patch:  # its scores unread: 10 proposals, undone before the outputs compared
        patch.setattr(RegionProposalNetwork, "post_nms_top_n", lambda self: own(self) if self.training else 10)
        assert main(["detect", "--eval-only", "--pretrained", str(det / "best.pt"), "--val-ann", str(one_val),
                     "--val-images", str(data / "images" / "val"), "--workers", "0", "--threads", "1", "--device",
                     "cpu", "--out", str(tmp_path / "det-scored")]) == 0
    assert main(["segment", "--eval-only", "--pretrained", str(seg / "best.pt"), "--data", str(data),
                 "--workers", "0", "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "seg-scored")]) == 0
    detector, segmenter = (built[name][0].model.eval() for name in ("detect", "segment"))
    detector.roi_heads.score_thresh = 0.0
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outputs = {"detect_images": images, "detect": detector(list(images)), "segment_images": batch,
                   "segment": segmenter(batch)}
    atomic_save(outputs, tmp_path / "outputs.pt")
    done = subprocess.run([sys.executable, "-c", _COMPARE, str(tmp_path / "outputs.pt"), str(torch.get_num_threads()),
                           str(det / "best.pt"), str(seg / "best.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["detect", "ViTMaskRCNN", "segment", "UperNetSegmenter"]
