"""A study refused before any cell trains: a bad cell, evaluation data without images or of one class, a probe
warm-up past its epochs, pretrain-only decoding, a step budget past a cell's epochs, and an edited spec re-run; the
class check's cost."""

import pytest
from tiny_study import TINY, _spec

from helpers import write_images
from lomar.cli.study.runner import run_study
from lomar.cli.study.spec import parse_spec


def test_a_bad_cell_is_refused_before_any_training(tmp_path, labelled):
    spec = parse_spec(_spec(labelled, grid={"window_size": [3, 9]}))
    from lomar.errors import UsageError

    with pytest.raises(UsageError, match="cell 'window_size=9' is not a valid `lomar pretrain` setting"):
        run_study(spec, tmp_path / "study", log=lambda line: None)
    assert not (tmp_path / "study" / "cells").exists()


@pytest.mark.parametrize("metrics, split, folders, message", [
    (["heldout_loss"], "val", ["a"], r"^data.val: no images found in the class folders of .*val; supported"),
    (["knn"], "train", ["a", "b"], r"^data.train: no images found in the class folders of .*train; supported"),
    (["knn"], "train", [], r"^data.train: .*train holds no class folders"),
    (["knn"], "val", [], r"^data.val: .*val holds no class folders"),
])
def test_evaluation_data_without_images_is_refused_before_any_training(tmp_path, labelled, metrics, split, folders,
                                                                      message):
    """Caught when the first cell has trained (a slice of the budget, minutes at paper scale) is caught late."""
    import shutil

    from lomar.errors import UsageError

    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    shutil.rmtree(data / split)
    (data / split).mkdir()
    for folder in folders:
        (data / split / folder).mkdir()
    spec = parse_spec(_spec(data, eval={"metrics": metrics}, data={
        "pretrain": str(labelled / "train"), "train": str(data / "train"), "val": str(data / "val")}))
    with pytest.raises(UsageError, match=message):
        run_study(spec, tmp_path / "study", log=lambda line: None)
    assert not (tmp_path / "study" / "cells").exists()


def test_a_labelled_evaluation_of_one_class_is_refused_before_any_training(tmp_path, labelled):
    from lomar.errors import UsageError

    for split in ("train", "val"):
        write_images(tmp_path / split / "only", 2)
    spec = parse_spec(_spec(tmp_path, eval={"metrics": ["knn"]}, data={
        "pretrain": str(labelled / "train"), "train": str(tmp_path / "train"), "val": str(tmp_path / "val")}))
    with pytest.raises(UsageError, match=r"^data.train: .*train holds one class folder with images \(only\)"):
        run_study(spec, tmp_path / "study", log=lambda line: None)


@pytest.mark.parametrize("metric", ["knn", "linprobe", "finetune"])
def test_a_val_class_folder_that_train_lacks_is_refused_before_any_training(tmp_path, labelled, metric):
    """The evaluations pair the splits' class folders (LabelledImageFolder.match_classes): a val class no training
    folder teaches is refused by the study's check, not by the first score after a cell's whole budget."""
    from lomar.errors import UsageError

    for split, classes in (("train", ("a", "b")), ("val", ("a", "b", "c"))):
        for label in classes:
            write_images(tmp_path / split / label, 2)
    options = {"finetune": {"batch_size": 2}} if metric == "finetune" else {}
    spec = parse_spec(_spec(tmp_path, eval={"metrics": [metric], **options}, data={
        "pretrain": str(labelled / "train"), "train": str(tmp_path / "train"), "val": str(tmp_path / "val")}))
    with pytest.raises(UsageError, match=r"^data.train, data.val: train and val class folders differ: only in "
                                         r".*train: none, only in .*val: \['c'\]; give both splits"):
        run_study(spec, tmp_path / "study", log=lambda line: None)
    assert not (tmp_path / "study" / "cells").exists()


