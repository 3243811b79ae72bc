"""Files an older lomar wrote, read by this one."""

from __future__ import annotations

import yaml

from lomar.cli.app import main
from lomar.train.config import PretrainConfig


def test_older_config_yaml_with_its_invocations_overwrite_is_refused(tmp_path, capsys):
    """Before config.yaml kept --overwrite and --resume at their defaults, a run started with --overwrite recorded
    overwrite: true (measured with the lomar of a5ae584); given back as --config for another --out, that replaced
    the run held there without a word."""
    old = tmp_path / "first" / "config.yaml"
    old.parent.mkdir()
    recorded = PretrainConfig(out=str(old.parent), overwrite=True, max_steps=1).to_dict()  # as that version dumped
    old.write_text(yaml.safe_dump(recorded, sort_keys=False))
    victim = str(tmp_path / "victim")
    assert main(["pretrain", "--config", str(old), "--out", victim, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"{old} records an invocation's overwrite: true (it is --print-config's output of one, or a run's " \
           f"config.yaml written by an older lomar)" in err
    assert len(err.strip().splitlines()) == 1
    # given on the command line, the setting is the user's again; so is a hand-written file's
    assert main(["pretrain", "--config", str(old), "--out", victim, "--overwrite", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["overwrite"] is True
    own = tmp_path / "own.yaml"
    own.write_text("overwrite: true\nmax_steps: 1\n")
    assert main(["pretrain", "--config", str(own), "--out", victim, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["overwrite"] is True


def test_older_config_yaml_with_its_invocations_resume_is_refused(tmp_path, capsys):
    """A run resumed from a named checkpoint recorded resume: PATH; given as --config, it branched off that run."""
    old = tmp_path / "config.yaml"
    recorded = PretrainConfig(out=str(tmp_path), resume=str(tmp_path / "checkpoint-000004.pt")).to_dict()
    old.write_text(yaml.safe_dump(recorded, sort_keys=False))
    assert main(["pretrain", "--config", str(old), "--out", str(tmp_path / "new"), "--print-config"]) == 2
    assert "resume: " in capsys.readouterr().err
