"""`lomar knn` / `lomar linprobe` outputs never replace the checkpoint they score."""

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
