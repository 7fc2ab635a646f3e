"""GGUF files (llama.cpp's format) in: a Llama model's config, weights and tokenizer from one file.

The format. A GGUF file is a header (the magic bytes "GGUF", a version, the number of tensors and
of metadata entries), the metadata (typed key/value pairs: numbers, strings, arrays), one record
per tensor (its name, its dimensions, its ggml type, its offset) and the tensors' data, aligned.
Dimensions are ggml's `ne`, fastest-varying first, so NumPy's shape is their reverse: a linear
weight of `out` rows of `in` columns is `ne = [in, out]`, as NumPy (out, in), which is npllama's
[out, in] too. Types are floats (F32, F16, BF16, F64) or quantizations in blocks along a row: 32
weights with a scale (Q8_0, Q4_0, Q5_0) and a minimum (Q4_1, Q5_1); the K-quants Q2_K .. Q6_K, 256
weights with sub-block scales; the IQ, TQ and FP4 types, codebooks and ternary or 4-bit floats.
The file is read with `gguf.GGUFReader` (llama.cpp's own Python reader, the `gguf` package of the
optional extra `models`), which memory-maps it, and each tensor is turned into float32 by
`gguf.quants.dequantize`: every type that function knows is read (F64 as float64); F32, F16 and
BF16 exactly. Each tensor is dequantized a few million weights at a time straight into its array
of the output dict, so memory holds the float model once (and the memory-mapped file), never two
float copies of it nor a tensor's temporaries whole.

The mapping (llama.cpp names -> Meta's, from npllama/params.py's `gguf_names`):

    token_embd.weight -> tok_embeddings.weight        blk.{i}.attn_norm -> layers.{i}.attention_norm
    blk.{i}.attn_q / attn_k / attn_v / attn_output -> layers.{i}.attention.wq / wk / wv / wo
    blk.{i}.ffn_norm -> layers.{i}.ffn_norm            blk.{i}.ffn_gate / ffn_down / ffn_up -> w1 / w2 / w3
    output_norm.weight -> norm.weight                  output.weight -> output.weight (absent: tied)

The rows of attn_q and attn_k are already in Meta's RoPE layout (interleaved pairs): llama.cpp's
convert_hf_to_gguf.py permutes Hugging Face's rotate-half rows back for the llama architecture (its
`LlamaModel.permute`), and transformers undoes that when it loads a GGUF file (its
`LlamaTensorProcessor._reverse_permute_weights`). They are taken as they are; tests/test_convert_gguf.py
proves it against transformers' logits for SmolLM2's GGUF file.

Metadata -> LlamaConfig: `general.architecture` must be "llama"; `llama.embedding_length` (dim),
`.block_count`, `.attention.head_count`, `.attention.head_count_kv` (default: head_count),
`.feed_forward_length` (hidden_dim), `.context_length` (max_seq_len), `.rope.freq_base` (rope_theta,
default 10000), `.attention.layer_norm_rms_epsilon` (norm_eps); the vocabulary is the token
embedding's rows, checked against `llama.vocab_size` and the tokenizer's token count where given;
`.rope.dimension_count` must be the head dimension; tied embeddings when there is no output.weight.
RoPE scaling `.rope.scaling.type` "linear" (or the older `.rope.scale_linear`) becomes
`RopeScaling("linear", factor)`; "none" or absent, no scaling.

The tokenizer: `tokenizer.ggml.model` "gpt2" is byte-level BPE (`BpeTokenizer.from_gguf_metadata`);
"llama" is a SentencePiece vocabulary (pieces, scores, types: what Llama 1/2, TinyLlama and Mistral
files hold), rebuilt here as the SentencePiece model it came from (`sentencepiece_model`) and run by
SentencePiece itself as npllama's `Tokenizer`; a file without tokenizer metadata gives None.

Refused in one line naming the file (ConvertError): not a GGUF file, a truncated or damaged one,
one file of a split model, another architecture, a mixture of experts, other RoPE scaling kinds,
Llama 3.1's frequency factors (the `rope_freqs.weight` tensor), a tensor npllama has no place for
(a bias) or one missing, a shape the metadata does not imply, a type the gguf package cannot
dequantize, other tokenizer models.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy

from ..files import kind_of
from ..model import LlamaConfig, RopeScaling
from ..params import GGUF_NAMES, GGUF_ROPE_FREQS, OUTPUT_HEAD, TOK_EMBEDDINGS, gguf_names, parameter_shapes
from ..tokenizer import Tokenizer, TokenizerError
from ..tokenizer.bpe import BpeTokenizer
from . import ConvertError
from .hf import Imported

GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
ARCHITECTURE = "llama"
MISSING_GGUF = "pip install 'npllama[models]' (or pip install 'gguf>=0.17')"
DAMAGED = "the file is truncated or damaged: download or convert it again"
CHUNK_ELEMENTS = 1 << 22  # weights dequantized at a time (16 MB of float32)
# what the gguf package raises for bytes that are not the GGUF it expects
READER_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError, AssertionError, struct.error)


# --- the file and its metadata -------------------------------------------------------------------


def is_gguf_file(path: Path) -> bool:
    """A regular file named *.gguf, or one that begins with GGUF's magic bytes."""
    if kind_of(path) != "regular file":
        return False
    if path.suffix.lower() == GGUF_SUFFIX:
        return True
    try:
        with open(path, "rb") as stream:
            return stream.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path):
    """A `gguf.GGUFReader` over the file (memory-mapped), or a one-line ConvertError."""
    path = Path(path)
    kind = kind_of(path)
    if kind != "regular file":
        raise ConvertError(path, "does not exist" if kind is None else f"is a {kind}, not a file",
                           "pass the path of a .gguf file")
    try:
        with open(path, "rb") as stream:
            head = stream.read(len(GGUF_MAGIC))
    except OSError as error:
        raise ConvertError(path, f"cannot be read ({error.strerror})", "check its permissions") from None
    if head != GGUF_MAGIC:
        raise ConvertError(path, f"is not a GGUF file (it begins with {head!r}, not {GGUF_MAGIC!r})",
                           "pass a .gguf file written by llama.cpp or the gguf package")
    try:
        import gguf
    except ImportError:
        raise ConvertError(path, "GGUF files are read with the gguf package, which is not installed",
                           MISSING_GGUF) from None
    try:
        reader = gguf.GGUFReader(path)
    except READER_ERRORS as error:
        raise ConvertError(path, f"is not a readable GGUF file ({_one_line(error)})", DAMAGED) from None
    except OSError as error:
        raise ConvertError(path, f"cannot be read ({error.strerror or error})", "check the file") from None
    if reader.byte_order != "I":
        raise ConvertError(path, "is a GGUF file of the other byte order (big-endian)",
                           "convert the model again on a little-endian machine")
    return reader


