"""How much the evaluator's shared-context batching saves, against one forward pass per choice.

    python bench/eval_scoring.py --checkpoint runs/tiny-20261129-220641 [--task hellaswag] [--limit 30]

Both sides score the same (context, completion) pairs of one task with the same model in this
process: npllama.eval.scoring.loglikelihoods (each context once, its KV cache shared by its choices,
equal-length contexts batched) and the plain way, one full forward pass over context + completion
for every choice. It prints both times, their ratio and the largest difference between the two
sets of log-likelihoods. The task's items come from the test fixtures unless --data-dir says
where `python -m npllama.eval.datasets download` put them.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy

from npllama import model as llama
from npllama.convert.load import load
from npllama.eval import scoring
from npllama.eval.tasks import load_task

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "data" / "tasks"


def one_forward_per_pair(model, pairs) -> list[float]:
    """The baseline: every pair run on its own, BOS + context + completion, no cache."""
    results = []
    for context, continuation in pairs:
        context_ids, continuation_ids = scoring.encode_pair(model.tokenizer, context, continuation)
        sequence = (context_ids + continuation_ids)[-(model.config.max_seq_len + 1):]
        logits = llama.forward(model.params, model.config, numpy.array([sequence[:-1]]))[0]
        logits = logits[-len(continuation_ids):].astype(numpy.float64)
        top = logits.max(axis=-1, keepdims=True)
        logprobs = logits - top - numpy.log(numpy.exp(logits - top).sum(axis=-1, keepdims=True))
        results.append(float(logprobs[numpy.arange(len(continuation_ids)), continuation_ids].sum()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--data-dir", type=Path, default=FIXTURES)
    args = parser.parse_args()
    model = load(args.checkpoint)
    items = load_task(args.task, args.data_dir).items[:args.limit]
    pairs = [(item.context, " " + choice) for item in items for choice in item.choices]
    scoring.loglikelihoods(model, pairs[:4])  # warm up both paths once
    one_forward_per_pair(model, pairs[:4])
    started = time.perf_counter()
    shared = [scored.logprob for scored in scoring.loglikelihoods(model, pairs)]
    shared_seconds = time.perf_counter() - started
    started = time.perf_counter()
    plain = one_forward_per_pair(model, pairs)
    plain_seconds = time.perf_counter() - started
    print(f"{platform.processor() or platform.machine()}, {args.task}: {len(items)} items, {len(pairs)} completions, "
          f"model dim {model.config.dim} x {model.config.n_layers} layers, {model.params['norm.weight'].dtype}")
    print(f"{'':32}{'seconds':>9}{'completions/s':>15}")
    print(f"{'shared context, batched':32}{shared_seconds:9.2f}{len(pairs) / shared_seconds:15.1f}")
    print(f"{'one forward pass per choice':32}{plain_seconds:9.2f}{len(pairs) / plain_seconds:15.1f}")
    print(f"speed-up {plain_seconds / shared_seconds:.2f}x; largest log-likelihood difference "
          f"{max(abs(a - b) for a, b in zip(shared, plain)):.2e}")


if __name__ == "__main__":
    main()
