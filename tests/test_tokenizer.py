"""Properties of npllama.tokenizer: Llama's training options, exact round trips, digits, errors, CLI.

One tokenizer is trained per module, on a few hundred KB of the Python standard library's own
source files found on this machine (no download, nothing committed).
"""

import hashlib
import os
import re
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import example, given
from hypothesis import strategies as st

from npllama.tokenizer import (
    MIN_VOCAB_SIZE,
    WHITESPACE_SYMBOL,
    Tokenizer,
    TokenizerError,
    train_tokenizer,
)

VOCAB_SIZE = 800
CORPUS_CHARACTERS = 300_000
REPO_ROOT = Path(__file__).resolve().parent.parent

DIGITS = "0123456789"
DIGIT_PIECES = set(DIGITS)  # ten one-character pieces

# text() draws any string of code points except surrogates, which no UTF-8 text can hold.
# Its examples rarely hit the characters SentencePiece treats specially, so a second strategy
# draws strings made mostly of them: spaces (the dummy prefix), U+2581 (SentencePiece's own space
# symbol), NUL, newlines and tabs (never in a training line), digits, and characters outside the
# vocabulary (byte fallback).
tricky_characters = st.sampled_from([" ", WHITESPACE_SYMBOL, "\x00", "\n", "\t", "\r", "7", "a",
                                     "é", "\u3000", "\U0001f600", "\U0010fffd"])
any_character = st.characters(codec="utf-8")  # no lone surrogates: see test_encode_rejects_...
tricky_texts = st.lists(tricky_characters | any_character, max_size=30).map("".join)
digit_strings = st.text(alphabet=DIGITS, min_size=1)


