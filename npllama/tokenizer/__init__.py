"""SentencePiece BPE tokenizers, trained the Llama way.

`encoding.py` is `Tokenizer` (load any SentencePiece model, Meta's included; encode and decode
with exact round trips), `training.py` trains one with the paper's options and names a trained
one by its recipe, `model_bytes.py` checks a model's bytes before SentencePiece reads them, and
`__main__.py` is `python -m npllama.tokenizer train | encode | decode`.

`bpe.py` is `BpeTokenizer`, byte-level BPE tokenizers (GPT-2's kind: SmolLM, Llama 3, Qwen 2) read
from a Hugging Face tokenizer.json or a GGUF file's metadata and run by Hugging Face's `tokenizers`,
the optional extra `models`. It is not imported here, so that this package never needs `tokenizers`:
`from npllama.tokenizer.bpe import BpeTokenizer` always works, and building one without the package
raises a TokenizerError that says how to install it.
"""

from .encoding import (
    BOS_ID,
    BYTE_PIECE_COUNT,
    ENCODE_CHUNK_CHARS,
    EOS_ID,
    MIN_VOCAB_SIZE,
    UNK_ID,
    WHITESPACE_SYMBOL,
    Tokenizer,
)
from .model_bytes import MAX_MODEL_BYTES, TokenizerError
from .training import DEFAULT_MAX_SENTENCES, LINE_CHUNK_CHARS, LLAMA_TRAINING_OPTIONS, recipe_key, train_tokenizer

__all__ = ["BOS_ID", "BYTE_PIECE_COUNT", "DEFAULT_MAX_SENTENCES", "ENCODE_CHUNK_CHARS", "EOS_ID", "LINE_CHUNK_CHARS",
           "LLAMA_TRAINING_OPTIONS", "MAX_MODEL_BYTES", "MIN_VOCAB_SIZE", "UNK_ID", "WHITESPACE_SYMBOL", "Tokenizer",
           "TokenizerError", "recipe_key", "train_tokenizer"]
