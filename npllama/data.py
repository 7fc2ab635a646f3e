"""Training data: text files -> one memory-mapped token file -> seeded (B, T+1) windows.

Sources are files, folders (searched recursively for text files) or glob patterns. Each document
(one file) is encoded as [BOS] tokens [EOS] and the documents are concatenated into a flat token
stream, stored as a raw little-endian array (uint16 when the vocabulary fits, else uint32) with
a JSON sidecar:

    <cache>/<key>/train.bin  val.bin  tokens.json

`tokens.json` records the tokenizer's fingerprint, each source's path, size and mtime, the token
counts and the dtype; the key is a hash of the tokenizer fingerprint and the source list, so an
unchanged corpus is tokenised once and reused, and any change (a file edited, another tokenizer)
gets a fresh file. Files are written to a temporary name and renamed, so an interrupted
tokenisation leaves nothing half-written behind.

Validation split: with at least MIN_DOCUMENTS_TO_SPLIT documents, a document goes to `val.bin`
when a hash of its path (relative to the source it was found under) falls in the held-out
fraction (default 5%): whole documents, never halves. With fewer (a single input.txt, say), and
whenever the hash leaves a split empty, the last 5% of the concatenated token stream is held
out instead.

`tokens.json` also records a sha256 of the token streams themselves (`content_sha256`): the
identity a checkpoint remembers, so a resumed run can tell the same data from other data even
when the files were moved or touched.

Text handling: files are read as UTF-8. A file named directly that cannot be read or is not valid
UTF-8 is an error; files found by walking a folder or matching a glob are skipped when they are
not UTF-8 or cannot be read, and the run says how many and names the first few.

The built-in default corpus is the Python standard library's own source files (`*.py` under
`sysconfig.get_paths()['stdlib']`, without site-packages and without the test suites): about
800 files and 12 MB of real code and English prose (docstrings, comments), present on every
machine that runs npllama, needing no download.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy

from .errors import NpllamaError
from .files import kind_of, temporary_sibling, write_atomically, writing_atomically

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".json", ".html", ".tex", ".csv", ".toml", ".cfg",
                 ".ini", ".yaml", ".yml", ".js", ".ts", ".java", ".go", ".rs", ".cpp", ".hpp", ".sh", ""}
FORMAT_VERSION = 2
MIN_DOCUMENTS_TO_SPLIT = 20


class DataError(NpllamaError):
    """A problem with the training data, stated in one line."""


@dataclass
class Document:
    path: Path
    name: str  # path relative to the source it was found under: stable across machines
    direct: bool  # named directly by the user (errors are fatal) or found by a walk/glob


def default_corpus_files() -> list[Path]:
    """The standard library's *.py files, without site-packages and test suites, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in stdlib.rglob("*.py"):
        parts = set(path.relative_to(stdlib).parts[:-1])
        if parts & {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}:
            continue
        files.append(path)
    return sorted(files)


def find_documents(sources: list[str] | None, flag: str = "--data") -> list[Document]:
    """Resolve files, folders and globs to documents; None means the built-in default corpus.

    `flag` names the command-line option the sources came from, for the error messages.
    """
    if not sources:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = default_corpus_files()
        if not files:
            raise DataError(f"the default corpus is empty: no *.py files under {stdlib}; pass --data")
        return [Document(p, str(p.relative_to(stdlib)), False) for p in files]
    documents = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            documents.append(Document(path, path.name, True))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))
                           and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"{flag} {source}: the folder holds no text files "
                                f"(looked for {', '.join(sorted(s for s in TEXT_SUFFIXES if s))[:60]}...)")
            documents += [Document(p, str(p.relative_to(path)), False) for p in found]
        elif any(ch in source for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"{flag} {source}: the pattern matches no files")
            fixed = _fixed_prefix(os.path.expanduser(source))
            documents += [Document(p, os.path.relpath(p, fixed), False) for p in found]
        elif (kind := kind_of(path)) is not None:
            raise DataError(f"{flag} {source}: it is a {kind}, not a file or folder of text; pass regular files")
        else:
            raise DataError(f"{flag} {source}: no such file or folder")
    return documents


