"""Durable file writes shared by the tokenizer, the token cache, the training log and checkpoints,
the lock that makes one process the only writer of a run folder, and where npllama keeps its caches.

Every temporary file or folder npllama writes is named `.tmp-<final name>-<pid>` beside its final
name (`temporary_sibling`), so that whoever finds one later can tell a leftover of a process that
died (delete it) from the work of a process still running (leave it): `owned_by_a_live_process`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import NpllamaError

TEMPORARY_PREFIX = ".tmp-"
LOCK_FILE = ".lock"


class FileProblem(NpllamaError):
    """A file that cannot be read as one: missing, not a regular file, or larger than such a file can be.

    `problem` is what is wrong, without the file's name or the fix (for callers with messages of their own).
    """

    def __init__(self, what: str, path: Path, problem: str, fix: str):
        self.problem = problem
        super().__init__(f"{what} {path}: {problem}; {fix}")


def kind_of(path: Path) -> str | None:
    """What `path` is ("regular file", "folder", "FIFO", "character device", ...), following links;
    None when nothing is there (or nothing can be: one of its folders is a file)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there, or a file where a folder should be
        return None
    except OSError as error:
        return f"unreadable entry ({error.strerror})"
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def regular_file_problem(path: Path) -> str | None:
    """None when `path` is a regular file, else what is wrong: "no such file" or "it is a FIFO, not a
    regular file" (a folder, a device, ...), for the caller's one-line error."""
    kind = kind_of(path)
    if kind == "regular file":
        return None
    return "no such file" if kind is None else f"it is a {kind}, not a regular file"


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes; else a one-line
    FileProblem naming `what` (the flag or role of the file, e.g. "--tokenizer") and the fix.

    Never opens a FIFO or a device (which could block or never end) and never reads more than
    `limit` + 1 bytes, even from a file that grows while it is read.
    """
    path = Path(path)
    problem = regular_file_problem(path)
    if problem is not None:
        raise FileProblem(what, path, problem, "check the path" if problem == "no such file" else "pass a file")
    too_large = FileProblem(what, path, f"larger than {limit:,} bytes, more than such a file can be",
                            "check that it is the right file")
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise too_large
            data = file.read(size + 1)  # a read of n bytes sets n aside first: the size, not the limit
            if len(data) > size:  # the file grew since: read on, to one byte past the limit
                data += file.read(limit + 1 - len(data))
    except OSError as error:
        raise FileProblem(what, path, f"cannot read it ({error.strerror})", "check its permissions") from None
    if len(data) > limit:
        raise too_large
    return data


def named_file_inside(folder: Path, name, what: str) -> Path:
    """`folder / name` for a file name another file gave (a shard in an index), refused in one line
    (FileProblem) unless it stays in `folder`: a relative name without "..", naming a regular file,
    which may be a link only to a file inside `folder` or, in a Hugging Face cache snapshot
    (`.../snapshots/<revision>/`), to its repository's `blobs/`. The message names the path and
    never shows bytes of a file it should not have opened."""
    folder = Path(folder)
    parts = Path(name).parts if isinstance(name, str) and name and "\0" not in name else None
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise FileProblem(what, folder, f"names {name!r:.120}, which is not a file name inside the folder",
                          "a model's files name only files beside them")
    path = folder / name
    problem = regular_file_problem(path)
    if problem is not None:
        raise FileProblem(what, path, problem, "check that every file the model names is there")
    root = folder.resolve()
    roots = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    target = path.resolve()
    if not any(target.is_relative_to(allowed) for allowed in roots):
        raise FileProblem(what, path, f"a link to {target}, outside the model's folder",
                          "copy the file into the folder instead of linking it")
    return path


class FolderInUse(Exception):
    """Another process holds a folder's lock; `holder` is its process id as it wrote it (or "")."""

    def __init__(self, folder: Path, holder: str):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder} is locked by process {holder or '(unknown)'}")


@contextlib.contextmanager
def exclusive_lock(folder: Path):
    """Hold an exclusive lock on `folder` for the duration of the block, or raise FolderInUse.

    The lock is flock(2) on `folder/.lock`, which holds the holder's process id. The kernel
    releases it when the process ends, however it ends (SIGKILL included), so a lock is never
    stale; the file stays behind and the next holder rewrites it. Two locks of one process on the
    same folder also exclude each other (flock binds to the open file, not to the process). Where
    flock does not exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(folder, os.read(fd, 32).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def temporary_sibling(path: Path, process: int | None = None) -> Path:
    """`.tmp-<name>-<pid>` in `path`'s folder: where this process prepares `path` before renaming it."""
    path = Path(path)
    return path.parent / f"{TEMPORARY_PREFIX}{path.name}-{os.getpid() if process is None else process}"


def cannot_create_in(folder: Path) -> str | None:
    """None when a file can be created in `folder`, else why not ("Permission denied", "Read-only
    file system"). Tried, not guessed from permission bits: a temporary file is made and removed,
    so root, who may write where the bits say no, is answered truly by a read-only mount or /sys."""
    probe = temporary_sibling(Path(folder) / "probe")
    try:
        probe.open("xb").close()
    except FileExistsError:  # another probe of this process, left by a kill: the folder takes files
        return None
    except OSError as error:
        return error.strerror or str(error)
    probe.unlink(missing_ok=True)
    return None


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (not atomic by itself: for files in a temporary folder)."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    with writing_atomically(path) as file:
        file.write(data)


@contextlib.contextmanager
def writing_atomically(path: Path):
    """A file to write `path` through, bit by bit: it is the temporary sibling, fsynced and renamed
    over `path` (atomic) when the block ends, then the folder is fsynced so the rename is durable.
    An error (or a kill) in the block leaves `path` as it was; the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
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


def default_cache_dir() -> Path:
    """$NPLLAMA_CACHE, else $XDG_CACHE_HOME/npllama, else ~/.cache/npllama."""
    if os.environ.get("NPLLAMA_CACHE"):
        return Path(os.environ["NPLLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "npllama"