def test_the_studys_class_check_decodes_a_jpeg_at_one_eighth_as_the_commands_check(tmp_path, monkeypatch):
    """The pre-check pairs the splits as knn does (match_classes): each training class is read up to its first image
    that reads, with the commands' own check (lomar.data.decode_check), a photo's JPEG at 1/8, not decoded whole."""
    from PIL import Image, JpegImagePlugin

    from helpers import photo_like
    from lomar.cli.study.evals import check_options

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.fromarray(photo_like(48, 64)).save(tmp_path / split / label / "p.jpg", quality=90)
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda img, mode, size: scales.append(img.size[0] // size[0]) or draft(img, mode, size))
    check_options(parse_spec(_spec(tmp_path, eval={"metrics": ["knn"]})))
    assert scales == [8, 8]  # train's a and b


def test_a_study_linear_probe_warm_up_beyond_its_epochs_is_refused_up_front(labelled):
    from lomar.cli.study.evals import check_options
    from lomar.errors import UsageError

    spec = parse_spec(_spec(labelled, eval={"metrics": ["linprobe"],
                                            "linprobe": {"protocol": "mae", "epochs": 5, "warmup_epochs": 10}}))
    with pytest.raises(UsageError, match=r"eval.linprobe: --warmup-epochs must be in \[0, --epochs 5\], got 10"):
        check_options(spec)


@pytest.mark.parametrize("metric", ["knn", "linprobe"])
def test_a_study_evaluation_decoding_as_pretrain_alone_does_is_refused_up_front(labelled, metric):
    """--decode windows (pretrain's) is refused before any cell trains, not at the first score after a cell's whole
    budget."""
    from lomar.cli.study.evals import check_options
    from lomar.errors import UsageError

    spec = parse_spec(_spec(labelled, eval={"metrics": [metric], metric: {"decode": "windows"}}))
    with pytest.raises(UsageError, match=rf"^eval.{metric}: argument --decode: invalid choice: 'windows' \(choose "
                                         r"from 'full', 'draft'\); fix the spec's"):
        check_options(spec)


@pytest.mark.slow  # one cell of 1 step, then refused re-runs: ~5 s
def test_a_re_run_with_an_edited_spec_is_refused_before_it_replaces_anything(tmp_path, labelled, monkeypatch):
    """A finished cell is not skipped whatever an edited spec says: another budget, setting or evaluation would show
    the first spec's numbers as the edited one's (eval.every would score 'at-2steps' at step 4). The cell's spec is
    kept, and a re-run under another is refused before it replaces anything."""
    from lomar.errors import UsageError

    out = tmp_path / "study"
    spec = _spec(labelled, budget="1steps", grid={"method": ["lomar"]}, random_init=False,
                 eval={"metrics": ["knn"], "knn": {"k": 3}})
    run_study(parse_spec(spec), out, log=lambda line: None)
    before = (out / "spec.json").read_text()
    for change, message in [
        ({"budget": "2steps"}, 'budget "1 step", the spec now gives "2 steps"'),
        ({"settings": {**TINY, "mask_ratio": 0.5}}, "settings.mask_ratio unset, the spec now gives 0.5"),
        ({"eval": {"metrics": ["knn", "linprobe"], "knn": {"k": 3}}}, 'eval.metrics \\["knn"\\], the spec now'),
        ({"eval": {"metrics": ["knn"], "knn": {"k": 5}}}, "eval.knn.k 3, the spec now gives 5"),
        ({"eval": {"metrics": ["knn"], "knn": {"k": 3}, "every": "1steps"}}, "eval.every unset"),
    ]:
        with pytest.raises(UsageError, match=f"^cell method-lomar_seed0 in {out} was run with {message}.*; restore "
                                             f"the spec .or flags., pass another --out, or delete "
                                             f"{out}/cells/method-lomar_seed0"):
            run_study(parse_spec({**spec, **change}), out, log=lambda line: None)
        assert (out / "spec.json").read_text() == before
    # what a cell's numbers do not depend on may change: the slice, more seeds, the data's spelling
    monkeypatch.chdir(labelled)
    data = {"pretrain": "train", "train": "./train", "val": "val"}
    records = run_study(parse_spec({**spec, "slice": "3s", "seeds": [0, 1], "data": data}), out, log=lambda line: None)
    assert sorted(r["seed"] for r in records) == [0, 1]


def test_a_step_budget_past_the_cells_epochs_is_refused_before_any_training(tmp_path, labelled):
    """Each cell stopped at its epochs' end, short of the budget, its lr schedule (laid over the budget) unfinished."""
    from lomar.errors import UsageError

    settings = {k: v for k, v in TINY.items() if k != "epochs"}  # the recipe's 400 epochs of 3 steps: 1200 < 4000
    spec = parse_spec(_spec(labelled, budget="4000steps", settings=settings, random_init=False,
                            eval={"metrics": ["heldout_loss"]}))
    with pytest.raises(UsageError, match=r"^cell method-lomar_seed0: its 400 epochs of 3 steps end at step 1200, "
                                         r"before its 4000-step lr schedule; add epochs: 1334 and schedule_steps: "
                                         r"4000 to the spec's settings, or lower the budget$"):
        run_study(spec, tmp_path / "study", log=lambda line: None)
    assert not list((tmp_path / "study").glob("cells/*/last.pt"))
