"""`BpeTokenizer`: byte-level BPE tokenizers (GPT-2's kind, used by SmolLM, Llama 3, Qwen 2, ...)
beside SentencePiece, run by Hugging Face's `tokenizers` library; there is no BPE of our own here.

A byte-level BPE tokenizer cuts text into pieces with a regular expression (the pre-tokenizer),
spells each piece's UTF-8 bytes in GPT-2's alphabet of 256 printable characters (a space is "Ġ",
a newline "Ċ") and merges neighbouring symbols in the order of its merge list. Every byte has a
symbol, so nothing is ever unknown and `decode(encode(text)) == text` for every string without
surrogates (for a tokenizer.json with a normalizer, such as Qwen 2's NFC, up to that normalizer).

Where one comes from:
- `from_tokenizer_json(path_or_text, config)`: a Hugging Face tokenizer.json, with the special
  tokens, `add_bos_token` and `chat_template` of a tokenizer_config.json as a dict;
  `from_hf_directory(folder)` reads both files (and chat_template.jinja, where transformers 5
  keeps the template). Only byte-level BPE is taken: SentencePiece-style tokenizer.json files are
  refused (their tokenizer.model loads with `npllama.tokenizer.Tokenizer`).
- `from_gguf_metadata(fields)`: a GGUF file's tokenizer metadata under llama.cpp's key names, as
  plain Python values. It builds the tokenizer transformers builds from the same file
  (transformers/integrations/gguf/gguf_tokenizer_mapping.py): the vocabulary respelled into the
  byte alphabet where a token is not already, the merges, control tokens (type 3) as special added
  tokens and user-defined ones (type 4) as added tokens, so that "<|im_start|>" written in a text
  encodes to its one id. How text is cut follows `tokenizer.ggml.pre` as llama.cpp reads it
  (src/llama-vocab.cpp), which is also what the model's own tokenizer.json does; see
  `PRE_TOKENIZERS` for where that differs from transformers.

Conventions shared with `Tokenizer`: `encode(text, bos, eos)` never adds a special token unless
asked (`add_bos_token` says whether the model's authors add BOS); `bos_id`, `eos_id`, `unk_id` and
`pad_id` are -1 when the tokenizer has none, as `Tokenizer.pad_id` is; `unk_id` is the id the file
names as unknown (transformers' `unk_token_id`), which byte-level BPE never produces. Unlike
`Tokenizer.decode`, `decode` keeps special tokens by default, as transformers' `decode` does, so
that a text holding "<|im_end|>" round-trips; `decode(ids, skip_special_tokens=True)` drops them.
`fingerprint` is the sha256 of `to_json()`, the canonical tokenizer.json text (serialized again by
`tokenizers`, truncation and padding off); the special-token choices and the chat template are not
in it but in `tokenizer_config()`, which `from_tokenizer_json` takes back. The chat template is kept
as a string and never rendered here.

The `tokenizers` package is the optional extra `models` (pip install 'npllama[models]'). This
module imports without it, so that callers may import it unconditionally; building a
`BpeTokenizer` without it raises a TokenizerError that says how to install it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

from ..files import FileProblem, kind_of, named_file_inside, read_regular_file, write_atomically
from .encoding import ENCODE_CHUNK_CHARS, check_unicode, cut_point
from .model_bytes import TokenizerError

try:
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers.models import BPE
except ImportError:  # the optional extra `models` is not installed: see _require_tokenizers
    tokenizers = None  # type: ignore[assignment]

MISSING_TOKENIZERS = ("byte-level BPE tokenizers need the tokenizers package: "
                      "pip install 'npllama[models]' (or pip install 'tokenizers>=0.22')")
MAX_TOKENIZER_JSON_BYTES = 256 * 2**20  # a 256k-token tokenizer.json is some 35 MB

CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
GGUF_BYTE_LEVEL_MODEL = "gpt2"  # tokenizer.ggml.model of byte-level BPE; "llama" is SentencePiece

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizerRecipe:
    """How a family of `tokenizer.ggml.pre` names cuts text before BPE, as llama.cpp reads it.

    `split` is the regex whose matches become pieces (None: GPT-2's, which `tokenizers`' ByteLevel
    pre-tokenizer has built in); `individual_digits` cuts every digit (\\p{N}) off first;
    `ignore_merges` takes a piece whole when it is in the vocabulary, before any merge; and
    `adds_bos` is llama.cpp's default for `add_bos_token` when the file does not say.
    """

    split: str | None
    individual_digits: bool = False
    ignore_merges: bool = False
    adds_bos: bool = False

    def pre_tokenizer(self):
        """The `tokenizers` pre-tokenizer: the split, then the bytes spelled in GPT-2's alphabet."""
        if self.split is None:
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            if not self.individual_digits:
                return byte_level
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


