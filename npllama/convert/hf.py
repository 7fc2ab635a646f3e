"""Hugging Face Llama checkpoints (transformers' `LlamaForCausalLM` directories), in and out.

A directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`, and perhaps a tokenizer: `tokenizer.model` (SentencePiece), else
`tokenizer.json` (byte-level BPE, with tokenizer_config.json beside it). The config comes in two styles:
older files state `rope_theta` and `rope_scaling` (and `torch_dtype`), newer ones `rope_parameters`
(and `dtype`); RoPE scaling `linear` and `llama3` are read from either, other kinds refused.

Hugging Face's RoPE rotates halves ([x0..x(D/2-1)] against [x(D/2)..]) where Meta's rotates
interleaved pairs (x0,x1), (x2,x3), ...; the two agree once wq's and wk's rows are permuted within
each head (H = n_heads for wq, n_kv_heads for wk), which is what Meta's conversion script does on
the way in and `hf_rows_to_meta` undoes here:

    Meta -> HF:  w.reshape(H, D/2, 2, C).transpose(0, 2, 1, 3).reshape(H*D, C)
    HF -> Meta:  w.reshape(H, 2, D/2, C).transpose(0, 2, 1, 3).reshape(H*D, C)

Safetensors files are read here, not with torch: float32, float64, float16 as they are, bfloat16
widened to float32 exactly (a bfloat16 is the upper half of a float32).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy

from ..files import FileProblem, named_file_inside, read_regular_file, regular_file_problem
from ..model import LlamaConfig
from ..ops.rope import ROPE_TYPES, RopeScaling
from ..params import hf_names, parameter_shapes, rope_permuted_names
from ..tokenizer import BOS_ID, EOS_ID, Tokenizer
from ..tokenizer.bpe import BpeTokenizer
from . import ConvertError
from .pth import widen_bfloat16

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
BPE_TOKENIZER_FILE = "tokenizer.json"  # read when there is no tokenizer.model (Llama 2's folders have both)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# what Meta's Llama checkpoints on the Hub say: without it AutoTokenizer reads tokenizer.model as a
# generic tokenizer that adds no BOS, and the model would see text without the BOS it was trained with
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
                    "clean_up_tokenization_spaces": False}
SAFETENSORS_DTYPES = {"F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16, "BF16": numpy.uint16}
SAFETENSORS_INTEGER_DTYPES = {"I64": numpy.int64, "I32": numpy.int32, "I16": numpy.int16, "I8": numpy.int8,
                              "U32": numpy.uint32, "U16": numpy.uint16, "U8": numpy.uint8}  # token ids, not weights
MAX_HEADER_BYTES = 100 * 2**20
MAX_JSON_BYTES = 16 * 2**20  # config.json and the shards' index: a few KB in every real checkpoint
# buffers some older exports carry that hold nothing a model needs (recomputed from the config)
HARMLESS_EXTRAS = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Imported:
    """A checkpoint read into npllama's terms: its config, its weights under Meta's names, its tokenizer."""

    config: LlamaConfig
    params: dict
    tokenizer: Path | Tokenizer | BpeTokenizer | None  # a tokenizer.model or tokenizer.json to load, or one built


# --- config.json ------------------------------------------------------------------------------


def read_json_object(file: Path, limit: int, what: str) -> dict:
    """The JSON object in `file` (a regular file of at most `limit` bytes), or a one-line ConvertError:
    too large, not UTF-8 JSON, nested too deep, or not an object."""
    data = read_regular_file(file, limit, what)
    try:
        value = json.loads(data)
    except RecursionError:
        raise ConvertError(file, "JSON nested too deep for " + what, "re-download it") from None
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError alike
        raise ConvertError(file, f"not a readable JSON file ({error})", "is this a model directory?") from None
    if not isinstance(value, dict):
        raise ConvertError(file, f"a JSON {type(value).__name__}, not the object {what} is", "re-download it")
    return value


def config_from_hf(fields: dict, file: Path) -> LlamaConfig:
    """LlamaConfig for a Hugging Face config.json, or a ConvertError naming the field."""
    fix = "npllama implements the Llama architecture: plain RoPE, no biases"

    def need(name):
        if name not in fields:
            raise ConvertError(file, f"missing field {name!r}", "is this a Llama config.json?")
        return fields[name]

    if fields.get("model_type", "llama") != "llama":
        raise ConvertError(file, f"model_type {fields['model_type']!r} is not 'llama'", fix)
    heads = need("num_attention_heads")
    kv_heads = fields.get("num_key_value_heads", heads)
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
        raise ConvertError(file, f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}",
                           "each key/value head must serve the same number of query heads")
    for name, allowed in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if fields.get(name, allowed) != allowed:
            raise ConvertError(file, f"{name} {fields[name]!r} is not supported", fix)
    rope_theta, rope_scaling = _rope_from_hf(fields, file)
    hidden = need("hidden_size")
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if type(fields.get(name, 1)) is not int or fields.get(name, 1) < 1:
            raise ConvertError(file, f"{name} is {fields[name]!r:.40}, not a positive integer", "check its fields")
    if fields.get("head_dim") not in (None, hidden // heads if isinstance(hidden, int) and heads else None):
        raise ConvertError(file, f"head_dim {fields['head_dim']} != hidden_size / num_attention_heads", fix)
    try:
        return LlamaConfig(dim=hidden, n_layers=need("num_hidden_layers"), n_heads=heads,
                           n_kv_heads=kv_heads, tie_embeddings=fields.get("tie_word_embeddings", False),
                           vocab_size=need("vocab_size"), hidden_dim=need("intermediate_size"),
                           norm_eps=fields.get("rms_norm_eps", 1e-6),
                           max_seq_len=need("max_position_embeddings"), rope_theta=rope_theta,
                           rope_scaling=rope_scaling)
    except (TypeError, ValueError) as error:
        raise ConvertError(file, f"not a valid Llama configuration ({error})", "check its fields") from None


def _rope_from_hf(fields: dict, file: Path) -> tuple:
    """(rope_theta, RopeScaling or None) from newer files' `rope_parameters` or older ones'
    `rope_theta` and `rope_scaling` (whose type is `type` in the oldest)."""
    theta = fields.get("rope_theta", 10000.0)
    for name in ("rope_parameters", "rope_scaling"):
        rope = fields.get(name)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ConvertError(file, f"{name} {rope!r} is not a JSON object", "check its fields")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", theta)
        if rope_type == "default":
            continue
        if rope_type not in ROPE_TYPES:
            raise ConvertError(file, f"{name} has rope_type {rope_type!r}, which npllama does not implement",
                               f"npllama implements RoPE scaling {', '.join(ROPE_TYPES)}")
        factor = rope.get("factor")
        if factor is None:
            raise ConvertError(file, f"{name} has rope_type {rope_type!r} but no factor", "check its fields")
        try:
            return theta, RopeScaling(rope_type, factor, rope.get("low_freq_factor"),
                                      rope.get("high_freq_factor"), rope.get("original_max_position_embeddings"))
        except (TypeError, ValueError) as error:
            raise ConvertError(file, f"{name}: {error}", "check its fields") from None
    return theta, None


def config_to_hf(config: LlamaConfig, dtype: str, bos_id: int | None = BOS_ID, eos_id: int | None = EOS_ID) -> dict:
    """config.json for transformers: both RoPE styles' fields, so older and newer versions read it;
    the BOS and EOS ids are the tokenizer's (npllama's own SentencePiece ids by default)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": config.dim, "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": _rope_to_hf(config), "rope_scaling": _rope_to_hf(config) if config.rope_scaling else None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype, "torch_dtype": dtype,
    }


