"""Files from strangers: a Hugging Face folder, a safetensors file, a batch or gradients file that
someone else wrote is read only inside its folder, with its memory bounded by what it declares
and checks before allocation, and anything wrong with it is one line (exit status 2 from the
commands), never a traceback, a hang or bytes of a file it should not have opened.

The .pth reader's cases are in tests/test_pth.py.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from safetensors.numpy import save_file

from npllama.convert import ConvertError
from npllama.convert.hf import import_hf, read_safetensors
from npllama.errors import NpllamaError
from npllama.model import LlamaConfig

CONFIG = LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, hidden_dim=32, max_seq_len=32)


def hf_folder(folder: Path, shards: int = 1, config: LlamaConfig = CONFIG) -> Path:
    """A small Hugging Face Llama folder written by npllama's exporter, its weights in `shards` files."""
    from npllama import model as llama
    from npllama.convert.hf import export_hf

    export_hf(folder, config, llama.init_params(config, seed=0))
    if shards > 1:
        weights = read_safetensors(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        names, weight_map = sorted(weights), {}
        for shard in range(shards):
            file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: weights[name] for name in names[shard::shards]}
            save_file(part, str(folder / file))
            weight_map.update(dict.fromkeys(part, file))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def refusal(call, *args) -> str:
    with pytest.raises(NpllamaError) as refused:
        call(*args)
    message = str(refused.value)
    assert "\n" not in message, message
    return message


def set_index_entry(folder: Path, file_name: str):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = file_name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# --- nothing read outside the model's folder ---------------------------------------------------------

@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "../outside/x.safetensors", "/etc/passwd", ""])
def test_an_index_entry_that_leaves_the_folder_is_refused_before_anything_is_opened(tmp_path, entry):
    folder = hf_folder(tmp_path / "model", shards=2)
    (tmp_path / "outside").mkdir()
    save_file({"model.norm.weight": numpy.ones(16, numpy.float32)}, str(tmp_path / "outside" / "x.safetensors"))
    set_index_entry(folder, entry)
    message = refusal(import_hf, folder)
    assert "which is not a file name inside the folder" in message and "root:" not in message


def test_a_shard_linked_outside_the_folder_is_refused_naming_the_link_not_its_bytes(tmp_path):
    folder = hf_folder(tmp_path / "model", shards=2)
    shard = next(folder.glob("model-00001-*.safetensors"))
    shard.unlink()
    shard.symlink_to("/proc/self/environ")
    message = refusal(import_hf, folder)
    assert f"{shard}: a link to /proc/" in message and "outside the model's folder" in message
    assert "PATH=" not in message and "header of" not in message


def test_a_hugging_face_cache_snapshot_whose_files_link_to_its_blobs_loads(tmp_path):
    """The Hub's cache keeps each file once in blobs/ and links it from snapshots/<revision>/."""
    repository = tmp_path / "models--someone--tiny"
    source, snapshot, blobs = hf_folder(tmp_path / "source", shards=2), repository / "snapshots" / "abc123", \
        repository / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for number, file in enumerate(sorted(source.iterdir())):
        os.replace(file, blobs / f"blob{number}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{number}")
    assert import_hf(snapshot).config.dim == CONFIG.dim


def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path):
    folder = hf_folder(tmp_path / "model", shards=2)
    first, second = sorted(folder.glob("model-*.safetensors"))
    extra = read_safetensors(first)
    save_file({**read_safetensors(second), **dict(list(extra.items())[:1])}, str(second))
    message = refusal(import_hf, folder)
    assert f"{second}: tensor" in message and f"is also in {first.name}" in message


# --- safetensors headers checked as the specification says -----------------------------------------

def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize("header, data_bytes, expected", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps the tensor before it"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "leaves bytes 0..4 unused"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8, "its tensors hold 4 bytes, the file 8"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "not lists of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, 8, "not lists of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "not lists of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [16384, 16384], "data_offsets": [0, 4]}}, 4, "do not hold shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "do not hold shape"),
    ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, 8, "has dtype 'I64'"),
], ids=["overlap", "gap", "bytes-left-over", "negative-shape", "string-shape", "bool-shape", "huge-shape",
        "reversed-offsets", "integer-weights"])
def test_a_safetensors_header_the_specification_forbids_is_one_line(tmp_path, header, data_bytes, expected):
    path = raw_safetensors(tmp_path / "w.safetensors", header, bytes(data_bytes))
    assert expected in refusal(read_safetensors, path)