GPT2 = PreTokenizerRecipe(split=None)
# llama.cpp (and the models' own tokenizer.json) cut digits one by one; transformers' GGUF loader
# does not, which gives the same ids for a vocabulary without a token joining a digit to anything
# (SmolLM 2's: tests/test_tokenizer_bpe.py checks that the two agree on it).
GPT2_DIGITS = PreTokenizerRecipe(split=None, individual_digits=True)
# Llama 3's tokenizer.json and llama.cpp take a whole word found in the vocabulary before merging
# (ignore_merges); transformers' GGUF loader does not, which can differ on rare words.
LLAMA3 = PreTokenizerRecipe(split=LLAMA3_SPLIT, ignore_merges=True, adds_bos=True)
# Qwen 2's tokenizer.json also NFC-normalizes; llama.cpp and transformers' GGUF loader do not.
QWEN2 = PreTokenizerRecipe(split=QWEN2_SPLIT)

PRE_TOKENIZERS: dict[str, PreTokenizerRecipe] = {
    **dict.fromkeys(["gpt-2", "mpt", "olmo"], GPT2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
                    GPT2_DIGITS),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
                    LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], QWEN2),
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of each byte: printable Latin-1 bytes as themselves, the other 68 as U+0100.."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [byte for byte in range(256) if byte not in kept]
    spelling = {byte: chr(byte) for byte in kept}
    spelling.update({byte: chr(256 + n) for n, byte in enumerate(moved)})
    return spelling