def stdlib_corpus(characters: int) -> list[str]:
    """Documents: the standard library's top-level *.py files, in name order, up to `characters`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        documents.append(text)
        total += len(text)
        if total >= characters:
            return documents
    pytest.skip(f"the standard library at {stdlib} has fewer than {characters} characters of source")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(stdlib_corpus(CORPUS_CHARACTERS), VOCAB_SIZE)


def pieces(tokenizer, text):
    return [tokenizer.id_to_piece(i) for i in tokenizer.encode(text)]


def is_byte_piece(piece):
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


# --- reading a serialized ModelProto without the protobuf package ---------------------------------

def protobuf_fields(data: bytes) -> dict:
    """{field number: [values]} of a serialized protobuf message (wire format, one level)."""

    def varint(i):
        value = shift = 0
        while True:
            value |= (data[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not data[i - 1] & 0x80:
                return value, i

    fields, i = {}, 0
    while i < len(data):
        key, i = varint(i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = varint(i)
        elif wire_type == 2:
            length, i = varint(i)
            value, i = data[i:i + length], i + length
        elif wire_type == 5:
            value, i = struct.unpack("<f", data[i:i + 4])[0], i + 4
        elif wire_type == 1:
            value, i = struct.unpack("<d", data[i:i + 8])[0], i + 8
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def model_specs(model_bytes):
    """(trainer_spec, normalizer_spec) as {field number: value}; numbers from sentencepiece_model.proto."""
    model = protobuf_fields(model_bytes)
    trainer = {k: v[-1] for k, v in protobuf_fields(model[2][0]).items()}
    normalizer = {k: v[-1] for k, v in protobuf_fields(model[3][0]).items()}
    return trainer, normalizer


# --- the trained model ------------------------------------------------------------------------------

def test_training_options_are_the_llama_ones(tokenizer):
    trainer, normalizer = model_specs(tokenizer.model_bytes)
    bpe = 2
    assert trainer[3] == bpe                                   # model_type
    assert trainer[4] == VOCAB_SIZE == tokenizer.vocab_size    # vocab_size
    assert trainer[10] == pytest.approx(0.99995, abs=1e-7)     # character_coverage (float32)
    assert trainer[25] == 1                                    # split_digits
    assert trainer[26] == 1                                    # allow_whitespace_only_pieces
    assert trainer[35] == 1                                    # byte_fallback
    assert (trainer[40], trainer[41], trainer[42]) == (0, 1, 2)  # unk_id, bos_id, eos_id
    assert trainer[43] == 2**64 - 1                            # pad_id = -1 (int32 as a varint)
    assert normalizer[1] == b"identity"                        # name
    assert normalizer[3] == 1                                  # add_dummy_prefix
    assert normalizer[4] == 0                                  # remove_extra_whitespaces


def test_training_options_show_in_behaviour(tokenizer):
    processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
    # identity normalization (no NFKC: full-width letters, a combining accent stay), spaces kept
    # as they are, one dummy space in front
    assert processor.normalize("ｆｕｌｌ  xe\u0301 ") == "▁ｆｕｌｌ▁▁xe\u0301▁"
    # whitespace-only pieces: Python's indentation gives runs of spaces their own pieces
    vocabulary = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert "▁▁▁▁" in vocabulary
    # byte fallback: a character the corpus never had becomes its UTF-8 bytes, not <unk>
    assert pieces(tokenizer, "\U0001d518")[1:] == ["<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]


def test_special_ids_are_unk_bos_eos_0_1_2_and_there_is_no_pad(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, -1)
    assert [tokenizer.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    # then the 256 byte fallback pieces, in byte order
    assert [tokenizer.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]


@given(digit_strings)
@example("0123456789")
def test_every_digit_is_its_own_piece(tokenizer, digits):
    assert pieces(tokenizer, digits) == ["▁", *digits]


@given(st.text() | tricky_texts | st.lists(st.sampled_from(["x", " ", "12", "3.5", "v2"])).map("".join))
@example("version 3.11.7, port 8080 in 2024")
def test_every_digit_in_any_text_is_its_own_piece(tokenizer, text):
    text_pieces = pieces(tokenizer, text)
    # no piece holds a digit together with anything else (byte pieces are spelled in hex: skip)
    assert all(p in DIGIT_PIECES for p in text_pieces if not is_byte_piece(p) and set(p) & DIGIT_PIECES)
    assert [p for p in text_pieces if p in DIGIT_PIECES] == [c for c in text if c in DIGIT_PIECES]


@given(st.text())
@example("")
@example(" leading space")
@example("  two leading spaces and trailing  ")
@example("\x00")
@example("tab\tnewline\ncarriage\r\n")
@example(WHITESPACE_SYMBOL)
@example(f"a{WHITESPACE_SYMBOL}b")
@example(f"{WHITESPACE_SYMBOL} x{WHITESPACE_SYMBOL}{WHITESPACE_SYMBOL}  ")
@example("emoji \U0001f600 and cjk \u4e2d\u6587 and \u3000 ideographic space")
def test_any_text_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(tricky_texts, st.booleans(), st.booleans())
def test_text_of_spaces_nul_and_sentencepiece_space_symbol_round_trips(tokenizer, text, bos, eos):
    assert tokenizer.decode(tokenizer.encode(text, bos=bos, eos=eos)) == text


# texts with the places a chunk may be cut (newlines, lone spaces) and the places it must not
# (runs of spaces, a space at either end, U+2581 beside a space), among words of real code
code_words = st.sampled_from(["def", "x", "return", "(self)", "12", "é", "  ", "\t", "::", "__init__"])
chunkable_texts = st.lists(tricky_characters | code_words, max_size=40).map("".join)


@given(text=chunkable_texts, chunk_chars=st.integers(1, 12), bos=st.booleans(), eos=st.booleans())
def test_encoding_in_chunks_gives_exactly_the_ids_of_encoding_whole(tokenizer, text, chunk_chars, bos, eos):
    chunks = list(tokenizer.encode_in_chunks(text, bos=bos, eos=eos, chunk_chars=chunk_chars))
    assert [i for chunk in chunks for i in chunk] == tokenizer.encode(text, bos=bos, eos=eos)


@pytest.mark.parametrize("text", ["a  self", "x   y", "def  f(x):\n    return  x\n", "a b  c   d    e",
                                  "    x\t \tx     selfself    ", " lead", "trail ", "\n\n  \n x"])
def test_every_chunk_size_gives_the_whole_texts_ids_around_runs_of_spaces(tokenizer, text):
    """Runs of spaces are where a cut would break a whitespace piece ("▁▁" + "self", not "▁" + "▁self")."""
    for chunk_chars in range(1, len(text) + 1):
        chunks = tokenizer.encode_in_chunks(text, bos=True, eos=True, chunk_chars=chunk_chars)
        assert [i for chunk in chunks for i in chunk] == tokenizer.encode(text, bos=True, eos=True), chunk_chars


def test_a_long_line_is_encoded_in_chunks_of_about_the_size_asked(tokenizer):
    line = "value = compute(first, second) + other " * 2000  # 78,000 characters, no newline
    chunks = list(tokenizer.encode_in_chunks(line, chunk_chars=1000))
    assert len(chunks) >= 78 and max(map(len, chunks)) < 1000
    assert [i for chunk in chunks for i in chunk] == tokenizer.encode(line)


def test_plain_sentencepiece_reads_u2581_as_a_space_which_encode_works_around(tokenizer):
    # Why Tokenizer.encode splits the text at U+2581: SentencePiece alone loses it. If this test
    # fails, SentencePiece has changed, and the workaround may no longer be needed.
    processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
    text = f"a{WHITESPACE_SYMBOL}b"
    assert processor.decode(processor.encode(text)) == "a b"
    assert pieces(tokenizer, text) == ["▁a", "<0xE2>", "<0x96>", "<0x81>", "b"]


@given(st.text().filter(lambda text: WHITESPACE_SYMBOL not in text))
@example(" 12 apples  and\tpears\n")
def test_text_without_u2581_is_encoded_as_sentencepiece_encodes_it(tokenizer, text):
    # compatibility: Meta's tokenizer.model gives Meta's ids through this wrapper
    processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
    assert tokenizer.encode(text) == processor.encode(text)


@given(st.text() | tricky_texts)
def test_ids_stay_inside_the_vocabulary(tokenizer, text):
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.unk_id not in ids  # byte fallback: nothing is unknown


@given(st.text())
def test_bos_and_eos_are_added_only_when_asked(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.encode(text, bos=True) == [1, *ids]
    assert tokenizer.encode(text, eos=True) == [*ids, 2]
    assert tokenizer.encode(text, bos=True, eos=True) == [1, *ids, 2]
    assert 1 not in ids and 2 not in ids


def test_encode_rejects_lone_surrogates_which_utf8_cannot_hold(tokenizer):
    # text() never draws them, but a str can hold them (e.g. from os.fsdecode of a bad name)
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tokenizer.encode("ok \ud800")
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tokenizer.encode(f"{WHITESPACE_SYMBOL}\udfff")


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    for bad in (-1, VOCAB_SIZE):
        with pytest.raises(TokenizerError, match=f"token id {bad} is outside the vocabulary"):
            tokenizer.decode([5, bad])
        with pytest.raises(TokenizerError):
            tokenizer.id_to_piece(bad)


def test_model_bytes_round_trip_and_fingerprint_is_their_sha256(tokenizer):
    again = Tokenizer.from_bytes(tokenizer.model_bytes)
    assert again.model_bytes == tokenizer.model_bytes
    assert again.fingerprint == tokenizer.fingerprint == hashlib.sha256(tokenizer.model_bytes).hexdigest()
    assert again.encode("def f(x): return 42") == tokenizer.encode("def f(x): return 42")


# --- training ---------------------------------------------------------------------------------------

small_corpus = ["def add(a, b):\n    return a + b\n", "print(add(2, 40))  # forty-two\n"]


def test_training_is_deterministic():
    documents = stdlib_corpus(60_000)
    first = train_tokenizer(documents, 400)
    second = train_tokenizer(documents, 400)
    assert first.model_bytes == second.model_bytes


def test_trainer_threads_change_only_the_recorded_thread_count():
    # why num_threads defaults to 1: more threads give the same pieces and scores, but the count
    # is recorded in the model, so a machine-dependent count would change the fingerprint
    documents = stdlib_corpus(60_000)
    one, two = (train_tokenizer(documents, 400, num_threads=n) for n in (1, 2))
    processors = [sentencepiece.SentencePieceProcessor(model_proto=t.model_bytes) for t in (one, two)]
    vocabularies = [[(p.id_to_piece(i), p.get_score(i)) for i in range(400)] for p in processors]
    assert vocabularies[0] == vocabularies[1]
    assert [model_specs(t.model_bytes)[0][16] for t in (one, two)] == [1, 2]  # num_threads
    assert one.fingerprint != two.fingerprint


def test_seed_chooses_the_lines_sampled_when_there_are_more_than_max_sentences():
    documents = stdlib_corpus(60_000)
    messages = []
    sampled = train_tokenizer(documents, 400, seed=0, max_sentences=300, progress=messages.append)
    assert any(m.startswith("sampled 300 of ") for m in messages)
    assert train_tokenizer(documents, 400, seed=0, max_sentences=300).model_bytes == sampled.model_bytes
    assert train_tokenizer(documents, 400, seed=1, max_sentences=300).model_bytes != sampled.model_bytes


def test_vocab_size_below_byte_and_special_pieces_is_refused():
    with pytest.raises(TokenizerError, match=f"take {MIN_VOCAB_SIZE}"):
        train_tokenizer(small_corpus, MIN_VOCAB_SIZE - 1)


def test_vocab_size_below_the_corpus_characters_names_the_minimum():
    with pytest.raises(TokenizerError, match=r"need at least (\d+)") as error:
        train_tokenizer(small_corpus, MIN_VOCAB_SIZE)
    minimum = int(re.search(r"need at least (\d+)", str(error.value)).group(1))
    assert train_tokenizer(small_corpus, minimum).vocab_size == minimum


def test_vocab_size_beyond_what_the_corpus_gives_names_the_maximum():
    # hard_vocab_limit stays on (as for Llama): the vocabulary is exactly the size asked for, or
    # training fails saying the largest size this corpus can give.
    with pytest.raises(TokenizerError, match=r"at most \d+ pieces") as error:
        train_tokenizer(small_corpus, 5000)
    maximum = int(re.search(r"at most (\d+) pieces", str(error.value)).group(1))
    assert train_tokenizer(small_corpus, maximum).vocab_size == maximum
    with pytest.raises(TokenizerError, match="at most"):
        train_tokenizer(small_corpus, maximum + 1)


def test_lines_longer_than_sentencepiece_takes_are_trained_on_not_dropped():
    # SentencePiece skips lines over max_sentence_length bytes; train_tokenizer cuts them instead
    long_line = "zq" * 20_000
    trained = train_tokenizer(["short line\n", long_line], 280)
    vocabulary = {trained.id_to_piece(i) for i in range(trained.vocab_size)}
    assert {"z", "q", "zq"} <= vocabulary


def test_empty_corpus_is_refused():
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer(["", "\n\n"], 300)


# --- loading and saving -----------------------------------------------------------------------------

def test_save_then_load_gives_the_same_tokenizer(tokenizer, tmp_path):
    path = tmp_path / "sub" / "tokenizer.model"
    path.parent.mkdir()
    path.write_bytes(b"an older file, replaced whole")
    tokenizer.save(path)
    assert Tokenizer.load(path).fingerprint == tokenizer.fingerprint
    assert os.listdir(path.parent) == ["tokenizer.model"]  # no temporary file left behind


def test_save_where_the_folder_is_a_file_fails_clearly(tokenizer, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TokenizerError, match="cannot write tokenizer file"):
        tokenizer.save(tmp_path / "file" / "tokenizer.model")


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"this is not a sentencepiece model", "not a SentencePiece model"),
    (bytes(range(256)) * 4, "not a SentencePiece model"),
])
def test_load_of_a_missing_or_garbage_file_names_the_path(tmp_path, content, problem):
    path = tmp_path / "tokenizer.model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError, match=problem) as error:
        Tokenizer.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_load_of_a_folder_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="is a folder"):
        Tokenizer.load(tmp_path)


def cut_points(model_bytes):
    """Where to cut a model file: near both ends, and the most dangerous place: after every field
    but the normalizer_spec (the last one), which SentencePiece alone would load, with its default
    normalization (extra whitespace removed) instead of the model's."""
    normalizer_spec = protobuf_fields(model_bytes)[3][0]  # under 128 bytes: a 2-byte field header
    before_normalizer = len(model_bytes) - 2 - len(normalizer_spec)
    assert model_bytes[before_normalizer:] == bytes([0x1A, len(normalizer_spec)]) + normalizer_spec
    return [1, 2, before_normalizer, before_normalizer + 1, len(model_bytes) - 1]


