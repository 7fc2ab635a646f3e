"""Where one npllama training step spends its time: by op, by forward, backward and recompute, and
by thread.

    python bench/profile_step.py [--preset small] [--seq-len 256] [--tokens 2048] [--steps 3] [--threads N]
    python bench/profile_step.py --backend cupy [--preset 134M] [--seq-len 1024] [--tokens 16384]

The step runs as `python -m npllama.train` runs it on NumPy: --threads worker threads (default:
the cores available to the process), a one-thread BLAS in each (npllama.parallel), AdamW and
clipping on them; --threads 0 runs the batch whole on one Python thread with the BLAS's own threads.

Every op's `forward` and `backward` (npllama/ops/) and the optimizer's `step` are wrapped with a
timer for the duration of the run. A forward called after its thread's first backward of the slice
is counted as recompute (the block's hand-written backward reruns the cheap forwards). Each call is
timed on the thread that runs it and the table adds the threads' seconds; a call handed a `pool`
spreads its work over the workers (for one long sequence: attention's head groups, counted as the
calls they are, and a linear's blocks of rows, counted as its wall time on each worker). The share
is of the threads' capacity: the step's wall time times the number of threads. What no op accounts
for is the model's own work (reshapes, residual additions, gradient sums) and threads waiting; the
last line tells the two apart with each thread's CPU seconds (from /proc) over the wall seconds.
What stays serial shows as one busy thread.
Times are the mean over --steps steps after one untimed step, on the same shape and batches as
bench/train_step.py.

With --backend cupy (one thread, as training runs on a GPU) each call is bracketed by two CUDA
events on the current stream, and the table adds the device time between them: an op's kernels,
and any time the GPU waited for Python to launch them, which the host seconds of the same calls
(their last column) show. The share is of the step's wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_step import thread_cpu_seconds  # noqa: E402  (bench/, beside this file)

from npllama import model, optim, parallel  # noqa: E402
from npllama.backend import BackendError, get_backend  # noqa: E402
from npllama.ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu  # noqa: E402

OPS = {"embedding": embedding, "rmsnorm": rmsnorm, "linear": linear, "rope": rope, "attention": attention,
       "swiglu": swiglu, "cross_entropy": cross_entropy}
HEAD_LINEAR = "linear, output head"
OPTIMIZER = "AdamW + clipping"
PHASES = ("forward", "backward", "recompute")


class Timers:
    """Seconds per (op, phase), added over the threads that ran the op.

    The phase is forward until the thread's first backward in the current slice
    (model.loss_and_grads_on_device), then recompute; a worker running part of a call handed a
    pool takes that call's phase. The output head and the loss run forward
    and backward chunk by chunk before the blocks' backward (model._head_loss_and_grads): their
    calls count as forward and backward, and the head's matrix products (a weight of vocab_size
    rows) get a row of their own. A call handed the pool counts its wall time once on each of the
    pool's threads (a linear's blocks of rows), unless its parts are calls of their own (attention's
    head groups, each counted on the thread that ran it).
    """

    def __init__(self, vocab_size: int, threads: int, cupy=None):
        self.vocab_size, self.threads, self.cupy = vocab_size, threads, cupy
        self.seconds: dict = defaultdict(float)
        self.host_seconds: dict = defaultdict(float)  # with CUDA events: the calls' time on the host
        self.events: list = []  # (label, phase, start, end) CUDA events not yet added up
        self.lock = threading.Lock()
        self.local = threading.local()
        self.delegated: str | None = None  # the phase of the call whose work the workers now run

    def _label(self, name, function, args) -> str:
        if name == "linear":
            weight = args[1] if function == "forward" else args[1].weight
            if weight.shape[0] == self.vocab_size:
                return HEAD_LINEAR
        return name

    def wrap(self, module, name: str, function: str, phase: str | None = None):
        """Time module.function as op `name`; `phase`, when given, instead of forward/backward."""
        original = getattr(module, function)

        def timed(*args, **kwargs):
            label = self._label(name, function, args)
            if function == "backward" and label not in (HEAD_LINEAR, "cross_entropy"):
                self.local.in_backward = True
            in_backward = getattr(self.local, "in_backward", False)
            called = phase or (function if function != "forward" or label in (HEAD_LINEAR, "cross_entropy")
                               else ("recompute" if in_backward else "forward"))
            if kwargs.get("pool") is not None and name == "attention":  # its head groups are calls of
                self.delegated = called  # their own on the workers, counted there, in this call's phase
                try:
                    return original(*args, **kwargs)
                finally:
                    self.delegated = None
            called = self.delegated or called
            if self.cupy is not None:
                return self._on_device(label, called, original, args, kwargs)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                if kwargs.get("pool") is not None:  # its blocks ran on every worker for this long
                    elapsed *= self.threads
                with self.lock:
                    self.seconds[label, called] += elapsed

        setattr(module, function, timed)

    def _on_device(self, label, phase, original, args, kwargs):
        """Run the call between two CUDA events (added up by `collect`), timing the host too."""
        start, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
        start.record()
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            self.host_seconds[label] += time.perf_counter() - started
            end.record()
            self.events.append((label, phase, start, end))

    def collect(self):
        """Add the device time of every bracketed call so far (after the device has finished them)."""
        self.cupy.cuda.get_current_stream().synchronize()
        for label, phase, start, end in self.events:
            self.seconds[label, phase] += self.cupy.cuda.get_elapsed_time(start, end) / 1000
        self.events.clear()

    def mark_slices(self):
        original = model.loss_and_grads_on_device

        def slice_starts(*args, **kwargs):
            self.local.in_backward = False
            return original(*args, **kwargs)

        model.loss_and_grads_on_device = slice_starts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="model shape (default small; 134M on cupy)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; 1024 on cupy)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens a step: batch = tokens / T (default 2048; 16384 on cupy)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=parallel.available_cores(),
                        help="worker threads, each with a one-thread BLAS (default: the cores available); "
                             "0: the batch whole, with the BLAS's own threads (always, on cupy)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="cupy: the step on the GPU, each op timed with CUDA events")
    args = parser.parse_args(argv)
    on_gpu = args.backend == "cupy"
    args.preset = args.preset or ("134M" if on_gpu else "small")
    args.seq_len = args.seq_len or (1024 if on_gpu else 256)
    args.tokens = args.tokens or (16384 if on_gpu else 2048)
    if on_gpu:
        args.threads = 0
    try:
        xp = get_backend(args.backend)
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = model.get_preset(args.preset)
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, args.seq_len))
    params = model.init_params(config, seed=0, xp=xp)
    state = optim.init_state(params)
    rng = numpy.random.default_rng(0)
    batch = max(args.tokens // args.seq_len, 1)
    batches = [rng.integers(0, config.vocab_size, (batch, args.seq_len + 1)) for _ in range(args.steps + 1)]
    timers = Timers(config.vocab_size, max(args.threads, 1), cupy=xp if on_gpu else None)
    for name, module in OPS.items():
        timers.wrap(module, name, "forward")
        timers.wrap(module, name, "backward")
    timers.wrap(optim, OPTIMIZER, "_sum_of_squares", phase="step")  # clipping's norm, parameter by parameter
    timers.wrap(optim, OPTIMIZER, "_update", phase="step")  # AdamW, parameter by parameter
    timers.mark_slices()
    total, cpu_before = 0.0, {}
    with parallel.workers(args.threads) if args.threads else nullcontext() as pool:
        for index, tokens in enumerate(batches):
            if index == 1:  # the first step warms up; count from the second
                timers.seconds.clear()
                timers.host_seconds.clear()
                total = 0.0
                cpu_before = thread_cpu_seconds()
            started = time.perf_counter()
            if pool is not None:
                _, grads = parallel.sliced_loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:], pool)
            else:
                _, grads = model.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:])
            optim.step(params, grads, state, 1e-4, pool=pool)
            if on_gpu:
                timers.collect()  # waits for the device: the step's wall time includes its kernels
            total += time.perf_counter() - started
        cpu = {int(key.rsplit("/", 1)[1]): seconds - cpu_before.get(key, 0.0)  # before the workers end
               for key, seconds in thread_cpu_seconds().items()}
    _print(timers, cpu, total, args, batch)
    return 0


def _print(timers: Timers, cpu: dict, total: float, args, batch: int) -> None:
    steps, seconds = args.steps, timers.seconds
    threads = max(args.threads, 1)
    capacity = threads * total / steps  # thread-seconds a step
    on_gpu = timers.cupy is not None
    how = ("on the GPU, each op between two CUDA events" if on_gpu else
           f"{args.threads} worker threads, a one-thread BLAS in each" if args.threads
           else "one thread, the BLAS's own threads")
    print(f"preset {args.preset}, T {args.seq_len} x batch {batch}, {how}, mean of {steps} steps: "
          f"{total / steps:.3f} s a step")
    print("device seconds between each op's events; share of the step; the same calls' host seconds" if on_gpu
          else f"seconds in each op on the threads that ran it, added; share of {threads} thread(s) x the step")
    print(f"{'':20}{'forward':>9}{'backward':>10}{'recompute':>11}{'total':>8}{'share':>8}"
          + (f"{'host':>9}" if on_gpu else ""))
    names = list(OPS) + [HEAD_LINEAR, OPTIMIZER]
    accounted = 0.0
    for name in sorted(names, key=lambda n: -sum(seconds[n, p] for p in PHASES + ("step",))):
        row = [seconds[name, phase] / steps for phase in PHASES]
        row_total = sum(row) + seconds[name, "step"] / steps
        accounted += row_total
        cells = "".join(f"{value:>{width}.3f}" if value else f"{'':>{width}}" for value, width in zip(row, (9, 10, 11)))
        host = f"{timers.host_seconds[name] / steps:>9.3f}" if on_gpu else ""
        print(f"{name:20}{cells}{row_total:>8.3f}{100 * row_total / capacity:>7.0f}%{host}")
    rest = capacity - accounted
    print(f"{'not in an op':20}{'':>30}{rest:>8.3f}{100 * rest / capacity:>7.0f}%   "
          "(the model's own work, and threads waiting)")
    wall = total
    busy = sorted((tid for tid in cpu if cpu[tid] / wall >= 0.01), key=lambda tid: -cpu[tid])
    shares = ", ".join(f"{tid} {cpu[tid] / wall:.0%}" for tid in busy)
    print(f"threads busy (CPU seconds over the wall seconds of the timed steps, by thread id): {shares}")


if __name__ == "__main__":
    sys.exit(main())
