"""The one exception type the toolkit raises for bad input.

Every loader, the analyzer and the CLI raise :class:`InputError` for problems with what the
user gave (missing paths, corrupt files, shape mismatches, NaN/Inf, unknown formats). The CLI
turns it into a one-line message and exit status 2; anything else is a bug and keeps its
traceback under ``--debug``.
"""

from __future__ import annotations

from os import PathLike


class InputError(Exception):
    """Bad user input: says what was wrong, where (file, tensor), and how to fix it if known.

    Args:
        message: What was wrong, as one sentence.
        path: The file or folder it concerns, if any.
        tensor: The tensor name it concerns, if any.
        hint: How to fix it, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike[str] | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path
            if self.tensor is not None:
                where += f" [{self.tensor}]"
            where += ": "
        elif self.tensor is not None:
            where = f"{self.tensor}: "
        text = where + self.message
        if self.hint:
            text += f" ({self.hint})"
        # One line, always: the CLI prints this verbatim.
        return " ".join(text.split())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
