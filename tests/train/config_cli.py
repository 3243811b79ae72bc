"""`lomar pretrain --print-config` and a settings file in tmp_path, for the configuration tests (none trains)."""

from __future__ import annotations

from pathlib import Path

from lomar.cli.app import main


def _resolve(tmp_path: Path, *args: str) -> int:
    return main(["pretrain", "--out", str(tmp_path / "run"), *args, "--print-config"])


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)