class BpeTokenizer:
    """A byte-level BPE tokenizer: encode text to ids, decode ids to text (see the module docstring).

    Build one with `from_tokenizer_json`, `from_hf_directory` or `from_gguf_metadata`.
    """

    def __init__(self, tokenizer, *, bos_id: int = -1, eos_id: int = -1, unk_id: int = -1, pad_id: int = -1,
                 add_bos_token: bool = False, add_eos_token: bool = False, chat_template: str | None = None):
        _require_tokenizers()
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._json = tokenizer.to_str()
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        self._vocab_size = 1 + max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        self._cuttable = _may_cut_text(json.loads(self._json))

    @classmethod
    def from_tokenizer_json(cls, path_or_text, config: Mapping | None = None) -> BpeTokenizer:
        """A tokenizer from a tokenizer.json (a path, or its text: a str beginning with "{"), with the
        special tokens, add_bos_token, add_eos_token and chat_template of `config`, a dict shaped as
        tokenizer_config.json (as `tokenizer_config()` returns it)."""
        _require_tokenizers()
        text, source = _tokenizer_json_text(path_or_text)
        tokenizer = _parse_tokenizer_json(text, source)
        return cls._with_config(tokenizer, dict(config or {}), source)

    @classmethod
    def from_hf_directory(cls, folder) -> BpeTokenizer:
        """A Hugging Face model folder's tokenizer: tokenizer.json, with tokenizer_config.json (and
        special_tokens_map.json, chat_template.jinja) where present."""
        _require_tokenizers()
        folder = Path(folder)
        if kind_of(folder) != "folder":
            raise TokenizerError(f"{folder} is not a folder; pass the Hugging Face model folder that holds "
                                 "tokenizer.json")
        tokenizer_json = _file_inside(folder, "tokenizer.json")
        if tokenizer_json is None:
            raise TokenizerError(f"{folder} has no tokenizer.json; byte-level BPE tokenizers are read from it "
                                 "(a folder with only tokenizer.model is SentencePiece: use Tokenizer.load)")
        return cls.from_tokenizer_json(tokenizer_json, _hf_folder_config(folder))

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping, source: str = "GGUF metadata") -> BpeTokenizer:
        """The tokenizer a GGUF file describes, from its `tokenizer.*` metadata as plain Python values
        (strings, ints, bools, lists); `source` names the file in error messages."""
        _require_tokenizers()
        recipe = _gguf_recipe(fields, source)
        tokens = _string_list(fields, "tokenizer.ggml.tokens", source)
        types = _int_list(fields, "tokenizer.ggml.token_type", source, len(tokens))
        merges = [_merge_pair(merge, source) for merge in _string_list(fields, "tokenizer.ggml.merges", source)]
        spelled = _spelled_in_byte_alphabet(tokens)
        vocab = {token: i for i, token in enumerate(spelled)}  # a repeated token: the last id wins, as in transformers
        try:
            model = BPE(vocab=vocab, merges=merges, ignore_merges=recipe.ignore_merges, fuse_unk=False)
        except Exception as error:  # tokenizers raises plain Exception, e.g. a merge of an unknown token
            raise TokenizerError(f"{source} has merges that do not fit its tokens ({_one_line(error)}); "
                                 "the file is damaged: convert or download it again") from None
        tokenizer = tokenizers.Tokenizer(model)
        tokenizer.pre_tokenizer = recipe.pre_tokenizer()
        tokenizer.decoder = decoders.ByteLevel()
        ids = {name: _optional_id(fields, f"tokenizer.ggml.{name}_token_id", source, len(tokens))
               for name in ("bos", "eos", "unknown", "padding")}
        _add_gguf_special_tokens(tokenizer, tokens, types, [tokens[i] for i in ids.values() if i >= 0])
        return cls(tokenizer, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unknown"], pad_id=ids["padding"],
                   add_bos_token=_flag(fields, "tokenizer.ggml.add_bos_token", recipe.adds_bos, source),
                   add_eos_token=_flag(fields, "tokenizer.ggml.add_eos_token", False, source),
                   chat_template=_optional_string(fields, "tokenizer.chat_template", source))

    @classmethod
    def _with_config(cls, tokenizer, config: dict, source: str) -> BpeTokenizer:
        """The tokenizer with the ids of config's special tokens; add_bos_token / add_eos_token, where
        config does not say, from what the tokenizer.json's post-processor adds around a text."""
        ids = {name: _config_token_id(tokenizer, config, f"{name}_token", source)
               for name in ("bos", "eos", "unk", "pad")}
        model_unk_token = getattr(tokenizer.model, "unk_token", None)
        if ids["unk"] < 0 and model_unk_token is not None:
            ids["unk"] = _id_or_minus_one(tokenizer.token_to_id(model_unk_token))
        added = tokenizer.encode("", add_special_tokens=True).ids
        template = config.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"chat_template of {source}'s tokenizer_config is a {type(template).__name__}, "
                                 "not a string; pass the template's text")
        return cls(tokenizer, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"], pad_id=ids["pad"],
                   add_bos_token=_config_flag(config, "add_bos_token", ids["bos"] >= 0 and added[:1] == [ids["bos"]]),
                   add_eos_token=_config_flag(config, "add_eos_token", ids["eos"] >= 0 and added[-1:] == [ids["eos"]]),
                   chat_template=template)

    @property
    def vocab_size(self) -> int:
        """1 + the largest id: the rows a model's embedding needs at least."""
        return self._vocab_size

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of `to_json()`: equal fingerprints, the same ids for every text."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        """The tokenizer.json text (canonical: as `tokenizers` serializes it), e.g. for a checkpoint."""
        return self._json

    def tokenizer_config(self) -> dict:
        """What tokenizer.json does not hold, as tokenizer_config.json spells it: the special tokens,
        add_bos_token, add_eos_token and chat_template. `from_tokenizer_json(to_json(), this)` gives
        this tokenizer back."""
        token = self._tokenizer.id_to_token
        return {"bos_token": token(self.bos_id) if self.bos_id >= 0 else None,
                "eos_token": token(self.eos_id) if self.eos_id >= 0 else None,
                "unk_token": token(self.unk_id) if self.unk_id >= 0 else None,
                "pad_token": token(self.pad_id) if self.pad_id >= 0 else None,
                "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                "chat_template": self.chat_template}

    def special_tokens(self) -> dict:
        """The named special tokens as text ({"bos_token": ..., "eos_token": ...}), as a chat
        template sees them (transformers passes the same)."""
        config = self.tokenizer_config()
        return {name: config[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token") if config[name]}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with the BOS id in front and the EOS id at the end if asked. Special
        tokens written in the text ("<|im_start|>") are their own ids, as in transformers."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        ids = [self._special_id("bos", self.bos_id)] if bos else []
        ids += self._encode_part(text)
        if eos:
            ids.append(self._special_id("eos", self.eos_id))
        return ids

    def encode_in_chunks(self, text: str, bos: bool = False, eos: bool = False,
                         chunk_chars: int = ENCODE_CHUNK_CHARS) -> Iterator[list[int]]:
        """`encode(text, bos, eos)` as lists whose concatenation is exactly that, each from about
        `chunk_chars` characters at most, as `Tokenizer.encode_in_chunks`.

        The text is cut only between a newline that follows a character other than whitespace and a
        letter, where no pre-tokenizer this module knows joins the two sides, and only for those
        pre-tokenizers (no normalizer but NFC; no added token holding a newline or eating the
        whitespace around it). Any other tokenizer is encoded whole, in one chunk.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        if not self._cuttable or len(text) <= chunk_chars:
            yield self.encode(text, bos, eos)
            return
        start = 0
        while start < len(text):
            end = cut_point(text, start, chunk_chars, _safe_cut)
            ids = [self._special_id("bos", self.bos_id)] if bos and start == 0 else []
            ids += self._encode_part(text[start:end])
            if eos and end == len(text):
                ids.append(self._special_id("eos", self.eos_id))
            yield ids
            start = end

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of a sequence of ids; special tokens as their text unless `skip_special_tokens`."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0 .. {self.vocab_size - 1}); "
                                     "ids must come from this tokenizer")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str:
        """The piece of id `i` as the vocabulary spells it, e.g. "Ġthe" (a space and "the") or "<|im_end|>"."""
        piece = self._tokenizer.id_to_token(i) if 0 <= i < self.vocab_size else None
        if piece is None:
            raise TokenizerError(f"token id {i} is not in the vocabulary (0 .. {self.vocab_size - 1})")
        return piece

    def save(self, path) -> None:
        """Write `to_json()` to `path` atomically: a temporary file, fsynced, then renamed."""
        path = Path(path)
        try:
            write_atomically(path, self._json.encode("utf-8"))
        except OSError as error:
            raise TokenizerError(f"cannot write tokenizer file {path}: {error.strerror}; "
                                 "choose a writable path") from None

    def __repr__(self) -> str:
        return f"BpeTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]}...)"

    def _encode_part(self, text: str) -> list[int]:
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # what tokenizers raises for a str that UTF-8 cannot encode
            check_unicode(text)
            raise

    def _special_id(self, name: str, i: int) -> int:
        if i < 0:
            raise TokenizerError(f"this tokenizer has no {name.upper()} token; encode without {name}=True")
        return i


