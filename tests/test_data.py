"""Data: sources -> memory-mapped token files (reused when unchanged) -> seeded, resumable batches."""

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from assertions import assert_same
from npllama import data


class ByteTokenizer:
    """A stand-in tokenizer: UTF-8 bytes shifted by 3 (ids 0, 1, 2 are unk, bos, eos)."""

    vocab_size = 259
    fingerprint = "bytes-v1"
    bos_id, eos_id = 1, 2

    def __init__(self):
        self.calls = 0

    def encode(self, text, bos=False, eos=False):
        self.calls += 1
        return [self.bos_id] * bos + [b + 3 for b in text.encode("utf-8")] + [self.eos_id] * eos

    def encode_in_chunks(self, text, bos=False, eos=False):
        yield self.encode(text, bos, eos)


def write_corpus(folder, n_files=12):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: " + "héllo wörld " * (20 + i))
    return folder


def test_default_corpus_is_the_standard_library_without_tests_or_site_packages():
    files = data.default_corpus_files()
    assert len(files) > 300
    assert not [f for f in files if "site-packages" in f.parts or "test" in f.parts]
    assert sum(f.stat().st_size for f in files) > 5_000_000  # megabytes of real text


def test_tokens_are_stored_once_and_reused_while_the_sources_are_unchanged(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    tokenizer = ByteTokenizer()
    documents = data.find_documents([str(corpus)])
    first = data.prepare_tokens(documents, tokenizer, tmp_path / "cache")
    calls = tokenizer.calls
    again = data.prepare_tokens(data.find_documents([str(corpus)]), tokenizer, tmp_path / "cache")
    assert tokenizer.calls == calls  # nothing re-encoded
    assert again.directory == first.directory
    assert_same(again.train, first.train)
    assert first.train.dtype == numpy.uint16 and isinstance(first.train, numpy.memmap)
    # every document is [BOS] bytes [EOS], whole, in one of the two splits
    total = sum(len(f.read_text().encode()) + 2 for f in corpus.iterdir())
    assert first.train.size + first.val.size == total == sum(first.info["n_tokens"].values())
    assert first.val.size > 0


def test_an_edited_source_gives_a_fresh_token_file(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    tokenizer = ByteTokenizer()
    first = data.prepare_tokens(data.find_documents([str(corpus)]), tokenizer, tmp_path / "cache")
    (corpus / "doc00.txt").write_text("changed text, a different length")
    second = data.prepare_tokens(data.find_documents([str(corpus)]), tokenizer, tmp_path / "cache")
    assert second.directory != first.directory


def test_vocabularies_beyond_uint16_use_uint32(tmp_path):
    tokenizer = ByteTokenizer()
    tokenizer.vocab_size = 70_000
    tokens = data.prepare_tokens(data.find_documents([str(write_corpus(tmp_path / "c", 3))]), tokenizer,
                                 tmp_path / "cache")
    assert tokens.train.dtype == numpy.uint32


def test_walked_files_that_are_not_utf8_are_skipped_and_reported(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 3)
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    warnings = []
    tokens = data.prepare_tokens(data.find_documents([str(corpus)]), ByteTokenizer(), tmp_path / "cache",
                                 warn=warnings.append)
    assert len(warnings) == 1 and "skipped 1 file" in warnings[0] and "latin1.txt" in warnings[0]
    assert tokens.train.size + tokens.val.size > 0


def test_a_named_file_that_is_not_utf8_is_an_error(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(data.DataError, match="not UTF-8 text"):
        data.prepare_tokens(data.find_documents([str(bad)]), ByteTokenizer(), tmp_path / "cache")


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.txt"), "no such file or folder"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no text files"),
    (lambda p: str(p / "*.nothing"), "matches no files"),
])
def test_missing_sources_are_named(tmp_path, make, message):
    with pytest.raises(data.DataError, match=message):
        data.find_documents([make(tmp_path)])


def test_files_without_any_text_are_reported_as_empty_data(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError, match="the data is empty: 1 file"):
        data.prepare_tokens(data.find_documents([str(tmp_path / "empty.txt")]), ByteTokenizer(), tmp_path / "c")


def test_too_little_data_for_one_window_is_refused():
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.BatchSampler(numpy.arange(10, dtype=numpy.uint16), 2, 64, seed=0)


def test_a_single_file_holds_out_the_last_five_percent_of_its_tokens(tmp_path):
    one = tmp_path / "input.txt"
    one.write_text("all the text of one book. " * 2000)
    tokens = data.prepare_tokens(data.find_documents([str(one)]), ByteTokenizer(), tmp_path / "c")
    total = len(one.read_bytes()) + 2
    assert tokens.info["split"] == "tail"
    assert tokens.val.size == round(0.05 * total) and tokens.train.size + tokens.val.size == total


def test_many_files_hold_out_whole_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=60)
    tokens = data.prepare_tokens(data.find_documents([str(corpus)]), ByteTokenizer(), tmp_path / "c")
    assert tokens.info["split"] == "documents"
    assert 0 < tokens.info["n_documents"]["val"] < 60
    # every held-out document starts with BOS and ends with EOS: no document is cut in two
    assert tokens.val[0] == ByteTokenizer.bos_id and tokens.val[-1] == ByteTokenizer.eos_id


def test_token_content_hash_ignores_where_the_files_are(tmp_path):
    first = data.prepare_tokens(data.find_documents([str(write_corpus(tmp_path / "a", 5))]), ByteTokenizer(),
                                tmp_path / "c")
    second = data.prepare_tokens(data.find_documents([str(write_corpus(tmp_path / "elsewhere" / "b", 5))]),
                                 ByteTokenizer(), tmp_path / "c")
    assert first.directory != second.directory  # another source list: another cache entry
    assert first.info["content_sha256"] == second.info["content_sha256"]  # but the same tokens


