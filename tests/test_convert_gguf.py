"""Properties of npllama.convert.gguf: GGUF files (llama.cpp's format) read into npllama's terms.

Without a download: small GGUF files written here with gguf.GGUFWriter from random npllama models
(multi-head and grouped-query attention, separate and tied embeddings), in F32 (weights and logits
bitwise npllama's own), F16 and BF16 (their exact float32 values), each type the gguf package
quantizes (its dequantization of the bytes, near the floats), and every type it dequantizes
(random blocks: the importer puts the package's numbers in the right places); metadata to config
(GQA, ties, linear RoPE scaling); the tokenizers (byte-level BPE, and a SentencePiece vocabulary
rebuilt as the model it came from: the original's ids); npllama.load and the generate, eval, audit
and convert commands on a .gguf; and one-line refusals naming the file (another architecture, an
unexpected or missing tensor, a wrong shape, a truncated file, not a GGUF, rope_freqs, ...).

The real model (SmolLM2-135M-Instruct's GGUF file) against transformers: tests/test_real_model.py.
"""

import os
import subprocess
import sys
from dataclasses import replace

import numpy
import pytest

from npllama import model as llama
from npllama.convert import ConvertError
from npllama.convert.gguf import gguf_metadata, gguf_tokenizer_metadata, import_gguf, open_gguf
from npllama.model import LlamaConfig, RopeScaling
from npllama.params import GGUF_ROPE_FREQS, gguf_names, parameter_table
from npllama.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf", reason="GGUF files are read with gguf: pip install '.[models]'")
pytest.importorskip("tokenizers", reason="byte-level BPE needs tokenizers: pip install '.[models]'")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants  # noqa: E402

from npllama.convert.load import LoadError, load  # noqa: E402
from npllama.tokenizer.bpe import BpeTokenizer, byte_alphabet  # noqa: E402

F32, F16, BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r", "Ġ s"]
TOKENS = SPECIALS + list(byte_alphabet().values()) + ["".join(merge.split()) for merge in MERGES]  # 267
EXACT = 2.0**-16  # a norm_eps that float32 metadata holds exactly

CONFIGS = {  # rows a multiple of 32 (Q4_0's block) for the quantized files
    "multi_head": LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=len(TOKENS), hidden_dim=96, norm_eps=EXACT,
                              max_seq_len=64),
    "gqa_tied": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True, vocab_size=len(TOKENS),
                            hidden_dim=96, norm_eps=EXACT, max_seq_len=64, rope_theta=500000.0),
}
# rows of 256 for the K-quants and the other types of 256-weight super-blocks
WIDE = LlamaConfig(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=len(TOKENS), hidden_dim=256,
                   norm_eps=EXACT, max_seq_len=64)


# --- writing GGUF files -----------------------------------------------------------------------------

def llama_metadata(config: LlamaConfig, tokenizer: bool = True) -> dict:
    """What llama.cpp's converter writes for a Llama model, and a small byte-level BPE tokenizer."""
    fields = {"general.architecture": "llama", "llama.embedding_length": config.dim,
              "llama.block_count": config.n_layers, "llama.attention.head_count": config.n_heads,
              "llama.attention.head_count_kv": config.n_kv_heads, "llama.feed_forward_length": config.ffn_dim,
              "llama.context_length": config.max_seq_len, "llama.rope.freq_base": config.rope_theta,
              "llama.attention.layer_norm_rms_epsilon": config.norm_eps, "llama.vocab_size": config.vocab_size,
              "llama.rope.dimension_count": config.head_dim}
    if tokenizer:
        fields.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": TOKENS,
                       "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(TOKENS) - 3),
                       "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1,
                       "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False})
    return fields


def quantized(array, qtype) -> tuple:
    """(the bytes or floats the file stores, their type) for one parameter; norm gains stay F32."""
    if qtype == F32 or array.ndim == 1:
        return numpy.asarray(array, numpy.float32), F32
    if qtype == F16:
        return array.astype(numpy.float16), F16
    return quants.quantize(numpy.asarray(array, numpy.float32), qtype), qtype


def gguf_tensors(config: LlamaConfig, params: dict, qtype=F32) -> dict:
    """{GGUF name: (stored array, type)} for npllama parameters, as llama.cpp's converter lays them out."""
    return {name: quantized(params[meta_name], qtype) for meta_name, name in gguf_names(config).items()}