def gguf_metadata(reader, path, prefix: str = "") -> dict[str, Any]:
    """The file's metadata whose keys begin with `prefix`, as plain Python values (str, int, float,
    bool, lists of them): the one reader of GGUF fields, shared by the config and the tokenizer."""
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith(prefix) and not name.startswith("GGUF."):
            try:
                fields[name] = field.contents()
            except READER_ERRORS as error:  # UnicodeDecodeError is a ValueError
                raise ConvertError(path, f"metadata {name!r} cannot be read ({_one_line(error)})", DAMAGED) from None
    return fields


def gguf_tokenizer_metadata(path) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file as plain Python values, as
    `BpeTokenizer.from_gguf_metadata` takes them."""
    return gguf_metadata(open_gguf(path), Path(path), "tokenizer.")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- the whole file ------------------------------------------------------------------------------


def import_gguf(path, dtype=None) -> Imported:
    """The Llama model in a GGUF file: config, weights under Meta's names (float32, or `dtype`; F64
    tensors stay float64 unless `dtype` says otherwise), and its tokenizer (None without one)."""
    path = Path(path)
    reader = open_gguf(path)
    fields = gguf_metadata(reader, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = config_from_gguf(fields, tensors, path)
    params = read_weights(tensors, config, path, dtype)
    tokenizer = tokenizer_from_gguf(fields, path, config.vocab_size)
    return Imported(config, params, tokenizer)


# --- metadata -> LlamaConfig ----------------------------------------------------------------------


def config_from_gguf(fields: dict, tensors: dict, file: Path) -> LlamaConfig:
    """LlamaConfig for a GGUF file's `llama.*` metadata and tensors, or a ConvertError naming the key."""
    architecture = fields.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise ConvertError(file, f"general.architecture is {architecture!r}, not 'llama'",
                           "npllama implements the Llama architecture only")
    _refuse_what_llama_lacks(fields, tensors, file)

    def need(key: str):
        if f"llama.{key}" not in fields:
            raise ConvertError(file, f"missing metadata 'llama.{key}'", "convert the model again with llama.cpp")
        return fields[f"llama.{key}"]

    embedding = tensors.get(GGUF_NAMES[TOK_EMBEDDINGS])
    if embedding is None:
        raise ConvertError(file, f"missing tensor {GGUF_NAMES[TOK_EMBEDDINGS]!r}", DAMAGED)
    vocab_size = int(embedding.shape[-1])  # ne = [dim, vocab]
    heads, tied = need("attention.head_count"), GGUF_NAMES[OUTPUT_HEAD] not in tensors
    try:
        config = LlamaConfig(dim=need("embedding_length"), n_layers=need("block_count"), n_heads=heads,
                             n_kv_heads=fields.get("llama.attention.head_count_kv", heads), vocab_size=vocab_size,
                             hidden_dim=need("feed_forward_length"), max_seq_len=need("context_length"),
                             norm_eps=need("attention.layer_norm_rms_epsilon"),
                             rope_theta=fields.get("llama.rope.freq_base", 10000.0),
                             tie_embeddings=tied, rope_scaling=_rope_scaling(fields, file))
    except (TypeError, ValueError) as error:
        raise ConvertError(file, f"not a valid Llama configuration ({_one_line(error)})",
                           "check its llama.* metadata") from None
    _check_head_and_vocab(fields, config, file)
    _check_block_count(tensors, config, file)
    return config


