"""Checkpoints: a folder of safetensors and JSON, written atomically, validated on load.

Three modules, each readable alone:

    format.py       one checkpoint folder: its files, how they are encoded, read back and checked
    run_folder.py   a run's folder: step-N names, atomic placement, `latest`, pruning, recovery
    messages.py     CheckpointError and the one-line descriptions of what is wrong

and here the three things callers use: `save_checkpoint`, `load_checkpoint`, `find_latest`.
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy

from ..model import LlamaConfig
from ..optim import AdamWState
from . import format, run_folder
from .format import FORMAT_VERSION, Checkpoint
from .messages import CheckpointError
from .run_folder import checkpoint_name, find_latest

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "checkpoint_name", "find_latest", "load_checkpoint",
           "save_checkpoint"]


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
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    files = format.encode(step, config=config, params=params, optimizer_state=optimizer_state, state=state,
                          tokenizer_model=tokenizer_model)
    run_dir = Path(run_dir)
    try:
        return run_folder.place(run_dir, operator.index(step), files, keep_last)
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoint: {error.strerror or error}", error.filename or run_dir,
            "choose another output directory, or make this one writable and free some space",
        ) from error


def load_checkpoint(path, *, expected_config: LlamaConfig | None = None, xp=numpy,
                    flag: str = "--resume") -> Checkpoint:
    """Load and fully validate a checkpoint folder, or the one a run folder's `latest` names.

    Every check runs before anything is returned (format.read): state.json's own checksum, each
    file's sha256, the config (and that it equals `expected_config`, if given), the step its
    folder's name gives, and each tensor's name, shape and dtype. Arrays are returned as `xp`
    arrays (NumPy by default, or CuPy). Any problem raises a one-line CheckpointError whose fix names
    `flag`, the command's argument that gave `path` (`--resume` for train, `--checkpoint` for generate).
    """
    directory = run_folder.resolve(Path(path), format.FILES, flag)
    return format.read(directory, expected_config=expected_config, expected_step=run_folder.step_named_by(directory),
                       xp=xp, flag=flag)
