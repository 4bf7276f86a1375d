"""The writer lock of a trace store: one writer at a time, refused at once with the holder's pid.

Two collections into one ``--out`` would both append shards and rewrite the manifest, each from
its own idea of what is stored: the store ends up unreadable or with sequences twice. Every
writer (``collect``, ``import_routes``) therefore holds an exclusive ``fcntl.flock`` on
``<store>/writer.lock`` for its whole run. The OS drops the lock when the process dies (even on
``kill -9``), so a stale lock file never blocks a rerun; the file keeps the pid of the last
holder, which the refusal names.

A run that created the store folder and wrote nothing into it removes the folder again on
release, so a refused or failed first run leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from core.errors import UserError, describe_os_error

LOCK_NAME = "writer.lock"


class StoreBusyError(UserError):
    """Another process holds the writer lock of the store."""


class StoreLock:
    """Exclusive writer lock on a store folder (see the module docstring). Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this lock created (removed on release when left empty)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StoreLock:
        if self._fd is not None:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} exists and is not a folder")
        lock_path = self.path / LOCK_NAME
        try:
            self._make_folder()
            while True:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise StoreBusyError(
                        f"{self.path} is being written by another process (pid {self._holder(lock_path)}); "
                        f"wait for it to finish, or stop it and rerun to resume"
                    ) from None
                # a releasing writer may have removed the file between our open and our lock: lock the new one
                try:
                    same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            self._remove_created()
            raise UserError(f"cannot lock {self.path} for writing: {describe_os_error(e)}") from None
        except BaseException:
            self._remove_created()
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock; remove the folder again when this lock created it and nothing else was written."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._created and [p.name for p in self.path.iterdir()] == [LOCK_NAME]:
                (self.path / LOCK_NAME).unlink()  # still locked: a waiting opener re-checks the inode
                self._remove_created()
        except OSError:
            pass  # cleaning up is best effort; the lock itself goes with the descriptor
        finally:
            self._created = []
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _make_folder(self) -> None:
        missing = []
        p = self.path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
                self._created.append(folder)
            except FileExistsError:
                pass

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    @staticmethod
    def _holder(lock_path: Path) -> str:
        """The pid the holder wrote (it writes it right after locking: wait a moment for it)."""
        for _ in range(20):
            try:
                text = lock_path.read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                return text
            time.sleep(0.01)
        return "unknown"

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)  # type: ignore[arg-type]
            except OSError:
                pass