def _check_block_count(tensors: dict, config: LlamaConfig, file: Path) -> None:
    """llama.block_count against the blocks whose tensors the file holds, before any table of
    per-layer names is built from it (a block_count of 10^8 in a small file is refused here)."""
    blocks = {name.split(".")[1] for name in tensors if name.startswith("blk.")}
    numbered = blocks == {str(i) for i in range(len(blocks))}
    if len(blocks) != config.n_layers or not numbered:
        held = f"tensors of {len(blocks)} blocks{'' if numbered else ', not numbered 0, 1, 2, ...'}"
        raise ConvertError(file, f"llama.block_count is {config.n_layers}, but the file holds {held}",
                           "the weights and the metadata disagree: convert the model again")


def _refuse_what_llama_lacks(fields: dict, tensors: dict, file: Path) -> None:
    """One file of a split model, experts (Mixtral is stored as llama), Llama 3.1's frequency factors."""
    splits = fields.get("split.count")
    if isinstance(splits, int) and splits > 1:
        raise ConvertError(file, f"is one of {splits} files of a split model (split.count)",
                           "merge them into one with llama.cpp's llama-gguf-split --merge")
    experts = fields.get("llama.expert_count")
    if isinstance(experts, int) and experts > 0:
        raise ConvertError(file, f"is a mixture of experts (llama.expert_count {experts})",
                           "npllama implements dense Llama models only")
    if GGUF_ROPE_FREQS in tensors:
        raise ConvertError(file, f"has {GGUF_ROPE_FREQS} (Llama 3 frequency factors), which is not supported yet",
                           "import the model's Hugging Face or Meta checkpoint, whose rope_scaling npllama reads")


def _rope_scaling(fields: dict, file: Path) -> RopeScaling | None:
    """`llama.rope.scaling.type` "linear" (or the older `llama.rope.scale_linear`) -> RopeScaling."""
    kind = fields.get("llama.rope.scaling.type")
    factor = fields.get("llama.rope.scaling.factor")
    if kind in (None, "none"):
        legacy = fields.get("llama.rope.scale_linear")
        if legacy is None or (type(legacy) in (int, float) and legacy == 1):
            return None
        return RopeScaling("linear", legacy)  # which refuses what is not a positive finite number
    if kind != "linear":
        raise ConvertError(file, f"llama.rope.scaling.type is {kind!r}, which npllama does not implement",
                           "npllama reads GGUF RoPE scaling 'linear' (and 'none')")
    if factor is None:
        raise ConvertError(file, f"llama.rope.scaling.type is 'linear' but llama.rope.scaling.factor is {factor!r}",
                           "convert the model again with llama.cpp")
    return RopeScaling("linear", factor)