@pytest.mark.parametrize("header", [b"[1, 2]", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe"],
                         ids=["a-list", "nested-too-deep", "not-utf8"])
def test_a_safetensors_header_that_is_not_a_json_object_is_one_line(tmp_path, header):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    refusal(read_safetensors, path)


def test_the_safetensors_library_agrees_that_overlapping_offsets_are_invalid(tmp_path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = raw_safetensors(tmp_path / "w.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    with pytest.raises(SafetensorError):
        load_file(str(path))


# --- config.json --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "a JSON list, not the object config.json is"),
    ("[" * 100_000 + "]" * 100_000, "nested too deep"),
    (" " * (16 * 2**20 + 1), "larger than 16,777,216 bytes"),
    ("{\"hidden_size\": ", "not a readable JSON file"),
], ids=["a-list", "nested-too-deep", "too-large", "cut-short"])
def test_a_config_json_that_is_not_a_small_json_object_is_one_line(tmp_path, content, expected):
    folder = hf_folder(tmp_path / "model")
    (folder / "config.json").write_text(content)
    assert expected in refusal(import_hf, folder)


@pytest.mark.parametrize("change, expected", [
    ({"rope_theta": True}, "rope_theta must be a positive finite number, got True"),
    ({"vocab_size": "32"}, "vocab_size is '32', not a positive integer"),
    ({"hidden_size": 1e12}, "hidden_size is 1000000000000.0, not a positive integer"),
    ({"num_hidden_layers": 100_000_000}, "num_hidden_layers is 100000000, the weights hold 1 layers"),
    ({"rope_scaling": {"rope_type": "linear", "factor": True}},
     "RoPE scaling factor must be a positive finite number, got True"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1e400}}, "positive finite number, got inf"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192.5}}, "llama3 RoPE scaling needs"),
], ids=["bool-theta", "string-vocab", "float-hidden-size", "layers-beyond-the-weights", "bool-rope-factor",
        "infinite-rope-factor", "fractional-original-context"])
def test_a_config_field_of_the_wrong_kind_or_size_is_named_before_anything_is_allocated(tmp_path, change, expected):
    folder = hf_folder(tmp_path / "model")
    fields = json.loads((folder / "config.json").read_text())
    if "rope_theta" in change or "rope_scaling" in change:
        fields.pop("rope_parameters")
    (folder / "config.json").write_text(json.dumps({**fields, **change}))
    assert expected in refusal(import_hf, folder)


# --- batches and gradients of audit compare ----------------------------------------------------------

def audit_compare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npllama.audit", "compare", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("role", ["--batch", "--grads"])
def test_a_fifo_as_a_batch_or_gradients_file_is_named_and_never_opened(tmp_path, role):
    folder = hf_folder(tmp_path / "model")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    numpy.save(tmp_path / "batch.npy", numpy.zeros((1, 5), numpy.int64))
    files = {"--batch": tmp_path / "batch.npy", "--grads": tmp_path / "none.safetensors", role: fifo}
    result = audit_compare(folder, "--batch", files["--batch"], "--grads", files["--grads"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{fifo}" in result.stderr and "FIFO" in result.stderr


def test_a_batch_of_token_ids_in_safetensors_is_read_as_the_readme_says(tmp_path):
    from npllama.audit.compare import read_batch

    tokens = numpy.arange(12, dtype=numpy.int32).reshape(2, 6)
    save_file({"tokens": tokens}, str(tmp_path / "batch.safetensors"))
    assert read_batch(tmp_path / "batch.safetensors").tolist() == tokens.tolist()
    save_file({"tokens": tokens.astype(numpy.float32)}, str(tmp_path / "floats.safetensors"))
    assert "expected integer token ids" in refusal(read_batch, tmp_path / "floats.safetensors")


def test_integer_weights_are_refused_by_the_safetensors_reader_in_the_words_of_every_loader(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": numpy.zeros(2, numpy.int64)}, str(path))
    with pytest.raises(ConvertError, match="has dtype 'I64'; npllama reads F64, F32, F16, BF16"):
        read_safetensors(path)


# --- weights: floating point and finite, from every kind of file --------------------------------------

def test_nan_weights_are_refused_by_generate_in_one_line_naming_the_tensor(tmp_path):
    folder = hf_folder(tmp_path / "model")
    weights = read_safetensors(folder / "model.safetensors")
    weights["model.norm.weight"][3] = numpy.nan
    save_file(weights, str(folder / "model.safetensors"))
    result = subprocess.run([sys.executable, "-m", "npllama.generate", "--checkpoint", str(folder), "--prompt", "a"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "tensor 'norm.weight' holds NaN or infinite values" in result.stderr


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_integer_and_bool_weights_in_a_meta_shard_are_refused_as_every_loader_refuses_them(tmp_path, dtype):
    torch = pytest.importorskip("torch", reason="torch writes Meta's .pth files: pip install '.[test]'")
    from test_convert_meta import write_meta_layout

    from npllama import load
    from npllama import model as llama

    folder = write_meta_layout(tmp_path / "meta", CONFIG, llama.init_params(CONFIG, seed=0), n_ranks=1)
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    shard["norm.weight"] = torch.ones(CONFIG.dim, dtype=getattr(torch, dtype))
    torch.save(shard, folder / "consolidated.00.pth")
    message = refusal(load, folder)
    assert f"tensor 'norm.weight' has dtype {dtype}; weights must be float64, float32, float16 or bfloat16" in message


# --- tokenizers beside the weights ---------------------------------------------------------------------

def byte_level_folder(folder: Path, vocab_size: int = 300) -> Path:
    """A Hugging Face folder with a byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json) of
    258 tokens and no tokenizer.model, as SmolLM's and Llama 3's are."""
    pytest.importorskip("tokenizers", reason="byte-level BPE needs tokenizers: pip install '.[models]'")
    from npllama.tokenizer.bpe import BpeTokenizer, byte_alphabet

    tokens = ["<|endoftext|>", *byte_alphabet().values(), "he"]
    tokenizer = BpeTokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1), "tokenizer.ggml.merges": ["h e"],
        "tokenizer.ggml.eos_token_id": 0})
    hf_folder(folder, config=LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=vocab_size, hidden_dim=32,
                                         max_seq_len=32))
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer.tokenizer_config()))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return folder


