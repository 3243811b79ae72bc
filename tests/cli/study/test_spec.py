"""The study spec: every mistake is one UsageError naming the key; good specs expand to cells."""

import pytest

from helpers import write_images
from lomar.cli.study.presets import scaled_windows
from lomar.cli.study.spec import Budget, parse_budget, parse_spec
from lomar.errors import UsageError


def _raw(tmp_path, **changes):
    for split in ("pre", "train", "val"):
        (tmp_path / split).mkdir(exist_ok=True)
    raw = {"budget": "30s", "grid": {"method": ["lomar", "mae"]}, "seeds": 2,
           "data": {"pretrain": str(tmp_path / "pre"), "train": str(tmp_path / "train"),
                    "val": str(tmp_path / "val")}}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


@pytest.mark.parametrize("text, expected", [
    ("30s", Budget(30, "seconds")), ("2min", Budget(120, "seconds")), ("200steps", Budget(200, "steps")),
    ("200 steps", Budget(200, "steps")), ("3epochs", Budget(3, "epochs")), ("1.5s", Budget(1.5, "seconds")),
])
def test_budgets_parse(text, expected):
    assert parse_budget(text, "budget") == expected


@pytest.mark.parametrize("changes, message", [
    ({"budget": "30 parsecs"}, "budget: '30 parsecs' is not a budget"),
    ({"budget": "0s"}, "budget: '0s' must be a positive amount"),
    ({"budget": "2.5steps"}, "must be a positive amount (whole steps"),
    ({"budget": None}, "budget: missing"),
    ({"seeds": 0}, "seeds: 0 must be a count"),
    ({"seeds": [0, 0]}, "list of distinct seeds"),
    ({"grid": {"method": []}}, "grid.method must be a non-empty list"),
    ({"grid": {"method": ["lomar", "lomar"]}}, "grid.method has repeated values"),
    ({"grid": {"window": [{"label": "x"}]}}, "grid.window: {'label': 'x'} sets nothing"),
    ({"grid": {"out": ["a", "b"]}}, "grid.out: out is set by the study"),
    ({"settings": {"max_steps": 5}}, "settings: max_steps is set by the study"),
    ({"grid": "lomar"}, "grid must be a mapping"),
    ({"colour": "blue"}, "unknown key(s) colour"),
    ({"eval": {"metrics": ["accuracy"]}}, "eval.metrics: ['accuracy'] must be a list drawn from"),
    ({"eval": {"every": "2epochs"}}, "eval.every: use seconds or steps"),
    ({"eval": {"every": "10steps"}}, "eval.every: 10 steps must use the budget's unit"),
    ({"eval": {"speed": 1}}, "eval: unknown key(s) speed"),
    ({"eval": {"img_size": -3}}, "eval.img_size: -3 must be a positive"),
    ({"slice": "3steps"}, "slice: '3steps' must be seconds"),
    ({"data": {"pretrain": "/no/such/folder"}}, "data.pretrain: /no/such/folder does not exist"),
    ({"data": {"images": "x"}}, "data: unknown key(s) images"),
    ({"name": "../../escape"}, "name: '../../escape' must be letters, digits"),
    ({"name": "/etc"}, "(it names the folder studies/NAME)"),
    # bool() read the quoted 'false' as true: a random-init row nobody asked for
    ({"random_init": "false"}, "random_init: 'false' must be true or false"),
    ({"eval": {"equal_steps": "no"}}, "eval.equal_steps: 'no' must be true or false"),
    ({"seeds": True}, "seeds: True must be a count"),  # not named 'None'
    ({"eval": {"img_size": True}}, "eval.img_size: True must be a positive"),  # not an image size of 1
])
def test_bad_specs_name_the_key_and_the_fix(tmp_path, changes, message):
    with pytest.raises(UsageError) as info:
        parse_spec(_raw(tmp_path, **changes))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_huge_grid_is_refused_before_any_cell_is_built(tmp_path, monkeypatch):
    import time

    from lomar.cli.study.spec import StudySpec

    monkeypatch.setattr(StudySpec, "cells", lambda self: pytest.fail("cells built"))
    grid = {f"axis{i}": list(range(30)) for i in range(8)}  # 30 ** 8 = 6.6e11 cells
    start = time.perf_counter()
    with pytest.raises(UsageError, match=r"the grid has 1312200000000 cells .* at most 1000") as info:
        parse_spec(_raw(tmp_path, grid=grid))
    assert time.perf_counter() - start < 5 and "\n" not in str(info.value)
    assert len(parse_spec(_raw(tmp_path, grid={"lr": list(range(500))})).seeds) == 2  # 1000 cells: allowed
    with pytest.raises(UsageError, match="seeds: 101 seeds is more than a study runs"):
        parse_spec(_raw(tmp_path, seeds=101))
    with pytest.raises(UsageError, match="at most 100"):
        parse_spec(_raw(tmp_path, seeds=list(range(1000))))


def test_a_spec_files_out_is_read_from_its_folder_as_its_data_is(tmp_path):
    from lomar.cli.study.spec import load_spec

    (tmp_path / "st" / "imgs").mkdir(parents=True)
    common = "budget: 1steps\ngrid: {method: [mae]}\neval: {metrics: []}\n"
    (tmp_path / "st" / "a.yaml").write_text("data: {pretrain: imgs}\nout: runs/a\n" + common)
    spec = load_spec(tmp_path / "st" / "a.yaml")
    assert (spec.data_pretrain, spec.out) == (str(tmp_path / "st" / "imgs"), str(tmp_path / "st" / "runs" / "a"))
    (tmp_path / "st" / "b.yaml").write_text(f"out: {tmp_path / 'abs'}\n" + common)
    assert load_spec(tmp_path / "st" / "b.yaml").out == str(tmp_path / "abs")
    assert parse_spec(_raw(tmp_path, out="rel")).out == "rel"  # a spec given as a mapping has no folder


