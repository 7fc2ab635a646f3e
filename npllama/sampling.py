"""The one decode loop: prompts through the model once to fill a KV cache, then one token per step.

`decode` serves every caller: `generate` (one prompt, sampled, streamed; `python -m
npllama.generate`, `Model.generate` and the sample at the end of training) and greedy batches of
prompts of equal length (`npllama.eval.scoring.greedy_until`, the closed-book QA answers and
lm-eval's `generate_until`). Each step feeds only the newest token of every row and attends to the
cached keys and values. A row ends at EOS, at the first stop string in its text, or after `budget`
tokens; the loop ends when every row has. Texts are decoded in context and the prompt's text cut
off: a piece's leading-space marker only turns into a space in context (decoding "▁fib" alone
drops it as if it began the text).

Sampling (`sampling_distribution`): temperature scaling, then top-k, then top-p (nucleus)
truncation, then a draw from a seeded generator; temperature 0 is greedy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy

from . import model as llama
from .backend import array_namespace, to_host
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
    with numpy.errstate(over="ignore"):
        scaled = logits / temperature
        if not numpy.isfinite(scaled.max()):  # a temperature so small that logits / temperature overflows
            scaled = (logits - logits.max()) / temperature  # the largest becomes 0, the others -inf: greedy
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


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first of `stops`, and whether one was found."""
    cut = min((text.find(stop) for stop in stops if stop in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _Row:
    """One prompt's decoding: its ids, its text, the ids it added, whether it has ended."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        self.prompt_text = tokenizer.decode(self.prompt_ids)
        self.new_ids: list[int] = []
        self.done = False

    def text(self) -> str:
        """What the new ids add after the prompt, decoded in context."""
        return self.tokenizer.decode(self.prompt_ids + self.new_ids)[len(self.prompt_text):]

    def take(self, token: int, stops: Sequence[str]) -> None:
        if self.done:
            return
        if token == self.tokenizer.eos_id:
            self.done = True
            return
        self.new_ids.append(token)
        self.done = bool(stops) and cut_at_stop(self.text(), stops)[1]


def decode(params, config, tokenizer, prompts: list[list[int]], budget: int,
           choose: Callable[[object], Sequence[int]], stops: Sequence[str] = (),
           on_text: Callable[[str], None] | None = None) -> list[str]:
    """The continuation of each prompt (ids, all of one length, at least one), cut at its first stop.

    choose(logits) -> the next id of every row, from the last position's logits (B, V) as they lie
    on the weights' backend. `on_text(piece)`, for one prompt only, gets each new piece of text as
    soon as it is whole (a character made of several byte pieces appears at once). The KV cache
    starts with room for INITIAL_CACHE_ROOM new tokens and doubles as needed: `budget` may be far
    more than the text that comes before EOS.
    """
    xp = array_namespace(params[FINAL_NORM])
    length = len(prompts[0])
    cache = llama.init_kv_cache(config, batch=len(prompts), max_len=length + min(budget, INITIAL_CACHE_ROOM),
                                dtype=params[FINAL_NORM].dtype, xp=xp)
    logits = llama.forward(params, config, xp.asarray(prompts), kv_cache=cache, only_last=True)[:, -1]
    rows = [_Row(tokenizer, ids) for ids in prompts]
    shown = ""
    for step in range(budget):
        next_ids = [int(token) for token in choose(logits)]
        for row, token in zip(rows, next_ids):
            row.take(token, stops)
        if on_text is not None and not rows[0].done:
            text = rows[0].text()
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text
        if all(row.done for row in rows) or step == budget - 1:
            break
        if cache.length == cache.capacity:
            llama.grow_kv_cache(cache, min(2 * cache.capacity, length + budget))
        logits = llama.forward(params, config, xp.asarray([[token] for token in next_ids]), kv_cache=cache)[:, -1]
    texts = [cut_at_stop(row.text(), stops)[0] for row in rows]
    if on_text is not None and len(texts[0]) > len(shown):
        on_text(texts[0][len(shown):])
    return texts


def greedy(logits) -> Sequence[int]:
    """The likeliest id of each row (argmax on the device, then to the host)."""
    return to_host(logits.argmax(axis=-1)).tolist()


def generate(params, config, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = 0.95, seed: int = 0, on_text=None,
             bos: bool | None = None) -> str:
    """Continue `prompt` (encoded with BOS first when `bos`, by default when the tokenizer's
    `add_bos_token` says so); returns the generated text, without the prompt.

    Each id is drawn from `sampling_distribution` with a generator seeded by `seed`; decoding stops
    at EOS or after `max_new_tokens`. `on_text(piece)` is called with each new piece of text.
    """
    rng = numpy.random.default_rng(seed)
    prompt_ids = tokenizer.encode(prompt, bos=tokenizer.add_bos_token if bos is None else bos)
    budget = min(max_new_tokens, config.max_seq_len - len(prompt_ids))
    if not prompt_ids:
        raise GenerateError("the prompt is empty and this tokenizer adds no BOS, so there is nothing to continue; "
                            "give a --prompt")
    if budget <= 0:
        raise GenerateError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {config.max_seq_len}; "
                            "shorten --prompt")

    def draw(logits) -> list[int]:
        probs = sampling_distribution(to_host(logits[0]), temperature, top_k, top_p)
        return [int(rng.choice(probs.size, p=probs))]

    return decode(params, config, tokenizer, [prompt_ids], budget, draw, on_text=on_text)[0]