def test_a_hugging_face_folder_with_tokenizer_json_loads_its_byte_level_tokenizer(tmp_path):
    from npllama import load

    model = load(byte_level_folder(tmp_path / "model"))
    assert model.tokenizer.vocab_size == 258 and model.tokenizer.eos_id == 0
    assert model.tokenizer.decode(model.tokenizer.encode("the hello")) == "the hello"


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "chat_template.jinja"])
def test_a_tokenizer_file_linked_outside_the_folder_is_refused_naming_the_link_not_its_bytes(tmp_path, name):
    from npllama import load

    folder = byte_level_folder(tmp_path / "model")
    (folder / name).unlink()
    (folder / name).symlink_to("/proc/self/environ")
    message = refusal(load, folder)
    assert f"{folder / name}: a link to /proc/" in message and "outside the model's folder" in message
    assert "PATH=" not in message


def test_a_fifo_as_tokenizer_config_json_is_named_and_never_opened(tmp_path):
    folder = byte_level_folder(tmp_path / "model")
    (folder / "tokenizer_config.json").unlink()
    os.mkfifo(folder / "tokenizer_config.json")
    result = subprocess.run([sys.executable, "-m", "npllama.generate", "--checkpoint", str(folder), "--prompt", "he"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{folder / 'tokenizer_config.json'}: it is a FIFO, not a regular file" in result.stderr


def test_a_tokenizer_json_beyond_the_cap_is_refused_by_its_size_before_a_byte_is_read(tmp_path):
    """A sparse file of 300 MB: its size is read from the file system; no buffer of it is made."""
    from npllama.tokenizer.bpe import MAX_TOKENIZER_JSON_BYTES, BpeTokenizer

    path = tmp_path / "tokenizer.json"
    with open(path, "wb") as file:
        file.truncate(MAX_TOKENIZER_JSON_BYTES + 1)
    assert f"larger than {MAX_TOKENIZER_JSON_BYTES:,} bytes" in refusal(BpeTokenizer.from_tokenizer_json, path)


def test_a_tokenizer_with_more_tokens_than_the_embedding_has_rows_is_refused(tmp_path):
    from npllama import load

    message = refusal(load, byte_level_folder(tmp_path / "model", vocab_size=200))
    assert "its tokenizer has 258 tokens, the model's embedding 200 rows" in message


def test_metas_tokenizer_one_folder_up_loads_but_not_through_a_link_leading_out(tmp_path):
    pytest.importorskip("torch", reason="torch writes Meta's .pth files: pip install '.[test]'")
    from test_convert_meta import write_meta_layout

    from npllama import load
    from npllama import model as llama
    from npllama.tokenizer import train_tokenizer

    download = tmp_path / "llama"  # Meta's download: llama/tokenizer.model beside llama/7B/
    config = LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=320, hidden_dim=32, max_seq_len=32)
    folder = write_meta_layout(download / "7B", config, llama.init_params(config, seed=0), n_ranks=1)
    train_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789\n" * 50],
                    vocab_size=config.vocab_size).save(download / "tokenizer.model")
    assert load(folder).tokenizer.vocab_size == config.vocab_size
    os.replace(download / "tokenizer.model", tmp_path / "elsewhere.model")
    (download / "tokenizer.model").symlink_to(tmp_path / "elsewhere.model")
    message = refusal(load, folder)
    assert f"{download / 'tokenizer.model'}: a link to {tmp_path / 'elsewhere.model'}, outside" in message


