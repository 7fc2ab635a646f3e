"""SentencePiece BPE tokenizer, trained the Llama way.

    python -m npllama.tokenizer train --input PATH [PATH ...] --vocab-size N --out FILE
    python -m npllama.tokenizer encode --tokenizer FILE [--pieces] TEXT
    python -m npllama.tokenizer decode --tokenizer FILE ID [ID ...]

`Tokenizer` is a thin wrapper around `sentencepiece.SentencePieceProcessor`. It loads any
SentencePiece model, Meta's `tokenizer.model` included, and keeps the model's serialized bytes so
that a checkpoint can store them (`model_bytes`) and name them (`fingerprint`, a sha256).

`train_tokenizer` trains a model with the options of the Llama paper (Touvron et al., 2023, §2.1;
the trainer_spec recorded in Meta's tokenizer.model): byte-pair encoding, every digit split into
its own piece, unknown characters falling back to their UTF-8 bytes, no Unicode normalization, a
dummy space in front of the text, whitespace kept as it is (runs of spaces may form pieces), and
the special ids unk=0, bos=1, eos=2 with no padding id. Training happens in memory; nothing is
written to disk until `Tokenizer.save`, which writes atomically.

Round trips. `decode(encode(text)) == text` for every Python string without surrogates, the
strings Hypothesis' `text()` draws. Plain SentencePiece breaks this in one place: it writes spaces
as U+2581 (LOWER ONE EIGHTH BLOCK, "▁") inside pieces, so a literal U+2581 in the input is read as
a space and decodes to " ". `Tokenizer.encode` therefore spells a literal U+2581 with its three
byte pieces <0xE2><0x96><0x81>, which decode back to U+2581, and encodes the text after it without
the dummy prefix space. Text without U+2581 is encoded exactly as SentencePiece (and Meta's code)
encodes it. A model without byte fallback cannot do this and keeps SentencePiece's behaviour.

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
import os
import random
import re
import sys
from pathlib import Path

import sentencepiece

from .cli import OneLineParser, integer
from .errors import NpllamaError
from .files import FileProblem, kind_of, read_regular_file, write_atomically

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_PIECE_COUNT = 256  # <0x00> .. <0xFF>, the byte fallback pieces
MIN_VOCAB_SIZE = BYTE_PIECE_COUNT + 3  # byte pieces + unk, bos, eos

# SentencePiece trains on lines ("sentences") and skips any longer than max_sentence_length bytes.
# Long lines (minified code, long paragraphs) are cut into chunks of LINE_CHUNK_CHARS characters
# instead, which are at most 4 bytes each in UTF-8, so no text is dropped.
LINE_CHUNK_CHARS = 4096
MAX_SENTENCE_BYTES = 4 * LINE_CHUNK_CHARS
DEFAULT_MAX_SENTENCES = 1_000_000  # about 40 MB of code: some 20 s of training for 32000 pieces

# Meta's tokenizer.model is 0.5 MB and a 256k-piece model about 4 MB; a "model" of more than this
# is not one, and reading it whole (a device, a growing file) must not take the machine's memory.
MAX_MODEL_BYTES = 64 * 2**20

WHITESPACE_SYMBOL = "\u2581"  # "▁": how SentencePiece writes a space inside a piece
ENCODE_CHUNK_CHARS = 1 << 20  # encode_in_chunks: about 1M characters (some 40 MB of Python ints) at a time

# The options of Meta's tokenizer.model (its trainer_spec and normalizer_spec).
LLAMA_TRAINING_OPTIONS = dict(
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

# A serialized ModelProto fragment: normalizer_spec (field 3) { add_dummy_prefix (field 3): false }.
# A protobuf parser merges a message field that appears twice, the later values winning, so
# appending this to a model's bytes gives the same model without the dummy prefix space.
#
# Why these two pieces of protobuf by hand (this fragment, and `_protobuf_field_numbers` below)
# rather than SentencePiece's own API: SentencePiece 0.2.1 had
# `SentencePieceProcessor.OverrideNormalizerSpec(add_dummy_prefix=False)`, but 0.2.3, the current
# release, rewrote its bindings without it; and its ModelProto module (`sentencepiece_model_pb2`)
# needs the `protobuf` package at the very major version it was generated with (7.x for 0.2.3),
# which would pin the protobuf of every environment npllama is installed into. Both pieces work
# the same with every SentencePiece 0.2.x, and tests/test_tokenizer.py checks them against
# SentencePiece's behaviour (truncated models refused; encoding after U+2581 without the prefix).
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
_NORMALIZER_SPEC_FIELD = 3


class TokenizerError(NpllamaError):
    """A tokenizer file or argument that cannot be used; the message says what to do."""


class Tokenizer:
    """A SentencePiece model: encode text to ids, decode ids to text.

    Build one with `Tokenizer.load(path)`, `Tokenizer.from_bytes(model_bytes)` or
    `train_tokenizer(...)`.
    """

    def __init__(self, model_bytes: bytes, source: str = "model bytes"):
        self._model_bytes = bytes(model_bytes)
        self._processor = _processor_from_bytes(self._model_bytes, source)
        self._literal_whitespace_symbol_ids = self._byte_piece_ids(WHITESPACE_SYMBOL.encode())
        self._processor_without_dummy_prefix = None  # built when first needed
        self._cuttable_vocabulary = None  # decided when first needed

    @classmethod
    def load(cls, path, what: str = "tokenizer file") -> Tokenizer:
        """Load a SentencePiece model file (ours, or Meta's tokenizer.model).

        Missing, empty, truncated and unparsable files raise TokenizerError. A model file has no
        checksum of its own, so some corruptions (a changed score, a changed piece) still load as
        a different tokenizer: compare `fingerprint` with a recorded one to rule that out.
        """
        path = Path(path)
        if path.is_dir():
            raise TokenizerError(f"{path} is a folder, not a tokenizer file; pass the .model file "
                                 "in it (for a checkpoint: DIR/tokenizer.model)")
        if kind_of(path) is None:
            raise TokenizerError(f"tokenizer file {path} does not exist; train one with "
                                 "`python -m npllama.tokenizer train` or check the path")
        try:
            model_bytes = read_regular_file(path, MAX_MODEL_BYTES, what)
        except FileProblem as problem:
            raise TokenizerError(str(problem)) from None
        return cls(model_bytes, source=f"tokenizer file {path}")

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        """A tokenizer from a serialized SentencePiece model, e.g. `model_bytes` stored elsewhere."""
        return cls(model_bytes)

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def unk_id(self) -> int:
        return self._processor.unk_id()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        """The padding id, or -1 when the model has none (Llama has none)."""
        return self._processor.pad_id()

    @property
    def model_bytes(self) -> bytes:
        """The serialized model (a SentencePiece ModelProto): what a .model file holds."""
        return self._model_bytes

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of `model_bytes`: equal fingerprints, identical tokenizers."""
        return hashlib.sha256(self._model_bytes).hexdigest()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with the BOS id in front and the EOS id at the end if asked.

        Text without U+2581 ("▁") is encoded exactly as SentencePiece encodes it. A literal U+2581
        becomes its three byte pieces, so that decode gives it back (see the module docstring).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        ids = [self._special_id("bos", self.bos_id)] if bos else []
        ids += self._encode_part(text, at_start=True)
        if eos:
            ids.append(self._special_id("eos", self.eos_id))
        return ids

    def encode_in_chunks(self, text: str, bos: bool = False, eos: bool = False,
                         chunk_chars: int = ENCODE_CHUNK_CHARS):
        """`encode(text, bos, eos)` as a sequence of lists whose concatenation is exactly that, each
        from at most about `chunk_chars` characters, so a long text never becomes one list of ids
        (some 40 bytes an id in Python) all at once.

        The text is cut only where no piece of this vocabulary can cross: after a newline (no piece
        holds one) or before a single space between two other characters (a space begins a piece or
        continues a run of spaces, never ends one). A vocabulary where either is not so is encoded
        whole, in one chunk.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        if not self._cuttable():
            yield self.encode(text, bos, eos)
            return
        start = 0
        while start < len(text):
            end = _cut_point(text, start, chunk_chars)
            ids = [self._special_id("bos", self.bos_id)] if bos and start == 0 else []
            ids += self._encode_part(text[start:end], at_start=start == 0)
            if eos and end == len(text):
                ids.append(self._special_id("eos", self.eos_id))
            yield ids
            start = end
        if not text:
            yield self.encode(text, bos, eos)

    def _encode_part(self, text: str, at_start: bool) -> list[int]:
        """Ids of `text`, with SentencePiece's dummy prefix space only if it begins the whole text."""
        processor = self._processor if at_start else self._without_dummy_prefix()
        try:
            if not (self._literal_whitespace_symbol_ids and WHITESPACE_SYMBOL in text):
                return processor.encode(text)
            first, *after_each_symbol = text.split(WHITESPACE_SYMBOL)
            ids = processor.encode(first)
            for segment in after_each_symbol:
                ids += self._literal_whitespace_symbol_ids
                # Not the start of the text: no dummy prefix space in front of this segment.
                ids += self._without_dummy_prefix().encode(segment)
            return ids
        except RuntimeError:  # what SentencePiece raises for a str that UTF-8 cannot encode
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise TokenizerError(f"text is not valid Unicode ({error}); "
                                     "decode it with errors='replace' first") from None
            raise

    def _cuttable(self) -> bool:
        """Whether encode_in_chunks may cut: no piece holds a newline, and every piece holding "▁"
        holds it only at its start (whitespace-only pieces included)."""
        if self._cuttable_vocabulary is None:
            pieces = [self._processor.id_to_piece(i) for i in range(self.vocab_size)]
            self._cuttable_vocabulary = not any(
                "\n" in piece or WHITESPACE_SYMBOL in piece.lstrip(WHITESPACE_SYMBOL) for piece in pieces)
        return self._cuttable_vocabulary

    def decode(self, ids) -> str:
        """The text of a sequence of ids; BOS and EOS (control pieces) decode to nothing."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0 .. "
                                     f"{self.vocab_size - 1}); ids must come from this tokenizer")
        return self._processor.decode(ids)

    def id_to_piece(self, i: int) -> str:
        """The piece of id `i`, e.g. "▁the", "7" or "<0x0A>" (a byte fallback piece)."""
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (0 .. {self.vocab_size - 1})")
        return self._processor.id_to_piece(i)

    def save(self, path) -> None:
        """Write the model to `path` atomically: a temporary file, fsynced, then renamed."""
        path = Path(path)
        try:
            write_atomically(path, self._model_bytes)
        except OSError as error:
            raise TokenizerError(f"cannot write tokenizer file {path}: {error.strerror}; "
                                 "choose a writable path") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]}...)"

    def _special_id(self, name: str, i: int) -> int:
        if i < 0:
            raise TokenizerError(f"this tokenizer has no {name.upper()} piece; "
                                 f"encode without {name}=True")
        return i

    def _byte_piece_ids(self, data: bytes) -> list[int]:
        """Ids of the byte fallback pieces of `data`, or [] when the model has no byte fallback."""
        ids = [self._processor.piece_to_id(f"<0x{byte:02X}>") for byte in data]
        return ids if all(self._processor.is_byte(i) for i in ids) else []

    def _without_dummy_prefix(self) -> sentencepiece.SentencePieceProcessor:
        if self._processor_without_dummy_prefix is None:
            self._processor_without_dummy_prefix = sentencepiece.SentencePieceProcessor(
                model_proto=self._model_bytes + _NO_DUMMY_PREFIX)
        return self._processor_without_dummy_prefix


def _cut_point(text: str, start: int, chunk_chars: int) -> int:
    """The end of the chunk that begins at `start`: the last safe cut at most `chunk_chars` after it,
    else the first one beyond; the end of the text when there is none."""
    limit = start + chunk_chars
    if limit >= len(text):
        return len(text)
    for cut in range(limit, start, -1):
        if _safe_cut(text, cut):
            return cut
    return next((cut for cut in range(limit + 1, len(text)) if _safe_cut(text, cut)), len(text))


def _safe_cut(text: str, cut: int) -> bool:
    """Whether no piece can cross between text[cut - 1] and text[cut]: after a newline, or before
    a single space between two other characters."""
    return text[cut - 1] == "\n" or (text[cut] == " " and text[cut - 1] != " " and cut + 1 < len(text)
                                      and text[cut + 1] != " ")


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
    sample, count = [], 0
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


def _processor_from_bytes(model_bytes: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    """A SentencePieceProcessor for `model_bytes`, or a TokenizerError naming `source`."""
    fix = "it should be a SentencePiece .model file; copy or train it again"
    if not model_bytes:
        raise TokenizerError(f"{source} is empty; {fix}")
    try:
        fields = _protobuf_field_numbers(model_bytes)
    except ValueError:
        raise TokenizerError(f"{source} is not a SentencePiece model (truncated or corrupted); "
                             f"{fix}") from None
    # Without its normalizer_spec, a cut-off model still loads, but with SentencePiece's default
    # normalization (extra whitespace removed): a different tokenizer. Every trained model has one.
    if _NORMALIZER_SPEC_FIELD not in fields:
        raise TokenizerError(f"{source} has no normalizer_spec, so it is truncated or not a "
                             f"SentencePiece model; {fix}")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError, ValueError) as error:  # ValueError: an undecodable message
        detail = " ".join(str(error).split()) or "it does not parse"
        raise TokenizerError(f"{source} is not a valid SentencePiece model ({detail}); {fix}") from None
    if processor.vocab_size() == 0:
        raise TokenizerError(f"{source} has no pieces; {fix}")
    return processor


def _protobuf_field_numbers(data: bytes) -> set[int]:
    """Field numbers at the top level of a serialized protocol buffer message.

    Walks the wire format (https://protobuf.dev/programming-guides/encoding/) without decoding the
    values; raises ValueError where the data ends in the middle of a field or is not protobuf.
    """

    def varint(position):
        value, shift = 0, 0
        while True:
            if position >= len(data) or shift > 63:
                raise ValueError("data ends inside a varint")
            byte = data[position]
            value |= (byte & 0x7F) << shift
            position, shift = position + 1, shift + 7
            if not byte & 0x80:
                return value, position

    fixed_sizes = {1: 8, 5: 4}  # wire types 1 (64-bit) and 5 (32-bit)
    numbers, position = set(), 0
    while position < len(data):
        key, position = varint(position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            _, position = varint(position)
        elif wire_type == 2:
            length, position = varint(position)
            position += length
        elif wire_type in fixed_sizes:
            position += fixed_sizes[wire_type]
        else:
            raise ValueError(f"wire type {wire_type}")
        if position > len(data):
            raise ValueError("data ends inside a field")
        numbers.add(number)
    return numbers


# --- command line --------------------------------------------------------------------------------

def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m npllama.tokenizer",
        description="Train, and use, a SentencePiece BPE tokenizer with the options of Llama "
                    "(split digits, byte fallback, identity normalization, unk/bos/eos = 0/1/2).",
        epilog="Errors print one line on stderr and exit with status 2.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a tokenizer on text files",
        description="Train a Llama-style BPE tokenizer and write it as a SentencePiece .model file.",
        epilog="Inputs are read as npllama.train reads --data: files are read whatever their name; "
               "folders are searched recursively for text files (*.txt, *.md, *.py, ...); patterns "
               "such as 'corpus/**/*.txt' are expanded (quote them). Text must be UTF-8: a file named "
               "directly that is not is an error; one found in a folder or by a pattern is skipped "
               "as a whole (never decoded with replacement characters), and the skipped files are "
               "counted and named. Training uses at most --max-sentences lines, sampled with --seed when the "
               "corpus has more; the same inputs and options give a byte-identical model.")
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="text files, folders or glob patterns")
    train.add_argument("--vocab-size", type=integer(minimum=1), required=True, metavar="N",
                       help=f"number of pieces (at least {MIN_VOCAB_SIZE}; Llama: 32000)")
    train.add_argument("--out", required=True, metavar="FILE", help="the .model file to write")
    train.add_argument("--max-sentences", type=integer(minimum=1), default=DEFAULT_MAX_SENTENCES,
                       metavar="N", help="train on at most N lines (default %(default)s)")
    train.add_argument("--seed", type=integer(minimum=0), default=0,
                       help="seed of the line sampling (default %(default)s)")

    encode = commands.add_parser("encode", help="print the token ids of a text",
                                 description="Print the token ids of TEXT, space-separated.")
    encode.add_argument("--tokenizer", required=True, metavar="FILE", help="a .model file")
    encode.add_argument("--pieces", action="store_true", help="print the pieces instead of ids")
    encode.add_argument("--bos", action="store_true", help="begin with the BOS id")
    encode.add_argument("--eos", action="store_true", help="end with the EOS id")
    encode.add_argument("text", metavar="TEXT")

    decode = commands.add_parser("decode", help="print the text of token ids",
                                 description="Print the text of the token ids.")
    decode.add_argument("--tokenizer", required=True, metavar="FILE", help="a .model file")
    decode.add_argument("ids", nargs="+", type=int, metavar="ID")
    return parser


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train_command(args) -> None:
    out = Path(args.out)
    if out.is_dir():
        raise TokenizerError(f"--out {out} is a folder; name a file, e.g. {out / 'tokenizer.model'}")
    existing_parent = next(p for p in out.absolute().parents if p.exists())
    if not existing_parent.is_dir() or not os.access(existing_parent, os.W_OK):
        raise TokenizerError(f"cannot write --out {out}: {existing_parent} is not a writable "
                             "folder; choose another path")
    from .data import find_documents, read_documents

    documents = find_documents([str(spec) for spec in args.input], flag="--input")
    _say(f"reading {len(documents):,} files")
    texts = (text for _, text in read_documents(documents, warn=_say, flag="--input"))
    tokenizer = train_tokenizer(texts, args.vocab_size, seed=args.seed,
                                max_sentences=args.max_sentences, progress=_say)
    tokenizer.save(out)
    print(f"wrote {out}: {tokenizer.vocab_size:,} pieces, fingerprint {tokenizer.fingerprint[:16]}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            _train_command(args)
        elif args.command == "encode":
            tokenizer = Tokenizer.load(args.tokenizer, what="--tokenizer")
            ids = tokenizer.encode(args.text, bos=args.bos, eos=args.eos)
            print(" ".join(tokenizer.id_to_piece(i) if args.pieces else str(i) for i in ids))
        else:
            print(Tokenizer.load(args.tokenizer, what="--tokenizer").decode(args.ids))
    except (NpllamaError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
