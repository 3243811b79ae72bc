"""results.md: a cell that trained well past a seconds budget is named under the tables; the evaluations' settings."""

from lomar.cli.study.results import past_budget, write_results
from lomar.cli.study.spec import parse_spec


def _end(setting: str, seed: int, seconds: float) -> dict:
    return {"setting": setting, "seed": seed, "random_init": False, "point": "end", "step": 10,
            "train_seconds": seconds, "load_1min": None}


def test_a_cell_far_past_a_seconds_budget_is_named_under_the_table(tmp_path):
    """A load that came during a cell's last slice carried it to 49.4 s of an 8 s budget; results.md showed its row
    'at the end of the budget' beside cells of 8 s, with only the mean 'train s' of its seeds (29) to tell."""
    spec = parse_spec({"name": "w", "budget": "8s", "grid": {"window_size": [3, 4]}, "eval": {"metrics": []}})
    records = [_end("window_size=3", 0, 8.6), _end("window_size=3", 1, 9.9), _end("window_size=4", 1, 49.38)]
    assert past_budget(records, spec) == ["", "Past the budget: window_size=4, seed 1, trained 49.38 s of its 8s (a "
                                              "slice stops only between steps: the machine slowed during one, or its "
                                              "steps are long against the budget): not at equal time; re-run it on a "
                                              "quieter machine (delete its cell folder), or give the study a longer "
                                              "budget, for a fair row."]
    write_results(records, spec, tmp_path, 1.0)
    assert "Past the budget: window_size=4, seed 1" in (tmp_path / "results.md").read_text()
    steps = parse_spec({"name": "w", "budget": "8steps", "grid": {"window_size": [3]}, "eval": {"metrics": []}})
    assert past_budget(records, steps) == []  # a steps budget is met exactly, whatever the time


def test_the_settings_line_names_only_the_evaluations_that_ran(tmp_path):
    """A knn-only study's line names knn's settings alone: linprobe `{}` and finetune `{}` (and finetune's last-epoch
    note) beside it would read as if they had run at their defaults."""
    for metrics, line in (
            (["knn"], "- Evaluations: knn; knn `{}` (fixed before running)."),
            (["knn", "finetune"], "- Evaluations: knn, finetune; knn `{}`, finetune `{\"epochs\": 2}` (fixed before "
                                  "running; finetune reports its last epoch's top-1, not the best)."),
            (["heldout_loss"], "- Evaluations: heldout_loss."),
            ([], "- Evaluations: none.")):
        spec = parse_spec({"name": "w", "budget": "8steps", "grid": {"window_size": [3]},
                           "data": {"train": str(tmp_path), "val": str(tmp_path)},
                           "eval": {"metrics": metrics, "finetune": {"epochs": 2}}})
        write_results([_end("window_size=3", 0, 1.0)], spec, tmp_path, 1.0)
        assert line in (tmp_path / "results.md").read_text().splitlines()
