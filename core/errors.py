"""One error type for bad input, and the wrapper that turns it into one clear line + exit code.

Every command-line entry point runs through :func:`run_cli`, so a missing file, a corrupt shard,
an unknown policy, a full disk, a read-only folder or a Lightning misconfiguration prints
``error: <what is wrong>`` and exits 2 instead of a traceback. Writers remove their partial
files before the error reaches here (see ``data_pipeline.trace_store``), so the message can say
that a rerun resumes.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BAD_INPUT = 2
_LIGHTNING_EXCEPTIONS = "lightning.fabric.utilities.exceptions"


class UserError(Exception):
    """Bad input from the user: the message is the one line they will read."""


def one_line(text: str) -> str:
    """Collapse a (library) message to one line: the user reads one line, never a dump."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "unknown error"


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(code)


def describe_os_error(e: OSError) -> str:
    """A one-line account of an OS error that names the file and what to do about it."""
    where = e.filename if e.filename is not None else None
    reason = e.strerror or one_line(str(e))
    code = e.errno
    if code is None:  # pyarrow reports the errno inside its message only
        text = str(e)
        code = next((c for c, name in ((errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file system"),
                                       (errno.EACCES, "Permission denied")) if name in text), None)
    target = f" ({where})" if where else ""
    if code == errno.ENOSPC:
        return (f"no space left on the device{target}; partial files were removed and everything finished is "
                f"kept: free some space and rerun")
    if code == errno.EROFS:
        return f"read-only file system{target}: write somewhere else"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied{target}: check the folder's permissions or write somewhere else"
    return f"{reason}{target}"


def _is_lightning_misconfiguration(e: BaseException) -> bool:
    module = sys.modules.get(_LIGHTNING_EXCEPTIONS)  # only loaded when Lightning is: no import cost here
    return module is not None and isinstance(e, module.MisconfigurationException)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; bad input, OS errors and framework misconfigurations become one line + exit 2."""
    try:
        result = main(argv)
    except UserError as e:
        fail(str(e))
    except OSError as e:
        fail(describe_os_error(e))
    except KeyboardInterrupt:
        fail("interrupted; everything already written is kept and a rerun resumes", 130)
    except Exception as e:
        if _is_lightning_misconfiguration(e):
            fail(f"Lightning refused the configuration: {one_line(str(e))}")
        raise
    if isinstance(result, int) and result:
        raise SystemExit(result)
