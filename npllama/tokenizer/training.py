"""Training a SentencePiece BPE tokenizer the Llama way, and the recipe that names a trained one.

`train_tokenizer` trains a model with the options of the Llama paper (Touvron et al., 2023, §2.1;
the trainer_spec recorded in Meta's tokenizer.model): byte-pair encoding, every digit split into
its own piece, unknown characters falling back to their UTF-8 bytes, no Unicode normalization, a
dummy space in front of the text, whitespace kept as it is (runs of spaces may form pieces), and
the special ids unk=0, bos=1, eos=2 with no padding id. Training happens in memory; nothing is
written to disk until `Tokenizer.save`, which writes atomically.

Determinism. SentencePiece's BPE trainer is deterministic for a given list of lines and options,
and its random seed changes nothing: its own sampling of input lines (input_sentence_size) ignores
`set_random_generator_seed` (checked with sentencepiece 0.2.3). So `train_tokenizer` does the
sampling itself: a corpus with more than `max_sentences` lines is reduced by reservoir
sampling with a `random.Random(seed)`, and SentencePiece is given exactly those lines. The model
bytes also record the options, `num_threads` among them, which is why it defaults to 1 (see
`train_tokenizer`): the same corpus gives the same bytes, and fingerprint, on every machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from typing import Any

import sentencepiece

from .encoding import BOS_ID, BYTE_PIECE_COUNT, EOS_ID, MIN_VOCAB_SIZE, UNK_ID, Tokenizer
from .model_bytes import TokenizerError

# SentencePiece trains on lines ("sentences") and skips any longer than max_sentence_length bytes.
# Long lines (minified code, long paragraphs) are cut into chunks of LINE_CHUNK_CHARS characters
# instead, which are at most 4 bytes each in UTF-8, so no text is dropped.
LINE_CHUNK_CHARS = 4096
MAX_SENTENCE_BYTES = 4 * LINE_CHUNK_CHARS
DEFAULT_MAX_SENTENCES = 1_000_000  # about 40 MB of code: some 20 s of training for 32000 pieces

# The options of Meta's tokenizer.model (its trainer_spec and normalizer_spec).
LLAMA_TRAINING_OPTIONS: dict[str, Any] = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=0.99995,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=-1,
    hard_vocab_limit=True,  # the vocabulary has exactly the size asked for, or training fails
)


def train_tokenizer(texts, vocab_size: int, *, seed: int = 0,
                    max_sentences: int = DEFAULT_MAX_SENTENCES, num_threads: int = 1,
                    progress=None) -> Tokenizer:
    """Train a Llama-style SentencePiece BPE tokenizer on `texts`, in memory.

    texts          an iterable of documents (strings), consumed once; each is split into lines,
                   the unit SentencePiece trains on. Empty lines are dropped; lines longer than
                   LINE_CHUNK_CHARS characters are cut into chunks.
    vocab_size     the exact number of pieces, at least MIN_VOCAB_SIZE (256 byte pieces + unk,
                   bos, eos) plus the corpus' distinct characters. A corpus too small to yield
                   that many pieces is an error that names the largest size it can give.
    seed           picks the lines kept when there are more than `max_sentences`; with fewer it
                   has no effect, because SentencePiece's BPE training is deterministic.
    max_sentences  bounds training time and memory: at most this many lines are trained on.
    num_threads    SentencePiece trainer threads. 1 by default: BPE training is not faster with
                   more (15.6 s with 1 and 16.7 s with 2 threads, 30 MB of code, 32000 pieces),
                   and the count is recorded in the model bytes, so a machine-dependent count
                   would give the same tokenizer a different fingerprint on every machine.
    progress       optional callable taking a one-line message.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TokenizerError(f"vocab_size must be an integer, not {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: the {BYTE_PIECE_COUNT} byte fallback pieces "
            f"and unk, bos, eos alone take {MIN_VOCAB_SIZE}; ask for more (Llama: 32000)")
    if max_sentences < 1:
        raise TokenizerError(f"max_sentences must be at least 1, not {max_sentences}")
    report = progress or (lambda message: None)

    lines, line_count = _sample_lines(_training_lines(texts), max_sentences, seed)
    if not lines:
        raise TokenizerError("no text to train the tokenizer on: the inputs hold no non-empty "
                             "line; pass files or folders with text")
    if line_count > len(lines):
        report(f"sampled {len(lines):,} of {line_count:,} lines (seed {seed})")
    report(f"training BPE with {vocab_size:,} pieces on {len(lines):,} lines "
           f"({sum(map(len, lines)):,} characters)")

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            input_sentence_size=0,  # train on every line given: the sample above is the bound
            max_sentence_length=MAX_SENTENCE_BYTES, num_threads=num_threads,
            minloglevel=2,  # errors only: SentencePiece logs every step of training otherwise
            **LLAMA_TRAINING_OPTIONS)
    except RuntimeError as error:
        raise _training_error(str(error), vocab_size) from None
    return Tokenizer(model.getvalue(), source="the trained model")


def _training_lines(texts):
    """Non-empty lines of every document, long lines cut into LINE_CHUNK_CHARS chunks."""
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not a single str: "
                        "pass [text] to train on one document")
    for document in texts:
        for line in document.splitlines():
            for start in range(0, len(line), LINE_CHUNK_CHARS):
                yield line[start:start + LINE_CHUNK_CHARS]


def _sample_lines(lines, max_lines: int, seed: int):
    """(at most max_lines of `lines`, chosen uniformly by reservoir sampling; total count)."""
    rng = random.Random(seed)
    sample: list[str] = []
    count = 0
    for line in lines:
        count += 1
        if len(sample) < max_lines:
            sample.append(line)
        else:
            slot = rng.randrange(count)
            if slot < max_lines:
                sample[slot] = line
    return sample, count


def _training_error(message: str, vocab_size: int) -> TokenizerError:
    """Turn a SentencePiece trainer failure into a one-line TokenizerError that says what to do."""
    too_high = re.search(r"Vocabulary size too high .*<= (\d+)", message)
    if too_high:
        return TokenizerError(
            f"vocab_size {vocab_size} is more than this corpus can give: at most "
            f"{too_high.group(1)} pieces; ask for at most that many, or train on more text")
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return TokenizerError(
            f"vocab_size {vocab_size} is too small for this corpus: its characters and the "
            f"{MIN_VOCAB_SIZE} byte and special pieces need at least {too_small.group(1)}")
    return TokenizerError("SentencePiece training failed: " + " ".join(message.split()))


def recipe_key(vocab_size: int, sources: Any) -> str:
    """A name for the tokenizer `train_tokenizer(texts, vocab_size)` gives with its defaults on the
    texts `sources` identifies (a signature of their files): the same key, the same model bytes.
    It covers everything that decides those bytes: the options, the line bound, the seed and
    SentencePiece's version."""
    recipe = {"vocab": vocab_size, "sources": sources, "options": LLAMA_TRAINING_OPTIONS,
              "max_sentences": DEFAULT_MAX_SENTENCES, "seed": 0, "sentencepiece": sentencepiece.__version__}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
