"""`lomar knn` / `lomar linprobe` outputs: they never replace the checkpoint they score; the lines they print."""

import shutil

import pytest

from lomar.cli.app import main


@pytest.mark.parametrize("command, flag, name", [
    ("linprobe", "--save", "last.pt"),  # the probe's weights written over the run's last checkpoint
    ("knn", "--json", "last.pt"),
    ("knn", "--json", "config.json"),  # the run folder's export unreadable afterwards
])
def test_an_output_on_the_checkpoint_being_scored_is_refused(pretrained, tmp_path, capsys, command, flag, name):
    run = tmp_path / "run"
    shutil.copytree(pretrained.parent, run)
    source = str(run / "last.pt") if name == "last.pt" else str(run)
    before = (run / name).read_bytes()
    argv = [command, source, "--data", str(tmp_path / "no-data"), "--device", "cpu", flag, str(run / name)]
    (tmp_path / "no-data").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"lomar {command}: error: {flag} {run / name} is a file of the checkpoint {source} being scored: "
                   f"writing it would replace that checkpoint; give another file\n")
    assert (run / name).read_bytes() == before


def test_an_output_on_the_best_pt_a_run_folder_is_read_by_is_refused(pretrained, tmp_path, capsys):
    """A finetune run folder is read as its best.pt: --save or --json there would replace the checkpoint scored."""
    run, data = tmp_path / "ft", tmp_path / "no-data"
    run.mkdir()
    data.mkdir()
    for name in ("best.pt", "last.pt"):
        shutil.copy(pretrained, run / name)
    before = (run / "best.pt").read_bytes()
    assert main(["linprobe", str(run), "--data", str(data), "--device", "cpu", "--save", str(run / "best.pt")]) == 2
    assert capsys.readouterr().err == (f"lomar linprobe: error: --save {run / 'best.pt'} is a file of the checkpoint "
                                       f"{run} being scored: writing it would replace that checkpoint; give another "
                                       f"file\n")
    assert (run / "best.pt").read_bytes() == before


def test_the_load_line_keeps_the_crop_size_apart_from_what_was_not_used(pretrained, labelled_folder, tmp_path, capsys):
    """A comma joined the crop size to the load report's last list: an export's line read 'not used: none, 448 px
    crops', as if the crops were left unused."""
    export = tmp_path / "export"
    assert main(["export", str(pretrained), "--to", str(export)]) == 0
    capsys.readouterr()
    assert main(["knn", str(export), "--data", str(labelled_folder), "--device", "cpu", "--workers", "0",
                 "--img-size", "32", "--threads", "1"]) == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if "loaded" in line)
    assert line.endswith("; not used: none; 32 px crops"), line


def test_a_tensor_name_both_new_and_left_out_says_which_is_the_sources():
    # a finetune's line read "newly initialised: head.weight, head.bias; not used: head.weight, ...": the classifier's
    # new head and the pretraining pixel head share their names
    from lomar.eval.features import LoadReport

    report = LoadReport("pretrain checkpoint (lomar)", "run/last.pt", loaded=3, fresh=["head.weight", "head.bias"],
                        dropped=["head.weight", "head.bias", "mask_token"])
    assert report.summary() == ("loaded 3 tensors from pretrain checkpoint (lomar) run/last.pt; newly initialised: "
                                "head.weight, head.bias; not used: the source's head.weight, the source's head.bias, "
                                "mask_token")


def test_an_output_on_the_last_json_a_sharded_run_folder_is_read_by_is_refused(tmp_path, capsys):
    """A stopped --fsdp run folder is read through its last.json: --json there would replace the pointer to the
    checkpoint scored (and the run's resume point)."""
    run, data = tmp_path / "fsdp", tmp_path / "no-data"
    (run / "checkpoint-000010.dcp").mkdir(parents=True)
    data.mkdir()
    (run / "last.json").write_text('{"checkpoint": "checkpoint-000010.dcp", "step": 10}\n')
    assert main(["knn", str(run), "--data", str(data), "--device", "cpu", "--json", str(run / "last.json")]) == 2
    assert capsys.readouterr().err == (f"lomar knn: error: --json {run / 'last.json'} is a file of the checkpoint "
                                       f"{run} being scored: writing it would replace that checkpoint; give another "
                                       f"file\n")
