"""`Tokenizer`: a SentencePiece model that encodes text to ids and decodes ids to text.

A thin wrapper around `sentencepiece.SentencePieceProcessor`. It loads any SentencePiece model,
Meta's `tokenizer.model` included, and keeps the model's serialized bytes so that a checkpoint can
store them (`model_bytes`) and name them (`fingerprint`, a sha256).

Round trips. `decode(encode(text)) == text` for every Python string without surrogates, the
strings Hypothesis' `text()` draws. Plain SentencePiece breaks this in one place: it writes spaces
as U+2581 (LOWER ONE EIGHTH BLOCK, "▁") inside pieces, so a literal U+2581 in the input is read as
a space and decodes to " ". `Tokenizer.encode` therefore spells a literal U+2581 with its three
byte pieces <0xE2><0x96><0x81>, which decode back to U+2581, and encodes the text after it without
the dummy prefix space. Text without U+2581 is encoded exactly as SentencePiece (and Meta's code)
encodes it. A model without byte fallback cannot do this and keeps SentencePiece's behaviour.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sentencepiece

from ..files import FileProblem, kind_of, read_regular_file, write_atomically
from .model_bytes import MAX_MODEL_BYTES, NO_DUMMY_PREFIX, TokenizerError, processor_from_bytes

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_PIECE_COUNT = 256  # <0x00> .. <0xFF>, the byte fallback pieces
MIN_VOCAB_SIZE = BYTE_PIECE_COUNT + 3  # byte pieces + unk, bos, eos

WHITESPACE_SYMBOL = "\u2581"  # "▁": how SentencePiece writes a space inside a piece
ENCODE_CHUNK_CHARS = 1 << 20  # encode_in_chunks: about 1M characters (some 40 MB of Python ints) at a time


class Tokenizer:
    """A SentencePiece model: encode text to ids, decode ids to text.

    Build one with `Tokenizer.load(path)`, `Tokenizer.from_bytes(model_bytes)` or
    `train_tokenizer(...)`.
    """

    def __init__(self, model_bytes: bytes, source: str = "model bytes"):
        self._model_bytes = bytes(model_bytes)
        self._processor = processor_from_bytes(self._model_bytes, source)
        self._literal_whitespace_symbol_ids = self._byte_piece_ids(WHITESPACE_SYMBOL.encode())
        # built when first needed
        self._processor_without_dummy_prefix: sentencepiece.SentencePieceProcessor | None = None
        self._cuttable_vocabulary: bool | None = None  # decided when first needed

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

    # what BpeTokenizer also says: Llama's SentencePiece models begin every text with BOS, and a
    # SentencePiece model file holds no chat template
    add_bos_token = True
    chat_template: str | None = None

    def special_tokens(self) -> dict:
        """The named special tokens as text ({"bos_token": "<s>", ...}), as a chat template sees them."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id}
        return {name: self.id_to_piece(i) for name, i in names.items() if i >= 0}

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
            end = cut_point(text, start, chunk_chars)
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
            check_unicode(text)
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
                model_proto=self._model_bytes + NO_DUMMY_PREFIX)
        return self._processor_without_dummy_prefix



def check_unicode(text: str) -> None:
    """TokenizerError if `text` holds what UTF-8 cannot encode (a lone surrogate, say)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TokenizerError(f"text is not valid Unicode ({error}); decode it with errors='replace' first") from None


def cut_point(text: str, start: int, chunk_chars: int, safe_cut=None) -> int:
    """The end of the chunk that begins at `start`: the last safe cut at most `chunk_chars` after it,
    else the first one beyond; the end of the text when there is none. `safe_cut(text, cut)` says
    whether no piece can cross text[cut - 1] | text[cut] (default: SentencePiece's rule below)."""
    safe_cut = _safe_cut if safe_cut is None else safe_cut
    limit = start + chunk_chars
    if limit >= len(text):
        return len(text)
    for cut in range(limit, start, -1):
        if safe_cut(text, cut):
            return cut
    return next((cut for cut in range(limit + 1, len(text)) if safe_cut(text, cut)), len(text))


def _safe_cut(text: str, cut: int) -> bool:
    """Whether no piece can cross between text[cut - 1] and text[cut]: after a newline, or before
    a single space between two other characters."""
    return text[cut - 1] == "\n" or (text[cut] == " " and text[cut - 1] != " " and cut + 1 < len(text)
                                      and text[cut + 1] != " ")