def _rope_to_hf(config: LlamaConfig) -> dict:
    scaling = config.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    fields = {key: value for key, value in asdict(scaling).items() if value is not None}
    return {**fields, "rope_theta": config.rope_theta}


# --- safetensors --------------------------------------------------------------------------------


def read_safetensors(file: Path, integers: bool = False) -> dict:
    """Every tensor of a .safetensors file as a NumPy array (bfloat16 widened to float32); weights
    are floating point, and integer tensors are read only when asked for (`integers`: token ids).

    The header is checked as the format's specification says before any tensor is made: a JSON
    object of entries with a known dtype, a shape of non-negative integers and data offsets whose
    byte count is the shape's; the entries' bytes tile the data from its first byte to its last,
    without gaps or overlaps."""
    file = Path(file)
    problem = regular_file_problem(file)
    if problem is not None:
        raise ConvertError(file, problem, "pass a .safetensors file")
    try:
        with open(file, "rb") as stream:
            size = file.stat().st_size
            header_bytes = stream.read(8)
            if len(header_bytes) != 8:
                raise ConvertError(file, "shorter than a safetensors header", "re-download or re-save it")
            (header_length,) = struct.unpack("<Q", header_bytes)
            if header_length > min(MAX_HEADER_BYTES, size - 8):
                raise ConvertError(file, f"header of {header_length} bytes in a file of {size}", "re-download it")
            header = json.loads(stream.read(header_length))
    except RecursionError:
        raise ConvertError(file, "its header is JSON nested too deep", "re-download or re-save it") from None
    except (OSError, ValueError) as error:
        raise ConvertError(file, f"not a readable safetensors file ({error})", "re-download or re-save it") from None
    if not isinstance(header, dict):
        raise ConvertError(file, "its header is not a JSON object", "re-download or re-save it")
    dtypes = {**SAFETENSORS_DTYPES, **SAFETENSORS_INTEGER_DTYPES} if integers else SAFETENSORS_DTYPES
    entries = {name: _entry(file, name, entry, dtypes) for name, entry in header.items() if name != "__metadata__"}
    _check_tiling(file, entries, size - 8 - header_length)
    data = numpy.memmap(file, dtype=numpy.uint8, mode="r", offset=8 + header_length) if size > 8 + header_length \
        else numpy.zeros(0, numpy.uint8)
    return {name: _tensor(entry, data) for name, entry in entries.items()}