def test_load_of_a_model_file_cut_short_fails_naming_the_path(tokenizer, tmp_path):
    for length in cut_points(tokenizer.model_bytes):
        path = tmp_path / f"cut-at-{length}.model"
        path.write_bytes(tokenizer.model_bytes[:length])
        with pytest.raises(TokenizerError, match="truncated") as error:
            Tokenizer.load(path)
        assert str(path) in str(error.value)


@given(st.integers(min_value=1))
def test_load_of_any_truncated_model_file_fails(tokenizer, tmp_path_factory, length):
    length = 1 + length % (len(tokenizer.model_bytes) - 1)  # 1 .. len - 1
    path = tmp_path_factory.mktemp("truncated") / "tokenizer.model"
    path.write_bytes(tokenizer.model_bytes[:length])
    with pytest.raises(TokenizerError) as error:
        Tokenizer.load(path)
    assert str(path) in str(error.value)


def test_load_of_a_model_with_a_piece_that_is_not_utf8_fails(tokenizer):
    # SentencePiece's own error message then holds the bad bytes, and is not UTF-8 either
    corrupted = tokenizer.model_bytes.replace(b"\x06<0x00>", b"\x06\xe50x00>", 1)
    assert corrupted != tokenizer.model_bytes
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        Tokenizer.from_bytes(corrupted)


