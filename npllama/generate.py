"""Text generation with KV-cache incremental decoding.

    python -m npllama.generate --checkpoint RUN_OR_CHECKPOINT_DIR --prompt "def fib(n):"

The prompt is encoded with the checkpoint's own tokenizer (BOS first), run through the model
once to fill the KV cache, then one token at a time: each step feeds only the newest token and
attends to the cached keys and values. Sampling: temperature scaling, then top-k, then top-p
(nucleus) truncation, then a draw from a seeded generator; temperature 0 is greedy. Decoding
stops at EOS or after --max-new-tokens. Text is streamed to stdout as it is produced (the whole
sequence is re-decoded and only the new characters are written, so byte-fallback pieces that
make up one character appear together).
"""

from __future__ import annotations

import sys

import numpy

from . import model as llama
from .backend import BACKENDS, array_namespace, to_host
from .cli import OneLineParser, integer, real
from .errors import NpllamaError
from .params import FINAL_NORM

INITIAL_CACHE_ROOM = 256  # new positions the KV cache holds before it first grows


class GenerateError(NpllamaError):
    """A generation request the model cannot serve (a prompt longer than its context)."""


def sampling_distribution(logits, temperature: float, top_k: int | None, top_p: float | None):
    """Probabilities (V,) float64 over the vocabulary for one position's logits (V,)."""
    logits = numpy.asarray(logits, dtype=numpy.float64)
    if temperature <= 0:
        probs = numpy.zeros_like(logits)
        probs[int(numpy.argmax(logits))] = 1.0
        return probs
    scaled = logits / temperature
    if top_k is not None and 0 < top_k < scaled.size:
        kth_largest = numpy.partition(scaled, -top_k)[-top_k]
        scaled = numpy.where(scaled < kth_largest, -numpy.inf, scaled)
    probs = numpy.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p is not None and 0 < top_p < 1:
        order = numpy.argsort(-probs, kind="stable")
        cumulative = numpy.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        n_keep = int(numpy.searchsorted(cumulative, top_p) + 1)
        kept = numpy.zeros_like(probs)
        kept[order[:n_keep]] = probs[order[:n_keep]]
        probs = kept / kept.sum()
    return probs


def generate(params, config, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = 0.95, seed: int = 0, on_text=None) -> str:
    """Continue `prompt`; returns the generated text (without the prompt).

    `on_text(piece)` is called with each new piece of decoded text as it appears.
    """
    xp = array_namespace(params[FINAL_NORM])
    rng = numpy.random.default_rng(seed)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    budget = min(max_new_tokens, config.max_seq_len - len(prompt_ids))
    if budget <= 0:
        raise GenerateError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {config.max_seq_len}; "
                            "shorten --prompt")
    # the cache starts small and doubles as decoding goes on: --max-new-tokens may be far more than
    # the text that comes before EOS, and a model's max_seq_len far more than memory holds
    capacity = len(prompt_ids) + min(budget, INITIAL_CACHE_ROOM)
    cache = llama.init_kv_cache(config, batch=1, max_len=capacity, dtype=params[FINAL_NORM].dtype, xp=xp)
    logits = llama.forward(params, config, xp.asarray([prompt_ids]), kv_cache=cache)[0, -1]
    new_ids: list[int] = []
    shown = ""
    # decode the whole sequence and cut the prompt off: a piece's leading-space marker only turns
    # into a space in context (decoding "▁fib" alone drops it as if it began the text)
    prompt_text = tokenizer.decode(prompt_ids)

    def continuation():
        return tokenizer.decode(prompt_ids + new_ids)[len(prompt_text):]

    for _ in range(budget):
        probs = sampling_distribution(to_host(logits), temperature, top_k, top_p)
        next_id = int(rng.choice(probs.size, p=probs))
        if next_id == tokenizer.eos_id:
            break
        new_ids.append(next_id)
        text = continuation()
        if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown):])
            shown = text
        if len(new_ids) == budget:
            break
        if cache.length == cache.capacity:
            llama.grow_kv_cache(cache, min(2 * cache.capacity, len(prompt_ids) + budget))
        logits = llama.forward(params, config, xp.asarray([[next_id]]), kv_cache=cache)[0, -1]
    text = continuation()
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text


def _parser():
    parser = OneLineParser(prog="python -m npllama.generate",
                           description="Generate text from a Llama checkpoint with KV-cache decoding.")
    parser.add_argument("--checkpoint", required=True,
                        help="a training run's output folder or one checkpoint folder, a Hugging Face Llama "
                             "directory, or Meta's original layout (params.json + consolidated.NN.pth)")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty, start from BOS)")
    parser.add_argument("--max-new-tokens", type=integer(minimum=1), default=200,
                        help="stop after this many tokens (default 200)")
    parser.add_argument("--temperature", type=real(minimum=0), default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=integer(minimum=1), default=None, help="keep only the k most likely tokens")
    parser.add_argument("--top-p", type=real(minimum=0, maximum=1, above=True), default=0.95,
                        help="nucleus sampling mass, in (0, 1] (default 0.95; 1 = off)")
    parser.add_argument("--seed", type=integer(minimum=0), default=0, help="sampling seed (default 0)")
    parser.add_argument("--backend", default="numpy",
                        help=f"array backend: {' or '.join(BACKENDS)} (cupy: a CUDA GPU, with npllama's kernels)")
    return parser


def main(argv=None) -> int:
    from .loading import load
    from .tokenizer import TokenizerError

    parser = _parser()
    args = parser.parse_args(argv)
    printed = []  # the prompt is printed with the first new text, after every check has passed

    def show(piece):
        if not printed:
            printed.append(True)
            print(args.prompt, end="", flush=True)
        print(piece, end="", flush=True)

    try:
        loaded = load(args.checkpoint, backend=args.backend, flag="--checkpoint")
        if loaded.tokenizer is None:
            raise TokenizerError(f"--checkpoint {loaded.path}: the model holds no tokenizer.model; pass a "
                                 "checkpoint written by npllama.train, or put the model's tokenizer.model beside it")
        generate(loaded.params, loaded.config, loaded.tokenizer, args.prompt, args.max_new_tokens,
                 args.temperature, args.top_k, args.top_p if args.top_p < 1 else None, args.seed, on_text=show)
        if not printed:
            show("")
        print()
    except NpllamaError as error:
        print(f"\nerror: {error}" if printed else f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
