"""Zero- and few-shot evaluation the way the Llama paper (section 3, appendix A) and GPT-3 did it.

Every benchmark item is one of three kinds:

    MultipleChoice(context, choices, gold)       the choice whose completion the model finds likeliest
    Partial(contexts, continuation, gold)        WinoGrande: each option fills the blank in its own
                                                 context; the shared continuation is what is scored
    Generation(context, answers)                 closed-book QA: greedy decoding, exact match

Scores of a completion c after a context x, in float64 over c's tokens:

    ll(c | x)   = sum_j log p(c_j | x, c_<j)           acc:        argmax_i ll(c_i | x)
    acc_norm:     argmax_i ll(c_i | x) / len(c_i)      (len in characters, the paper's default)
    acc_uncond:   argmax_i ll(c_i | x) - ll(c_i | "Answer:")   (OpenBookQA and BoolQ, as GPT-3)

A completion's tokens are those of encode(x + c) after the first len(encode(x)) (SentencePiece's
leading space is handled once), with any whitespace at the end of x moved to the front of c; the
model reads encode(x) then those tokens, BOS first. An input longer than the model's context loses
tokens from the left. The context of a question is run once and its KV cache is shared by all its
choices; questions whose contexts have the same number of tokens run as one batch.

Few-shot prompts are joined the GPT-3 way: description + (shot + separator) * k + query, each shot
the item with its gold answer after a space; shots are drawn from a pool that is never the
evaluated split, by one `random.Random(seed)` that draws k for each item in turn.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import cast

import numpy

from .. import model as llama
from .. import sampling
from ..backend import array_namespace, to_host
from ..errors import NpllamaError
from ..params import FINAL_NORM

STOP_STRINGS = ("\n", ".", ",")  # closed-book QA answers end at the first of these
MAX_ANSWER_TOKENS = 32  # a closed-book answer is a few words; decoding stops here at the latest
MAX_SHOTS = 64


class EvaluationError(NpllamaError):
    """A task or request that cannot be evaluated, in one line."""


@dataclass(frozen=True)
class MultipleChoice:
    context: str
    choices: tuple[str, ...]
    gold: int
    unconditional: str | None = None  # the calibration context ("Answer:"), for acc_uncond

    def shot(self) -> str:
        return f"{self.context} {self.choices[self.gold]}"

    def after(self, prefix: str) -> MultipleChoice:
        return replace(self, context=prefix + self.context)


@dataclass(frozen=True)
class Partial:
    contexts: tuple[str, ...]
    continuation: str
    gold: int

    def shot(self) -> str:
        return f"{self.contexts[self.gold]} {self.continuation}"

    def after(self, prefix: str) -> Partial:
        return replace(self, contexts=tuple(prefix + context for context in self.contexts))


@dataclass(frozen=True)
class Generation:
    context: str
    answers: tuple[str, ...]

    def shot(self) -> str:
        return f"{self.context} {self.answers[0]}"

    def after(self, prefix: str) -> Generation:
        return replace(self, context=prefix + self.context)


@dataclass(frozen=True)
class Scored:
    """One completion's log-likelihood (float64), its token count, and whether greedy decoding gives it."""

    logprob: float
    n_tokens: int
    greedy: bool


# --- prompts ------------------------------------------------------------------------------------

def few_shot_prompts(items: list, pool: list, shots: int, seed: int = 1234, description: str = "",
                     separator: str = "\n\n") -> list:
    """`items` with their few-shot prefix: description + (shot + separator) for k shots from `pool`.

    One generator seeded with `seed` draws k shots without replacement for each item in turn
    (`random.Random(seed).sample(pool, k)`, as lm-evaluation-harness draws them), so the same
    items, pool and seed give the same prompts. `pool` should be another split than `items`'; an
    item that is in the pool all the same is never drawn as its own shot.
    """
    draw, in_pool = random.Random(seed), set(pool)
    prompted = []
    for item in items:
        candidates = pool if item not in in_pool else [shot for shot in pool if shot != item]
        if shots > len(candidates):
            besides = " besides the evaluated one" if item in in_pool else ""
            raise EvaluationError(f"--shots {shots}: the few-shot pool holds {len(candidates)} examples{besides}; "
                                  f"ask for at most {len(candidates)}")
        chosen = draw.sample(candidates, shots) if shots else []
        prompted.append(item.after(description + "".join(shot.shot() + separator for shot in chosen)))
    return prompted


