"""One writer per folder: an exclusive lock on a run folder or a prediction's ``out_dir``.

The lock is a kernel lock (``fcntl.flock``) on ``<folder>/.subseg.lock``, whose text records
who holds it (pid, host, start time, command). The kernel releases it when its process ends,
however it ends — a crash, ``kill -9``, a SLURM time-out — so a lock can never outlive its
writer: a lock file left behind by a dead process is reported and taken over, and a live one
refuses the second writer with one line naming the first. Python's standard library has the
primitive but no lock-file object with an owner record, and ``filelock`` (a dependency of
torch) writes none, so this small class is written here.

A filesystem that cannot lock (some network mounts) gets a warning and no lock rather than no
run at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from subseg.core import io

LOCK_NAME = ".subseg.lock"

_held: dict[Path, FolderLock] = {}
"""Locks this process holds, by folder: a second ``acquire`` of the same folder reuses it."""


class FolderLock:
    """An exclusive lock on one folder, held from :meth:`acquire` until :meth:`release`.

    Args:
        folder: the folder to lock (created if needed).
        what: how the folder is named in messages ("run folder", "out_dir").
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.folder / LOCK_NAME

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def holder(self) -> dict:
        """The record of the process that last took the lock (``{}`` if none or unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> FolderLock:
        """Take the lock, or refuse with one line naming the process that holds it.

        Returns:
            ``self``.

        Raises:
            io.InputError: another live process holds the lock.
        """
        key = self.folder.resolve()
        if key in _held and _held[key].held:  # this process already writes here
            return _held[key]
        io.ensure_writable(self.folder)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise io.InputError(self._busy_message()) from None
            except OSError as exc:  # no locking on this filesystem: warn, do not stop the work
                os.close(fd)
                print(
                    f"subseg: warning: {self.folder}: cannot lock this {self.what} "
                    f"({exc.strerror}); do not run two commands into it at once",
                    file=sys.stderr,
                )
                return self
            # The file may have been removed (a release) between our open and our lock: then we
            # hold a lock on a name no one else sees. Lock the file that is there now instead.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        before = self._read_fd(fd)
        if before.get("pid") is not None:
            print(
                f"subseg: {self.folder}: the previous writer ({_describe(before)}) ended without "
                "releasing its lock (killed?); taking over",
                file=sys.stderr,
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _held[key] = self
        return self

    def release(self) -> None:
        """Give the lock up and remove the lock file (nothing happens if not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # before the unlock: nobody can take the old file after this
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _held.pop(self.folder.resolve(), None)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy_message(self) -> str:
        holder = self.holder()
        who = _describe(holder) if holder else "another process"
        return (
            f"{self.folder}: this {self.what} is being written by {who}; wait for it to finish, "
            "or give this command another name= / out_dir="
        )

    @staticmethod
    def _read_fd(fd: int) -> dict:
        try:
            text = os.pread(fd, 1 << 16, 0).decode()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}


def _describe(record: dict) -> str:
    return (
        f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: "
        f"{record.get('command', '?')}"
    )