def _entry(file: Path, name: str, entry, dtypes: dict) -> tuple:
    """(dtype name, shape, begin, end) of one header entry, each checked."""
    if not isinstance(entry, dict) or entry.get("dtype") not in dtypes:
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        raise ConvertError(file, f"tensor {name!r:.80} has dtype {dtype!r:.40}; npllama reads "
                           f"{', '.join(dtypes)}", "save the weights as float32, float16 or bfloat16"
                           if dtypes is SAFETENSORS_DTYPES else "save the tensors with one of those dtypes")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise ConvertError(file, f"tensor {name!r:.80}: shape {shape!r:.60} and data_offsets {offsets!r:.60} are "
                           "not lists of non-negative integers", "the file is corrupt; re-download it")
    begin, end = offsets
    itemsize = numpy.dtype(dtypes[entry["dtype"]]).itemsize
    if not 0 <= begin <= end or end - begin != math.prod(shape) * itemsize:
        raise ConvertError(file, f"tensor {name!r:.80}: offsets {begin}..{end} do not hold shape {tuple(shape)}",
                           "the file is truncated or corrupt; re-download it")
    return entry["dtype"], tuple(shape), begin, end


def _check_tiling(file: Path, entries: dict, data_bytes: int) -> None:
    """The entries' byte ranges cover the data exactly, one after another (the specification's rule)."""
    expected = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != expected:
            problem = "overlaps the tensor before it" if begin < expected else \
                f"leaves bytes {expected}..{begin} unused"
            raise ConvertError(file, f"tensor {name!r:.80} at {begin}..{end} {problem}",
                               "the file is corrupt; re-download it")
        expected = end
    if expected != data_bytes:
        raise ConvertError(file, f"its tensors hold {expected} bytes, the file {data_bytes} after its header",
                           "the file is truncated or corrupt; re-download it")


