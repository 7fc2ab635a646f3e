"""Llama checkpoints in other formats: Hugging Face directories in and out (`hf.py`), Meta's
original layout in (`meta.py`: params.json and model-parallel consolidated.NN.pth shards, read by
`pth.py` without running their pickles), GGUF files in (`gguf.py`: llama.cpp's format, read and
dequantized by the `gguf` package, with the tokenizer its metadata describes), `npllama.load` for
every kind (`load.py`), and `python -m npllama.convert` (`__main__.py`).

Names and shapes come from the one parameter table (npllama/params.py). What npllama does not
implement (RoPE scaling other than linear and Llama 3's, biases, experts, other architectures) is
refused in one line that names the file and the field.
"""

from __future__ import annotations

from ..errors import NpllamaError


class ConvertError(NpllamaError):
    """A checkpoint that cannot be converted, in one line: the file, what is wrong, what to do."""

    def __init__(self, file, problem: str, fix: str):
        super().__init__(f"{file}: {problem}; {fix}")