def test_a_spec_file_is_read_as_a_config_is_in_yamls_encodings_and_bounded(tmp_path):
    """A UTF-16 spec (PowerShell's `>`) is read, not a UnicodeDecodeError; a 2 MiB file is refused by its size before
    it is parsed."""
    from lomar.cli.study.spec import load_spec

    (tmp_path / "imgs").mkdir()
    (tmp_path / "a.yaml").write_text("data: {pretrain: imgs}\nbudget: 1steps\ngrid: {method: [mae]}\n"
                                     "eval: {metrics: []}\n", encoding="utf-16")
    assert load_spec(tmp_path / "a.yaml").data_pretrain == str(tmp_path / "imgs")
    (tmp_path / "big.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(UsageError, match=r"^study spec \S+big.yaml is 2.0 MiB, which no settings file is"):
        load_spec(tmp_path / "big.yaml")


def test_a_spec_from_a_pipe_is_read_as_a_config_from_one_is_its_paths_the_working_folders(tmp_path, monkeypatch):
    """`lomar study <(sed ... spec.yaml)` reads the pipe, as --config reads one, not 'study spec /dev/fd/63 does not
    exist'."""
    import os

    from lomar.cli.study.spec import load_spec

    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    read, write = os.pipe()
    os.write(write, b"data: {pretrain: imgs}\nbudget: 1steps\ngrid: {method: [mae]}\neval: {metrics: []}\n")
    os.close(write)
    try:
        assert load_spec(f"/dev/fd/{read}").data_pretrain == "imgs"
    finally:
        os.close(read)
    with pytest.raises(UsageError, match=r"^study spec \S+ is not a file; pass a YAML file or --preset NAME$"):
        load_spec(tmp_path)


def test_accuracy_metrics_need_labelled_data(tmp_path):
    raw = _raw(tmp_path, eval={"metrics": ["knn"]})
    raw["data"] = {"pretrain": raw["data"]["pretrain"]}
    with pytest.raises(UsageError, match="eval.metrics knn need labelled data"):
        parse_spec(raw)
    raw["eval"] = {"metrics": []}
    assert parse_spec(raw).eval.metrics == ()


def test_grid_expands_to_cells_per_seed_with_mapping_axes(tmp_path):
    spec = parse_spec(_raw(tmp_path, random_init=True, settings={"img-size": 32},
                           grid={"method": ["lomar", "mae"],
                                 "window": [{"label": "5:8", "window_size": 5, "windows": 8},
                                            {"window_size": 7, "windows": 4}]}))
    cells = spec.cells()
    assert len(cells) == 2 * (1 + 2 * 2)
    assert [c.seed for c in cells] == [0] * 5 + [1] * 5
    assert cells[0].random_init and cells[0].setting_label == "random init"
    second = cells[1]
    assert second.labels == {"method": "lomar", "window": "5:8"}
    assert second.settings == {"img_size": 32, "method": "lomar", "window_size": 5, "windows": 8}
    assert cells[2].labels["window"] == "window_size=7,windows=4"
    assert len({c.name for c in cells}) == len(cells)  # one run folder each


def test_windows_scale_with_the_grid():
    assert [(w["window_size"], w["windows"]) for w in scaled_windows(14)] == [(5, 8), (7, 4), (9, 3), (11, 2), (14, 1)]
    assert [(w["window_size"], w["windows"]) for w in scaled_windows(8)] == [(3, 8), (4, 4), (5, 3), (6, 2), (8, 1)]
    sizes = [w["window_size"] for w in scaled_windows(12)]
    assert sizes == sorted(set(sizes)) and sizes[-1] == 12  # distinct, the largest covers the grid


def test_bad_finetune_options_are_refused_before_any_cell_trains(tmp_path):
    """Its bounds are the config's, which only the first score (after a cell's whole budget) read."""
    from lomar.cli.study.evals import check_options

    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(tmp_path / split / label, 1)
    spec = parse_spec(_raw(tmp_path, eval={"metrics": ["finetune"], "finetune": {"epochs": 0}}))
    with pytest.raises(UsageError, match=r"^eval.finetune: --epochs must be positive, got 0; fix the spec's "):
        check_options(spec)


def test_a_finetune_batch_its_training_images_cannot_fill_is_refused_before_any_cell_trains(tmp_path):
    """finetune's loader leaves a short last batch out, so no step: else its run fails after every cell trained."""
    from lomar.cli.study.evals import check_options

    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(tmp_path / split / label, 2)
    for finetune in ({}, {"batch_size": 2, "accum_steps": 4}):
        spec = parse_spec(_raw(tmp_path, eval={"metrics": ["finetune"], "finetune": finetune}))
        with pytest.raises(UsageError, match=r"^eval.finetune: data.train's 4 images cannot fill one step of batch "
                                             r"(64 x accum 1|2 x accum 4); give eval.finetune a batch_size x "
                                             r"accum_steps of 4 or less, or data.train (64|8) images$"):
            check_options(spec)
    check_options(parse_spec(_raw(tmp_path, eval={"metrics": ["finetune"], "finetune": {"batch_size": 4}})))


@pytest.mark.parametrize("budget, text", [(Budget(1, "steps"), "1 step"), (Budget(2, "steps"), "2 steps"),
                                          (Budget(1, "epochs"), "1 epoch"), (Budget(1, "seconds"), "1s")])
def test_budgets_print_in_words(budget, text):
    assert str(budget) == text
