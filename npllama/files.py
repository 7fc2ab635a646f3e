"""Durable file writes shared by the tokenizer, the token cache, the training log and checkpoints.

Every temporary file or folder npllama writes is named `.tmp-<final name>-<pid>` beside its final
name (`temporary_sibling`), so that whoever finds one later can tell a leftover of a process that
died (delete it) from the work of a process still running (leave it): `owned_by_a_live_process`.
"""

from __future__ import annotations

import os
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"


def temporary_sibling(path: Path, process: int | None = None) -> Path:
    """`.tmp-<name>-<pid>` in `path`'s folder: where this process prepares `path` before renaming it."""
    path = Path(path)
    return path.parent / f"{TEMPORARY_PREFIX}{path.name}-{os.getpid() if process is None else process}"


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (not atomic by itself: for files in a temporary folder)."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one.

    The temporary sibling is written and fsynced, renamed over `path` (atomic), and the folder is
    fsynced so the rename itself is durable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        write_synced(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable; a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def owned_by_a_live_process(name: str) -> bool:
    """True for a `...-<pid>` name (a temporary, or a set-aside checkpoint) of a running process
    other than this one; False for this process's own, and for those of processes that died."""
    suffix = name.rsplit("-", 1)[-1]
    if not suffix.isdigit() or int(suffix) == os.getpid() or os.name != "posix":
        return False
    try:
        os.kill(int(suffix), 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True
