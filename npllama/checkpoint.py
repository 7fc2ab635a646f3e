"""Checkpoints: a directory of safetensors and JSON, written atomically, validated on load.

On-disk format (format version 1)
---------------------------------
A checkpoint is a directory:

    config.json             LlamaConfig.to_dict() plus {"format": 1}
    model.safetensors       the parameters under Meta's names (`layers.0.attention.wq.weight`, ...),
                            all float32 or all float64, shapes as `params.parameter_shapes(config)`
    optimizer.safetensors   (optional) the AdamW moments, `m.<name>` and `v.<name>` for every
                            parameter, all float32 or all float64
    tokenizer.model         (optional) the SentencePiece model, the caller's bytes unchanged
    state.json              {"format": 1,
                             "step": the training step the checkpoint was taken at,
                             "optimizer_step": AdamW's step count t, or null without optimizer,
                             "state": the caller's JSON dict (schedule, RNG and sampler state,
                                      data fingerprint, ...), returned unchanged by load,
                             "checksums": {file name: sha256 hex} for every other file above,
                             "self_sha256": sha256 of this document without this key, serialised
                                      as json.dumps(doc, sort_keys=True, separators=(",", ":"))}

Nothing is pickled: safetensors holds only a JSON header and raw little-endian arrays, the rest
is JSON, so loading a checkpoint can never run code.

A training run's directory holds numbered checkpoints and a pointer to the newest one:

    run_dir/step-00000100/   run_dir/step-00000200/   run_dir/latest  ("step-00000200\\n")

Why a kill at any instant leaves the previous checkpoint loadable
-----------------------------------------------------------------
(For one writer per run directory; two processes saving into the same one are not supported.)

1. Nothing is written in place under a final name. `save_checkpoint` writes every file into a
   temporary sibling `run_dir/.tmp-step-N-<pid>/`, fsyncs each file and then the directory, and
   only then renames the directory to `step-N`. rename(2) is atomic: the name `step-N` appears
   with all its contents or not at all. The run directory is fsynced so the rename is on disk
   before anything refers to it (fsync guards against power loss; a killed process loses nothing
   the kernel already has).
2. `latest` is replaced the same way: a fsynced temporary file, `os.replace` (atomic), a fsync of
   the run directory. So `latest` only ever names a directory that was complete before `latest`
   changed; a kill before the replace leaves it naming the previous checkpoint.
3. Old checkpoints are deleted only after `latest` names the new one, and they are first renamed
   to `.tmp-...`, so a half-deleted directory never carries a `step-*` name.
4. Re-saving a step that exists (a re-run) keeps the old directory until the new one is complete:
   the old one is renamed to `.old-step-N-<pid>`, the new one takes the name `step-N`, and only
   then is the old one deleted. A kill between those two renames leaves `latest` naming a missing
   `step-N` whose complete old version is `.old-step-N-<pid>`: `find_latest` falls back to it and
   the next save renames it back.
5. Leftovers of a kill are never read as checkpoints (`.tmp-*`) or only as in 4 (`.old-*`); the
   next save removes them, or puts an `.old-*` back, unless the process that made them still runs.

Atomicity cannot catch corruption at rest, truncation by a copy, or hand edits: the checksums do.
`load_checkpoint` verifies state.json's own checksum, every file's sha256, the config, and every
tensor's name, shape and dtype before it returns anything, and reports the first problem as a
`CheckpointError` of one line: what is wrong, in which file, and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy
import safetensors.numpy
from safetensors import safe_open

from .backend import to_host
from .errors import NpllamaError, few
from .files import fsync_dir
from .model import LlamaConfig
from .optim import AdamWState
from .params import parameter_shapes

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "find_latest", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.model"
LATEST_FILE = "latest"
CHECKSUMMED_FILES = (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE)

_STEP_DIR = re.compile(r"step-(\d{8,})")
_OLD_DIR = re.compile(r"\.old-step-(\d{8,})-\d+")  # a checkpoint set aside while its step is re-saved
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointError(NpllamaError):
    """A checkpoint that cannot be used. The message is one line: what, where, how to fix it."""

    def __init__(self, what: str, where, fix: str):
        self.what, self.where, self.fix = what, Path(where), fix
        super().__init__(" ".join(f"checkpoint {where}: {what}; {fix}".split()))


@dataclass
class Checkpoint:
    config: LlamaConfig
    params: dict
    optimizer_state: AdamWState | None
    state: dict
    tokenizer_model: bytes | None
    path: Path
    step: int


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    run_dir,
    step: int,
    *,
    config: LlamaConfig,
    params: dict,
    optimizer_state: AdamWState | None = None,
    state: dict | None = None,
    tokenizer_model: bytes | None = None,
    keep_last: int | None = 2,
) -> Path:
    """Write `run_dir/step-<step>/` atomically, point `run_dir/latest` at it, prune, return it.

    Arrays may be NumPy or CuPy (copied to the host). `state` must be a JSON-serialisable dict
    (NumPy scalars are converted); if it has a "step" it must equal `step`. `keep_last` keeps the
    checkpoints with the highest steps, always including the one just written (None keeps all).
    Invalid arguments raise ValueError before anything is written. An OSError (a directory that
    cannot be written, a full disk) becomes a one-line CheckpointError; the checkpoints already
    there are left as they were.
    """
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"save_checkpoint: config must be a LlamaConfig, got {type(config).__name__}")
    state = {} if state is None else state
    if not isinstance(state, dict):
        raise ValueError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    if "step" in state and state["step"] != step:
        raise ValueError(f"save_checkpoint: state['step'] is {state['step']!r} but step is {step}")
    if tokenizer_model is not None and not isinstance(tokenizer_model, (bytes, bytearray)):
        raise ValueError("save_checkpoint: tokenizer_model must be bytes (the tokenizer.model file)")

    files = {MODEL_FILE: safetensors.numpy.save(_host_tensors(params, config))}
    if optimizer_state is not None:
        moments = {f"m.{name}": a for name, a in optimizer_state.m.items()}
        moments.update({f"v.{name}": a for name, a in optimizer_state.v.items()})
        files[OPTIMIZER_FILE] = safetensors.numpy.save(_host_tensors(moments, config, optimizer=True))
    if tokenizer_model is not None:
        files[TOKENIZER_FILE] = bytes(tokenizer_model)
    files[CONFIG_FILE] = _json_bytes({"format": FORMAT_VERSION, **config.to_dict()})
    document = {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer_step": None if optimizer_state is None else int(optimizer_state.step),
        "state": json.loads(_json_bytes(state)),  # fails here, before any write, if not JSON
        "checksums": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    document["self_sha256"] = _self_sha256(document)
    files[STATE_FILE] = _json_bytes(document)  # last: a directory without it is visibly unfinished

    run_dir = Path(run_dir)
    name = checkpoint_name(step)
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
        try:
            for file_name, data in files.items():
                _write_synced(tmp / file_name, data)
            fsync_dir(tmp)
            _rename_into_place(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        _write_latest(run_dir, name)
        _clean_up(run_dir, keep=final, keep_last=keep_last)
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoint: {error.strerror or error}", error.filename or run_dir,
            "choose another output directory, or make this one writable and free some space",
        ) from error
    return final


def _host_tensors(arrays: dict, config: LlamaConfig, optimizer: bool = False) -> dict:
    """NumPy, C-contiguous copies (safetensors writes raw memory) after checking names and shapes."""
    if not isinstance(arrays, dict):
        raise ValueError(f"save_checkpoint: expected a dict of arrays, got {type(arrays).__name__}")
    host = {name: numpy.ascontiguousarray(to_host(a)) for name, a in arrays.items()}
    problem = _tensor_problem(
        {name: (a.shape, a.dtype.name) for name, a in host.items()}, _expected_shapes(config, optimizer)
    )
    if problem:
        what = "optimizer moments" if optimizer else "params"
        raise ValueError(f"save_checkpoint: {what} do not fit the config: {problem}")
    return host


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


def _write_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f".tmp-{LATEST_FILE}-{os.getpid()}"
    _write_synced(tmp, f"{name}\n".encode())
    os.replace(tmp, run_dir / LATEST_FILE)
    fsync_dir(run_dir)


def _clean_up(run_dir: Path, keep: Path, keep_last: int | None) -> None:
    """Remove leftovers of killed saves, restore set-aside checkpoints, prune old checkpoints."""
    for entry in sorted(run_dir.iterdir()):
        if entry.name.startswith(".tmp-") and not _owned_by_another_live_process(entry.name):
            _remove(entry)
        old = _OLD_DIR.fullmatch(entry.name)
        if old and not _owned_by_another_live_process(entry.name):
            original = run_dir / checkpoint_name(int(old.group(1)))
            if original.exists():
                _remove(entry)
            else:
                os.rename(entry, original)
    if keep_last is not None:
        checkpoints = sorted(_step_dirs(run_dir), key=_step_of, reverse=True)
        for path in checkpoints[keep_last:]:
            if path != keep:
                trash = run_dir / f".tmp-pruned-{path.name}-{os.getpid()}"
                os.rename(path, trash)  # never a half-deleted `step-*` directory
                _remove(trash)
    fsync_dir(run_dir)


def _owned_by_another_live_process(name: str) -> bool:
    """True for `.tmp-...-<pid>` / `.old-...-<pid>` of a running process other than this one."""
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


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _json_bytes(value) -> bytes:
    def convert(obj):
        if isinstance(obj, numpy.generic):
            return obj.item()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        return (json.dumps(value, indent=2, allow_nan=False, default=convert) + "\n").encode()
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_checkpoint: state must be plain JSON (finite numbers): {error}") from None


def _self_sha256(document: dict) -> str:
    body = {key: value for key, value in document.items() if key != "self_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Finding and loading


def find_latest(run_dir) -> Path | None:
    """The checkpoint `run_dir/latest` names; without `latest`, the highest `step-*`; else None.

    Raises CheckpointError when `latest` exists but names nothing usable.
    """
    run_dir = Path(run_dir)
    latest = run_dir / LATEST_FILE
    if not latest.is_file():
        steps = sorted(_step_dirs(run_dir), key=_step_of)
        return steps[-1] if steps else None
    fix = f"delete {latest} to fall back to the newest step-* directory, or pass --resume with a checkpoint"
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
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


def load_checkpoint(path, *, expected_config: LlamaConfig | None = None, xp=numpy) -> Checkpoint:
    """Load and fully validate a checkpoint directory, or the one a run directory's `latest` names.

    Every check runs before anything is returned: state.json's own checksum, each file's sha256,
    the config (and that it equals `expected_config`, if given), and each tensor's name, shape and
    dtype. Arrays are returned as `xp` arrays (NumPy by default, or CuPy). Any problem raises a
    one-line CheckpointError.
    """
    directory = _resolve(Path(path))
    fix = f"delete {directory} or pass --resume with another checkpoint"

    document = _read_state(directory, fix)
    for file_name, expected in document["checksums"].items():
        file = directory / file_name
        if not file.is_file():
            raise CheckpointError("file is missing", file, fix)
        actual = _sha256_file(file)
        if actual != expected:
            raise CheckpointError(
                f"file is corrupted or truncated (its sha256 is {actual[:12]}..., "
                f"{STATE_FILE} records {expected[:12]}...)", file, fix,
            )

    config = _read_config(directory / CONFIG_FILE, fix)
    if expected_config is not None and config != expected_config:
        theirs, ours = config.to_dict(), expected_config.to_dict()
        differences = ", ".join(
            f"checkpoint has {key}={theirs[key]!r}, this run has {key}={ours[key]!r}"
            for key in theirs if theirs[key] != ours[key]
        )
        raise CheckpointError(
            f"checkpoint of another model ({differences})", directory / CONFIG_FILE,
            "run with the checkpoint's model settings, or pass --resume with a checkpoint of this model",
        )

    params = _read_tensors(directory / MODEL_FILE, _expected_shapes(config), fix, xp)
    optimizer_state = None
    if document["optimizer_step"] is not None:
        moments = _read_tensors(directory / OPTIMIZER_FILE, _expected_shapes(config, optimizer=True), fix, xp)
        optimizer_state = AdamWState(
            m={name: moments[f"m.{name}"] for name in params},
            v={name: moments[f"v.{name}"] for name in params},
            step=document["optimizer_step"],
        )
    tokenizer_model = None
    if TOKENIZER_FILE in document["checksums"]:
        tokenizer_model = (directory / TOKENIZER_FILE).read_bytes()
    return Checkpoint(
        config=config, params=params, optimizer_state=optimizer_state, state=document["state"],
        tokenizer_model=tokenizer_model, path=directory, step=document["step"],
    )


def _resolve(path: Path) -> Path:
    """A checkpoint directory as given, or the one a run directory's `latest` names."""
    if not path.exists():
        # A checkpoint being replaced by a killed re-save: its complete old version (find_latest).
        set_aside = sorted(path.parent.glob(f".old-{path.name}-*"))
        if _STEP_DIR.fullmatch(path.name) and set_aside:
            return set_aside[-1]
        raise CheckpointError("no such file or directory", path, "check the path, or start without --resume")
    if not path.is_dir():
        raise CheckpointError("not a directory", path, "pass a checkpoint directory or a run directory")
    if any((path / name).exists() for name in (STATE_FILE, *CHECKSUMMED_FILES)):
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(
            "no checkpoint here (no 'latest' file, no step-* directory, no state.json)", path,
            "check the path, or start without --resume",
        )
    return latest


