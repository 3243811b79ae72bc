"""A stop signal whose exception lands where Python cannot raise it (a weakref callback, a ``__del__``, a gc callback:
CPython prints "Exception ignored in ..." and goes on) still ends the command with its exit code."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import weakref

import pytest

from lomar.cli.app import main

WAIT_S = 20  # the stand-in command's work after the signal: a signal lost lets it run to its end, exit 0


def _signal_lands_here(signum: int, seconds: float = 5.0) -> None:
    """Send ``signum`` to this process and run Python code for ``seconds``, or until its handler raises in here."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


class _Dying:
    def __init__(self, signum: int | None = None):
        self.signum = signum

    def __del__(self):
        if self.signum is not None:
            _signal_lands_here(self.signum)


def _in_weakref_callback(signum: int) -> None:
    thing = _Dying()
    ref = weakref.ref(thing, lambda _: _signal_lands_here(signum))
    del thing
    assert ref() is None


def _in_finaliser(signum: int) -> None:
    _Dying(signum)


def _in_gc_callback(signum: int) -> None:
    def callback(phase, info):
        if phase == "start":
            gc.callbacks.remove(callback)
            _signal_lands_here(signum)

    gc.callbacks.append(callback)
    gc.collect()


def _export_running(monkeypatch, swallow) -> list[float]:
    """``lomar export``'s run replaced: the signal, swallowed, then the command's long wait; the seconds it waited."""
    waited = []

    def run(args):
        swallow()
        start = time.monotonic()
        try:
            time.sleep(WAIT_S)  # the signal sent again interrupts this
        finally:
            waited.append(time.monotonic() - start)
        return 0

    monkeypatch.setattr("lomar.cli.export.run", run)
    return waited


@pytest.mark.parametrize("where, signum, code, line", [
    (_in_weakref_callback, signal.SIGTERM, 143, "terminated (SIGTERM)"),
    (_in_finaliser, signal.SIGINT, 130, "interrupted"),
    (_in_gc_callback, signal.SIGUSR1, 138, "terminated (SIGUSR1)"),
])
def test_a_stop_signal_swallowed_where_python_cannot_raise_still_ends_the_command(monkeypatch, capsys, where, signum,
                                                                                   code, line):
    waited = _export_running(monkeypatch, lambda: where(signum))
    before = signal.getsignal(signum)
    assert main(["export", "ckpt", "--to", "out"]) == code
    assert all(seconds < WAIT_S / 2 for seconds in waited)  # sent again before or during the wait, not after it
    assert capsys.readouterr().err == f"lomar export: {line}\n"  # no 'Exception ignored' traceback
    assert signal.getsignal(signum) is before


def test_a_stop_signal_that_lands_in_the_unraisable_hook_is_not_lost(monkeypatch, capsys):
    """The hook itself runs Python code (the one before lomar's: pytest's, a user's): an exception raised there would
    be the hook's own failure, which CPython prints and drops."""
    hook_ran_through = []

    def previous_hook(unraisable):
        if str(unraisable.exc_value) == "a callback's own error":
            _signal_lands_here(signal.SIGTERM, seconds=0.5)  # its handler runs in here: raising, it would stop this
            hook_ran_through.append(True)

    def failing_callback(_):
        raise ValueError("a callback's own error")

    def swallow():
        thing = _Dying()
        ref = weakref.ref(thing, failing_callback)
        del thing
        assert ref() is None

    _export_running(monkeypatch, swallow)
    monkeypatch.setattr(sys, "unraisablehook", previous_hook)
    assert main(["export", "ckpt", "--to", "out"]) == 143
    assert hook_ran_through == [True]
    assert capsys.readouterr().err == "lomar export: terminated (SIGTERM)\n"


def test_a_ctrl_c_the_parent_ignores_stays_ignored(monkeypatch):
    """As Python leaves it: a shell starts a background job with SIGINT ignored, so that a Ctrl-C meant for the
    foreground does not stop it."""
    def run(args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # time for it to reach the main thread, which any other thread may have taken it for
        return 0

    monkeypatch.setattr("lomar.cli.export.run", run)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["export", "ckpt", "--to", "out"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# A child's SIGTERM raised in a weakref callback, which CPython swallows: swallow_sigterm() does it
SWALLOWING = '''
import os, signal, sys, time, weakref
import lomar.cli.export

class Thing:
    pass

def callback(_):
    os.kill(os.getpid(), signal.SIGTERM)
    while True:  # the handler raises in here
        pass

def swallow_sigterm():
    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
'''

CHILD = SWALLOWING + f'''
from lomar.cli.app import run

def export(args):
    swallow_sigterm()
    print("callback done", flush=True)
    time.sleep({WAIT_S})
    return 0

lomar.cli.export.run = export
run()
'''


@pytest.mark.slow  # a subprocess
def test_a_sigterm_swallowed_in_a_weakref_callback_exits_143():
    """As torch.compile's weakref callbacks swallowed a scheduler's SIGTERM: the process, through lomar's entry point,
    still exits 143 with its one line, well before the command's work would have ended."""
    proc = subprocess.run([sys.executable, "-c", CHILD, "export", "ckpt", "--to", "out"], capture_output=True,
                          text=True, timeout=WAIT_S * 3)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr == "lomar export: terminated (SIGTERM)\n"


AFTER_THE_END = SWALLOWING + '''
from lomar.cli.app import main

sys.setswitchinterval(30)  # the thread sending the signal again gets to run only in the sleep below

def export(args):
    swallow_sigterm()
    return 0  # before the signal is sent again

lomar.cli.export.run = export
code = main(["export", "ckpt", "--to", "out"])
time.sleep(1)  # SIGTERM's handler is the default again: a send now would kill this process
print(code)
'''


@pytest.mark.slow  # a subprocess
def test_a_signal_swallowed_as_the_command_ends_is_not_sent_once_it_has_ended():
    """The command's own code stands, and the process its caller goes on with is not killed by a late send."""
    proc = subprocess.run([sys.executable, "-c", AFTER_THE_END], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "0\n", "")
