"""Hugging Face Llama checkpoints (transformers' `LlamaForCausalLM` directories), in and out.

A directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`, and perhaps `tokenizer.model`. The config comes in two styles:
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
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy

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
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# what Meta's Llama checkpoints on the Hub say: without it AutoTokenizer reads tokenizer.model as a
# generic tokenizer that adds no BOS, and the model would see text without the BOS it was trained with
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
                    "clean_up_tokenization_spaces": False}
SAFETENSORS_DTYPES = {"F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16, "BF16": numpy.uint16}
MAX_HEADER_BYTES = 100 * 2**20
# buffers some older exports carry that hold nothing a model needs (recomputed from the config)
HARMLESS_EXTRAS = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Imported:
    """A checkpoint read into npllama's terms: its config, its weights under Meta's names, its tokenizer."""

    config: LlamaConfig
    params: dict
    tokenizer: Path | Tokenizer | BpeTokenizer | None  # a tokenizer.model to load, or one built from the file


# --- config.json ------------------------------------------------------------------------------


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
    if fields.get("head_dim") not in (None, hidden // heads if isinstance(hidden, int) and heads else None):
        raise ConvertError(file, f"head_dim {fields['head_dim']} != hidden_size / num_attention_heads", fix)
    try:
        return LlamaConfig(dim=hidden, n_layers=need("num_hidden_layers"), n_heads=heads,
                           n_kv_heads=kv_heads, tie_embeddings=fields.get("tie_word_embeddings", False),
                           vocab_size=need("vocab_size"), hidden_dim=need("intermediate_size"),
                           norm_eps=float(fields.get("rms_norm_eps", 1e-6)),
                           max_seq_len=need("max_position_embeddings"), rope_theta=float(rope_theta),
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


def read_safetensors(file: Path) -> dict:
    """Every tensor of a .safetensors file as a NumPy array (bfloat16 widened to float32)."""
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
    except (OSError, ValueError) as error:
        raise ConvertError(file, f"not a readable safetensors file ({error})", "re-download or re-save it") from None
    data = numpy.memmap(file, dtype=numpy.uint8, mode="r", offset=8 + header_length) if size > 8 + header_length \
        else numpy.zeros(0, numpy.uint8)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor(file, name, entry, data)
    return tensors


def _tensor(file: Path, name: str, entry, data) -> numpy.ndarray:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        raise ConvertError(file, f"tensor {name!r} has dtype {dtype!r}; npllama reads "
                           f"{', '.join(SAFETENSORS_DTYPES)}", "save the weights as float32, float16 or bfloat16")
    dtype = numpy.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
    shape, (begin, end) = tuple(entry.get("shape", ())), entry.get("data_offsets", (0, -1))
    if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= data.size:
        raise ConvertError(file, f"tensor {name!r}: offsets {begin}..{end} do not hold shape {shape}",
                           "the file is truncated or corrupt; re-download it")
    array = numpy.frombuffer(data[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if entry["dtype"] == "BF16":
        array = widen_bfloat16(array)
    return array


# --- a whole directory ---------------------------------------------------------------------------


def is_hf_directory(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and ((directory / WEIGHTS_FILE).is_file()
                                                   or (directory / INDEX_FILE).is_file())


def _weight_files(directory: Path) -> list[Path]:
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    index_file = directory / INDEX_FILE
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConvertError(index_file, f"not a safetensors index ({error})", "re-download it") from None
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise ConvertError(directory / missing[0], f"missing shard (the index lists {len(files)})",
                           "download every shard the index names")
    return [directory / name for name in files]


def import_hf(directory, dtype=None) -> Imported:
    """The model in a Hugging Face directory, under Meta's names and RoPE layout."""
    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    try:
        fields = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ConvertError(config_file, f"not a readable JSON file ({error})", "is this a model directory?") from None
    config = config_from_hf(fields, config_file)
    weights, where = {}, {}
    for file in _weight_files(directory):
        for name, array in read_safetensors(file).items():
            weights[name], where[name] = array, file
    params = to_meta(weights, config, where, directory)
    if dtype is not None:
        params = {name: p.astype(dtype) for name, p in params.items()}
    tokenizer = directory / TOKENIZER_FILE
    return Imported(config, params, tokenizer if tokenizer.is_file() else None)


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