def _read_state(directory: Path, fix: str) -> dict:
    file = directory / STATE_FILE
    if not file.is_file():
        raise CheckpointError("file is missing (an unfinished or damaged checkpoint)", file, fix)
    try:
        document = json.loads(file.read_bytes())
    except (ValueError, OSError) as error:
        raise CheckpointError(f"not valid JSON ({error})", file, fix) from None
    if not isinstance(document, dict):
        raise CheckpointError("not a JSON object", file, fix)
    if document.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"format {document.get('format')!r}, this npllama reads format {FORMAT_VERSION}",
            file, "load it with the npllama version that wrote it",
        )
    if document.get("self_sha256") != _self_sha256(document):
        raise CheckpointError("file is corrupted (its contents do not match its self_sha256)", file, fix)
    checksums = document.get("checksums")
    if not (
        isinstance(checksums, dict) and set(checksums) <= set(CHECKSUMMED_FILES)
        and {CONFIG_FILE, MODEL_FILE} <= set(checksums)
        and isinstance(document.get("state"), dict)
        and isinstance(document.get("step"), int)
        and (document.get("optimizer_step") is None) == (OPTIMIZER_FILE not in checksums)
    ):
        raise CheckpointError("step, optimizer_step, state or checksums missing or malformed", file, fix)
    named = _STEP_DIR.fullmatch(directory.name) or _OLD_DIR.fullmatch(directory.name)
    if named and int(named.group(1)) != document["step"]:
        raise CheckpointError(f"says step {document['step']}, unlike the directory's name", file, fix)
    return document


