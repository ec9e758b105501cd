"""One run per output folder: an advisory lock each command takes on its folder for as long as it writes there."""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import ToEError
from .files import atomic_write_json
from .run_kinds import RECORD_NAME, kind_of, run_files, top_stats

# -- one run per output folder -------------------------------------------------------------------------------------
LOCK_NAME = ".toe.lock"  # in the output folder; starts with a dot, so run_files and --overwrite never see it


HELD_LOCKS: dict[tuple[int, int], OutLock] = {}  # this process's locks by folder (st_dev, st_ino): re-entered, not re-taken


LOCK_SCOPE: contextvars.ContextVar[list[OutLock] | None] = contextvars.ContextVar("toe_out_locks", default=None)


class OutLock:
    """An advisory lock (``fcntl.flock``) on ``out/.toe.lock``, held while one command writes into ``out``.

    A second ToE process that claims the folder is refused, with the pid, host and command line the lock file
    records. The kernel drops a flock when its process dies (kill -9 included), so a killed run's folder is free at
    once and ``--resume`` continues it; the file it leaves behind is only the dead run's record. Released (``release()``, or the
    end of a ``with`` block or of a command decorated with :func:`releases_out_locks`), the file is removed, and so
    is ``out`` when this lock created it and nothing else was written there. Within one process the same folder is
    re-entered (a recipe's command calling another into its own folder), not refused.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = os.fspath(out)
        self.path = os.path.join(self.out, LOCK_NAME)
        self._created = _missing_folders(self.out)
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise ToEError(f"--out {self.out} cannot be created ({e.strerror}): pass a writable folder") from None
        self._key = _folder_key(self.out)
        self._depth = 1
        self._fd = self._acquire()
        self._record()
        self.command: str | None = None  # set by claim_out: the kind of run recorded in RECORD_NAME at release
        self._before: dict[str, tuple[int, int]] = {}

    def _acquire(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
            except PermissionError:
                self._remove_created()
                raise ToEError(f"--out {self.out} is not writable: pass a folder you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_created()
                raise ToEError(f"{self.out} is being written by another run ({holder}): wait for it to finish, or "
                               "pass another --out") from None
            # the holder may have released (and removed) the file between our open and our lock: lock anew
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _record(self) -> None:
        """Writes who holds the lock into the file, for the message a second run gets."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "argv": shlex.join(sys.argv),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Gives the lock up (once per claim: a re-entered lock is held until its first claim lets go)."""
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        HELD_LOCKS.pop(self._key, None)
        if self.command is not None:
            with contextlib.suppress(OSError):  # a record that cannot be written only loses the kind's name
                self._record_run()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still locked: whoever opens the name next gets a new file
        fd, self._fd = self._fd, None
        os.close(fd)
        self._remove_created()

    def _record_run(self) -> None:
        """Writes which command's run the folder holds (RECORD_NAME) when the run changed any of its files: a
        refused or empty run leaves the folder byte-identical."""
        if top_stats(self.out) == self._before:
            return
        files = run_files(self.out, self.command)
        if files:
            atomic_write_json(os.path.join(self.out, RECORD_NAME), {"command": kind_of(self.command), "files": files})

    def _remove_created(self) -> None:
        for folder in reversed(self._created):  # deepest first; a folder holding anything stays
            try:
                os.rmdir(folder)
            except OSError:
                break

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def take_lock(out: str | os.PathLike) -> OutLock:
    """This process's lock on the folder ``out`` (created if missing): taken, or re-entered where it holds it."""
    key = _folder_key(out) if os.path.isdir(out) else None
    lock = HELD_LOCKS.get(key) if key else None
    if lock is not None and lock.held:
        lock._depth += 1
        return lock
    lock = OutLock(out)
    HELD_LOCKS[lock._key] = lock
    return lock


F = TypeVar("F", bound=Callable[..., Any])


def releases_out_locks(fn: F) -> F:
    """Decorates a command: the output folders it claims (:func:`claim_out`) stay locked while it runs and are
    released when it returns or raises, so a library caller running many commands in one process leaks none."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        held: list[OutLock] = []
        token = LOCK_SCOPE.set(held)
        try:
            return fn(*args, **kwargs)
        finally:
            LOCK_SCOPE.reset(token)
            for lock in reversed(held):
                lock.release()

    return command  # type: ignore[return-value]


def _folder_key(folder: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def _missing_folders(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would create, outermost first."""
    missing = []
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing[::-1]


def _read_holder(fd: int) -> str:
    """Who holds the lock, as its file says (it may not have written it yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process"
    argv = str(holder.get("argv", ""))
    argv = argv if len(argv) <= 100 else argv[:97] + "..."
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('started', '?')}: {argv}"
