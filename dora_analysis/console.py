"""What every command-line entry point shares: turning exceptions into one line and an exit code.

Bad input (:class:`~dora_analysis.errors.InputError`) prints ``PROG: error: <message>`` and
exits 2; anything else is a bug, printed as one line too, with its traceback under
``--debug``. Light on purpose: imported before torch so ``--help`` stays instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def run_main(prog: str, body: Callable[[], int], *, debug: bool = False, on_interrupt: str = "interrupted") -> int:
    """Run a command's body; map its exceptions to one-line messages and exit statuses.

    Args:
        prog: The command's name, the prefix of every message.
        body: The command; returns its exit status.
        debug: Re-raise instead, so the traceback shows.
        on_interrupt: What to say on Ctrl-C (e.g. how to continue).

    Returns:
        ``body()``'s status, 2 for any error, 130 on interrupt.
    """
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: {on_interrupt}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        if debug:
            raise
        from .errors import InputError

        if isinstance(exc, InputError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
        else:
            msg = " ".join(str(exc).split()) or type(exc).__name__
            print(f"{prog}: error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT
