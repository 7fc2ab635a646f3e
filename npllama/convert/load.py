"""`npllama.load`: one door for every kind of model directory.

    model = npllama.load("runs/mine")                       # an npllama run or checkpoint folder
    model = npllama.load("Llama-2-7b-hf")                   # a Hugging Face Llama directory
    model = npllama.load("llama/7B", backend="cupy")        # Meta's original layout
    model = npllama.load("SmolLM2-135M.Q4_1.gguf")          # a GGUF file (llama.cpp's), dequantized
    model.logits(tokens)                                    # (B, T) ints -> (B, T, V) floats
    loss, grads = model.loss_and_grads(tokens, targets)     # grads under Meta's names
    print(model.generate("def fibonacci(n):", max_new_tokens=50))

The kind is recognised from the files: an npllama checkpoint has `state.json` (a run folder has
`latest`), a Hugging Face directory `config.json` with safetensors weights, a Meta directory
`params.json` with `consolidated.NN.pth` shards; a GGUF file is a file named *.gguf or beginning
with the bytes "GGUF". Weights keep the dtype they were stored in (bfloat16 is widened to float32;
GGUF's quantized and float16 tensors become float32) unless `dtype` says otherwise.

`Model.tokenizer` is what the model came with: a SentencePiece `Tokenizer` (a tokenizer.model, or
a GGUF file's "llama" vocabulary), a `BpeTokenizer` (a GGUF file's byte-level BPE, or a Hugging Face
folder's tokenizer.json when it has no tokenizer.model), or None. Both
kinds encode (`encode(text, bos, eos)`, `encode_in_chunks`), decode, and name `bos_id`, `eos_id`,
`vocab_size` and `add_bos_token`, which is what generation and evaluation use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy

from .. import checkpoint as ckpt
from .. import model as llama
from ..backend import get_backend
from ..errors import NpllamaError
from ..model import LlamaConfig
from ..sampling import generate
from ..tokenizer import Tokenizer
from ..tokenizer.bpe import BpeTokenizer
from .gguf import import_gguf, is_gguf_file
from .hf import import_hf, is_hf_directory
from .meta import import_meta, is_meta_directory

KINDS = ("npllama", "huggingface", "meta", "gguf")
WHAT_LOADS = ("an npllama run or checkpoint folder, a Hugging Face Llama directory, Meta's original layout "
              "(params.json + consolidated.NN.pth) or a .gguf file")  # for the commands' --help


class LoadError(NpllamaError):
    """A path that is no model directory npllama knows, in one line."""


@dataclass
class Model:
    """A loaded model: its config, its weights (Meta's names, on the chosen backend), its tokenizer."""

    config: LlamaConfig
    params: dict
    tokenizer: Tokenizer | BpeTokenizer | None  # when the model comes with one
    kind: str  # one of KINDS
    path: Path

    def logits(self, tokens):
        """Next-token logits (B, T, V) for token ids (B, T), on the weights' backend."""
        return llama.forward(self.params, self.config, tokens)

    def loss_and_grads(self, tokens, targets):
        """(mean next-token cross-entropy, {name: gradient}) for ids (B, T) and targets (B, T)."""
        return llama.loss_and_grads(self.params, self.config, tokens, targets)

    def generate(self, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = 0.95, seed: int = 0) -> str:
        """The text the model writes after `prompt` (KV-cache decoding; temperature 0 is greedy)."""
        if self.tokenizer is None:
            raise LoadError(f"{self.path}: the model has no tokenizer.model, so it cannot turn text into ids; "
                            "put the model's tokenizer.model beside its weights")
        return generate(self.params, self.config, self.tokenizer, prompt, max_new_tokens, temperature, top_k,
                        top_p, seed)


def kind_of_directory(path: Path) -> str | None:
    """Which of KINDS the folder (or the GGUF file) `path` holds, or None."""
    if is_gguf_file(path):
        return "gguf"
    if not path.is_dir():
        return None
    if (path / "state.json").is_file() or (path / "latest").is_file():
        return "npllama"
    if is_hf_directory(path):
        return "huggingface"
    if is_meta_directory(path):
        return "meta"
    return None


WEIGHT_DTYPES = ("float64", "float32", "float16")  # bfloat16 arrives widened to float32


def _tokenizer(found: Path | Tokenizer | BpeTokenizer | None) -> Tokenizer | BpeTokenizer | None:
    """An importer's tokenizer: a tokenizer.model (SentencePiece) or a Hugging Face folder's
    tokenizer.json (byte-level BPE, with its tokenizer_config.json) to read, or one already built."""
    if not isinstance(found, Path):
        return found
    return BpeTokenizer.from_hf_directory(found.parent) if found.suffix == ".json" else Tokenizer.load(found)


def _check_weights(params: dict, path: Path, flag: str) -> None:
    """Weights are floating point and finite, whatever kind of file they came from (one line if not)."""
    for name, array in params.items():
        if str(array.dtype) not in WEIGHT_DTYPES:
            raise LoadError(f"{flag} {path}: tensor {name!r} has dtype {array.dtype}; weights must be "
                            f"{', '.join(WEIGHT_DTYPES)} or bfloat16; re-save the model with floating-point weights")
        if not numpy.isfinite(array).all():
            raise LoadError(f"{flag} {path}: tensor {name!r} holds NaN or infinite values; the checkpoint is "
                            "damaged (or the model diverged); use another one")


def load(path, backend: str = "numpy", dtype=None, flag: str = "path") -> Model:
    """The model in `path` (any of KINDS) on `backend`; errors are one-line NpllamaErrors."""
    xp = get_backend(backend)
    path = Path(path)
    kind = kind_of_directory(path)
    if kind is None and path.is_dir() and ((path / "config.json").exists() or any(path.glob("step-*"))):
        kind = "npllama"  # a damaged npllama checkpoint or run: its reader says what is wrong
    if kind is None:
        what = "does not exist" if not path.exists() else "is neither a folder nor a GGUF file" \
            if not path.is_dir() else "holds no model npllama knows"
        raise LoadError(f"{flag} {path} {what}; pass an npllama run or checkpoint folder, a Hugging Face Llama "
                        "directory (config.json + *.safetensors), Meta's (params.json + consolidated.NN.pth) "
                        "or a .gguf file")
    tokenizer: Tokenizer | BpeTokenizer | None
    if kind == "npllama":
        checkpoint = ckpt.load_checkpoint(path, flag=flag)
        config, params = checkpoint.config, checkpoint.params
        tokenizer = Tokenizer.from_bytes(checkpoint.tokenizer_model) if checkpoint.tokenizer_model else None
    else:
        imported = {"huggingface": import_hf, "meta": import_meta, "gguf": import_gguf}[kind](path, dtype=dtype)
        config, params = imported.config, imported.params
        tokenizer = _tokenizer(imported.tokenizer)
    _check_weights(params, path, flag)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise LoadError(f"{flag} {path}: its tokenizer has {tokenizer.vocab_size:,} tokens, the model's embedding "
                        f"{config.vocab_size:,} rows; the tokenizer belongs to another model")
    # one parameter at a time, and no copy where the dtype is already the one asked for
    params = {name: xp.asarray(params.pop(name) if dtype is None else params.pop(name).astype(dtype, copy=False))
              for name in list(params)}
    return Model(config, params, tokenizer, kind, path)