def write_gguf(path, metadata: dict, tensors: dict):
    """A GGUF file of `metadata` (typed by their Python type, as llama.cpp types them) and `tensors`."""
    writer = GGUFWriter(path, arch=metadata["general.architecture"])
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        kind = gguf.GGUFValueType.get_type(value)
        writer.add_key_value(key, value, gguf.GGUFValueType.UINT32 if kind == gguf.GGUFValueType.INT32 else kind)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def model_file(tmp_path, config, qtype=F32, seed=0, name="model.gguf", metadata=None, tensors=None):
    """(path, params): a random model of `config` written as GGUF; `metadata` and `tensors` change
    the file (a value of None removes the key or the tensor)."""
    params = llama.init_params(config, seed=seed, std=0.5)
    fields = {**llama_metadata(config), **(metadata or {})}
    stored = {**gguf_tensors(config, params, qtype), **(tensors or {})}
    path = write_gguf(tmp_path / name, {k: v for k, v in fields.items() if v is not None},
                      {k: v for k, v in stored.items() if v is not None})
    return path, params


def tokens_for(config, seed=1, length=12):
    return numpy.random.default_rng(seed).integers(0, config.vocab_size, (2, length))


# --- weights --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", sorted(CONFIGS))
def test_f32_weights_import_exactly_and_give_npllamas_own_logits(tmp_path, shape):
    config = CONFIGS[shape]
    path, params = model_file(tmp_path, config)
    imported = import_gguf(path)
    assert imported.config == config
    assert set(imported.params) == set(params) == set(parameter_table(config))
    assert all(imported.params[name].dtype == numpy.float32 for name in params)
    assert all(imported.params[name].tobytes() == params[name].tobytes() for name in params)
    tokens = tokens_for(config)
    assert llama.forward(imported.params, config, tokens).tobytes() == llama.forward(params, config, tokens).tobytes()


def test_f16_and_bf16_weights_import_as_their_exact_float32_values(tmp_path):
    from npllama.convert.hf import to_bfloat16_bits

    config = CONFIGS["gqa_tied"]
    path, params = model_file(tmp_path, config, F16, name="f16.gguf")
    imported = import_gguf(path)
    for name, value in params.items():
        expected = value if value.ndim == 1 else value.astype(numpy.float16).astype(numpy.float32)
        assert numpy.array_equal(imported.params[name], expected), name
    path, params = model_file(tmp_path, config, BF16, name="bf16.gguf")
    imported = import_gguf(path, dtype=numpy.float64)
    for name, value in params.items():
        widened = (to_bfloat16_bits(value).astype(numpy.uint32) << 16).view(numpy.float32)
        expected = value if value.ndim == 1 else widened
        assert imported.params[name].dtype == numpy.float64 and numpy.array_equal(imported.params[name], expected)


QUANTIZED = {GGMLQuantizationType.Q8_0: 0.01, GGMLQuantizationType.Q5_0: 0.05, GGMLQuantizationType.Q5_1: 0.05,
             GGMLQuantizationType.Q4_0: 0.1, GGMLQuantizationType.Q4_1: 0.1}  # error / max |w| of a block


@pytest.mark.parametrize("qtype", list(QUANTIZED), ids=lambda qtype: qtype.name)
def test_quantized_weights_are_the_gguf_packages_dequantization_of_the_floats(tmp_path, qtype):
    config = CONFIGS["multi_head"]
    path, params = model_file(tmp_path, config, qtype)
    imported = import_gguf(path)
    for name, value in params.items():
        if value.ndim == 1:
            assert numpy.array_equal(imported.params[name], value)
            continue
        expected = quants.dequantize(quants.quantize(value, qtype), qtype)
        assert imported.params[name].shape == value.shape and numpy.array_equal(imported.params[name], expected)
        assert numpy.abs(imported.params[name] - value).max() <= QUANTIZED[qtype] * numpy.abs(value).max()


def dequantizable_types() -> list:
    """Every block type the installed gguf package dequantizes (F32 and F16 aside)."""
    found = []
    for qtype in GGMLQuantizationType:
        if qtype in (F32, F16):
            continue
        try:
            quants.dequantize(numpy.zeros((1, GGML_QUANT_SIZES[qtype][1]), numpy.uint8), qtype)
        except NotImplementedError:
            continue
        found.append(qtype)
    return found