def _check_head_and_vocab(fields: dict, config: LlamaConfig, file: Path) -> None:
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = fields.get(f"llama.{key}", config.head_dim)
        if value != config.head_dim:
            raise ConvertError(file, f"llama.{key} is {value}, not the head dimension {config.head_dim} "
                               "(embedding_length / head_count)", "npllama rotates and attends over whole heads")
    tokens = fields.get("tokenizer.ggml.tokens")
    for what, count in (("llama.vocab_size", fields.get("llama.vocab_size")),
                        ("the tokenizer's token count", None if tokens is None else len(tokens))):
        if count is not None and count != config.vocab_size:
            raise ConvertError(file, f"{what} is {count}, but token_embd has {config.vocab_size} rows",
                               "the weights and the metadata disagree: convert the model again")


# --- tensors -> Meta's parameters -----------------------------------------------------------------


def read_weights(tensors: dict, config: LlamaConfig, file: Path, dtype=None) -> dict:
    """Every parameter under Meta's names, dequantized tensor by tensor; unknown and missing tensors
    refused by name."""
    names, shapes = gguf_names(config), parameter_shapes(config)
    known = set(names.values())
    for name in tensors:
        if name not in known:
            raise ConvertError(file, f"tensor {name!r} has no place in a Llama model (a bias? another variant?)",
                               "npllama implements the Llama architecture without biases")
    params = {}
    for meta_name, gguf_name in names.items():
        if gguf_name not in tensors:
            raise ConvertError(file, f"missing tensor {gguf_name!r}", DAMAGED)
        params[meta_name] = dequantized(tensors[gguf_name], shapes[meta_name], file, dtype)
    return params


