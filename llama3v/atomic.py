"""Write a file under a temporary name beside its destination and rename it into place only when complete.

An interrupted or killed writer leaves the destination as it was: the temporary file carries the
writer's process id, and a later write to the same destination deletes those whose process is gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` if the block succeeds and is deleted if not."""
    remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_partials(path: Path) -> None:
    """Delete temporary files a killed writer (kill -9, power loss) left beside `path`."""
    for old in path.parent.glob(f".{path.name}.*.partial"):
        pid = old.name[len(path.name) + 2:-len(".partial")]
        if pid.isdigit() and not alive(int(pid)):
            old.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
