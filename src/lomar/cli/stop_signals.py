"""A lomar command's stop signals outside a training loop (which checkpoints on them instead: its StopFlag, in
lomar.train.preemption, sets a flag): SIGTERM and SIGUSR1 raise :class:`Terminated`, Ctrl-C KeyboardInterrupt, and
the command unwinds (its temporary files removed, its run folder's lock released) to exit 128 + the signal.

Python runs a signal's handler between two bytecodes of the main thread, whatever code that is. Inside a weakref
callback, a ``__del__``, a gc callback or an atexit function (torch.compile's machinery runs many weakref callbacks),
the handler's exception cannot unwind the code that called it from C: CPython passes it to ``sys.unraisablehook``,
which prints "Exception ignored in ...", and goes on, the signal lost, the command running to its end (a scheduler's
preemption then SIGKILLs it after its grace period). While a command runs, the hook set here sends such a signal again
instead, to be raised where it unwinds. Imports no torch: ``lomar --help`` imports this module.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from lomar.train.preemption import Terminated, signals_to_take

__all__ = ["handle_stop_signals", "command_running"]

_running = [False]  # whether a command is running: a stop signal after it has ended changes nothing
# Held while _running changes and while a lost signal is sent again: none is sent once the command has ended, when
# the handlers given back may be the default ones, which would kill the process (or a Python caller of main).
# Reentrant: a handler may run, and take it, in the main thread while that thread holds it.
_resending = threading.RLock()
_lost: list[int] = []  # a stop signal whose exception CPython swallowed, until a handler takes it again
_sending = [False]  # whether the thread that sends it again runs
_pause = [0.0]  # that thread's seconds between two sends: short after a swallow, longer while none is taken


def _terminate(signum, frame) -> None:
    # Once the command has ended (say, reporting a lost peer), a SIGTERM, such as the one torchrun sends the
    # survivors of a failed process, must not turn its one line into a traceback: it exits with its code anyway.
    if not _running[0]:
        return
    if _inside_hook(frame):  # raised here, it would be the hook's own failure, which CPython prints and drops
        _send_again(signum)
        return
    _lost.clear()
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _unraisable(previous: Callable, unraisable) -> None:
    """``sys.unraisablehook`` while a command is set up to stop on signals: a stop signal's exception that CPython
    could not raise (see the module's doc) is sent again, unprinted; anything else goes to ``previous``."""
    exc = unraisable.exc_value
    if _running[0] and isinstance(exc, KeyboardInterrupt):
        _send_again(exc.args[0] if isinstance(exc, Terminated) and exc.args else signal.SIGINT)
        return
    previous(unraisable)


def _inside_hook(frame) -> bool:
    """Whether ``frame`` (the one a signal interrupted) runs :func:`_unraisable` or code it called."""
    while frame is not None:
        if frame.f_code is _unraisable.__code__:
            return True
        frame = frame.f_back
    return False


def _send_again(signum: int) -> None:
    """Have ``signum`` delivered to the main thread again, by a thread of its own: sent from the main thread, its
    handler would run at the hook's next bytecode, where its exception is lost again."""
    with _resending:
        _lost[:], _pause[0] = [signum], 0.001
        if not _sending[0]:
            _sending[0] = True
            _thread.start_new_thread(_send_until_taken, (threading.main_thread().ident,))


def _send_until_taken(main_thread: int) -> None:
    """Send the lost signal until a handler has taken it: :func:`_terminate` raising it (should it land in another
    callback, the hook has it sent again), or a training loop's, which sets a flag (one is enough). Sent once, it may
    come just as the main thread lets go of the GIL to block (a sleep, a wait), which is when this thread gets it: the
    call, entered after the signal, would not be interrupted. The next one, a moment later, interrupts it; as they
    come before the handler runs, they make one call of it. This thread runs where the main thread lets go of the
    GIL, a blocking or a long torch call mostly, and the handler runs once it holds it again; a command running
    Python code in callbacks nearly all the time lets it go in one, where the signal lands again, and may end
    before one lands elsewhere."""
    while True:
        with _resending:
            if not (_running[0] and _lost):
                _sending[0] = False
                return
            signum = _lost[0]
            if hasattr(signal, "pthread_kill"):
                signal.pthread_kill(main_thread, signum)  # a signal, not a flag: it interrupts a blocking call
            else:  # Windows
                _thread.interrupt_main(signum)
            if signal.getsignal(signum) is not _terminate:
                _lost.clear()
            pause = _pause[0]
            _pause[0] = min(2 * pause, 0.25)  # a main thread busy without Python (a long torch call): a few, no storm
        time.sleep(pause)


def handle_stop_signals() -> Callable[[], None]:
    """Set the handlers of SIGTERM, SIGUSR1 (where there is one) and SIGINT (unless ignored), and the hook; the
    function that gives them back. Only in the main thread, which alone may set handlers and gets the signals."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, _terminate) for sig in signals_to_take()}
    hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unraisable, hook)

    def give_back() -> None:
        sys.unraisablehook = hook
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    return give_back


@contextlib.contextmanager
def command_running() -> Iterator[None]:
    """While the block runs, a stop signal ends the command; after, it changes nothing."""
    before, _running[0] = _running[0], True
    try:
        yield
    finally:
        with _resending:
            _running[0] = before