def _read_config(file: Path, fix: str) -> LlamaConfig:
    try:
        fields = json.loads(file.read_bytes())
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise CheckpointError(f"not a JSON object ({error})", file, fix) from None
    version = fields.pop("format", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"format {version!r}, this npllama reads format {FORMAT_VERSION}",
            file, "load it with the npllama version that wrote it",
        )
    try:
        return LlamaConfig(**fields)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"not a valid LlamaConfig ({error})", file, fix) from None


def _read_tensors(file: Path, expected: dict, fix: str, xp) -> dict:
    """Check the safetensors header against `expected` (name -> shape), then read the arrays."""
    try:
        with safe_open(file, framework="np") as f:
            header = {}
            for name in f.keys():
                tensor = f.get_slice(name)
                dtype = tensor.get_dtype()
                header[name] = (tuple(tensor.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype))
            problem = _tensor_problem(header, expected)
            if problem:
                raise CheckpointError(problem, file, fix)
            return {name: xp.asarray(f.get_tensor(name)) for name in expected}
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises SafetensorError, OSError, ... on a bad file
        raise CheckpointError(f"not a valid safetensors file ({error})", file, fix) from None


def _expected_shapes(config: LlamaConfig, optimizer: bool = False) -> dict:
    shapes = parameter_shapes(config)
    if not optimizer:
        return shapes
    return {f"{moment}.{name}": shape for moment in ("m", "v") for name, shape in shapes.items()}


def _tensor_problem(found: dict, expected: dict) -> str | None:
    """What is wrong with `found` (name -> (shape, dtype name)) given `expected` (name -> shape)."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {few(unexpected)}")
        return " and ".join(parts)
    for name, shape in expected.items():
        if tuple(found[name][0]) != tuple(shape):
            return f"{name} has shape {tuple(found[name][0])}, this config needs {tuple(shape)}"
    dtypes = {}
    for name, (_, dtype) in found.items():
        dtypes.setdefault(dtype, []).append(name)
    for dtype, names in dtypes.items():
        if dtype not in ("float32", "float64"):
            return f"{few(names)} {'is' if len(names) == 1 else 'are'} {dtype}; checkpoints hold float32 or float64"
    if len(dtypes) > 1:
        return "mixed dtypes: " + ", ".join(f"{dtype} ({few(names)})" for dtype, names in dtypes.items())
    return None


def _step_dirs(run_dir: Path) -> list:
    if not run_dir.is_dir():
        return []
    return [p for p in run_dir.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