def _require_tokenizers() -> None:
    if tokenizers is None:
        raise TokenizerError(MISSING_TOKENIZERS)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- tokenizer.json and tokenizer_config.json ---------------------------------------------------

def _tokenizer_json_text(path_or_text) -> tuple[str, str]:
    """(the tokenizer.json text, how to name it in a message)."""
    if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
        return path_or_text, "tokenizer.json text"
    path = Path(path_or_text)
    if kind_of(path) == "folder":
        raise TokenizerError(f"{path} is a folder; pass its tokenizer.json, or read the folder with "
                             "BpeTokenizer.from_hf_directory")
    try:
        data = read_regular_file(path, MAX_TOKENIZER_JSON_BYTES, "tokenizer file")
        return data.decode("utf-8"), f"tokenizer file {path}"
    except FileProblem as problem:
        raise TokenizerError(str(problem)) from None
    except UnicodeDecodeError:
        raise TokenizerError(f"tokenizer file {path} is not UTF-8 text, so not a tokenizer.json; "
                             "download or save it again") from None


def _parse_tokenizer_json(text: str, source: str):
    """The `tokenizers.Tokenizer` of a tokenizer.json, which must be byte-level BPE."""
    fix = "it should be a Hugging Face tokenizer.json: download or save it again"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{source} is not JSON ({error.msg} at line {error.lineno}, column "
                             f"{error.colno}); {fix}") from None
    except RecursionError:
        raise TokenizerError(f"{source} is JSON nested too deep for a tokenizer; {fix}") from None
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, dict):
        raise TokenizerError(f"{source} has no \"model\" object; {fix}")
    if model.get("type") != "BPE":
        raise TokenizerError(f"{source} holds a {model.get('type')!r} model, not BPE; only byte-level BPE "
                             "tokenizers load here (SentencePiece ones load with Tokenizer.load)")
    if not (_has_byte_level(document.get("pre_tokenizer")) and _has_byte_level(document.get("decoder"))):
        raise TokenizerError(f"{source} is BPE without a ByteLevel pre-tokenizer and decoder (a SentencePiece "
                             "model converted to tokenizer.json?); load its tokenizer.model with Tokenizer.load")
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # tokenizers raises plain Exception for what it cannot read
        raise TokenizerError(f"{source} is not a valid tokenizer.json ({_one_line(error)}); {fix}") from None