def _tensor(entry: tuple, data) -> numpy.ndarray:
    dtype_name, shape, begin, end = entry
    dtype = numpy.dtype({**SAFETENSORS_DTYPES, **SAFETENSORS_INTEGER_DTYPES}[dtype_name]).newbyteorder("<")
    array = numpy.frombuffer(data[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if dtype_name == "BF16":
        array = widen_bfloat16(array)
    return array


# --- a whole directory ---------------------------------------------------------------------------


def is_hf_directory(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and ((directory / WEIGHTS_FILE).is_file()
                                                   or (directory / INDEX_FILE).is_file())


def _weight_files(directory: Path) -> list[Path]:
    if (directory / WEIGHTS_FILE).is_file():
        return [named_file_inside(directory, WEIGHTS_FILE, "weights in")]
    index_file = named_file_inside(directory, INDEX_FILE, "index in")
    index = read_json_object(index_file, MAX_JSON_BYTES, "a safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ConvertError(index_file, "no weight_map of tensor names to file names", "re-download it")
    files = sorted(set(weight_map.values()))
    shards = []
    for name in files:
        try:
            shards.append(named_file_inside(directory, name, f"a shard {index_file.name} names in"))
        except FileProblem as problem:
            if problem.problem != "no such file":
                raise
            raise ConvertError(directory / name, f"missing shard (the index lists {len(files)})",
                               "download every shard the index names") from None
    return shards


def import_hf(directory, dtype=None) -> Imported:
    """The model in a Hugging Face directory, under Meta's names and RoPE layout."""
    directory = Path(directory)
    config_file = named_file_inside(directory, CONFIG_FILE, "config in")
    config = config_from_hf(read_json_object(config_file, MAX_JSON_BYTES, "config.json"), config_file)
    weights: dict[str, numpy.ndarray] = {}
    where: dict[str, Path] = {}
    for file in _weight_files(directory):
        for name, array in read_safetensors(file).items():
            if name in weights:
                raise ConvertError(file, f"tensor {name!r} is also in {where[name].name}",
                                   "a tensor belongs in one shard; re-download the checkpoint")
            weights[name], where[name] = array, file
    layers = {int(name.split(".")[2]) for name in weights if re.fullmatch(r"model\.layers\.\d+\..+", name)}
    if config.n_layers != len(layers):
        raise ConvertError(config_file, f"num_hidden_layers is {config.n_layers}, the weights hold {len(layers)} "
                           "layers", "the weights and config.json disagree")
    params = to_meta(weights, config, where, directory)
    if dtype is not None:
        params = {name: p.astype(dtype) for name, p in params.items()}
    present = [name for name in (TOKENIZER_FILE, BPE_TOKENIZER_FILE) if os.path.lexists(directory / name)]
    tokenizer = named_file_inside(directory, present[0], "tokenizer in") if present else None
    return Imported(config, params, tokenizer)


def to_meta(weights: dict, config: LlamaConfig, where: dict, directory: Path) -> dict:
    """Hugging Face's tensors -> Meta's names, shapes checked against the table, wq/wk rows permuted."""
    names, shapes, permuted = hf_names(config), parameter_shapes(config), rope_permuted_names(config)
    known = set(names.values())
    for name in weights:
        if name not in known and not name.endswith(HARMLESS_EXTRAS):
            raise ConvertError(where[name], f"tensor {name!r} has no place in a Llama-1 model (a bias? another "
                               "architecture?)", "npllama implements Llama-1 only")
    params = {}
    for meta_name, hf_name in names.items():
        if hf_name not in weights:
            raise ConvertError(directory, f"missing tensor {hf_name!r}", "download every shard of the checkpoint")
        array = weights[hf_name]
        if array.shape != shapes[meta_name]:
            raise ConvertError(where[hf_name], f"tensor {hf_name!r} has shape {array.shape}, the config.json "
                               f"implies {shapes[meta_name]}", "the weights and config.json disagree")
        params[meta_name] = hf_rows_to_meta(array, config) if meta_name in permuted else numpy.array(array)
    return params


def hf_rows_to_meta(weight, config):
    """wq or wk rows from Hugging Face's RoPE layout (rotate-half) to Meta's (interleaved pairs),
    head by head (n_heads heads for wq, n_kv_heads for wk)."""
    head_dim = config.head_dim
    heads = weight.shape[0] // head_dim
    return weight.reshape(heads, 2, head_dim // 2, -1).transpose(0, 2, 1, 3).reshape(weight.shape)


def meta_rows_to_hf(weight, config):
    """The inverse of hf_rows_to_meta."""
    head_dim = config.head_dim
    heads = weight.shape[0] // head_dim
    return weight.reshape(heads, head_dim // 2, 2, -1).transpose(0, 2, 1, 3).reshape(weight.shape)


def export_hf(directory, config: LlamaConfig, params: dict, tokenizer_model: bytes | None = None,
              dtype: str = "float32", special_ids: tuple[int | None, int | None] = (BOS_ID, EOS_ID)) -> Path:
    """Write a directory that transformers' LlamaForCausalLM.from_pretrained loads; `special_ids`
    are the (BOS, EOS) ids of the model's tokenizer, for config.json."""
    from safetensors.numpy import save_file

    from ..backend import to_host

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names, permuted = hf_names(config), rope_permuted_names(config)
    tensors = {}
    for meta_name, hf_name in names.items():
        weight = to_host(params[meta_name])
        weight = meta_rows_to_hf(weight, config) if meta_name in permuted else weight
        tensors[hf_name] = numpy.ascontiguousarray(weight.astype(dtype if dtype != "bfloat16" else numpy.float32))
    if dtype == "bfloat16":
        _save_bfloat16(directory / WEIGHTS_FILE, tensors)
    else:
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype, *special_ids), indent=2) + "\n")
    if tokenizer_model is not None:
        (directory / TOKENIZER_FILE).write_bytes(tokenizer_model)
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return directory


def to_bfloat16_bits(array) -> numpy.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even; NaN stays NaN."""
    bits = numpy.ascontiguousarray(array, dtype=numpy.float32).view(numpy.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(numpy.uint16)
    return numpy.where(numpy.isnan(array), numpy.uint16(0x7FC0), rounded)


def _save_bfloat16(file: Path, tensors: dict):
    """A safetensors file of BF16 tensors (NumPy has no bfloat16, so safetensors.numpy cannot write one):
    an 8-byte little-endian header length, the JSON header padded to 8 bytes, the data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name, array in tensors.items():
        data = to_bfloat16_bits(array).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(file, "wb") as stream:
        stream.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for chunk in chunks:
            stream.write(chunk)
