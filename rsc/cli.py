"""How every rsc command line ends on a user's mistake: one line on stderr and exit status 2.

``python -m rsc.fit``, ``rsc.generate``, ``rsc.export``, ``rsc.toy`` (and any later
command) run their ``main`` through :func:`run_cli`. An error caused by the user's
input (a path, a config value, a dataset, a backbone) prints ``<prog>: error:
<message>`` and exits with status 2, the status argparse uses for bad arguments;
any other error keeps its traceback. ``RSC_TRACEBACK=1`` shows the traceback of
user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserInputError(Exception):
    """An error in what the user gave (a path, a config field, a dataset, a backbone): shown as a message, not a traceback."""


#: What the user's input causes: rsc raises ``OSError`` (missing files, unreadable folders) and ``ValueError``
#: (bad values, naming the field) for it throughout, and :class:`UserInputError` where neither fits.
USER_ERRORS: tuple[type[BaseException], ...] = (UserInputError, OSError, ValueError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a ``KeyError``'s without its quotes)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def run_cli(
    main: Callable[[list[str] | None], T],
    argv: list[str] | None = None,
    prog: str | None = None,
    user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
) -> T:
    """Return ``main(argv)``; a ``user_errors`` exception ends the program with its one-line message and status 2.

    Args:
        main: The command's body; ``argv=None`` means ``sys.argv[1:]``.
        argv: The arguments.
        prog: The name in the message (default: ``main``'s module, e.g. ``rsc.fit``).
        user_errors: The exception types that mean "the input is wrong".
    """
    try:
        return main(argv)
    except user_errors as error:
        if os.environ.get("RSC_TRACEBACK"):
            raise
        name = prog or main.__module__.removesuffix(".__main__")
        sys.stderr.write(f"{name}: error: {one_line(error)}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