def _has_byte_level(component) -> bool:
    """Whether a pre-tokenizer or decoder (a tokenizer.json object) is ByteLevel or a Sequence with one."""
    if not isinstance(component, dict):
        return False
    parts = component.get("pretokenizers") or component.get("decoders") or [component]
    return any(isinstance(part, dict) and part.get("type") == "ByteLevel" for part in parts)


def _hf_folder_config(folder: Path) -> dict:
    """tokenizer_config.json, completed by special_tokens_map.json and chat_template.jinja."""
    config = _read_json_object(_file_inside(folder, "tokenizer_config.json"))
    for name, value in _read_json_object(_file_inside(folder, "special_tokens_map.json")).items():
        config.setdefault(name, value)
    template = _file_inside(folder, "chat_template.jinja")
    if isinstance(config.get("chat_template"), list):  # several named templates: the default one
        config["chat_template"] = next((entry.get("template") for entry in config["chat_template"]
                                        if isinstance(entry, dict) and entry.get("name") == "default"), None)
    if config.get("chat_template") is None and template is not None:
        try:
            config["chat_template"] = read_regular_file(template, MAX_TOKENIZER_JSON_BYTES, "chat template").decode()
        except (FileProblem, UnicodeDecodeError) as problem:
            raise TokenizerError(f"cannot read {template} ({problem}); save the folder again") from None
    return config


def _file_inside(folder: Path, name: str) -> Path | None:
    """`folder / name`, None when there is no such entry; refused in one line when it is not a regular
    file or a link leading out of the folder (files.named_file_inside)."""
    if not os.path.lexists(folder / name):
        return None
    try:
        return named_file_inside(folder, name, "tokenizer file")
    except FileProblem as problem:
        raise TokenizerError(str(problem)) from None


def _read_json_object(path: Path | None) -> dict:
    """The object a JSON file holds; {} when there is no file (None)."""
    if path is None:
        return {}
    try:
        document = json.loads(read_regular_file(path, MAX_TOKENIZER_JSON_BYTES, "tokenizer file"))
    except FileProblem as problem:
        raise TokenizerError(str(problem)) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise TokenizerError(f"{path} is not valid JSON ({_one_line(error)}); download or save it again") from None
    if not isinstance(document, dict):
        raise TokenizerError(f"{path} holds a JSON {type(document).__name__}, not an object; "
                             "download or save it again")
    return document