def dequantized(tensor, shape: tuple, file: Path, dtype=None) -> numpy.ndarray:
    """One tensor as a new NumPy array of `shape`, dequantized a block of rows at a time into it, so
    that the temporaries of dequantization stay small whatever the tensor's size."""
    from gguf import GGMLQuantizationType

    stored = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    if stored != shape:
        raise ConvertError(file, f"tensor {tensor.name!r} has shape {stored} (GGUF ne {tensor.shape.tolist()}), "
                           f"the metadata implies {shape}", "the weights and the llama.* metadata disagree")
    qtype = tensor.tensor_type
    out = numpy.empty(shape, dtype or (numpy.float64 if qtype == GGMLQuantizationType.F64 else numpy.float32))
    data = tensor.data if len(shape) > 1 else tensor.data[None]  # a 1-D tensor is one row
    rows = out if len(shape) > 1 else out[None]
    step = max(1, CHUNK_ELEMENTS // shape[-1])
    for start in range(0, rows.shape[0], step):
        block = _dequantize(data[start:start + step], qtype, tensor.name, file)
        if block.shape != rows[start:start + step].shape:
            raise ConvertError(file, f"tensor {tensor.name!r} ({qtype.name}) dequantizes to rows of shape "
                               f"{block.shape}, not {rows[start:start + step].shape}", DAMAGED)
        rows[start:start + step] = block
    return out


def _dequantize(data, qtype, name: str, file: Path) -> numpy.ndarray:
    from gguf import GGMLQuantizationType, quants

    try:
        with numpy.errstate(all="ignore"):  # a damaged scale: refused below, not warned about
            rows = data if qtype == GGMLQuantizationType.F64 else quants.dequantize(data, qtype)
    except NotImplementedError:
        raise ConvertError(file, f"tensor {name!r} is stored as {qtype.name}, which the gguf package cannot "
                           "dequantize", "convert the model with another type (Q8_0, Q4_K, F16, ...)") from None
    except READER_ERRORS as error:
        raise ConvertError(file, f"tensor {name!r} ({qtype.name}) cannot be dequantized ({_one_line(error)})",
                           DAMAGED) from None
    if not numpy.isfinite(rows).all():
        raise ConvertError(file, f"tensor {name!r} ({qtype.name}) holds NaN or infinite weights", DAMAGED)
    return rows


# --- the tokenizer -----------------------------------------------------------------------------------

SENTENCEPIECE_MODEL = "llama"  # tokenizer.ggml.model of a SentencePiece vocabulary
BYTE_LEVEL_MODEL = "gpt2"


def tokenizer_from_gguf(fields: dict, file: Path, vocab_size: int) -> Tokenizer | BpeTokenizer | None:
    """The tokenizer the file's metadata describes, or None when it has no `tokenizer.ggml.model`."""
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        return None
    try:
        if model == BYTE_LEVEL_MODEL:
            tokenizer: Tokenizer | BpeTokenizer = BpeTokenizer.from_gguf_metadata(fields, "its tokenizer metadata")
        elif model == SENTENCEPIECE_MODEL:
            tokenizer = Tokenizer(sentencepiece_model(fields), "the SentencePiece model of its tokenizer metadata")
        else:
            raise ConvertError(file, f"tokenizer.ggml.model is {model!r}, which npllama cannot build",
                               "npllama reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers")
    except TokenizerError as error:
        problem, _, fix = str(error).partition("; ")
        raise ConvertError(file, problem, fix or "convert the model again with llama.cpp") from None
    if tokenizer.vocab_size > vocab_size:
        raise ConvertError(file, f"its tokenizer has {tokenizer.vocab_size} tokens, the model {vocab_size}",
                           "the weights and the tokenizer disagree: convert the model again")
    return tokenizer


# SentencePiece's ModelProto (sentencepiece_model.proto), the fields written here
PIECES, TRAINER_SPEC, NORMALIZER_SPEC = 1, 2, 3
PIECE, SCORE, TYPE = 1, 2, 3
MODEL_TYPE, VOCAB_SIZE, BYTE_FALLBACK = 3, 4, 35
SPECIAL_IDS = {"unknown": (40, 45), "bos": (41, 46), "eos": (42, 47), "padding": (43, 48)}  # (id, piece) fields
NAME, ADD_DUMMY_PREFIX, REMOVE_EXTRA_WHITESPACES, ESCAPE_WHITESPACES = 1, 3, 4, 5
BPE_MODEL, NORMAL_PIECE, BYTE_PIECE = 2, 1, 6  # llama.cpp's token types are SentencePiece's piece types


def sentencepiece_model(fields: dict) -> bytes:
    """The serialized SentencePiece model (a ModelProto) of a GGUF file's "llama" vocabulary.

    llama.cpp's converter writes a SentencePiece model's pieces, scores and types as they are, and
    encodes as SentencePiece's BPE does (merging the best-scored pair first, byte pieces for what no
    piece covers), so the model rebuilt from them (BPE, byte fallback when there are byte pieces,
    the special pieces the metadata names, identity normalisation with the dummy prefix space unless
    `tokenizer.ggml.add_space_prefix` is false) encodes as the original did. The protobuf is written
    by hand (tag, length, value), as npllama reads it by hand (tokenizer/model_bytes.py).
    """
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(token, str) for token in tokens):
        raise TokenizerError("tokenizer.ggml.tokens is not a list of strings; the file is damaged")
    scores = _per_token(fields, "tokenizer.ggml.scores", len(tokens), 0.0, (int, float))
    types = _per_token(fields, "tokenizer.ggml.token_type", len(tokens), NORMAL_PIECE, int)
    pieces = b"".join(_bytes_field(PIECES, _bytes_field(PIECE, token.encode("utf-8")) + _float_field(SCORE, score)
                                   + _int_field(TYPE, kind)) for token, score, kind in zip(tokens, scores, types))
    trainer = _int_field(MODEL_TYPE, BPE_MODEL) + _int_field(VOCAB_SIZE, len(tokens))
    trainer += _int_field(BYTE_FALLBACK, int(BYTE_PIECE in types))
    for name, (id_field, piece_field) in SPECIAL_IDS.items():
        token_id = fields.get(f"tokenizer.ggml.{name}_token_id")
        token_id = token_id if isinstance(token_id, int) and 0 <= token_id < len(tokens) else -1
        trainer += _int_field(id_field, token_id)
        trainer += _bytes_field(piece_field, tokens[token_id].encode("utf-8") if token_id >= 0 else b"")
    normalizer = _bytes_field(NAME, b"identity")
    normalizer += _int_field(ADD_DUMMY_PREFIX, int(fields.get("tokenizer.ggml.add_space_prefix", True) is True))
    normalizer += _int_field(REMOVE_EXTRA_WHITESPACES,
                             int(fields.get("tokenizer.ggml.remove_extra_whitespaces", False) is True))
    normalizer += _int_field(ESCAPE_WHITESPACES, 1)
    return pieces + _bytes_field(TRAINER_SPEC, trainer) + _bytes_field(NORMALIZER_SPEC, normalizer)


def _per_token(fields: dict, key: str, count: int, default, kinds) -> list:
    values = fields.get(key)
    if values is None:
        return [default] * count
    if not isinstance(values, list) or len(values) != count or not all(isinstance(v, kinds) for v in values):
        raise TokenizerError(f"{key} is not a list of {count} numbers, one per token; the file is damaged")
    return values


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32s are ten bytes of two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value
