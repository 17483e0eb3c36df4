"""File helpers the asset cache and the workload cache share: a process lock and a file's sha256."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import pathlib
import sys
from collections.abc import Iterator

_CHUNK = 1 << 20


@contextlib.contextmanager
def locked(path: pathlib.Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``path`` (created if missing); when another process holds
    it, say ``waiting`` on stderr and wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