def _config_token_id(tokenizer, config: dict, key: str, source: str) -> int:
    """The id of config[key] (a token's text, or an AddedToken's {"content": ...}); -1 when absent."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return -1
    if not isinstance(value, str):
        raise TokenizerError(f"{key} of {source}'s tokenizer_config is a {type(value).__name__}, not a token's text")
    token_id = tokenizer.token_to_id(value)
    if token_id is None:
        raise TokenizerError(f"{key} {value!r} of the tokenizer_config is not in the vocabulary of {source}; "
                             "the two files come from different tokenizers")
    return token_id


def _config_flag(config: dict, key: str, default: bool) -> bool:
    value = config.get(key)
    return default if value is None else bool(value)


def _id_or_minus_one(token_id: int | None) -> int:
    return -1 if token_id is None else token_id


# --- GGUF metadata --------------------------------------------------------------------------------

def _gguf_recipe(fields: Mapping, source: str) -> PreTokenizerRecipe:
    """The pre-tokenizer recipe of `tokenizer.ggml.pre`, after checking `tokenizer.ggml.model`."""
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{source} has no tokenizer.ggml.model, so it describes no tokenizer; "
                             "use a GGUF file converted with its tokenizer")
    if model == "llama":
        raise TokenizerError(f"{source} has tokenizer.ggml.model 'llama', a SentencePiece tokenizer, not "
                             "byte-level BPE; build it as npllama.tokenizer.Tokenizer")
    if model != GGUF_BYTE_LEVEL_MODEL:
        raise TokenizerError(f"{source} has tokenizer.ggml.model {model!r:.60}, which npllama cannot read; "
                             f"supported: '{GGUF_BYTE_LEVEL_MODEL}' (byte-level BPE) and 'llama' (SentencePiece)")
    pre = fields.get("tokenizer.ggml.pre")
    if pre is None:
        raise TokenizerError(f"{source} has no tokenizer.ggml.pre, so how it cuts text is unknown (a file "
                             "converted before llama.cpp recorded it); convert the model again")
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"{source} has pre-tokenizer (tokenizer.ggml.pre) {pre!r:.60}, which npllama does not "
                             f"know; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    return PRE_TOKENIZERS[pre]


def _string_list(fields: Mapping, key: str, source: str) -> list[str]:
    values = fields.get(key)
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) for v in values):
        shown = "missing" if values is None else f"a {type(values).__name__}"
        raise TokenizerError(f"{key} of {source} must be a non-empty list of strings, not {shown}; "
                             "the file is damaged or not a byte-level BPE model")
    return list(values)


def _int_list(fields: Mapping, key: str, source: str, length: int) -> list[int]:
    """The token types: one int per token; all normal (1) when the file has none."""
    values = fields.get(key)
    if values is None:
        return [1] * length
    if not isinstance(values, (list, tuple)) or len(values) != length or not all(
            isinstance(v, Integral) for v in values):
        raise TokenizerError(f"{key} of {source} must be a list of {length} ints, one per token; "
                             "the file is damaged: convert or download it again")
    return [int(v) for v in values]


def _merge_pair(merge: str, source: str) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2 or not all(parts):
        raise TokenizerError(f"merge {merge!r} of {source} is not two tokens separated by one space; "
                             "the file is damaged: convert or download it again")
    return parts[0], parts[1]


def _optional_id(fields: Mapping, key: str, source: str, vocab_size: int) -> int:
    value = fields.get(key)
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= int(value) < vocab_size:
        raise TokenizerError(f"{key} of {source} is {value!r:.60}, not a token id (0 .. {vocab_size - 1}); "
                             "the file is damaged: convert or download it again")
    return int(value)


def _flag(fields: Mapping, key: str, default: bool, source: str) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, bool):
        raise TokenizerError(f"{key} of {source} is {value!r:.60}, not a bool; the file is damaged")
    return value


def _optional_string(fields: Mapping, key: str, source: str) -> str | None:
    value = fields.get(key)
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{key} of {source} is a {type(value).__name__}, not a string; the file is damaged")
    return value


def _spelled_in_byte_alphabet(tokens: list[str]) -> list[str]:
    """Each token as the vocabulary must spell it: unchanged when every character is in GPT-2's byte
    alphabet, else its UTF-8 bytes spelled in it (as transformers' GGUF loader does)."""
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    return [token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
            for token in tokens]


def _add_gguf_special_tokens(tokenizer, tokens: list[str], types: list[int], named: list[str]) -> None:
    """Control tokens (and those named bos/eos/unk/pad) as special added tokens, user-defined ones as
    added tokens: each then matches whole in a text. As transformers, a control token with a character
    outside the byte alphabet (a llama.cpp mislabel) is left a plain token, and so is a user-defined
    one, or a named one, that the vocabulary spells otherwise."""
    alphabet = set(byte_alphabet().values())
    vocab = tokenizer.get_vocab()
    control = [token for token, kind in zip(tokens, types) if kind == CONTROL_TOKEN and set(token) <= alphabet]
    special = list(dict.fromkeys(control + [token for token in named if token in vocab]))
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])
    user_defined = [token for token, kind in zip(tokens, types) if kind == USER_DEFINED_TOKEN and token in vocab]
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in user_defined])


# --- encode_in_chunks -----------------------------------------------------------------------------

def _may_cut_text(document: dict) -> bool:
    """Whether encode_in_chunks may cut this tokenizer's text (see its docstring)."""
    known = [_pre_tokenizer_document(recipe) for recipe in (GPT2, GPT2_DIGITS, LLAMA3, QWEN2)]
    added = document.get("added_tokens") or []
    return (document.get("pre_tokenizer") in known and document.get("normalizer") in (None, {"type": "NFC"})
            and not any("\n" in token.get("content", "") or token.get("lstrip") or token.get("rstrip")
                        for token in added))


def _pre_tokenizer_document(recipe: PreTokenizerRecipe) -> dict:
    """The recipe's pre-tokenizer as a tokenizer.json spells it."""
    tokenizer = tokenizers.Tokenizer(BPE())
    tokenizer.pre_tokenizer = recipe.pre_tokenizer()
    return json.loads(tokenizer.to_str())["pre_tokenizer"]


def _safe_cut(text: str, cut: int) -> bool:
    """Between a newline that follows a character other than whitespace, and a letter."""
    return cut >= 2 and text[cut - 1] == "\n" and not text[cut - 2].isspace() and text[cut].isalpha()