@given(st.binary(max_size=200))
def test_any_bytes_either_load_or_raise_tokenizer_error(data):
    try:
        Tokenizer.from_bytes(data)
    except TokenizerError:
        pass


# --- command line -----------------------------------------------------------------------------------

def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "npllama.tokenizer", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=120,
                          cwd=cwd or REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


@pytest.fixture(scope="module")
def cli_corpus(tmp_path_factory):
    """A folder of text: .py, .txt and .md files, one of them in a subfolder, one not UTF-8."""
    folder = tmp_path_factory.mktemp("corpus")
    documents = stdlib_corpus(60_000)
    half = len(documents) // 2
    (folder / "code.py").write_text("".join(documents[:half]), encoding="utf-8")
    (folder / "nested").mkdir()
    (folder / "nested" / "more.md").write_text("".join(documents[half:]), encoding="utf-8")
    (folder / "notes.txt").write_text("Prices: 12 apples, 3.50 each.\n", encoding="utf-8")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (folder / "ignored.bin").write_bytes(b"\xff\x00 not text")
    return folder


def test_cli_train_encode_decode_round_trip(cli_corpus, tmp_path):
    model = tmp_path / "out" / "tok.model"
    trained = run_cli("train", "--input", cli_corpus, "--vocab-size", 400, "--out", model)
    assert trained.returncode == 0, trained.stderr
    assert "skipped 1 file" in trained.stderr and "latin1.txt" in trained.stderr
    assert Tokenizer.load(model).vocab_size == 400

    text = "for i in range(10):  print(i, '\u2581 caf\xe9')"
    encoded = run_cli("encode", "--tokenizer", model, "--bos", text)
    assert encoded.returncode == 0, encoded.stderr
    ids = encoded.stdout.split()
    assert ids[0] == "1" and [int(i) for i in ids[1:]] == Tokenizer.load(model).encode(text)
    decoded = run_cli("decode", "--tokenizer", model, *ids)
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout == text + "\n"

    shown = run_cli("encode", "--tokenizer", model, "--pieces", "x = 42")
    assert shown.stdout.split()[-3:] == ["▁", "4", "2"]