def random_blocks(rows: int, columns: int, qtype, rng) -> numpy.ndarray:
    """Stored bytes of `rows` rows of `qtype`, random, each byte at most 0x3B: every float16 (and
    float8 or e8m0) scale in them is finite and small, so the weights are too."""
    block, size = GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 0x3C, (rows, columns // block * size), dtype=numpy.uint8)


@pytest.mark.parametrize("qtype", dequantizable_types(), ids=lambda qtype: qtype.name)
def test_every_type_the_gguf_package_dequantizes_lands_in_place(tmp_path, qtype):
    config, rng = WIDE, numpy.random.default_rng(int(qtype))
    shapes = {name: spec.shape for name, spec in parameter_table(config).items()}
    names = gguf_names(config)
    stored = {names[name]: random_blocks(*shape, qtype, rng) for name, shape in shapes.items() if len(shape) == 2}
    path, params = model_file(tmp_path, config, tensors={name: (data, qtype) for name, data in stored.items()})
    imported = import_gguf(path)
    for name, shape in shapes.items():
        expected = quants.dequantize(stored[names[name]], qtype) if len(shape) == 2 else params[name]
        assert imported.params[name].shape == shape and numpy.array_equal(imported.params[name], expected), name
    assert len(dequantizable_types()) >= 20 and numpy.isfinite(llama.forward(imported.params, config,
                                                                              tokens_for(config))).all()


def test_f64_weights_stay_float64_and_no_weight_is_a_view_of_the_file(tmp_path):
    config = CONFIGS["multi_head"]
    params = llama.init_params(config, seed=3, dtype="float64")
    stored = {name: (params[meta_name], GGMLQuantizationType.F64) for meta_name, name in gguf_names(config).items()}
    imported = import_gguf(write_gguf(tmp_path / "f64.gguf", llama_metadata(config), stored))
    assert all(imported.params[name].dtype == numpy.float64 for name in params)
    assert all(numpy.array_equal(imported.params[name], params[name]) for name in params)
    for array in imported.params.values():  # the file's memory map is read-only, and closed with the reader
        assert array.flags.writeable and not any(isinstance(base, numpy.memmap) for base in bases(array))


def bases(array):
    while array is not None:
        yield array
        array = getattr(array, "base", None)


# --- metadata -> config -------------------------------------------------------------------------------

def test_linear_rope_scaling_is_read_from_either_key(tmp_path):
    config = CONFIGS["multi_head"]
    scaled = replace(config, rope_scaling=RopeScaling("linear", 4.0))
    path, params = model_file(tmp_path, config, metadata={"llama.rope.scaling.type": "linear",
                                                          "llama.rope.scaling.factor": 4.0})
    imported = import_gguf(path)
    assert imported.config == scaled
    tokens = tokens_for(config, length=40)
    assert numpy.array_equal(llama.forward(imported.params, imported.config, tokens),
                             llama.forward(params, scaled, tokens))
    old, _ = model_file(tmp_path, config, name="old.gguf", metadata={"llama.rope.scale_linear": 4.0})
    assert import_gguf(old).config == scaled
    none, _ = model_file(tmp_path, config, name="none.gguf", metadata={"llama.rope.scaling.type": "none"})
    assert import_gguf(none).config == config


def test_head_count_kv_defaults_to_head_count(tmp_path):
    config = CONFIGS["multi_head"]
    path, _ = model_file(tmp_path, config, metadata={"llama.attention.head_count_kv": None,
                                                     "llama.rope.freq_base": None, "llama.vocab_size": None})
    assert import_gguf(path).config == config


def test_metadata_comes_back_as_plain_python_values(tmp_path):
    path, _ = model_file(tmp_path, CONFIGS["gqa_tied"])
    fields = gguf_metadata(open_gguf(path), path)
    assert fields["llama.block_count"] == 2 and type(fields["llama.block_count"]) is int
    assert fields["llama.rope.freq_base"] == 500000.0 and fields["tokenizer.ggml.tokens"] == TOKENS
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["general.architecture"] == "llama"
    assert set(gguf_tokenizer_metadata(path)) == {key for key in fields if key.startswith("tokenizer.")}


# --- refusals: one line naming the file --------------------------------------------------------------

def one_line_refusal(path, call=import_gguf) -> str:
    with pytest.raises(ConvertError) as refused:
        call(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message, message
    return message


REFUSALS = {  # name: (metadata changes, tensor changes, what the message says)
    "another_architecture": ({"general.architecture": "qwen2"}, {}, "general.architecture is 'qwen2', not 'llama'"),
    "a_bias": ({}, {"blk.0.attn_q.bias": (numpy.zeros(64, numpy.float32), F32)},
               "tensor 'blk.0.attn_q.bias' has no place in a Llama model"),
    "a_missing_tensor": ({}, {"blk.1.ffn_up.weight": None}, "missing tensor 'blk.1.ffn_up.weight'"),
    "no_embedding": ({}, {"token_embd.weight": None}, "missing tensor 'token_embd.weight'"),
    "a_wrong_shape": ({"llama.feed_forward_length": 128}, {},
                      "tensor 'blk.0.ffn_gate.weight' has shape (96, 64) (GGUF ne [64, 96]), the metadata implies "
                      "(128, 64)"),
    "rope_freqs": ({}, {GGUF_ROPE_FREQS: (numpy.ones(8, numpy.float32), F32)},
                   "has rope_freqs.weight (Llama 3 frequency factors), which is not supported yet"),
    "yarn": ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, {},
             "llama.rope.scaling.type is 'yarn', which npllama does not implement"),
    "linear_without_factor": ({"llama.rope.scaling.type": "linear"}, {}, "llama.rope.scaling.factor is None"),
    "partial_rope": ({"llama.rope.dimension_count": 8}, {},
                     "llama.rope.dimension_count is 8, not the head dimension 16"),
    "a_vocab_size_of_another_model": ({"llama.vocab_size": 300}, {},
                                      "llama.vocab_size is 300, but token_embd has 267 rows"),
    "one_file_of_a_split_model": ({"split.count": 3}, {}, "is one of 3 files of a split model (split.count)"),
    "a_mixture_of_experts": ({"llama.expert_count": 8}, {}, "is a mixture of experts (llama.expert_count 8)"),
    "missing_metadata": ({"llama.block_count": None}, {}, "missing metadata 'llama.block_count'"),
    "heads_that_do_not_divide": ({"llama.attention.head_count": 5}, {}, "not a valid Llama configuration"),
    # a GGUF bool is not a number (Python's True would read as 1.0)
    "a_bool_rope_base": ({"llama.rope.freq_base": True}, {}, "rope_theta must be a positive finite number, got True"),
    "a_bool_norm_eps": ({"llama.attention.layer_norm_rms_epsilon": True}, {},
                        "norm_eps must be a positive finite number, got True"),
    "an_infinite_rope_factor": ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": float("inf")}, {},
                                "RoPE scaling factor must be a positive finite number, got inf"),
    # refused before a table of 10^8 layers' names is built
    "a_block_count_of_a_hundred_million": ({"llama.block_count": 100_000_000}, {},
                                           "llama.block_count is 100000000, but the file holds tensors of 2 blocks"),
    "an_integer_tensor": ({}, {"token_embd.weight": (numpy.zeros((267, 64), numpy.int32), GGMLQuantizationType.I32)},
                          "tensor 'token_embd.weight' is stored as I32, which the gguf package cannot dequantize"),
    "a_nan_weight": ({}, {"blk.0.attn_norm.weight": (numpy.full(64, numpy.nan, numpy.float32), F32)},
                     "tensor 'blk.0.attn_norm.weight' (F32) holds NaN or infinite weights"),
    "another_tokenizer": ({"tokenizer.ggml.model": "bert"}, {}, "tokenizer.ggml.model is 'bert', which npllama cannot"),
    "an_unknown_pre_tokenizer": ({"tokenizer.ggml.pre": "nope"}, {},
                                 "its tokenizer metadata has pre-tokenizer (tokenizer.ggml.pre) 'nope'"),
    "a_tokenizer_of_another_size": ({"tokenizer.ggml.tokens": TOKENS[:-1], "tokenizer.ggml.token_type": None,
                                     "llama.vocab_size": None, "tokenizer.ggml.merges": MERGES[:-1]}, {},
                                    "the tokenizer's token count is 266, but token_embd has 267 rows"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_npllama_cannot_represent_is_refused_in_one_line_naming_the_file(tmp_path, case):
    metadata, tensors, expected = REFUSALS[case]
    path, _ = model_file(tmp_path, CONFIGS["multi_head"], metadata=metadata, tensors=tensors)
    assert expected in one_line_refusal(path)


@pytest.mark.parametrize("block_count", [1, 3])
def test_a_block_count_other_than_the_blocks_present_is_refused_naming_both(tmp_path, block_count):
    path, _ = model_file(tmp_path, CONFIGS["multi_head"], metadata={"llama.block_count": block_count})
    assert f"llama.block_count is {block_count}, but the file holds tensors of 2 blocks" in one_line_refusal(path)


def test_blocks_not_numbered_from_0_without_gaps_are_refused_though_their_count_fits(tmp_path):
    """Blocks 0 and 2 in a file of llama.block_count 2: the count fits, the numbering does not."""
    config = CONFIGS["multi_head"]
    stored = gguf_tensors(config, llama.init_params(config, seed=0, std=0.5), F32)
    moved = {name: None for name in stored if name.startswith("blk.1.")}
    moved.update({name.replace("blk.1.", "blk.2.", 1): stored[name] for name in stored if name.startswith("blk.1.")})
    path, _ = model_file(tmp_path, config, tensors=moved)
    assert "llama.block_count is 2, but the file holds tensors of 2 blocks, not numbered 0, 1, 2" in \
        one_line_refusal(path)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path, _ = model_file(tmp_path_factory.mktemp("good"), CONFIGS["gqa_tied"], GGMLQuantizationType.Q4_1)
    return path.read_bytes()


@pytest.mark.parametrize("keep", [1, 4, 8, 16, 24, 100, 0.05, 0.2, 0.5, 0.9, -1])
def test_a_truncated_file_is_refused_in_one_line(tmp_path, good_file, keep):
    size = len(good_file) + keep if keep < 0 else keep if isinstance(keep, int) else int(keep * len(good_file))
    path = tmp_path / "cut.gguf"
    path.write_bytes(good_file[:size])
    message = one_line_refusal(path)
    assert "truncated or damaged" in message or "not a GGUF file" in message, message


@pytest.mark.parametrize("content, expected", [
    (b"", "is not a GGUF file (it begins with b'', not b'GGUF')"),
    (b"PK\x03\x04 a zip file", "is not a GGUF file (it begins with b'PK\\x03\\x04'"),
    (b"GGUF\x63\x00\x00\x00" + bytes(16), "is not a readable GGUF file (Sorry, file appears to be version 99"),
])
def test_a_file_that_is_not_a_gguf_file_is_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    assert expected in one_line_refusal(path)
    assert "does not exist" in one_line_refusal(tmp_path / "absent.gguf")
    assert "is a folder, not a file" in one_line_refusal(tmp_path)
    os.mkfifo(tmp_path / "pipe.gguf")  # opened, it would block until a writer came
    assert "is a FIFO, not a file" in one_line_refusal(tmp_path / "pipe.gguf")


# --- tokenizers ---------------------------------------------------------------------------------------

TEXTS = ["Hello world", " leading space", "two  spaces and a tab\tthen\nnew lines\n\n", "def f(x):\n    return x",
         "café naïve 中文 😀", "numbers 1234567 and 3.14", "a\u2581literal lower block", "", " ", "THE the The tHe"]


def test_a_byte_level_bpe_vocabulary_gives_the_tokenizer_its_metadata_describes(tmp_path):
    path, _ = model_file(tmp_path, CONFIGS["multi_head"])
    tokenizer = import_gguf(path).tokenizer
    expected = BpeTokenizer.from_gguf_metadata(llama_metadata(CONFIGS["multi_head"]))
    assert isinstance(tokenizer, BpeTokenizer) and tokenizer.fingerprint == expected.fingerprint
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos_token) == (1, 2, False)
    assert [tokenizer.encode(text) for text in TEXTS] == [expected.encode(text) for text in TEXTS]
    assert tokenizer.encode(" the") == [TOKENS.index("Ġthe")]


def test_a_file_without_tokenizer_metadata_has_no_tokenizer(tmp_path):
    config = CONFIGS["multi_head"]
    params = llama.init_params(config, seed=0)
    path = write_gguf(tmp_path / "bare.gguf", llama_metadata(config, tokenizer=False), gguf_tensors(config, params))
    assert import_gguf(path).tokenizer is None


def sentencepiece_metadata(tokenizer_path) -> dict:
    """A SentencePiece model's vocabulary as llama.cpp's converter writes it (tokenizer.ggml.model "llama")."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = range(processor.vocab_size())
    kinds = [2 if processor.is_unknown(i) else 3 if processor.is_control(i) else 5 if processor.is_unused(i)
             else 6 if processor.is_byte(i) else 1 for i in ids]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in ids],
            "tokenizer.ggml.scores": [processor.get_score(i) for i in ids], "tokenizer.ggml.token_type": kinds,
            "tokenizer.ggml.bos_token_id": processor.bos_id(), "tokenizer.ggml.eos_token_id": processor.eos_id(),
            "tokenizer.ggml.unknown_token_id": processor.unk_id(), "tokenizer.ggml.pre": None,
            "tokenizer.ggml.merges": None, "tokenizer.ggml.add_bos_token": True}


@pytest.fixture(scope="module")
def sentencepiece_file(tmp_path_factory, corpus):
    """(a GGUF file with the 512-piece SentencePiece vocabulary of the test corpus, that Tokenizer)."""
    _, tokenizer_path = corpus
    config = replace(CONFIGS["multi_head"], vocab_size=512)
    path, _ = model_file(tmp_path_factory.mktemp("sentencepiece"), config, metadata=sentencepiece_metadata(
        tokenizer_path))
    return path, Tokenizer.load(tokenizer_path)


SENTENCEPIECE_TEXTS = TEXTS + ["import os\nfrom pathlib import Path\n\nclass A:\n    pass\n", "    indented", "x" * 50,
                               "<s> written </s> in the text", "\x00 control \x7f bytes"]


def test_a_sentencepiece_vocabulary_gives_the_original_models_ids(sentencepiece_file):
    path, original = sentencepiece_file
    tokenizer = import_gguf(path).tokenizer
    assert isinstance(tokenizer, Tokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id) == (
        original.vocab_size, original.bos_id, original.eos_id, original.unk_id, original.pad_id)
    assert [tokenizer.id_to_piece(i) for i in range(512)] == [original.id_to_piece(i) for i in range(512)]
    for text in SENTENCEPIECE_TEXTS:
        assert tokenizer.encode(text, bos=True, eos=True) == original.encode(text, bos=True, eos=True), text
        assert tokenizer.decode(tokenizer.encode(text)) == original.decode(original.encode(text)), text


def test_a_sentencepiece_vocabulary_without_the_space_prefix_encodes_without_it(tmp_path, corpus):
    import sentencepiece

    from npllama.tokenizer.model_bytes import NO_DUMMY_PREFIX

    _, tokenizer_path = corpus
    metadata = {**sentencepiece_metadata(tokenizer_path), "tokenizer.ggml.add_space_prefix": False}
    path, _ = model_file(tmp_path, replace(CONFIGS["multi_head"], vocab_size=512), metadata=metadata)
    tokenizer = import_gguf(path).tokenizer
    without = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_path.read_bytes() + NO_DUMMY_PREFIX)
    texts = [text for text in TEXTS if "\u2581" not in text]  # npllama spells a literal one in bytes
    assert [tokenizer.encode(text) for text in texts] == [without.encode(text) for text in texts]
    assert tokenizer.encode("word") != Tokenizer.load(tokenizer_path).encode("word")


# Where transformers' GGUF tokenizer and SentencePiece (the model's own, Meta's, llama.cpp's) differ:
# text that begins with a space (tokenizers' Metaspace adds no "▁" in front of one; SentencePiece's
# dummy prefix is always there), control tokens written in the text (transformers matches them
# whole; SentencePiece reads their characters), and a literal "▁" (npllama.Tokenizer spells it in
# bytes so that it decodes back to itself).
TRANSFORMERS_DIFFERS = {" leading space", " ", "    indented", "<s> written </s> in the text",
                        "a\u2581literal lower block"}


@pytest.mark.oracle
def test_a_sentencepiece_vocabulary_gives_transformers_ids(sentencepiece_file):
    transformers = pytest.importorskip("transformers")
    path, _ = sentencepiece_file
    ours = import_gguf(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    differ = {text for text in SENTENCEPIECE_TEXTS
              if ours.encode(text) != theirs.encode(text, add_special_tokens=False)}
    assert differ == TRANSFORMERS_DIFFERS
    assert ours.encode("Hi", bos=True) == theirs.encode("Hi")  # both add BOS, as llama.cpp does


# --- npllama.load and the commands --------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_model_file(tmp_path_factory):
    path, _ = model_file(tmp_path_factory.mktemp("bpe"), CONFIGS["gqa_tied"], GGMLQuantizationType.Q8_0)
    return path


def test_npllama_load_reads_a_gguf_file_by_its_name_or_its_magic_bytes(bpe_model_file, tmp_path):
    imported = import_gguf(bpe_model_file)
    loaded = load(bpe_model_file)
    assert (loaded.kind, loaded.config) == ("gguf", imported.config) and isinstance(loaded.tokenizer, BpeTokenizer)
    assert all(numpy.array_equal(loaded.params[name], imported.params[name]) for name in imported.params)
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(bpe_model_file.read_bytes())
    wide = load(renamed, dtype="float64")
    assert wide.kind == "gguf" and all(p.dtype == numpy.float64 for p in wide.params.values())
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(LoadError, match="is neither a folder nor a GGUF file; pass .* or a .gguf file"):
        load(tmp_path / "notes.txt")


def test_the_generate_command_continues_a_prompt_with_a_gguf_files_tokenizer(bpe_model_file):
    text = load(bpe_model_file).generate("the", max_new_tokens=8, temperature=0)
    result = subprocess.run([sys.executable, "-m", "npllama.generate", "--checkpoint", str(bpe_model_file), "--prompt",
                             "the", "--max-new-tokens", "8", "--temperature", "0"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the" + text + "\n"


def test_the_eval_and_audit_commands_read_a_gguf_file(bpe_model_file, tmp_path, capsys):
    from conftest import TASK_FIXTURES
    from npllama.audit.__main__ import main as audit
    from npllama.eval.__main__ import main as evaluate

    assert evaluate(["--checkpoint", str(bpe_model_file), "--tasks", "arc_easy", "--limit", "2", "--data-dir",
                     str(TASK_FIXTURES), "--no-progress"]) == 0
    assert "arc_easy" in capsys.readouterr().out
    numpy.save(tmp_path / "batch.npy", tokens_for(CONFIGS["gqa_tied"], length=9))
    assert audit(["reference", str(bpe_model_file), "--batch", str(tmp_path / "batch.npy"), "--out",
                  str(tmp_path / "grads.safetensors")]) == 0
    assert audit(["compare", str(bpe_model_file), "--batch", str(tmp_path / "batch.npy"), "--grads",
                  str(tmp_path / "grads.safetensors")]) == 0
    assert "gradients agree" in capsys.readouterr().out


def test_the_convert_command_imports_and_exports_a_gguf_file(bpe_model_file, tmp_path, capsys):
    from npllama.convert.__main__ import main as convert

    assert convert(["import", str(bpe_model_file), "--out", str(tmp_path / "run")]) == 0
    assert "its byte-level BPE tokenizer left out" in capsys.readouterr().out
    run, original = load(tmp_path / "run"), load(bpe_model_file)
    assert run.tokenizer is None and run.config == original.config
    assert all(numpy.array_equal(run.params[name], original.params[name]) for name in original.params)
    assert convert(["export", str(bpe_model_file), "--out", str(tmp_path / "hf")]) == 0
    exported = BpeTokenizer.from_hf_directory(tmp_path / "hf")
    assert exported.fingerprint == original.tokenizer.fingerprint
    assert exported.tokenizer_config() == original.tokenizer.tokenizer_config()
    reloaded = load(tmp_path / "hf").tokenizer  # a Hugging Face folder's tokenizer.json, with no tokenizer.model
    assert isinstance(reloaded, BpeTokenizer) and reloaded.fingerprint == original.tokenizer.fingerprint


def test_an_exported_config_names_the_tokenizers_own_bos_and_eos(tmp_path):
    """config.json's bos_token_id and eos_token_id are the file's tokenizer's, not npllama's 1 and 2."""
    import json

    from npllama.convert.__main__ import main as convert

    path, _ = model_file(tmp_path, CONFIGS["gqa_tied"], metadata={"tokenizer.ggml.bos_token_id": 0,
                                                                  "tokenizer.ggml.eos_token_id": 1})
    assert convert(["export", str(path), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
