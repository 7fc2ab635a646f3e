"""Gradient audit: every hand-derived backward against finite differences, in float64.

    python -m npllama.audit [--seed N] [--json] [--backend numpy] [--only OP ...]

For each op (each differentiable input and parameter) and for the whole model on a small config,
the gradient that backward returns is compared with fourth-order central differences along
random unit directions and entry by entry (see npllama/audit/gradcheck.py for the exact error
measures). Prints a table, or with --json a list of {op, wrt, max_abs_err, max_rel_err, passed, problem}.
A gradient that cannot be compared (NaN or infinite values in it or in the finite differences, a
wrong shape or dtype) fails, and its row says why (`problem`; its errors are null in the JSON).
Exits 1 if any check fails, naming the ops that failed; 2 on bad arguments.

The command is npllama/audit/__main__.py; `compare` and `reference`, which audit another
implementation's gradients, are npllama/audit/compare.py.
"""

from __future__ import annotations

import numpy

from .. import model as llama
from ..errors import few
from ..ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu
from ..params import NORM, parameter_table
from . import gradcheck

OPS = ("embedding", "linear", "rmsnorm", "rope", "swiglu", "attention", "attention_kv", "attention_gqa",
       "cross_entropy", "model", "model_gqa_tied")
MODELS = ("model", "model_gqa_tied")

# A model small enough to difference entry by entry, big enough to have every structure:
# two layers, two heads of dim 4, an FFN width that is not a multiple of the model dim.
AUDIT_CONFIG = llama.LlamaConfig(dim=8, n_layers=2, n_heads=2, vocab_size=13, multiple_of=4,
                                 max_seq_len=16)
# The shape of the models people ship today (Llama 3, SmolLM): query heads sharing a key/value
# head, and the embedding matrix used again as the output head.
AUDIT_GQA_TIED_CONFIG = llama.LlamaConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, tie_embeddings=True,
                                          vocab_size=13, multiple_of=4, max_seq_len=16)


def op_cases(rng, xp):
    """Yield (op, forward, backward, inputs, wrt): small float64 problems, one per op."""

    def normal(*shape):
        return xp.asarray(rng.standard_normal(shape))

    ids = xp.asarray(numpy.array([[0, 3, 3, 6, 1], [3, 0, 2, 2, 3]]))  # repeated ids on purpose
    yield ("embedding", lambda weight: embedding.forward(ids, weight), embedding.backward,
           {"weight": normal(7, 3)}, ["weight"])
    yield ("linear", linear.forward, linear.backward, {"x": normal(2, 3, 5), "weight": normal(4, 5)},
           ["x", "weight"])
    yield ("rmsnorm", rmsnorm.forward, rmsnorm.backward,
           {"x": normal(2, 3, 6), "weight": normal(6)}, ["x", "weight"])
    cos, sin = rope.frequencies(8, xp.arange(5), 10000.0, xp=xp)
    yield ("rope", lambda x: rope.forward(x, cos, sin), rope.backward, {"x": normal(2, 5, 3, 8)}, ["x"])
    yield ("swiglu", swiglu.forward, swiglu.backward, {"a": 2 * normal(2, 3, 7), "b": normal(2, 3, 7)},
           ["a", "b"])
    # head dim 16: on --backend cupy these run the CUDA kernels (their float64 instance); attention_kv has
    # fewer queries than keys, the queries after a KV cache that generation runs; attention_gqa has
    # four query heads sharing two key/value heads (grouped-query attention)
    yield ("attention", lambda q, k, v: attention.forward(q, k, v, tile_size=4), attention.backward,
           {"q": normal(2, 2, 9, 16), "k": normal(2, 2, 9, 16), "v": normal(2, 2, 9, 16)}, ["q", "k", "v"])
    yield ("attention_kv", lambda q, k, v: attention.forward(q, k, v, tile_size=4), attention.backward,
           {"q": normal(1, 2, 3, 16), "k": normal(1, 2, 9, 16), "v": normal(1, 2, 9, 16)}, ["q", "k", "v"])
    yield ("attention_gqa", lambda q, k, v: attention.forward(q, k, v, tile_size=4), attention.backward,
           {"q": normal(2, 4, 9, 16), "k": normal(2, 2, 9, 16), "v": normal(2, 2, 9, 16)}, ["q", "k", "v"])
    targets = xp.asarray(numpy.array([3, 0, -100, 10, 7, 7]))  # one ignored row
    yield ("cross_entropy", lambda logits: cross_entropy.forward(logits, targets), cross_entropy.backward,
           {"logits": 3 * normal(6, 11)}, ["logits"])


def audit_ops(seed, xp, only=None):
    rng = numpy.random.default_rng(seed)
    results = []
    for op, forward, backward, inputs, wrt in op_cases(rng, xp):
        if only and op not in only:
            continue
        results += gradcheck.check_op(op, forward, backward, inputs, wrt, rng)
    return results


def audit_model(seed, xp, config=AUDIT_CONFIG, batch=2, seq=7, recompute=True, op="model"):
    """One row per parameter of the whole model: loss(params) differenced against loss_and_grads."""
    rng = numpy.random.default_rng(seed)
    # a larger init than training's 0.02 so every path carries a gradient well above rounding
    params = llama.init_params(config, seed=seed, dtype="float64", xp=xp, std=0.5)
    for name, spec in parameter_table(config).items():
        if spec.role == NORM:
            params[name] = xp.asarray(1.0 + 0.3 * rng.standard_normal(spec.shape))
    tokens = xp.asarray(rng.integers(0, config.vocab_size, (batch, seq)))
    targets = xp.asarray(rng.integers(0, config.vocab_size, (batch, seq)))
    _, grads = llama.loss_and_grads(params, config, tokens, targets, recompute=recompute, tile_size=3)

    def func(values):
        return llama.loss(values, config, tokens, targets, tile_size=3)

    return [gradcheck.check_gradient(op, func, params, name, grads[name], rng, n_directions=2,
                                     max_elements=24) for name in params]


def run_audit(seed=0, xp=numpy, only=None):
    results = audit_ops(seed, xp, only)
    if not only or "model" in only:
        results += audit_model(seed, xp)
    if not only or "model_gqa_tied" in only:
        results += audit_model(seed, xp, AUDIT_GQA_TIED_CONFIG, op="model_gqa_tied")
    return results


def format_table(results) -> str:
    header = f"{'op':<14} {'wrt':<36} {'max abs err':>12} {'max rel err':>12}  result"
    lines = [header, "-" * len(header)]
    for r in results:
        verdict = "pass" if r.passed else "FAIL" + (f": {r.problem}" if r.problem else "")
        lines.append(f"{r.op:<14} {r.wrt:<36} {r.max_abs_err:>12.3e} {r.max_rel_err:>12.3e}  {verdict}")
    failed = [r for r in results if not r.passed]
    summary = (f"{len(results) - len(failed)} passed, {len(failed)} failed "
               f"(relative error limit {gradcheck.DEFAULT_RTOL:g}, float64)")
    if failed:
        failed_ops = dict.fromkeys(r.op for r in failed)  # in order, once each
        summary += "; failed: " + ", ".join(f"{op} ({few([r.wrt for r in failed if r.op == op], shown=4)})"
                                            for op in failed_ops)
    lines.append(summary)
    return "\n".join(lines)
