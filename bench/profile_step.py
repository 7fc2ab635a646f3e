"""Where one npllama training step spends its time: by op, and by forward, backward and recompute.

    python bench/profile_step.py [--preset small] [--seq-len 256] [--tokens 2048] [--steps 3]

Every op's `forward` and `backward` (npllama/ops/) and the optimizer's `step` are wrapped with a
timer for the duration of the run. A forward called after the step's first backward is counted as
recompute (the block's hand-written backward reruns the cheap forwards). What no op accounts for
("between the ops") is the model's own work: reshapes and transposes to and from the attention
layout, residual additions, gradient accumulation. Times are the mean over --steps steps after one
untimed step, on the same shape and batches as bench/train_step.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npllama import model, optim  # noqa: E402
from npllama.ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu  # noqa: E402

OPS = {"embedding": embedding, "rmsnorm": rmsnorm, "linear": linear, "rope": rope, "attention": attention,
       "swiglu": swiglu, "cross_entropy": cross_entropy}


HEAD_LINEAR = "linear, output head"


class Timers:
    """Seconds per (op, phase); phase is forward until the step's first backward, then recompute.

    The output head and the loss run forward and backward chunk by chunk before the blocks'
    backward (model._head_loss_and_grads): their calls count as forward and backward, and the
    head's matrix products get a row of their own.
    """

    def __init__(self):
        self.seconds = defaultdict(float)
        self.in_backward = False
        self.in_head = False

    def wrap(self, module, name: str, function: str):
        original = getattr(module, function)

        def timed(*args, **kwargs):
            label = HEAD_LINEAR if self.in_head and name == "linear" else name
            if function == "backward" and not self.in_head:
                self.in_backward = True
            phase = function if function != "forward" else ("recompute" if self.in_backward else "forward")
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label, phase] += time.perf_counter() - started

        setattr(module, function, timed)

    def mark_head(self):
        original = model._head_loss_and_grads

        def head(*args, **kwargs):
            self.in_head = True
            try:
                return original(*args, **kwargs)
            finally:
                self.in_head = False

        model._head_loss_and_grads = head


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens a step: batch = tokens / T")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    config = model.get_preset(args.preset)
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, args.seq_len))
    params = model.init_params(config, seed=0)
    state = optim.init_state(params)
    rng = numpy.random.default_rng(0)
    batch = max(args.tokens // args.seq_len, 1)
    batches = [rng.integers(0, config.vocab_size, (batch, args.seq_len + 1)) for _ in range(args.steps + 1)]
    timers = Timers()
    for name, module in OPS.items():
        timers.wrap(module, name, "forward")
        timers.wrap(module, name, "backward")
    timers.wrap(optim, "AdamW + clipping", "step")
    timers.mark_head()
    total = 0.0
    for index, tokens in enumerate(batches):
        if index == 1:  # the first step warms up; count from the second
            timers.seconds.clear()
            total = 0.0
        timers.in_backward = False
        started = time.perf_counter()
        _, grads = model.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:])
        optim.step(params, grads, state, 1e-4)
        total += time.perf_counter() - started
    _print(timers.seconds, total, args, batch)
    return 0


def _print(seconds, total, args, batch) -> None:
    steps = args.steps
    print(f"preset {args.preset}, T {args.seq_len} x batch {batch}, mean of {steps} steps: "
          f"{total / steps:.3f} s a step")
    print(f"{'':20}{'forward':>9}{'backward':>10}{'recompute':>11}{'total':>8}{'share':>8}")
    names = list(OPS) + [HEAD_LINEAR, "AdamW + clipping"]
    accounted = 0.0
    for name in sorted(names, key=lambda n: -sum(seconds[n, p] for p in ("forward", "backward", "recompute", "step"))):
        row = [seconds[name, phase] / steps for phase in ("forward", "backward", "recompute")]
        row_total = sum(row) + seconds[name, "step"] / steps
        accounted += row_total
        cells = "".join(f"{value:>{width}.3f}" if value else f"{'':>{width}}" for value, width in zip(row, (9, 10, 11)))
        print(f"{name:20}{cells}{row_total:>8.3f}{100 * row_total / (total / steps):>7.0f}%")
    between = total / steps - accounted
    print(f"{'between the ops':20}{'':>30}{between:>8.3f}{100 * between / (total / steps):>7.0f}%")


if __name__ == "__main__":
    sys.exit(main())
