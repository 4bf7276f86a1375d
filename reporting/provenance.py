"""Where a run came from: the command line, the versions that ran it, this checkout's commit.

A report that is shared or put next to a paper must say how to reproduce it; a number without its
command and versions cannot be checked.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "moe-lookahead"
LIBRARIES = ("torch", "transformers", "lightning", "numpy", "matplotlib", "jinja2")


def command_line(script: str, argv: Sequence[str]) -> str:
    """``python SCRIPT ARGS`` as a shell would take it back (arguments quoted where needed)."""
    return shlex.join(["python", script, *[str(a) for a in argv]])


def git_commit(repo: Path = REPO) -> str | None:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; None outside a git checkout
    (an installed wheel) or without git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """python, this package (and its commit), and the libraries whose versions change the numbers."""
    out = {"python": platform.python_version(), PACKAGE: _version(PACKAGE),
           "git commit": git_commit() or "not a git checkout"}
    out.update({name: _version(name) for name in LIBRARIES})
    return out


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