def _fixed_prefix(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard: 'corpus/**/*.txt' -> 'corpus'."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_documents(documents: list[Document], warn=print, flag: str = "--data"):
    """Yield (document, text). Walked files that are unreadable or not UTF-8 are skipped and reported."""
    skipped = []
    n_read = 0
    for doc in documents:
        try:
            text = doc.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            if doc.direct:
                raise DataError(f"{flag} {doc.path}: not UTF-8 text (byte {error.start}); "
                                f"convert it (e.g. iconv -t UTF-8) or leave it out") from None
            skipped.append(f"{doc.path} (not UTF-8)")
            continue
        except OSError as error:
            if doc.direct:
                raise DataError(f"{flag} {doc.path}: cannot read it ({error.strerror})") from None
            skipped.append(f"{doc.path} ({error.strerror})")
            continue
        n_read += 1
        yield doc, text
    if skipped:
        warn(f"skipped {len(skipped)} file(s) that are not UTF-8 or not readable, e.g. {'; '.join(skipped[:3])}")
    if n_read == 0:
        raise DataError(f"no readable UTF-8 text in the sources; check {flag}")


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic held-out choice by a hash of the document's stable name."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


@dataclass
class TokenData:
    """The tokenised corpus: two memory-mapped token streams and their description."""

    train: numpy.ndarray
    val: numpy.ndarray
    info: dict
    directory: Path


def token_dtype(vocab_size: int):
    return numpy.uint16 if vocab_size <= 2**16 else numpy.uint32


def sources_signature(documents: list[Document]) -> list[dict]:
    """What identifies the corpus: each file's resolved path, size and modification time."""
    signature = []
    for doc in documents:
        try:
            st = doc.path.stat()
        except OSError as error:
            raise DataError(f"--data {doc.path}: cannot read it ({error.strerror})") from None
        signature.append({"path": str(doc.path.resolve()), "name": doc.name, "size": st.st_size,
                          "mtime_ns": st.st_mtime_ns})
    return signature


def prepare_tokens(documents: list[Document], tokenizer, cache_dir: Path, val_fraction: float = 0.05,
                   progress=None, warn=print) -> TokenData:
    """Tokenise `documents` once into `cache_dir`, or reuse the files made by an earlier identical call."""
    signature = sources_signature(documents)
    key_material = json.dumps({"format": FORMAT_VERSION, "tokenizer": tokenizer.fingerprint,
                               "val_fraction": val_fraction, "sources": signature}, sort_keys=True)
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    directory = Path(cache_dir) / key
    info_path = directory / "tokens.json"
    if info_path.is_file():
        try:
            return _open_token_data(directory)
        except (OSError, ValueError, KeyError):
            pass  # damaged cache entry: rebuild it below
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the token cache {directory} ({error.strerror}); pass --cache-dir") from None
    iterator = read_documents(documents, warn)
    if progress is not None:
        iterator = progress(iterator, total=len(documents), desc="tokenizing", unit="file")
    dtype = _little_endian(tokenizer.vocab_size)
    stream_path = temporary_sibling(directory / "tokens.stream")
    try:
        with open(stream_path, "w+b") as stream:
            spans, n_characters = _tokenize_into(stream, iterator, tokenizer, val_fraction)
            if n_characters == 0:
                raise DataError(f"the data is empty: {len(spans)} file(s) without any text; check --data")
            stream.flush()
            tokens = numpy.memmap(stream, dtype=dtype, mode="r") if stream.tell() else numpy.zeros(0, dtype=dtype)
            ranges, n_docs, split_rule = _split(spans, tokens.size, val_fraction)
            content = hashlib.sha256()
            for split in ("train", "val"):
                content.update(split.encode())
                with writing_atomically(directory / f"{split}.bin") as out:
                    for first, count in ranges[split]:
                        for block in range(first, first + count, COPY_BLOCK_TOKENS):
                            data = tokens[block:min(block + COPY_BLOCK_TOKENS, first + count)].tobytes()
                            content.update(data)
                            out.write(data)
            del tokens
        info = {"format": FORMAT_VERSION, "tokenizer_fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size, "dtype": numpy.dtype(token_dtype(tokenizer.vocab_size)).name,
                "n_tokens": {split: sum(count for _, count in ranges[split]) for split in ("train", "val")},
                "n_documents": n_docs, "split": split_rule, "val_fraction": val_fraction,
                "content_sha256": content.hexdigest(), "sources": signature}
        write_atomically(info_path, json.dumps(info, indent=1).encode())
    except OSError as error:
        raise DataError(f"cannot write the token cache {directory} ({error.strerror}); free some space there, "
                        "or pass --cache-dir with another folder") from None
    finally:
        stream_path.unlink(missing_ok=True)
    return _open_token_data(directory)


# Documents are tokenised one at a time into one stream file, and the splits are copied out of it
# in blocks: memory follows the largest document (and encode_in_chunks bounds even that), not the
# corpus.
COPY_BLOCK_TOKENS = 1 << 22


def _little_endian(vocab_size: int):
    return numpy.dtype(token_dtype(vocab_size)).newbyteorder("<")


def _tokenize_into(stream, documents, tokenizer, val_fraction: float):
    """Append each document's tokens, [BOS] text [EOS], to `stream`; return its spans
    [(split, first token, token count)] in order, and the number of characters read."""
    dtype = _little_endian(tokenizer.vocab_size)
    spans, position, n_characters = [], 0, 0
    for doc, text in documents:
        n_characters += len(text)
        count = 0
        for ids in tokenizer.encode_in_chunks(text, bos=True, eos=True):
            stream.write(numpy.asarray(ids, dtype=dtype).tobytes())
            count += len(ids)
        split = "val" if is_validation(doc.name, val_fraction) else "train"
        spans.append((split, position, count))
        position += count
    return spans, n_characters


def _split(spans: list, n_tokens: int, val_fraction: float):
    """({split: [(first, count)]}, documents per split, rule): whole documents by their hash when
    there are enough of them in both splits, else the last val_fraction of the stream."""
    n_docs = {split: sum(1 for s, _, _ in spans if s == split) for split in ("train", "val")}
    if len(spans) >= MIN_DOCUMENTS_TO_SPLIT and n_docs["train"] and n_docs["val"]:
        ranges = {split: [(first, count) for s, first, count in spans if s == split] for split in ("train", "val")}
        return ranges, n_docs, "documents"
    cut = n_tokens - max(1, int(round(n_tokens * val_fraction)))
    return {"train": [(0, cut)], "val": [(cut, n_tokens - cut)]}, {"train": len(spans), "val": 0}, "tail"


def _open_token_data(directory: Path) -> TokenData:
    info = json.loads((directory / "tokens.json").read_text())
    dtype = numpy.dtype(info["dtype"]).newbyteorder("<")
    arrays = {}
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        expected = info["n_tokens"][split] * dtype.itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: size {path.stat().st_size} != {expected}")
        arrays[split] = (numpy.memmap(path, dtype=dtype, mode="r") if expected else numpy.zeros(0, dtype=dtype))
    return TokenData(arrays["train"], arrays["val"], info, directory)


class BatchSampler:
    """Seeded random windows of T+1 consecutive tokens: inputs are the first T, targets the last T.

    The state (the generator's bit state and the number of batches drawn) is plain JSON, so a
    checkpoint can restore it and a resumed run draws exactly the batches it would have drawn.
    """

    def __init__(self, tokens: numpy.ndarray, batch_size: int, seq_len: int, seed: int):
        if tokens.size < seq_len + 1:
            raise DataError(f"the data holds {tokens.size} tokens, fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1}; use more data or a smaller --seq-len")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rng = numpy.random.default_rng(seed)
        self.batches_drawn = 0

    def next_batch(self):
        """Return (inputs, targets), each (B, T) int64."""
        starts = self.rng.integers(0, self.tokens.size - self.seq_len, size=self.batch_size)
        windows = numpy.stack([numpy.asarray(self.tokens[s:s + self.seq_len + 1]) for s in starts]).astype(numpy.int64)
        self.batches_drawn += 1
        return windows[:, :-1], windows[:, 1:]

    def state(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def restore(self, state: dict):
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state["batches_drawn"])


def fixed_batches(tokens: numpy.ndarray, batch_size: int, seq_len: int, n_batches: int):
    """Evenly spaced, non-random windows: the same validation batches at every evaluation."""
    n_windows = batch_size * n_batches
    span = tokens.size - seq_len - 1
    if span < 0:
        return []
    starts = numpy.linspace(0, span, num=n_windows).astype(numpy.int64)
    windows = numpy.stack([numpy.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(numpy.int64)
    windows = windows.reshape(n_batches, batch_size, seq_len + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows]