def test_files_found_by_a_glob_are_named_by_their_path_below_the_pattern(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "README.txt").write_text(sub)
    names = [d.name for d in data.find_documents([str(tmp_path / "**" / "README.txt")])]
    assert names == ["x/README.txt", "y/README.txt"]


@given(seed=st.integers(0, 2**32 - 1), drawn_before=st.integers(0, 5), batch=st.integers(1, 4),
       seq=st.integers(1, 30))
def test_sampler_state_restores_the_exact_batch_sequence(seed, drawn_before, batch, seq):
    tokens = numpy.arange(500, dtype=numpy.uint16)
    sampler = data.BatchSampler(tokens, batch, seq, seed)
    for _ in range(drawn_before):
        sampler.next_batch()
    state = sampler.state()
    expected = [sampler.next_batch() for _ in range(3)]
    restored = data.BatchSampler(tokens, batch, seq, seed=12345)
    restored.restore(state)
    for (x, y), (x2, y2) in zip(expected, [restored.next_batch() for _ in range(3)]):
        assert_same(x, x2)
        assert_same(y, y2)
        # targets are the inputs shifted by one token
        assert_same(x[:, 1:], y[:, :-1])
        assert x.shape == (batch, seq) and x.dtype == numpy.int64


def test_validation_split_is_by_whole_documents_and_stable():
    names = [f"pkg/module{i}.py" for i in range(2000)]
    held_out = [n for n in names if data.is_validation(n, 0.05)]
    assert 50 <= len(held_out) <= 150
    assert held_out == [n for n in names if data.is_validation(n, 0.05)]


def test_unreadable_files_are_skipped_when_walked_and_an_error_when_named(tmp_path, monkeypatch):
    """Simulated with a read that raises PermissionError (tests run as root, who can read anything)."""
    corpus = write_corpus(tmp_path / "corpus", 3)
    locked = corpus / "doc01.txt"
    real_read_bytes = type(locked).read_bytes

    def read_bytes(path):
        if path.name == locked.name:
            raise PermissionError(13, "Permission denied")
        return real_read_bytes(path)

    monkeypatch.setattr(type(locked), "read_bytes", read_bytes)
    warnings = []
    texts = list(data.read_documents(data.find_documents([str(corpus)]), warn=warnings.append))
    assert len(texts) == 2 and "doc01.txt (Permission denied)" in warnings[0]
    with pytest.raises(data.DataError, match="cannot read it"):
        list(data.read_documents(data.find_documents([str(locked)])))


@given(seq_len=st.integers(1, 20), extra=st.integers(0, 30), batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_every_window_of_the_stream_can_be_drawn_and_none_reaches_past_its_end(seq_len, extra, batch, seed):
    """Windows of T + 1 tokens start anywhere from 0 to the last one that fits, the stream's end
    included (a stream of exactly T + 1 tokens is that one window); targets are inputs shifted by 1."""
    tokens = numpy.arange(seq_len + 1 + extra, dtype=numpy.uint16)
    sampler = data.BatchSampler(tokens, batch, seq_len, seed)
    starts = set()
    for _ in range(60):
        inputs, targets = sampler.next_batch()
        assert inputs.shape == targets.shape == (batch, seq_len)
        assert (targets[:, :-1] == inputs[:, 1:]).all() and (targets[:, -1] == inputs[:, -1] + 1).all()
        starts.update(inputs[:, 0].tolist())
    assert max(starts) <= extra and min(starts) >= 0
    if extra == 0:
        assert starts == {0}


@given(n_tokens=st.integers(2, 10_000), batch=st.integers(1, 4), n_batches=st.integers(1, 3),
       seq_len=st.integers(1, 64))
def test_fixed_validation_windows_run_from_the_first_token_to_the_last(n_tokens, batch, n_batches, seq_len):
    """Evenly spaced over the whole held-out stream (one window: its start), none past its end."""
    tokens = numpy.arange(n_tokens, dtype=numpy.uint32)
    batches = data.fixed_batches(tokens, batch, seq_len, n_batches)
    if n_tokens < seq_len + 1:
        assert batches == []
        return
    assert len(batches) == n_batches and all(inputs.shape == (batch, seq_len) for inputs, _ in batches)
    assert batches[0][0][0, 0] == 0  # the first window starts at the first token
    if batch * n_batches > 1:  # and the last one ends at the last
        assert batches[-1][1][-1, -1] == n_tokens - 1


@given(n_tokens=st.integers(2, 100_000), fraction=st.floats(0.0, 0.5), n_spans=st.integers(1, 40))
def test_a_split_by_the_tail_holds_out_at_least_one_token_and_keeps_at_least_one(n_tokens, fraction, n_spans):
    """Too few documents to split by document: the last max(1, round(fraction x tokens)) tokens
    are held out, so even a tiny corpus, or a fraction that rounds to 0, has a validation token."""
    spans = [("train", 0, n_tokens)] * n_spans  # every document on one side: the tail rule applies
    ranges, _, rule = data._split(spans, n_tokens, fraction)
    assert rule == "tail"
    (train_first, train_count), (val_first, val_count) = ranges["train"][0], ranges["val"][0]
    assert train_first == 0 and train_count + val_count == n_tokens and val_first == train_count
    assert val_count == max(1, round(n_tokens * fraction)) and train_count >= 1
