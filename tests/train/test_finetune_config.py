"""lomar finetune's settings (lomar.train.finetune_config): what a short run is told about its warm-up."""

from __future__ import annotations

import yaml

from lomar.cli.app import main


def test_short_run_warm_up_note_follows_the_checks_once_per_machine(tmp_path, capsys, monkeypatch):
    """The default warm-up shortened to a 1-epoch run is a note of a valid run: a bad setting's error stands alone,
    and under torchrun only the first process of a machine says it (the settings check needs no data)."""
    monkeypatch.chdir(tmp_path)
    base = ["finetune", "--pretrained", "missing.pt", "--data", "missing", "--epochs", "1"]
    assert main([*base, "--mixup", "-1"]) == 2
    assert capsys.readouterr().err.splitlines() == ["lomar finetune: error: --mixup must be >= 0, got -1.0"]
    assert main([*base, "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["warmup_epochs"] == 1
    assert err.splitlines() == ["lomar finetune: note: warming up for all 1 epoch(s) (the default 5 is longer than "
                                "--epochs)"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main([*base, "--print-config"]) == 0
    assert capsys.readouterr().err == ""
