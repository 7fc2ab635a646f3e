"""Fuzzing the readers of files from strangers: Hypothesis damages valid files (truncates them, flips
bytes, splices bytes in, overwrites 8 bytes with a huge little-endian number where a size or offset
may be, nests JSON deeply, swaps a JSON value for another kind) and every reader must keep its
promise on every example: a correct load, or one line (an NpllamaError); never another exception,
never more memory than the bound, never a hang. Each example reads in a forked child process, whose
peak resident memory `resource` measures and whose address space is capped, and which is killed
after 10 s.

Readers: .pth (the archive, and its pickle alone), safetensors, config.json, task files, GGUF
files, a GGUF file's tokenizer metadata (byte-level BPE; SentencePiece, rebuilt and loaded by its
C++ library), tokenizer.json and tokenizer_config.json. Examples per reader: FUZZ_EXAMPLES (about
15 s for all of them on 2 cores).
"""

import json
import os
import pickle
import resource
import select
import signal
import traceback
import zipfile

import numpy
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from conftest import TASK_FIXTURES
from npllama.convert.hf import import_hf, read_safetensors
from npllama.convert.pth import read_pth
from npllama.errors import NpllamaError
from npllama.eval.tasks import load_task
from npllama.model import LlamaConfig

FUZZ_EXAMPLES = 60
MEMORY_LIMIT = 64 * 2**20  # bytes; every valid file here is under 100 KB and loads in under 1 MiB
SECONDS = 10
CONFIG = LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, hidden_dim=32, max_seq_len=32)
fuzzing = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def keeps_the_promise(read, seconds: float = SECONDS) -> None:
    """`read()`, run in a forked child process, loads or raises a one-line NpllamaError, its resident
    memory grows by at most MEMORY_LIMIT (the child's ru_maxrss from `resource`, against what it held
    when forked; its address space is capped too, so that an allocation past the bound fails there
    rather than on this machine), and it ends within `seconds`."""
    receive, send = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report (outcome, detail, growth in bytes) through the pipe, then exit
        try:
            os.close(receive)
            resource.setrlimit(resource.RLIMIT_AS, (address_space() + 4 * MEMORY_LIMIT, resource.RLIM_INFINITY))
            start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                read()
                outcome: tuple = ("loaded", "")
            except NpllamaError as error:
                outcome = ("refused", str(error))
            except BaseException:
                outcome = ("broke", traceback.format_exc())
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * 1024
            with os.fdopen(send, "wb") as pipe:
                pipe.write(pickle.dumps((*outcome, grown)))
        finally:
            os._exit(0)
    os.close(send)
    report = bytearray()
    with os.fdopen(receive, "rb") as pipe:
        while select.select([pipe], [], [], seconds)[0]:
            chunk = pipe.read1(1 << 16)
            if not chunk:
                break
            report += chunk
        else:
            os.kill(child, signal.SIGKILL)
    status = os.waitpid(child, 0)[1]
    assert report, f"the reader hung (still reading after {seconds} s) or died ({status=})"
    outcome, detail, grown = pickle.loads(report)
    if currently_in_test_context():  # pytest --hypothesis-show-statistics: how many loaded, how many were refused
        event(outcome)
    assert outcome != "broke", detail
    assert "\n" not in detail, detail
    assert grown <= MEMORY_LIMIT, f"resident memory grew by {grown:,} bytes"


