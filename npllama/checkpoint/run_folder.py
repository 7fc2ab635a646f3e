"""A training run's folder: numbered checkpoints, `latest`, pruning, and recovery from a kill.

    run_dir/step-00000100/   run_dir/step-00000200/   run_dir/latest  ("step-00000200\\n")

This module moves whole checkpoint folders and never looks inside their files (format.py does).

Why a kill at any instant leaves the previous checkpoint loadable
-----------------------------------------------------------------
(For one writer per run directory; two processes saving into the same one are not supported.)

1. Nothing is written in place under a final name. `place` writes every file into a temporary
   sibling `run_dir/.tmp-step-N-<pid>/`, fsyncs each file and then the directory, and only then
   renames the directory to `step-N`. rename(2) is atomic: the name `step-N` appears with all its
   contents or not at all. The run directory is fsynced so the rename is on disk before anything
   refers to it (fsync guards against power loss; a killed process loses nothing the kernel
   already has).
2. `latest` is replaced the same way (files.write_atomically): a fsynced temporary file,
   `os.replace` (atomic), a fsync of the run directory. So `latest` only ever names a directory
   that was complete before `latest` changed; a kill before the replace leaves it naming the
   previous checkpoint.
3. Old checkpoints are deleted only after `latest` names the new one, and they are first renamed
   to `.tmp-...`, so a half-deleted directory never carries a `step-*` name.
4. Re-saving a step that exists (a re-run) keeps the old directory until the new one is complete:
   the old one is renamed to `.old-step-N-<pid>`, the new one takes the name `step-N`, and only
   then is the old one deleted. A kill between those two renames leaves `latest` naming a missing
   `step-N` whose complete old version is `.old-step-N-<pid>`: `find_latest` falls back to it and
   the next save renames it back.
5. Leftovers of a kill are never read as checkpoints (`.tmp-*`) or only as in 4 (`.old-*`); the
   next save removes them, or puts an `.old-*` back, unless the process that made them still runs
   (files.owned_by_a_live_process).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..files import (
    TEMPORARY_PREFIX,
    FileProblem,
    fsync_dir,
    kind_of,
    owned_by_a_live_process,
    read_regular_file,
    temporary_sibling,
    write_atomically,
    write_synced,
)
from .messages import CheckpointError

LATEST_FILE = "latest"

_STEP_DIR = re.compile(r"step-(\d{8,})")
_OLD_DIR = re.compile(r"\.old-step-(\d{8,})-\d+")  # a checkpoint set aside while its step is re-saved


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_named_by(directory: Path) -> int | None:
    """The step a `step-N` (or set-aside `.old-step-N-<pid>`) folder's name gives; None for another name."""
    named = _STEP_DIR.fullmatch(directory.name) or _OLD_DIR.fullmatch(directory.name)
    return int(named.group(1)) if named else None


def place(run_dir: Path, step: int, files: dict, keep_last: int | None) -> Path:
    """Write `files` ({name: bytes}) as `run_dir/step-N/` atomically, point `latest` at it, remove
    leftovers of killed saves and prune to the `keep_last` newest (None: keep all). Returns the folder.

    An OSError (a folder that cannot be written, a full disk) propagates; the checkpoints already
    there are left as they were.
    """
    name = checkpoint_name(step)
    final = run_dir / name
    tmp = temporary_sibling(final)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    tmp.mkdir()
    try:
        for file_name, data in files.items():
            write_synced(tmp / file_name, data)
        fsync_dir(tmp)
        _rename_into_place(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    write_atomically(run_dir / LATEST_FILE, f"{name}\n".encode())
    _clean_up(run_dir, keep=final, keep_last=keep_last)
    return final


def _rename_into_place(tmp: Path, final: Path) -> None:
    """Give the complete directory `tmp` the name `final`, never deleting an old `final` first."""
    if not final.exists():
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    _remove(old)
    os.rename(final, old)  # a kill from here ...
    os.rename(tmp, final)  # ... to here leaves the complete old version at `old` (see find_latest)
    fsync_dir(final.parent)
    _remove(old)


def _clean_up(run_dir: Path, keep: Path, keep_last: int | None) -> None:
    """Remove leftovers of killed saves, restore set-aside checkpoints, prune old checkpoints."""
    for entry in sorted(run_dir.iterdir()):
        if entry.name.startswith(TEMPORARY_PREFIX) and not owned_by_a_live_process(entry.name):
            _remove(entry)
        old = _OLD_DIR.fullmatch(entry.name)
        if old and not owned_by_a_live_process(entry.name):
            original = run_dir / checkpoint_name(int(old.group(1)))
            if original.exists():
                _remove(entry)
            else:
                os.rename(entry, original)
    if keep_last is not None:
        checkpoints = sorted(_step_dirs(run_dir), key=_step_of, reverse=True)
        for path in checkpoints[keep_last:]:
            if path != keep:
                trash = temporary_sibling(run_dir / f"pruned-{path.name}")
                os.rename(path, trash)  # never a half-deleted `step-*` directory
                _remove(trash)
    fsync_dir(run_dir)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def find_latest(run_dir, flag: str = "--resume") -> Path | None:
    """The checkpoint `run_dir/latest` names; without `latest`, the highest `step-*`; else None.

    Raises CheckpointError when `latest` exists but names nothing usable; its fix names `flag`, the
    command's argument that takes a checkpoint.
    """
    run_dir = Path(run_dir)
    latest = run_dir / LATEST_FILE
    if kind_of(latest) is None:
        steps = sorted(_step_dirs(run_dir), key=_step_of)
        return steps[-1] if steps else None
    fix = f"delete {latest} to fall back to the newest step-* folder, or give {flag} a checkpoint folder"
    try:
        name = read_regular_file(latest, 1024, "'latest'").decode("utf-8").strip()
    except (FileProblem, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read 'latest' ({error})", latest, fix) from None
    if not _STEP_DIR.fullmatch(name):
        raise CheckpointError(f"'latest' should name a step-NNNNNNNN directory, it holds {name[:40]!r}", latest, fix)
    if (run_dir / name).is_dir():
        return run_dir / name
    # A save re-writing this step was killed between its two renames: the old one is set aside.
    set_aside = sorted(p for p in run_dir.glob(f".old-{name}-*") if p.is_dir())
    if set_aside:
        return set_aside[-1]
    raise CheckpointError(f"'latest' names {name}, which does not exist", latest, fix)


def resolve(path: Path, checkpoint_files: tuple, flag: str) -> Path:
    """A checkpoint folder as given (one holding any of `checkpoint_files`), or the one a run
    folder's `latest` names. Messages name `flag`, the argument the path came from."""
    if not path.exists():
        # A checkpoint being replaced by a killed re-save: its complete old version (find_latest).
        set_aside = sorted(path.parent.glob(f".old-{path.name}-*"))
        if _STEP_DIR.fullmatch(path.name) and set_aside:
            return set_aside[-1]
        raise CheckpointError("no such file or folder", path, f"check the path given to {flag}")
    if not path.is_dir():
        raise CheckpointError("not a folder", path, f"give {flag} a checkpoint folder or a run folder")
    if any((path / name).exists() for name in checkpoint_files):
        return path
    latest = find_latest(path, flag)
    if latest is None:
        raise CheckpointError("no checkpoint here (no 'latest' file, no step-* folder, no state.json)", path,
                              f"check the path given to {flag}")
    return latest


def _step_dirs(run_dir: Path) -> list:
    if not run_dir.is_dir():
        return []
    return [p for p in run_dir.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]


def _step_of(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    assert match is not None, path  # only for the folders _step_dirs found by this pattern
    return int(match.group(1))