@pytest.mark.parametrize("seed, other_seed", [(0, 1), (3, 0)])
def test_cli_train_gives_the_model_train_tokenizer_gives_for_its_seed_and_line_bound(cli_corpus, tmp_path, seed,
                                                                                    other_seed):
    from npllama.tokenizer.__main__ import main as tokenizer_main

    code = cli_corpus / "code.py"
    out = tmp_path / "cli.model"
    assert tokenizer_main(["train", "--input", str(code), "--vocab-size", "400", "--max-sentences", "200",
                           "--seed", str(seed), "--out", str(out)]) == 0
    text = code.read_text(encoding="utf-8")
    assert len(text.splitlines()) > 200  # the bound and the seed choose which lines train
    same = train_tokenizer([text], 400, seed=seed, max_sentences=200)
    another = train_tokenizer([text], 400, seed=other_seed, max_sentences=200)
    every_line = train_tokenizer([text], 400, seed=seed)
    assert out.read_bytes() == same.model_bytes
    assert out.read_bytes() != another.model_bytes and out.read_bytes() != every_line.model_bytes


def test_cli_train_from_a_glob_gives_the_same_model_as_the_files(cli_corpus, tmp_path):
    from_glob = tmp_path / "glob.model"
    from_files = tmp_path / "files.model"
    assert run_cli("train", "--input", f"{cli_corpus}/**/*.[pm][yd]", "--vocab-size", 400,
                   "--out", from_glob).returncode == 0
    assert run_cli("train", "--input", cli_corpus / "code.py", cli_corpus / "nested" / "more.md",
                   "--vocab-size", 400, "--out", from_files).returncode == 0
    assert from_glob.read_bytes() == from_files.read_bytes()


