"""`lomar study` on the command line: one-line errors (exit 2) and the presets' grids."""

import pytest

from lomar.cli.app import main
from lomar.cli.study.presets import build_preset, method_available
from lomar.cli.study.runner import check_cells


@pytest.mark.parametrize("argv, message", [
    (["study"], "pass either SPEC.yaml or --preset NAME"),
    (["study", "--preset", "nope"], "--preset 'nope' is unknown; choose one of fig3"),
    (["study", "--preset", "windows", "--seeds", "0"], "--seeds must be a positive count, got 0"),
    (["study", "--preset", "windows", "--budget", "fast"], "--budget: 'fast' is not a budget"),
    (["study", "--preset", "windows", "--data", "/no/such/dir"], "--data /no/such/dir is not a folder"),
    (["study", "/no/such/spec.yaml"], "study spec /no/such/spec.yaml does not exist"),
])
def test_bad_invocations_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_bad_spec_file_names_the_key(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("budget: 30s\ngrid: {method: [lomar]}\neval: {metrics: [knn]}\n")
    assert main(["study", str(spec)]) == 2
    assert "eval.metrics knn need labelled data" in capsys.readouterr().err


def test_enc_dec_says_why_it_is_unavailable():
    if "--enc-dec" in __import__("lomar.cli.study.runner", fromlist=["x"]).lomar_command(["pretrain", "--help"])[1]:
        pytest.skip("this version offers --enc-dec")
    with pytest.raises(Exception, match="enc-dec is unavailable"):
        build_preset("enc-dec")


def test_windows_preset_has_the_five_paper_settings_and_all_are_valid_runs():
    spec = build_preset("windows", budget="10s")
    labels = [label for label, _ in spec.grid["window"]]
    assert [label.split(" ")[0] for label in labels] == ["5:8", "7:4", "9:3", "11:2", "14:1"]
    assert len(spec.cells()) == 5 and spec.eval.metrics == ()
    check_cells(spec)  # each passes `lomar pretrain --print-config`


def test_fig3_includes_beit_only_when_pretrain_accepts_it():
    spec = build_preset("fig3", budget="40s")
    methods = [label for label, _ in spec.grid["method"]]
    assert methods == ["lomar", "mae"] + (["beit"] if method_available("beit") else [])
    assert str(spec.eval.every) == "10s"
