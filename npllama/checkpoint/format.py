"""One checkpoint folder: what it holds, how it is encoded, and how it is read back and checked.

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

Atomicity (run_folder.py) cannot catch corruption at rest, truncation by a copy, or hand edits:
the checksums do. `read` verifies state.json's own checksum, every file's sha256, the config, and
every tensor's name, shape and dtype before it returns anything, and reports the first problem
as a `CheckpointError` of one line: what is wrong, in which file, and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy
import safetensors.numpy
from safetensors import safe_open

from ..backend import to_host
from ..files import FileProblem, kind_of, read_regular_file
from ..model import LlamaConfig
from ..optim import AdamWState
from ..params import parameter_shapes
from .messages import CheckpointError, config_differences, tensor_problem

FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKSUMMED_FILES = (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE)
FILES = (STATE_FILE, *CHECKSUMMED_FILES)

# state.json holds the sampler's and the caller's state (kilobytes), config.json a dozen numbers
MAX_JSON_BYTES = 16 * 2**20
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class Checkpoint:
    config: LlamaConfig
    params: dict
    optimizer_state: AdamWState | None
    state: dict
    tokenizer_model: bytes | None
    path: Path
    step: int


# ---------------------------------------------------------------------------------------------
# Saving


def encode(
    step: int,
    *,
    config: LlamaConfig,
    params: dict,
    optimizer_state: AdamWState | None = None,
    state: dict | None = None,
    tokenizer_model: bytes | None = None,
) -> dict:
    """The checkpoint's files, {file name: bytes}, with state.json (and its checksums) last.

    Arrays may be NumPy or CuPy (copied to the host). `state` must be a JSON-serialisable dict
    (NumPy scalars are converted); if it has a "step" it must equal `step`. Invalid arguments
    raise ValueError; nothing is written here.
    """
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
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
    return files


def _host_tensors(arrays: dict, config: LlamaConfig, optimizer: bool = False) -> dict:
    """NumPy, C-contiguous copies (safetensors writes raw memory) after checking names and shapes."""
    if not isinstance(arrays, dict):
        raise ValueError(f"save_checkpoint: expected a dict of arrays, got {type(arrays).__name__}")
    host = {name: numpy.ascontiguousarray(to_host(a)) for name, a in arrays.items()}
    problem = tensor_problem(
        {name: (a.shape, a.dtype.name) for name, a in host.items()}, _expected_shapes(config, optimizer)
    )
    if problem:
        what = "optimizer moments" if optimizer else "params"
        raise ValueError(f"save_checkpoint: {what} do not fit the config: {problem}")
    return host


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
# Reading


def read(directory: Path, *, expected_config: LlamaConfig | None = None, expected_step: int | None = None,
         xp=numpy, flag: str = "--resume") -> Checkpoint:
    """Read and fully validate the checkpoint folder `directory`.

    Every check runs before anything is returned: state.json's own checksum, each file's sha256,
    the config (and that it equals `expected_config`, if given), the step (that it equals
    `expected_step`, the one the folder's name gives, if any), and each tensor's name, shape and
    dtype. Arrays are returned as `xp` arrays (NumPy by default, or CuPy). Any problem raises a
    one-line CheckpointError, whose fix names `flag`, the argument the folder came from.
    """
    fix = f"delete {directory}, or give {flag} another checkpoint"

    document = _read_state(directory, fix)
    if expected_step is not None and expected_step != document["step"]:
        raise CheckpointError(f"says step {document['step']}, unlike the directory's name", directory / STATE_FILE,
                              fix)
    for file_name, expected in document["checksums"].items():
        file = directory / file_name
        kind = kind_of(file)
        if kind is None:
            raise CheckpointError("file is missing", file, fix)
        if kind != "regular file":  # hashing a FIFO or a device could block, or never end
            raise CheckpointError(f"it is a {kind}, not a regular file", file, fix)
        actual = _sha256_file(file)
        if actual != expected:
            raise CheckpointError(
                f"file is corrupted or truncated (its sha256 is {actual[:12]}..., "
                f"{STATE_FILE} records {expected[:12]}...)", file, fix,
            )

    config = _read_config(directory / CONFIG_FILE, fix)
    if expected_config is not None and config != expected_config:
        raise CheckpointError(
            f"checkpoint of another model ({config_differences(config.to_dict(), expected_config.to_dict())})",
            directory / CONFIG_FILE,
            f"run with the checkpoint's model settings, or give {flag} a checkpoint of this model",
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


def _read_state(directory: Path, fix: str) -> dict:
    file = directory / STATE_FILE
    if kind_of(file) is None:
        raise CheckpointError("file is missing (an unfinished or damaged checkpoint)", file, fix)
    try:
        document = json.loads(_read_small(file, fix))
    except (ValueError, RecursionError) as error:
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
    return document


def _read_small(file: Path, fix: str) -> bytes:
    """A JSON file of the checkpoint, read only if it is a regular file of at most MAX_JSON_BYTES."""
    try:
        return read_regular_file(file, MAX_JSON_BYTES, "checkpoint file")
    except FileProblem as problem:
        raise CheckpointError(problem.problem, file, fix) from None


def _read_config(file: Path, fix: str) -> LlamaConfig:
    try:
        fields = json.loads(_read_small(file, fix))
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as error:
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
            problem = tensor_problem(header, expected)
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
