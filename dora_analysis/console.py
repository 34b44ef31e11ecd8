"""What every command-line entry point shares: exceptions and signals become one line and an exit code.

Bad input (:class:`~dora_analysis.errors.InputError`) prints ``PROG: error: <message>`` and
exits 2; anything else is a bug, printed as one line too, with its traceback under
``--debug``. SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread, so
every ``finally`` (staging folders, partial files) runs before the command exits 128 + the
signal number; :func:`deferred_signals` holds them back while a switch must not be cut in
half. Light on purpose: imported before torch so ``--help`` stays instant.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# The signals that ask a command to stop: Ctrl-C, `kill`, a closed terminal.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread like Ctrl-C's KeyboardInterrupt.

    A KeyboardInterrupt subclass, so code that cleans up on Ctrl-C cleans up on SIGTERM too.

    Attributes:
        signum: The signal received.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process stopped by it."""
        return 128 + self.signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    """Leave at once, quietly: the command's work and its cleanup are already done."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe must not turn into a traceback
            pass
    os._exit(128 + signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install(handler: Callable[[int, FrameType | None], object]) -> dict[int, object]:
    """Set ``handler`` for every stop signal; returns the previous handlers (main thread only)."""
    if not _in_main_thread():
        return {}
    return {int(s): signal.signal(s, handler) for s in STOP_SIGNALS}


def _restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold stop signals back for the duration, then deliver the first one that came.

    For the few steps that must not be cut in half (switching an output folder, removing a
    staging folder): a signal that arrives meanwhile is recorded and re-raised once the
    block is done, to whatever handler was in place before. Outside the main thread (where
    Python cannot set handlers) the block just runs.
    """
    received: list[int] = []
    previous = _install(lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        _restore(previous)
        if received:
            signal.raise_signal(received[0])


def run_main(
    prog: str,
    body: Callable[[], int],
    *,
    debug: bool = False,
    on_interrupt: str = "interrupted",
    standalone: bool = False,
) -> int:
    """Run a command's body; map its exceptions and stop signals to one-line messages and exit statuses.

    Args:
        prog: The command's name, the prefix of every message.
        body: The command; returns its exit status.
        debug: Re-raise instead, so the traceback shows.
        on_interrupt: What to say on Ctrl-C (e.g. how to continue).
        standalone: The process ends when this returns (the command was run from the shell):
            a stop signal after the body then ends it at once, so nothing (an interpreter
            exit hook, matplotlib's among them) can print a traceback on the way out.
            Otherwise the previous signal handlers are put back.

    Returns:
        ``body()``'s status, 2 for any error, 128 + the signal number on a stop signal
        (130 for Ctrl-C).
    """
    previous = _install(_raise_interrupted)
    try:
        return body()
    except KeyboardInterrupt as exc:
        if standalone:
            _install(_exit_now)  # a second signal while saying so: leave at once
        signum = getattr(exc, "signum", signal.SIGINT)
        said = on_interrupt if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"{prog}: {said}", file=sys.stderr)
        return 128 + int(signum)
    except Exception as exc:  # the one place errors become exit codes
        if standalone:
            _install(_exit_now)
        if debug:
            raise
        from .errors import InputError

        if isinstance(exc, InputError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
        else:
            msg = " ".join(str(exc).split()) or type(exc).__name__
            print(f"{prog}: error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if standalone:
            _install(_exit_now)
        else:
            _restore(previous)
