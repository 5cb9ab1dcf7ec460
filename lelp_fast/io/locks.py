"""Exclusive locks on what a long job writes (an output directory, a checkpoint, a projector file).

A lock is an ``fcntl.flock`` on a small ``.lock`` file next to what it protects. The kernel drops a
flock when its process dies, however it dies, so a stale lock of a killed run is taken over by the
next run without any clean-up (a killed holder leaves the file, unlocked; a clean exit removes it).
The file records the holder (pid, host, command, start time) so that a refused run can say who has
it. Two runs on one output directory, or on one checkpoint, cannot both write; the second gets
:class:`LockHeldError` before it has written anything.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import time
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: locks are advisory no-ops
    fcntl = None


class LockHeldError(RuntimeError):
    """Another live process holds the lock."""


class ExclusiveLock:
    """``with ExclusiveLock(path, "output directory"):`` holds ``path`` for the whole block."""

    def __init__(self, lock_file: str, what: str):
        self.lock_file, self.what = os.path.abspath(lock_file), what
        self._fd: Optional[int] = None

    def acquire(self) -> "ExclusiveLock":
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeldError(f"{self.what} is in use by another run ({holder}; lock {self.lock_file}); wait "
                                    "for it to finish or write somewhere else") from None
            if _same_file(fd, self.lock_file):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(sys.argv)[:300],
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file while still holding it (a waiter that opened it re-checks the inode,
        see ``acquire``), then drops the lock. A killed holder leaves the file, unlocked."""
        if self._fd is not None:
            try:
                os.unlink(self.lock_file)
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "ExclusiveLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return "holder unknown"
    if not isinstance(info, dict) or "pid" not in info:  # locked a moment ago, its holder not yet written
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: {info.get('command')}"


def is_held(lock_file: str) -> bool:
    """Whether a live process holds ``lock_file`` (False when the file does not exist)."""
    if fcntl is None or not os.path.exists(lock_file):
        return False
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_rank_directory(directory: str, rank: int, world: int, what: str) -> ExclusiveLock:
    """A distributed job's lock on its output directory: each rank holds ``.lock-rank<r>``; rank 0
    also refuses when another run holds a rank lock this run does not have (a larger world size)."""
    lock = ExclusiveLock(os.path.join(directory, f".lock-rank{rank}"), what).acquire()
    if rank == 0:
        for path in glob.glob(os.path.join(directory, ".lock-rank*")):
            suffix = path.rsplit("rank", 1)[1]
            other = int(suffix) if suffix.isdigit() else -1
            if other >= world and is_held(path):
                lock.release()
                raise LockHeldError(f"{what} is in use by another run (its rank {other} holds {path}); wait for it "
                                    "to finish or write somewhere else")
    return lock
