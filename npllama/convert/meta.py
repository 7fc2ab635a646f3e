"""Meta's original Llama layout: `params.json`, `consolidated.00.pth` ... `consolidated.NN.pth`
(one file per model-parallel rank) and `tokenizer.model` (beside them or one folder up).

Each rank holds a slice of every matrix, cut the way Meta's model-parallel layers cut it:

    ColumnParallelLinear (wq, wk, wv, w1, w3, output)   rows (the output features): axis 0
    RowParallelLinear (wo, w2)                          columns (the input features): axis 1
    ParallelEmbedding (tok_embeddings)                  columns (the model dim): axis 1
    RMSNorm gains                                       whole on every rank

so the import concatenates each tensor's slices along its axis, in rank order, and checks that
the norm gains agree. The .pth files are read by npllama/convert/pth.py: without torch, and without
running any code a pickle might hold. Meta's layout is npllama's own (names, RoPE), so nothing is
permuted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy

from ..files import named_file_inside
from ..model import LlamaConfig, RopeScaling
from ..params import EMBEDDING, LAYER_SUFFIXES, NORM, TOK_EMBEDDINGS, layer_name, parameter_table
from . import ConvertError
from .hf import MAX_JSON_BYTES, Imported, read_json_object
from .pth import read_pth

PARAMS_FILE = "params.json"
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
TOKENIZER_FILE = "tokenizer.model"
ROW_PARALLEL = (LAYER_SUFFIXES["wo"], LAYER_SUFFIXES["w2"])  # cut along their columns
DEFAULT_MAX_SEQ_LEN = 2048  # Llama-1's context; params.json does not state it


def is_meta_directory(directory: Path) -> bool:
    return (directory / PARAMS_FILE).is_file() and any(SHARD_PATTERN.fullmatch(p.name) for p in directory.iterdir())


def _shards(directory: Path) -> list[Path]:
    ranks = sorted((int(match.group(1)), path) for path in directory.iterdir()
                   if (match := SHARD_PATTERN.fullmatch(path.name)))
    for expected, rank in enumerate(rank for rank, _ in ranks):
        if rank != expected:
            missing = directory / f"consolidated.{expected:02d}.pth"
            raise ConvertError(missing, f"missing shard (found {len(ranks)} shards up to rank {ranks[-1][0]})",
                               "download every consolidated.NN.pth of the model")
    return [path for _, path in ranks]


def _concat_axis(name: str, role: str) -> int | None:
    """The axis a tensor is cut along across ranks, or None for one held whole by every rank."""
    if role == NORM:
        return None
    if role == EMBEDDING or name.endswith(ROW_PARALLEL):
        return 1
    return 0


def _read_params_json(file: Path) -> dict:
    fields = read_json_object(file, MAX_JSON_BYTES, "params.json")
    for name in ("dim", "n_layers", "n_heads"):
        if name not in fields:
            raise ConvertError(file, f"missing field {name!r}", "is this Meta's params.json?")
    return fields


def _rope_scaling(fields: dict):
    """Llama 3.1's `use_scaled_rope`: Meta's apply_scaling, factor 8 (or `rope_scaling_factor`),
    low and high frequency factors 1 and 4 (or `high_freq_factor`), over an original 8192 positions."""
    if not fields.get("use_scaled_rope"):
        return None
    return RopeScaling("llama3", factor=float(fields.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0,
                       high_freq_factor=float(fields.get("high_freq_factor", 4.0)),
                       original_max_position_embeddings=8192)


def import_meta(directory, dtype=None) -> Imported:
    """The model in a Meta-layout directory, its shards merged."""
    directory = Path(directory)
    fields = _read_params_json(named_file_inside(directory, PARAMS_FILE, "params in"))
    paths = [named_file_inside(directory, path.name, "a shard in") for path in _shards(directory)]
    shards = [read_pth(path) for path in paths]
    for path, shard in zip(paths, shards):
        if not isinstance(shard, dict) or TOK_EMBEDDINGS not in shard:
            raise ConvertError(path, f"not a state dict of Meta's names (no {TOK_EMBEDDINGS})",
                               "is this Meta's consolidated checkpoint?")
    layers = {int(name.split(".")[1]) for name in shards[0] if re.fullmatch(r"layers\.\d+\..+", name)}
    if fields["n_layers"] != len(layers):
        raise ConvertError(directory / PARAMS_FILE, f"n_layers is {fields['n_layers']!r:.40}, the shards hold "
                           f"{len(layers)} layers", "the weights and params.json disagree")
    embedding = numpy.concatenate([shard[TOK_EMBEDDINGS] for shard in shards], axis=1)
    w1_rows = sum(shard[layer_name(0, "w1")].shape[0] for shard in shards)  # the FFN width, as the weights say
    vocab = fields.get("vocab_size", -1)
    try:
        config = LlamaConfig(dim=fields["dim"], n_layers=fields["n_layers"], n_heads=fields["n_heads"],
                             n_kv_heads=fields.get("n_kv_heads"), rope_scaling=_rope_scaling(fields),
                             vocab_size=vocab if vocab != -1 else embedding.shape[0],
                             norm_eps=fields.get("norm_eps", 1e-6), rope_theta=fields.get("rope_theta", 10000.0),
                             max_seq_len=fields.get("max_seq_len", DEFAULT_MAX_SEQ_LEN),
                             multiple_of=fields.get("multiple_of", 256), hidden_dim=w1_rows)
    except (TypeError, ValueError, KeyError) as error:
        raise ConvertError(directory / PARAMS_FILE, f"not a valid Llama configuration ({error})",
                           "check its fields") from None
    params = {}
    for name, spec in parameter_table(config).items():
        for path, shard in zip(paths, shards):
            if name not in shard:
                raise ConvertError(path, f"missing tensor {name!r}", "the shard is incomplete; re-download it")
        axis = _concat_axis(name, spec.role)
        if axis is None:
            merged = shards[0][name]
            for path, shard in zip(paths[1:], shards[1:]):
                if shard[name].shape != merged.shape or not numpy.array_equal(shard[name], merged):
                    raise ConvertError(path, f"tensor {name!r} differs from rank 0's, though every rank holds it "
                                       "whole", "the shards come from different models")
        else:
            try:
                merged = numpy.concatenate([shard[name] for shard in shards], axis=axis)
            except ValueError as error:
                raise ConvertError(directory, f"the shards' slices of {name!r} do not fit together ({error})",
                                   "the shards come from different models") from None
        if merged.shape != spec.shape:
            raise ConvertError(directory, f"tensor {name!r} merges to shape {merged.shape}, params.json implies "
                               f"{spec.shape}", "the weights and params.json disagree")
        params[name] = merged if dtype is None else merged.astype(dtype)
    # beside the shards, or one folder up (Meta's download: llama-2-7b/ beside tokenizer.model), and
    # there too a regular file, or a link that stays in that folder
    beside = next((folder for folder in (directory, directory.parent) if os.path.lexists(folder / TOKENIZER_FILE)),
                  None)
    tokenizer = None if beside is None else named_file_inside(beside, TOKENIZER_FILE, "tokenizer in")
    return Imported(config, params, tokenizer)
