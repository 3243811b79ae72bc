"""`lomar detect`'s training: ViTDet's step schedule and the refusal of a run past its end, --clip-grad, and an MAE
encoder's absolute position table trained or frozen by --train-pos-embed."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.train.detect import DetectTask, step_lr_factor


def test_step_schedule_is_vitdets():
    assert step_lr_factor(0, 1000, 250) == pytest.approx(0.001)
    assert step_lr_factor(250, 1000, 250) == 1.0
    assert step_lr_factor(888, 1000, 250) == 1.0 and step_lr_factor(889, 1000, 250) == pytest.approx(0.1)
    assert step_lr_factor(963, 1000, 250) == pytest.approx(0.01)
    # ViTDet's 100-epoch milestones: steps 163,889 and 177,546 of 184,375 (0.889 and 0.963 put them 20 and 7 later)
    assert step_lr_factor(163888, 184375, 250) == 1.0 and step_lr_factor(163889, 184375, 250) == pytest.approx(0.1)
    assert step_lr_factor(177545, 184375, 250) == pytest.approx(0.1)
    assert step_lr_factor(177546, 184375, 250) == pytest.approx(0.01)


def test_a_run_past_its_schedules_end_is_told_the_lr_detect_trains_at_there():
    """Detect's step schedule ends at 0.01 x the peak lr, not at min_lr as a cosine does: the refusal names it."""
    from lomar.train.schedule import schedule_overrun

    lr_schedule = DetectTask.lr_schedule_of(None)  # told unbuilt, as a resume's refusal reads it
    assert lr_schedule is DetectTask.__new__(DetectTask).lr_schedule
    message = schedule_overrun(8, 3.0, 1.0, 1e-4, 0.0, lr_schedule)
    assert ("steps 4-8 would all train at lr 1e-06 (0.01 x the peak lr 0.0001, where its schedule ends); end it at "
            "--max-steps 3, or raise --schedule-steps to 8") in message
    assert "would all train at min_lr 0;" in schedule_overrun(8, 3.0, 1.0, 1e-4, 0.0)  # a cosine's end


@pytest.mark.slow
def test_clip_grad_clips_the_gradient(tiny, one_val, tmp_path, few_eval_proposals):
    # --clip-grad: a diverging detection run's other fix besides a lower --blr
    from helpers import applied_grad_norms

    (train_ann, train_images), (val_ann, val_images) = tiny[0], one_val
    out = tmp_path / "run"
    norms = applied_grad_norms(lambda: main([
        "detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann", str(val_ann),
        "--val-images", str(val_images), "--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "2",
        "--max-steps", "1", "--warmup-steps", "1", "--rois-per-image", "16", "--eval-every", "50", "--workers", "0",
        "--threads", "2", "--clip-grad", "0.001", "--out", str(out)]))
    assert norms == pytest.approx([0.001], rel=1e-3)


@pytest.mark.slow
def test_an_mae_tables_training_follows_train_pos_embed(tiny, one_val, image_dir, tmp_path, capsys, few_eval_proposals):
    from helpers import pretrain

    pre = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(pre), "--method", "mae", "--windows", "0",
                    "--model", "vit_tiny_patch16", "--img-size", "64", "--max-steps", "1",
                    "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2") == 0
    (train_ann, train_images), (val_ann, val_images) = tiny[0], one_val
    counts = {}
    for trained in (True, False):
        out = tmp_path / f"det-{trained}"
        assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                     str(val_ann), "--val-images", str(val_images), "--pretrained", str(pre / "last.pt"),
                     "--img-size", "64", "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "0",
                     "--rois-per-image", "16", "--workers", "0", "--threads", "1", "--device", "cpu",
                     "--out", str(out), *([] if trained else ["--no-train-pos-embed"])]) == 0, capsys.readouterr().err
        assert "lomar detect: relative position term: decomposed, added to every block from zero" in \
            capsys.readouterr().err  # the load line before it says 'newly initialised: none' of the encoder's own
        counts[trained] = sum(len(g["params"]) for g in safe_load(out / "last.pt")["optimizer"]["param_groups"])
    assert counts[True] == counts[False] + 1
    # ViTDet's decomposed term in every block, from zero: window tables span 14 (capped by the 4x4 grid), trained
    detector = safe_load(out / "last.pt")
    assert detector["settings"]["rel_pos"] == "decomposed" and detector["encoder_config"]["rel_pos"] == "decomposed"
    tables = {k: v for k, v in detector["model"].items() if k.endswith((".attn.rel_pos_h", ".attn.rel_pos_w"))}
    assert len(tables) == 2 * detector["encoder_config"]["depth"]
    assert {v.shape[0] for v in tables.values()} == {7} and all(v.abs().sum() > 0 for v in tables.values())
    # scored at another size: the per-axis tables are resampled to the 6x6 grid; another term is refused
    evaluate = ["detect", "--val-ann", str(val_ann), "--val-images", str(val_images), "--eval-only", "--pretrained",
                str(out / "last.pt"), "--workers", "0", "--threads", "1", "--device", "cpu"]
    assert main([*evaluate, "--img-size", "96", "--out", str(tmp_path / "at96")]) == 0, capsys.readouterr().err
    assert "96 px input" in capsys.readouterr().err
    assert main([*evaluate, "--rel-pos", "bias", "--out", str(tmp_path / "bias")]) == 2
    assert "--rel-pos bias differs from the detector's own (decomposed)" in capsys.readouterr().err
    # a validation batch whose images are all unreadable is skipped, not fed to the model as an empty list (a
    # traceback): a JPEG cut short passes the up-front check (its header is whole; a PNG's check decodes it) and fails
    # in the loader; with no image of the split read, the evaluation stops in one line (exit 1: no score to give)
    data = json.loads(val_ann.read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for image in data["images"]:
        jpeg = broken / image["file_name"].replace(".png", ".jpg")
        Image.open(val_images / image["file_name"]).save(jpeg, quality=95)
        jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
        image["file_name"] = jpeg.name
    (broken / "instances.json").write_text(json.dumps(data))
    scored = ["--val-ann", str(broken / "instances.json"), "--val-images", str(broken),
              "--out", str(tmp_path / "broken-eval")]
    assert main([*evaluate[:1], *evaluate[5:], *scored]) == 1
    assert f"error: no image in {broken} could be read (1 tried); fix or replace them" in capsys.readouterr().err
