"""Exclusive lock on an output directory, shared by `cptstream shard` and `cptstream train`.

The lock is an `fcntl.flock` on `DIR/.cptstream.lock`. The kernel drops a flock when the last
descriptor of it closes, so the lock of a killed process never blocks a later run, unless a child
it forked (a DataLoader worker) still runs. The holder writes its pid into the file, so a second
run can name it in the error. POSIX only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["LOCK_FILE_NAME", "DirLock", "LockHeldError"]

LOCK_FILE_NAME = ".cptstream.lock"


class LockHeldError(RuntimeError):
    """Raised when another live process holds the lock on the directory."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process (pid not yet written)"
        super().__init__(
            f"output directory {directory} is in use by {holder}; wait for it to finish, "
            f"stop it, or choose another output directory"
        )
        self.directory = directory
        self.pid = pid


class DirLock:
    """Exclusive, non-blocking lock on a directory, usable as a context manager.

    Args:
        directory: the directory to lock. It is created if missing.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise at once.

        Raises:
            LockHeldError: another live process holds the lock; the message names its pid.
        """
        self.directory.mkdir(parents=True, exist_ok=True)

        # NOTE: the file is opened without O_TRUNC, so a failed attempt leaves the holder's pid intact.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise LockHeldError(self.directory, pid) from None

        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; the file stays so that a concurrent waiter never locks a deleted inode."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