@pytest.fixture(scope="module")
def saved_model(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tokenizer.model"
    tokenizer.save(path)
    return path


@pytest.mark.parametrize("args, problem", [
    (["encode", "--tokenizer", "{missing}", "hello"], "does not exist"),
    (["encode", "--tokenizer", "{garbage}", "hello"], "not a SentencePiece model"),
    (["decode", "--tokenizer", "{model}", "5", "-1"], "outside the vocabulary"),
    (["decode", "--tokenizer", "{model}", "5", "800"], "outside the vocabulary"),
    (["train", "--input", "{missing}", "--vocab-size", "300", "--out", "{out}"], "no such file or folder"),
    (["train", "--input", "{tmp}/*.nothing", "--vocab-size", "300", "--out", "{out}"], "matches no files"),
    (["train", "--input", "{empty_folder}", "--vocab-size", "300", "--out", "{out}"], "no text files"),
    (["train", "--input", "{latin1}", "--vocab-size", "300", "--out", "{out}"], "not UTF-8 text"),
    (["train", "--input", "{corpus}", "--vocab-size", "100", "--out", "{out}"], "too small"),
    (["train", "--input", "{notes}", "--vocab-size", "5000", "--out", "{out}"], "at most"),
    (["train", "--input", "{corpus}", "--vocab-size", "300", "--out", "{garbage}/x.model"],
     "not a writable folder"),
    pytest.param(["train", "--input", "{corpus}", "--vocab-size", "300", "--out", "/sys/npllama.model"],
                 "/sys is not a writable folder", id="out-in-sys-which-takes-no-file-even-from-root",
                 marks=pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="no sysfs here (Linux only)")),
    (["train", "--input", "{corpus}", "--vocab-size", "300", "--out", "{tmp}"], "is a folder"),
])
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(
        args, problem, cli_corpus, saved_model, tmp_path):
    (tmp_path / "garbage.model").write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    paths = dict(missing=tmp_path / "missing", garbage=tmp_path / "garbage.model", model=saved_model,
                 out=tmp_path / "out.model", tmp=tmp_path, empty_folder=tmp_path / "empty",
                 latin1=cli_corpus / "latin1.txt", corpus=cli_corpus, notes=cli_corpus / "notes.txt")
    result = run_cli(*[arg.format(**paths) for arg in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and problem in error_lines[0], result.stderr
    assert result.stderr.splitlines()[-1] == error_lines[0]  # after progress lines, if any
    assert not (tmp_path / "out.model").exists()


def test_cli_argument_errors_exit_2_without_traceback():
    result = run_cli("train", "--input", "x", "--vocab-size", "many", "--out", "y")
    assert result.returncode == 2 and "Traceback" not in result.stderr


@given(documents=st.lists(st.text(alphabet="ab \n", max_size=30), max_size=5), chunk=st.integers(1, 7))
def test_training_lines_are_every_non_empty_line_cut_into_chunks_that_join_back(documents, chunk):
    from npllama.tokenizer import training

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "LINE_CHUNK_CHARS", chunk)
        lines = list(training._training_lines(documents))
    expected = [line for document in documents for line in document.splitlines() if line]
    assert all(0 < len(line) <= chunk for line in lines)
    joined, at = [], 0
    for line in expected:  # each line is its chunks, in order
        pieces = []
        while len("".join(pieces)) < len(line):
            pieces.append(lines[at])
            at += 1
        joined.append("".join(pieces))
    assert joined == expected and at == len(lines)


@given(n_lines=st.integers(0, 60), max_lines=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_sampled_lines_are_at_most_the_bound_all_of_them_when_fewer_and_the_same_for_a_seed(n_lines, max_lines,
                                                                                             seed):
    from npllama.tokenizer import training

    lines = [f"line {i}" for i in range(n_lines)]
    sample, count = training._sample_lines(iter(lines), max_lines, seed)
    assert count == n_lines and len(sample) == min(n_lines, max_lines) and len(set(sample)) == len(sample)
    assert set(sample) <= set(lines)
    if n_lines <= max_lines:
        assert sample == lines
    assert training._sample_lines(iter(lines), max_lines, seed) == (sample, count)


def test_every_line_is_equally_likely_to_be_sampled():
    """Reservoir sampling keeps each of n lines with probability k / n, wherever it stands: over 2000
    seeds, 20 lines and k = 5, each line's count is Binomial(2000, 1/4), 500 +- 19.4, so 6 standard
    deviations (116) leave a chance below 1e-8 per line of a false failure, and a sampler that favours
    the first or the last lines (count 2000 or 0) fails by far."""
    from npllama.tokenizer import training

    lines = [f"line {i}" for i in range(20)]
    counts = dict.fromkeys(lines, 0)
    for seed in range(2000):
        for line in training._sample_lines(iter(lines), 5, seed)[0]:
            counts[line] += 1
    assert all(abs(count - 500) < 116 for count in counts.values()), counts


def protobuf_varint(value: int) -> bytes:
    out = b""
    while True:
        low, value = value & 0x7F, value >> 7
        out += bytes([low | (0x80 if value else 0)])
        if not value:
            return out


wire_fields = st.lists(st.tuples(st.integers(1, 2**29 - 1), st.sampled_from([0, 1, 2, 5]),
                                     st.integers(0, 2**64 - 1), st.binary(max_size=20)), max_size=8)


@given(fields=wire_fields, cut=st.integers(1, 40))
def test_the_protobuf_walk_finds_every_top_level_field_and_refuses_a_message_cut_inside_one(fields, cut):
    """Messages written here from the wire format (varints, 64-bit, length-delimited, 32-bit
    fields of any number): the walk names exactly their field numbers, and the same bytes cut
    anywhere inside a field are refused."""
    from npllama.tokenizer.model_bytes import protobuf_field_numbers

    encoded, ends = b"", [0]
    for number, wire_type, value, payload in fields:
        body = {0: protobuf_varint(value), 1: value.to_bytes(8, "little"),
                2: protobuf_varint(len(payload)) + payload, 5: (value % 2**32).to_bytes(4, "little")}[wire_type]
        encoded += protobuf_varint(number << 3 | wire_type) + body
        ends.append(len(encoded))
    assert protobuf_field_numbers(encoded) == {number for number, *_ in fields}
    inside = len(encoded) - cut
    if inside > 0 and inside not in ends:  # cut in the middle of a field
        with pytest.raises(ValueError):
            protobuf_field_numbers(encoded[:inside])
