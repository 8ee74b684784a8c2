"""One `lmjax train` per run directory: RUN_DIR/.lock, held with flock for the life of the run.

The file records who holds it (PID, host, start time) for the refusal message. The flock is
released by the kernel when its holder dies, even by kill -9, so a lock left behind by a dead
process is stale by construction: the next run takes it over and says so. Where the file
system has no flock (some network mounts), a file naming a PID on this host that no longer
runs is taken as stale too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from lmjax.errors import UserError

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    since = holder.get("started")
    when = (
        f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
        if isinstance(since, (int, float))
        else ""
    )
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


class RunLock:
    """Context manager: hold RUN_DIR/.lock or raise UserError naming the holder. The same lock
    guards a sweep directory (`name`, `what`, `user` and `flag`: the file, the directory, the
    holder and the flag to change)."""

    def __init__(self, run_dir: Path, say=print, name=LOCK_NAME, what="run", user="`lmjax train`", flag="--workdir"):
        self.path = Path(run_dir) / name
        self.say, self.what, self.user, self.flag = say, what, user, flag
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        for _ in range(5):  # the file can be removed between open and flock by a holder leaving: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._held(_holder(self.path)) from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._without_flock()
                fd = os.open(self.path, os.O_RDWR)
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            self.fd = fd
            break
        else:
            raise UserError(
                f"could not take the lock {self.path}: it keeps being replaced; is another "
                f"{self.user} starting in this {self.flag}?"
            )
        previous = _holder(self.path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.say(f"{self.path}: took over a stale lock of {_describe(previous)} (no longer running)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(record) + "\n").encode(), 0)
        return self

    def _held(self, holder: dict) -> UserError:
        return UserError(
            f"the {self.what} directory {self.path.parent} is in use by another {self.user} ({_describe(holder)}); "
            f"wait for it to finish or stop it, or choose another {self.flag} (if that process is gone, "
            f"delete {self.path})"
        )

    def _without_flock(self) -> None:
        holder = _holder(self.path)
        pid = holder.get("pid")
        if pid and pid != os.getpid() and (holder.get("host") != socket.gethostname() or _pid_alive(int(pid))):
            raise self._held(holder)

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: no one took it in between
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
