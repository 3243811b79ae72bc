"""What every ``lomar bench`` JSON's meta records of the run (lomar.cli.bench._start)."""

import argparse
import shlex
import sys

from lomar.cli.bench import _start


def test_the_recorded_command_runs_again_as_it_ran(monkeypatch):
    argv = ["lomar", "bench", "--tiny", "--json", "my results/bench.json", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    args = argparse.Namespace(device="cpu", precision="fp32", threads=0, quiet=True)
    _, _, meta = _start(args)
    assert shlex.split(meta["command"]) == ["lomar", *argv[1:]]  # the spaced path one argument