# --- log-likelihoods ----------------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the continuation's are encode(x + c) after encode(x)'s, both
    with BOS first where the tokenizer adds one (as lm-eval's `hf` model encodes). An empty context
    without BOS is one token, BOS or else EOS, so that the first continuation token has a context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    bos = tokenizer.add_bos_token
    context_ids = tokenizer.encode(context, bos=bos)
    continuation_ids = tokenizer.encode(context + continuation, bos=bos)[len(context_ids):]
    context_ids = context_ids or [_prefix_id(tokenizer)]
    if not continuation_ids:
        raise EvaluationError(f"the completion {continuation!r} after {context[-40:]!r} has no tokens of its own; "
                              "completions must not be empty")
    return context_ids, continuation_ids


def _prefix_id(tokenizer) -> int:
    """What an empty context is read as: BOS, or EOS when the tokenizer has none (lm-eval's prefix)."""
    return tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id


def _log_probs(logits, targets):
    """log softmax(logits)[targets] in float64, and whether each target is the argmax, as host arrays.

    logits (N, V), targets (N,): one row a scored token.
    """
    xp = array_namespace(logits)
    wide = logits.astype(xp.float64)
    top = wide.max(axis=-1, keepdims=True)
    lse = xp.log(xp.exp(wide - top).sum(axis=-1)) + top[:, 0]
    picked = xp.take_along_axis(wide, targets[:, None], axis=-1)[:, 0]
    return to_host(picked - lse), to_host(logits.argmax(axis=-1) == targets)


def _score_shared(params, config, batch) -> list[list[Scored]]:
    """Completions of contexts with equal token counts: each context runs once, its KV cache shared.

    batch: [(context_ids, [continuation_ids, ...]), ...]; returns one list of Scored per context.
    """
    xp = array_namespace(params[FINAL_NORM])
    n_context = len(batch[0][0])
    rows = [(group, ids) for group, (_, continuations) in enumerate(batch) for ids in continuations]
    longest = max(len(ids) for _, ids in rows)
    groups = xp.asarray([group for group, _ in rows])
    cache = llama.init_kv_cache(config, batch=len(batch), max_len=n_context + longest - 1,
                                dtype=params[FINAL_NORM].dtype, xp=xp)
    last = llama.forward(params, config, xp.asarray([ids for ids, _ in batch]), kv_cache=cache, only_last=True)
    # the first completion token is predicted by the context's last position, shared by its choices
    logprob, greedy = _log_probs(last[:, 0][groups], xp.asarray([ids[0] for _, ids in rows]))
    logprob, greedy = list(logprob), list(greedy)
    if longest > 1:
        # the rest: each choice reads its own tokens after a copy of its context's cache; shorter
        # completions are padded at the end, which no earlier position can see (causal attention),
        # and only real positions are scored
        shared = llama.KVCache([k[groups] for k in cache.keys], [v[groups] for v in cache.values], cache.length)
        inputs = numpy.zeros((len(rows), longest - 1), dtype=numpy.int64)
        for row, (_, ids) in enumerate(rows):
            inputs[row, :len(ids) - 1] = ids[:-1]
        logits = llama.forward(params, config, xp.asarray(inputs), kv_cache=shared)
        row_of = numpy.concatenate([[row] * (len(ids) - 1) for row, (_, ids) in enumerate(rows)]).astype(numpy.int64)
        position = numpy.concatenate([numpy.arange(len(ids) - 1) for _, ids in rows]).astype(numpy.int64)
        targets = numpy.concatenate([ids[1:] for _, ids in rows]).astype(numpy.int64)
        if targets.size:
            rest, rest_greedy = _log_probs(logits[xp.asarray(row_of), xp.asarray(position)], xp.asarray(targets))
            sums = numpy.bincount(row_of, weights=rest, minlength=len(rows))
            misses = numpy.bincount(row_of, weights=~rest_greedy, minlength=len(rows))
            logprob = [first + rest_sum for first, rest_sum in zip(logprob, sums)]
            greedy = [first and not missed for first, missed in zip(greedy, misses)]
    scored: list[list[Scored]] = [[] for _ in batch]
    for row, (group, ids) in enumerate(rows):
        scored[group].append(Scored(float(logprob[row]), len(ids), bool(greedy[row])))
    return scored


def _score_truncated(params, config, context_ids, continuation_ids) -> Scored:
    """A completion whose input is longer than the context window.

    If the completion fits in the window, the oldest context tokens are dropped (as lm-eval does).
    A completion longer than the window is scored in chunks of half a window, each read after the
    window's worth of tokens before it, so that every token is predicted from at least half a window.
    """
    xp = array_namespace(params[FINAL_NORM])
    sequence, window = context_ids + continuation_ids, config.max_seq_len
    first = len(context_ids)  # where the completion starts in `sequence`
    step = len(continuation_ids) if len(continuation_ids) <= window else max(window // 2, 1)
    logprob, greedy = 0.0, True
    for start in range(first, len(sequence), step):
        end = min(start + step, len(sequence))
        inputs = sequence[max(0, end - 1 - window):end - 1]
        logits = llama.forward(params, config, xp.asarray([inputs]))[0, -(end - start):]
        chunk_logprob, chunk_greedy = _log_probs(logits, xp.asarray(sequence[start:end]))
        logprob, greedy = logprob + float(chunk_logprob.sum()), greedy and bool(chunk_greedy.all())
    return Scored(logprob, len(continuation_ids), greedy)


def loglikelihoods(model, pairs, batch_size: int = 32, progress=None) -> list[Scored]:
    """Scored (log-likelihood of continuation given context) for each (context, continuation) pair
    of strings, encoded by `encode_pair`."""
    encoded = [encode_pair(model.tokenizer, context, continuation) for context, continuation in pairs]
    return token_loglikelihoods(model, encoded, batch_size, progress)


def token_loglikelihoods(model, encoded, batch_size: int = 32, progress=None) -> list[Scored]:
    """Scored for each (context ids, continuation ids) pair: the model reads the context, then all
    continuation tokens but the last, and each continuation token's log-probability is summed.

    Equal pairs are scored once. Pairs that share a context share one run of it; contexts are sorted
    by token count, and those of equal count run together, `batch_size` continuations at most to a
    batch. `progress(n)` is told as pairs finish.
    """
    if any(not continuation_ids or not context_ids for context_ids, continuation_ids in encoded):
        raise EvaluationError("a request with no context or no continuation tokens; both need at least one "
                              "(the context starts with BOS)")
    owners: dict[tuple, list[int]] = defaultdict(list)  # (context, continuation) -> the pairs that are it
    for index, (context_ids, continuation_ids) in enumerate(encoded):
        owners[tuple(context_ids), tuple(continuation_ids)].append(index)
    results: list[Scored | None] = [None] * len(encoded)

    def done(pair, scored):
        for index in owners[pair]:
            results[index] = scored
        if progress:
            progress(len(owners[pair]))

    by_context: dict[tuple, list[tuple]] = defaultdict(list)
    for pair in owners:
        if len(pair[0]) + len(pair[1]) - 1 > model.config.max_seq_len:
            done(pair, _score_truncated(model.params, model.config, list(pair[0]), list(pair[1])))
        else:
            by_context[pair[0]].append(pair)
    for batch in _batches(by_context, batch_size):
        groups = [(list(context_ids), [list(pair[1]) for pair in pairs]) for context_ids, pairs in batch]
        for (_, pairs), scored in zip(batch, _score_shared(model.params, model.config, groups)):
            for pair, result in zip(pairs, scored):
                done(pair, result)
    return cast("list[Scored]", results)  # done() has filled every place


def _batches(by_context: dict, batch_size: int):
    """Lists of (context, its pairs) whose contexts have one token count and whose pairs number at
    most `batch_size` (a context with more pairs is split across batches)."""
    by_length: dict[int, list] = defaultdict(list)
    for context_ids, pairs in by_context.items():
        for start in range(0, len(pairs), batch_size):
            by_length[len(context_ids)].append((context_ids, pairs[start:start + batch_size]))
    for length in sorted(by_length):
        batch: list[tuple] = []
        rows = 0
        for unit in by_length[length]:
            if rows + len(unit[1]) > batch_size:
                yield batch
                batch, rows = [], 0
            batch.append(unit)
            rows += len(unit[1])
        if batch:
            yield batch


# --- greedy generation --------------------------------------------------------------------------

def greedy_until(model, contexts, stops=STOP_STRINGS, max_new_tokens: int = MAX_ANSWER_TOKENS,
                 batch_size: int = 32, progress=None) -> list[str]:
    """The greedy continuation of each context, cut at the first of `stops`, at EOS or after
    `max_new_tokens` tokens. Contexts of equal token count decode as one batch with one KV cache
    (npllama.sampling.decode)."""
    params, config, tokenizer = model.params, model.config, model.tokenizer
    prompts = [tokenizer.encode(context, bos=tokenizer.add_bos_token) or [_prefix_id(tokenizer)]
               for context in contexts]
    room = max(config.max_seq_len - max_new_tokens, 1)
    prompts = [ids[-room:] for ids in prompts]  # the oldest tokens go, as in loglikelihoods
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(prompts):
        by_length[len(ids)].append(index)
    answers: list[str] = [""] * len(contexts)
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            texts = sampling.decode(params, config, tokenizer, [prompts[i] for i in chunk],
                                    min(max_new_tokens, config.max_seq_len - length), sampling.greedy, stops)
            for index, text in zip(chunk, texts):
                answers[index] = text
            if progress:
                progress(len(chunk))
    return answers


# --- answers and metrics ------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(char for char in text if char not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer.

    A blank prediction matches nothing; a gold answer that normalises to nothing (TriviaQA has
    "+-*/") is matched only by itself, ignoring case and surrounding spaces.
    """
    if not prediction.strip():
        return 0.0
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer)
                     and (predicted or prediction.strip().lower() == answer.strip().lower()) for answer in answers))


def mean_and_stderr(values) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt n; 0 for one value)."""
    values = numpy.asarray(values, dtype=numpy.float64)
    if values.size < 2:
        return float(values.mean()) if values.size else math.nan, 0.0
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


@dataclass
class Example:
    """One evaluated item: its scores, the metrics they give and what the model answered."""

    index: int
    metrics: dict[str, float]
    details: dict = field(default_factory=dict)


def multiple_choice_metrics(item: MultipleChoice, scored: list[Scored], unconditional: list[Scored] | None):
    lls = numpy.array([s.logprob for s in scored])
    lengths = numpy.array([float(len(choice)) for choice in item.choices])
    metrics = {"acc": float(numpy.argmax(lls) == item.gold),
               "acc_norm": float(numpy.argmax(lls / lengths) == item.gold)}
    details = {"logprobs": lls.tolist(), "n_tokens": [s.n_tokens for s in scored],
               "greedy": [s.greedy for s in scored], "gold": item.gold}
    if unconditional is not None:
        calibrated = lls - numpy.array([s.logprob for s in unconditional])
        metrics["acc_uncond"] = float(numpy.argmax(calibrated) == item.gold)
        details["unconditional_logprobs"] = [s.logprob for s in unconditional]
    return metrics, details


def evaluate_items(model, items: list, batch_size: int = 32, progress=None) -> list[Example]:
    """Score `items` (all of one kind, prompts complete) and return one Example per item."""
    if not items:
        return []
    kind = type(items[0])
    if kind is Generation:
        predictions = greedy_until(model, [item.context for item in items], batch_size=batch_size,
                                   progress=progress)
        return [Example(i, {"exact_match": exact_match(prediction, item.answers)},
                        {"prediction": prediction, "answers": list(item.answers)})
                for i, (item, prediction) in enumerate(zip(items, predictions))]
    pairs: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []
    for item in items:
        start = len(pairs)
        if kind is Partial:
            pairs += [(context, " " + item.continuation) for context in item.contexts]
        else:
            pairs += [(item.context, " " + choice) for choice in item.choices]
            if item.unconditional is not None:
                pairs += [(item.unconditional, " " + choice) for choice in item.choices]
        spans.append((start, len(pairs)))
    scored = loglikelihoods(model, pairs, batch_size=batch_size, progress=progress)
    examples = []
    for i, (item, (start, end)) in enumerate(zip(items, spans)):
        if kind is Partial:
            lls = [s.logprob for s in scored[start:end]]
            examples.append(Example(i, {"acc": float(numpy.argmax(lls) == item.gold)},
                                    {"logprobs": lls, "n_tokens": [s.n_tokens for s in scored[start:end]],
                                     "gold": item.gold}))
            continue
        n = len(item.choices)
        unconditional = scored[start + n:end] if item.unconditional is not None else None
        metrics, details = multiple_choice_metrics(item, scored[start:start + n], unconditional)
        examples.append(Example(i, metrics, details))
    return examples


def n_requests(items: list) -> int:
    """How many log-likelihoods or generations evaluating `items` takes (for a progress bar)."""
    total = 0
    for item in items:
        if isinstance(item, Generation):
            total += 1
        elif isinstance(item, Partial):
            total += len(item.contexts)
        else:
            total += len(item.choices) * (2 if item.unconditional is not None else 1)
    return total


def aggregate(examples: list[Example]) -> dict[str, tuple[float, float]]:
    """{metric: (mean, standard error)} over examples."""
    names = examples[0].metrics if examples else {}
    return {name: mean_and_stderr([example.metrics[name] for example in examples]) for name in names}