@pytest.mark.parametrize("read, broken", [
    (lambda: {}["x"], "KeyError"),
    (lambda: NpllamaError("two\nlines"), None),
    (lambda: (_ for _ in ()).throw(NpllamaError("two\nlines")), "two"),
    (lambda: numpy.ones(MEMORY_LIMIT // 4), "resident memory grew"),
    (lambda: numpy.empty(10 * MEMORY_LIMIT), "MemoryError"),
    (lambda: select.select([], [], [], 30), "hung"),
    (lambda: os.kill(os.getpid(), signal.SIGKILL), "died"),
])
def test_the_promise_is_broken_by_a_traceback_two_lines_memory_or_a_hang(read, broken):
    """The checker itself: each of these breaks the promise, and keeps_the_promise says so."""
    if broken is None:  # returning (not raising) an error is a load
        keeps_the_promise(read, seconds=2)
        return
    with pytest.raises(AssertionError, match=broken):
        keeps_the_promise(read, seconds=2)


def address_space() -> int:
    """This process's virtual memory in bytes (Linux: /proc/self/statm counts pages)."""
    return int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` after one to three damages."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["truncate", "flip", "splice", "inflate"]))
        if kind == "truncate":
            data = data[:at]
        elif kind == "flip":
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:] if data else data
        elif kind == "splice":
            data = data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
        else:
            huge = draw(st.sampled_from([2**31 - 1, 2**32, 2**40, 2**62, 2**64 - 1]))
            data = data[:at] + huge.to_bytes(8, "little") + data[at + 8:]
    return data


@pytest.fixture(scope="module")
def pth_bytes(tmp_path_factory) -> bytes:
    torch = pytest.importorskip("torch", reason="torch writes the .pth files fuzzed here: pip install '.[test]'")
    path = tmp_path_factory.mktemp("pth") / "consolidated.00.pth"
    generator = torch.Generator().manual_seed(0)
    torch.save({"w": torch.randn(8, 4, generator=generator), "b": torch.randn(8, generator=generator).half(),
                "view": torch.arange(12.0)[2:8]}, path)
    return path.read_bytes()


@fuzzing
@given(data=st.data())
def test_a_damaged_pth_file_loads_or_is_refused_in_one_line(tmp_path, pth_bytes, data):
    path = tmp_path / "consolidated.00.pth"
    path.write_bytes(data.draw(damaged(pth_bytes)))
    keeps_the_promise(lambda: read_pth(path))


@fuzzing
@given(data=st.data())
def test_a_pth_file_with_a_damaged_pickle_loads_or_is_refused_in_one_line(tmp_path, pth_bytes, data):
    """The archive stays valid; only data.pkl, the program the unpickler runs, is damaged."""
    source, path = tmp_path / "source.pth", tmp_path / "consolidated.00.pth"
    source.write_bytes(pth_bytes)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as copy:
        for item in original.infolist():
            content = original.read(item)
            copy.writestr(item, data.draw(damaged(content)) if item.filename.endswith("data.pkl") else content)
    keeps_the_promise(lambda: read_pth(path))


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory) -> bytes:
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    rng = numpy.random.default_rng(0)
    save_file({"a": rng.standard_normal((8, 4)).astype(numpy.float32), "b": numpy.ones(3, numpy.float16)}, str(path))
    return path.read_bytes()


@fuzzing
@given(data=st.data())
def test_a_damaged_safetensors_file_loads_or_is_refused_in_one_line(tmp_path, safetensors_bytes, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.draw(damaged(safetensors_bytes)))
    keeps_the_promise(lambda: read_safetensors(path))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=8)


@st.composite
def damaged_json(draw, document: dict) -> str:
    """A JSON document with one value replaced (by any JSON value, or one nested 10^4 deep), at the
    top level or somewhere inside, or its text damaged."""
    kind = draw(st.sampled_from(["value", "deep", "text"]))
    if kind == "text":
        return draw(damaged(json.dumps(document).encode())).decode("utf-8", "surrogateescape")
    document = json.loads(json.dumps(document))  # a copy to change
    parent, key = document, draw(st.sampled_from(sorted(document)))
    while isinstance(parent[key], (dict, list)) and parent[key] and draw(st.booleans()):  # deeper
        parent = parent[key]
        key = draw(st.sampled_from(sorted(parent)) if isinstance(parent, dict) else st.integers(0, len(parent) - 1))
    parent[key] = draw(json_values) if kind == "value" else "NESTED"
    text = json.dumps(document, allow_nan=True)
    return text.replace('"NESTED"', "[" * 10_000 + "]" * 10_000)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from npllama import model as llama
    from npllama.convert.hf import export_hf

    folder = export_hf(tmp_path_factory.mktemp("hf") / "model", CONFIG, llama.init_params(CONFIG, seed=0))
    return folder, json.loads((folder / "config.json").read_text())


@fuzzing
@given(data=st.data())
def test_a_damaged_config_json_loads_or_is_refused_in_one_line(hf_model, data):
    folder, config = hf_model
    (folder / "config.json").write_text(data.draw(damaged_json(config)), errors="surrogateescape")
    keeps_the_promise(lambda: import_hf(folder))


@pytest.fixture(scope="module")
def task_lines() -> list[str]:
    return (TASK_FIXTURES / "arc_easy" / "validation.jsonl").read_text().splitlines()[:5]


@fuzzing
@given(data=st.data())
def test_a_damaged_task_file_loads_or_is_refused_in_one_line(tmp_path, task_lines, data):
    line = data.draw(st.integers(0, len(task_lines) - 1))
    local = {"context": "Question: 2+2?\nAnswer:", "choices": ["4", "5"], "gold": 0}
    lines = [json.dumps(local)] * 3
    lines[line % 3] = data.draw(damaged_json(local))
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n", errors="surrogateescape")
    keeps_the_promise(lambda: load_task(str(path)))


# --- GGUF files and tokenizers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    """A small Llama GGUF file: Q8_0 matrices, F32 gains, a byte-level BPE tokenizer in its metadata."""
    gguf = pytest.importorskip("gguf", reason="GGUF files are read with gguf: pip install '.[models]'")
    pytest.importorskip("tokenizers", reason="byte-level BPE needs tokenizers: pip install '.[models]'")
    from npllama import model as llama
    from npllama.params import gguf_names

    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=len(BPE_TOKENS), hidden_dim=32, max_seq_len=32)
    params = llama.init_params(config, seed=0)
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    for key, value in {"llama.embedding_length": 32, "llama.block_count": 1, "llama.attention.head_count": 2,
                       "llama.feed_forward_length": 32, "llama.context_length": 32,
                       "llama.attention.layer_norm_rms_epsilon": 2.0**-16, "tokenizer.ggml.model": "gpt2",
                       "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": BPE_TOKENS,
                       "tokenizer.ggml.token_type": [3] + [1] * (len(BPE_TOKENS) - 1),
                       "tokenizer.ggml.merges": BPE_MERGES, "tokenizer.ggml.eos_token_id": 0}.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    for meta_name, name in gguf_names(config).items():
        weights = numpy.asarray(params[meta_name], numpy.float32)
        if weights.ndim == 1:
            writer.add_tensor(name, weights)
        else:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(weights, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def byte_level_tokens() -> list[str]:
    from npllama.tokenizer.bpe import byte_alphabet

    return ["<|endoftext|>"] + list(byte_alphabet().values()) + ["".join(merge.split()) for merge in BPE_MERGES]


BPE_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "o n"]
BPE_TOKENS = byte_level_tokens()


@fuzzing
@given(data=st.data())
def test_a_damaged_gguf_file_loads_or_is_refused_in_one_line(tmp_path, gguf_bytes, data):
    from npllama.convert.gguf import import_gguf

    path = tmp_path / "model.gguf"
    path.write_bytes(data.draw(damaged(gguf_bytes)))
    keeps_the_promise(lambda: import_gguf(path).tokenizer.encode("the thin one 123"))


gguf_values = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=12) \
    | st.lists(st.text(max_size=6) | st.integers(-2**31, 2**32), max_size=300)


@fuzzing
@given(data=st.data())
def test_byte_level_tokenizer_metadata_builds_a_tokenizer_or_is_refused_in_one_line(data):
    """The metadata as the GGUF reader returns it, one key given any value GGUF can hold."""
    from npllama.tokenizer.bpe import BpeTokenizer

    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": BPE_TOKENS,
              "tokenizer.ggml.token_type": [3] + [1] * (len(BPE_TOKENS) - 1), "tokenizer.ggml.merges": BPE_MERGES,
              "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.add_bos_token": False}
    key = data.draw(st.sampled_from(sorted(fields) + ["tokenizer.ggml.bos_token_id", "tokenizer.chat_template"]))
    fields[key] = data.draw(gguf_values)
    keeps_the_promise(lambda: BpeTokenizer.from_gguf_metadata(fields, "fuzzed").encode("the thin one"))


@fuzzing
@given(data=st.data())
def test_sentencepiece_tokenizer_metadata_builds_a_tokenizer_or_is_refused_in_one_line(data):
    """A GGUF "llama" vocabulary (pieces, scores, types) of any content, rebuilt as a SentencePiece
    model and loaded by SentencePiece itself: a crash in its C++ would kill the child and fail here."""
    from npllama.convert.gguf import sentencepiece_model
    from npllama.tokenizer import Tokenizer

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + ["▁t", "he", "▁the"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1]
    fields = {"tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": [0.0] * 3 + [0.0] * 256 + [-1.0, -2.0, -3.0],
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0}
    key = data.draw(st.sampled_from(sorted(fields) + ["tokenizer.ggml.add_space_prefix"]))
    if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type") and data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(pieces) - 1))  # one piece or type changed, the lists kept whole
        fields[key] = [*fields[key][:at], data.draw(st.text(max_size=4) if key.endswith("tokens")
                                                    else st.integers(-2**31, 2**31 - 1)), *fields[key][at + 1:]]
    else:
        fields[key] = data.draw(gguf_values)
    keeps_the_promise(lambda: Tokenizer(sentencepiece_model(fields), "fuzzed").encode("the thin one 123"))


@pytest.fixture(scope="module")
def tokenizer_json() -> dict:
    pytest.importorskip("tokenizers", reason="byte-level BPE needs tokenizers: pip install '.[models]'")
    from npllama.tokenizer.bpe import BpeTokenizer

    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": BPE_TOKENS,
              "tokenizer.ggml.token_type": [3] + [1] * (len(BPE_TOKENS) - 1), "tokenizer.ggml.merges": BPE_MERGES,
              "tokenizer.ggml.eos_token_id": 0}
    return json.loads(BpeTokenizer.from_gguf_metadata(fields).to_json())


@fuzzing
@given(data=st.data())
def test_a_damaged_tokenizer_json_loads_or_is_refused_in_one_line(tmp_path, tokenizer_json, data):
    from npllama.tokenizer.bpe import BpeTokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text(data.draw(damaged_json(tokenizer_json)), errors="surrogateescape")
    keeps_the_promise(lambda: BpeTokenizer.from_tokenizer_json(path).encode("the thin one <|endoftext|>"))


@fuzzing
@given(data=st.data())
def test_a_damaged_tokenizer_config_json_loads_or_is_refused_in_one_line(tmp_path, tokenizer_json, data):
    from npllama.tokenizer.bpe import BpeTokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False, "unk_token": None,
              "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}", "model_max_length": 2048}
    (tmp_path / "tokenizer_config.json").write_text(data.draw(damaged_json(config)), errors="surrogateescape")
    keeps_the_promise(lambda: BpeTokenizer.from_hf_directory(tmp_path).encode("the thin one", bos=False))
