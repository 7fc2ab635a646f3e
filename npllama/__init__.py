"""npllama: Llama-1 with every forward and backward written by hand, for NumPy and CuPy.

Nothing is differentiated automatically. Each operation lives in `npllama.ops` as a pair of pure
functions, `forward` and `backward`; `npllama.model` composes them into the Llama-1 block and its
hand-written backward with selective recompute; `npllama.optim` is AdamW with a cosine schedule;
`npllama.audit.gradcheck` proves every backward against finite differences. `npllama.load` opens a
model directory of any kind npllama reads (its own, Hugging Face's, Meta's).
"""

__version__ = "0.1.0"


def load(path, backend: str = "numpy", dtype=None):
    """The model in `path`: an npllama run or checkpoint folder, a Hugging Face Llama directory,
    Meta's original layout or a GGUF file, on `backend` ("numpy" or "cupy"). See
    npllama.convert.load.Model."""
    from .convert.load import load as load_any

    return load_any(path, backend=backend, dtype=dtype)
