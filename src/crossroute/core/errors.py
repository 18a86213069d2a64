"""User-facing errors: one line naming the file/field and the fix; the CLI prints them without a traceback."""

from __future__ import annotations


class CrossrouteError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line and exits 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
