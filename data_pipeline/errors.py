"""One error type for bad input, and the wrapper that turns it into one clear line + exit code.

Every command-line entry point runs through :func:`run_cli`, so a missing file, a corrupt shard or
an unknown policy prints ``error: <what is wrong>`` and exits non-zero instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input from the user: the message is the one line they will read."""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; bad input becomes one line on stderr and exit code 2."""
    try:
        result = main(argv)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; everything already written is kept and a rerun resumes", 130)
    if isinstance(result, int) and result:
        raise SystemExit(result)
