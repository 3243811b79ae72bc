"""How the error tests check what a command said (one line, ``lomar CMD: error: …``, no traceback) and make
lomar export fail with a given exception."""

from __future__ import annotations


def _one_error_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = "lomar: error:" if command == "nonsense" else f"lomar {command}: error:"
    assert lines[0].startswith(prefix), err
    return lines[0]


def _fail_with(monkeypatch, exc: BaseException) -> None:
    def run(args):
        raise exc

    monkeypatch.setattr("lomar.cli.export.run", run)
