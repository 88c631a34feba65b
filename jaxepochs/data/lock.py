"""Locks that keep two processes out of one workdir (or one dataset's preparation).

An OS file lock (`flock`) on a file in the directory: the kernel releases it when its process exits, however it
exits (SIGKILL included), so a dead run never leaves a stale lock. The file records its holder (pid, host, start
time) for the message a second process gets. The file stays: deleting it would let a third process lock a new
file while the second still holds the old one. It lives in the data layer, the lowest that does I/O, because
preparing a dataset takes a lock too.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys

LOCK_FILE = ".jaxepochs.lock"


class LockedError(ValueError):
    """Another live process holds the lock; the message names it."""


def _holder() -> str:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})


def _describe(fd: int) -> str:
    """The holder recorded in the lock file, as "pid 123 on host h (since 2026-...)"."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on host {holder['host']} (since {holder['started']})"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment after the lock is taken
        return "another process"


def _open(path: pathlib.Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _record(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder().encode(), 0)


def check_free(directory: pathlib.Path, what: str) -> None:
    """LockedError at once if a live process holds `directory`'s lock; creates nothing. A cheap look before the
    work that precedes `hold` (reading data, tracing the model), so a second process is refused in a moment."""
    try:
        fd = os.open(pathlib.Path(directory) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file (or none readable): nothing holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockedError(_in_use(directory, what, fd)) from None
    finally:
        os.close(fd)


def _in_use(directory, what: str, fd: int) -> str:
    return (
        f"the {what} {directory} is in use by {_describe(fd)}. Wait for it to finish, stop it, or use another "
        "--workdir. (Reading its checkpoints with jaxepochs.load works while it runs.)"
    )


@contextlib.contextmanager
def hold(directory: pathlib.Path, what: str):
    """Holds `directory`'s lock for the block; LockedError at once if a live process holds it. `what` names the
    directory in that message ("workdir", "sweep workdir")."""
    fd = _open(pathlib.Path(directory) / LOCK_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(_in_use(directory, what, fd)) from None
        _record(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def wait_for(path: pathlib.Path, what: str, quiet: bool = False):
    """Holds the lock file `path` for the block, waiting (and saying so) while another process holds it: for
    work that the second process then finds done, such as preparing a dataset."""
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"jaxepochs: waiting for {_describe(fd)}, which is {what}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _record(fd)
        yield
    finally:
        os.close(fd)
