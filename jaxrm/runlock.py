"""An advisory lock on a run directory, held for the life of a run.

`fcntl.flock` on RUN_DIR/.jaxrm.lock: the OS releases it when the process ends, however it ends
(SIGKILL included), so a stale lock never blocks the next run. The file holds the holder's pid and
host, for the message a second run prints. Several processes of one multi-process run share the
directory by design: process 0 holds the lock for them.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket

LOCK = ".jaxrm.lock"


class RunLocked(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    def __init__(self, run_dir):
        self.path = pathlib.Path(run_dir) / LOCK
        self._file = None

    def acquire(self) -> None:
        """Take the lock now or raise RunLocked naming the directory and the holder's pid and host."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _holder(f.read())
            f.close()
            raise RunLocked(
                f"{self.path.parent} is in use by another jaxrm run ({holder}); wait for it to end, "
                f"or use another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
