"""User-facing errors: one line naming the file/field and the fix; the CLI prints them without a traceback.

The exit-code contract of every `crossroute` command: EXIT_OK on success, EXIT_BAD_INPUT for anything the user
can fix (one line `crossroute: error: ...` on stderr), EXIT_INTERRUPTED after Ctrl-C or SIGTERM, and
EXIT_INTERNAL with a traceback for anything unexpected (a bug to report).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

INTERRUPTED_MESSAGE = "interrupted; what finished is kept, rerun the same command to resume."


class CrossrouteError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line and exits 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