# --- gradients files of audit compare -----------------------------------------------------------------

@pytest.fixture
def audit_inputs(tmp_path):
    """(model folder, batch file, gradients as audit reference writes them in Hugging Face's names)."""
    from npllama.audit.__main__ import main as audit_main

    folder = hf_folder(tmp_path / "model")
    numpy.save(tmp_path / "batch.npy", numpy.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 6)))
    assert audit_main(["reference", str(folder), "--batch", str(tmp_path / "batch.npy"), "--out",
                       str(tmp_path / "reference.safetensors"), "--names", "hf"]) == 0
    return folder, tmp_path / "batch.npy", read_safetensors(tmp_path / "reference.safetensors")


def compare_with(audit_inputs, tmp_path, capsys, change) -> tuple[int, str]:
    from npllama.audit.__main__ import main as audit_main

    folder, batch, tensors = audit_inputs
    tensors = dict(tensors)
    change(tensors)
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs))
    capsys.readouterr()
    status = audit_main(["compare", str(folder), "--batch", str(batch), "--grads", str(theirs)])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.weight"),
     "no gradient of 'model.layers.0.mlp.up_proj.weight' (1 of the 12 parameters missing, huggingface names)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": numpy.zeros((3, 16))}),
     "model.layers.0.self_attn.q_proj.weight has shape (3, 16), the model's is (16, 16)"),
    (lambda t: t.update({"loss": numpy.zeros(2)}), "its loss holds 2 numbers, not one"),
    (lambda t: t.update({"hidden_states.1": numpy.zeros((1, 2))}), "hidden_states.1 has shape (1, 2), the batch's"),
], ids=["missing-up-proj", "wrong-shape", "two-losses", "hidden-state-shape"])
def test_a_malformed_gradients_file_is_one_line_naming_what_is_wrong(audit_inputs, tmp_path, capsys, change,
                                                                        expected):
    status, error = compare_with(audit_inputs, tmp_path, capsys, change)
    assert status == 2 and error.count("\n") == 1 and expected in error, error


def test_the_reference_written_by_audit_passes_its_own_comparison(audit_inputs, tmp_path, capsys):
    status, _ = compare_with(audit_inputs, tmp_path, capsys, lambda tensors: None)
    assert status == 0


# --- exports are written whole or not at all ----------------------------------------------------------

@pytest.mark.parametrize("command", ["export", "import"])
def test_a_conversion_past_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, command):
    import resource

    folder = hf_folder(tmp_path / "model")
    out = tmp_path / "converted"

    def limit_file_size():  # `ulimit -f 8`: files of at most 8 KiB (the weights take more)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    result = subprocess.run([sys.executable, "-m", "npllama.convert", command, str(folder), "--out", str(out)],
                            capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"--out {out}: cannot be written (File too large" in result.stderr
    assert "nothing was left there" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="no sysfs here (Linux only)")
@pytest.mark.parametrize("command", ["export", "import"])
def test_a_conversion_into_a_folder_that_takes_no_file_is_refused_before_the_model_is_read(tmp_path, capsys,
                                                                                          command):
    """/sys takes no new file, from root either (whom permission bits do not stop)."""
    from npllama.convert.__main__ import main as convert

    assert convert([command, str(tmp_path / "absent"), "--out", "/sys/npllama-model"]) == 2
    assert "--out /sys/npllama-model: cannot write in /sys (Permission denied)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "import"])
def test_a_conversion_into_a_missing_folder_is_refused_before_the_model_is_read(tmp_path, capsys, command):
    from npllama.convert.__main__ import main as convert

    out = tmp_path / "no" / "such" / "folder"
    assert convert([command, str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert f"--out {out}: the folder {out.parent} does not exist" in capsys.readouterr().err


def test_an_out_folder_that_holds_anything_is_refused_and_left_as_it_was(tmp_path, capsys):
    from npllama.convert.__main__ import main as convert

    folder = hf_folder(tmp_path / "model")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for command in ("export", "import"):
        assert convert([command, str(folder), "--out", str(out)]) == 2
        assert f"--out {out} already exists and is not an empty folder" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("dtype, stored", [("float16", "F16"), ("bfloat16", "BF16"), ("float32", "F32")])
def test_an_export_stores_its_weights_in_the_dtype_asked_for(tmp_path, capsys, dtype, stored):
    import struct

    from npllama.convert.__main__ import main as convert

    folder = hf_folder(tmp_path / "model")
    assert convert(["export", str(folder), "--out", str(tmp_path / "out"), "--dtype", dtype]) == 0
    data = (tmp_path / "out" / "model.safetensors").read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    assert {entry["dtype"] for name, entry in header.items() if name != "__metadata__"} == {stored}
