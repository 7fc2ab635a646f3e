"""npllama: Llama-1 with every forward and backward written by hand, for NumPy and CuPy.

Nothing is differentiated automatically. Each operation lives in `npllama.ops` as a pair of pure
functions, `forward` and `backward`; `npllama.model` composes them into the Llama-1 block and its
hand-written backward with selective recompute; `npllama.optim` is AdamW with a cosine schedule;
`npllama.gradcheck` proves every backward against finite differences.
"""

__version__ = "0.1.0"
