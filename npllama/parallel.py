"""Every core of one process: a batch's forward and backward on worker threads, a fixed slice each.

NumPy lets go of the GIL inside its loops and its BLAS calls, so Python threads run side by side
both the matrix products and the elementwise passes (the exponentials of attention and
cross-entropy, SwiGLU, RMSNorm, RoPE) that a multi-threaded BLAS leaves to one core.

The numbers do not depend on the number of threads:

- the batch is cut into slices of SLICE_ROWS rows, a cut fixed by the batch, never by the threads;
- each slice's loss and gradients are `model.loss_and_grads_on_device` on its rows alone, its
  cross-entropy divided by the batch's count of targets (the positions not ignored), so that the
  slices' losses and gradients add up to the batch's;
- they are added into the batch's in slice order (slice k's after slice k-1's, whichever threads
  ran them);
- the BLAS is held to one thread while the workers are open (threadpoolctl, in the process), since a
  product cut among BLAS threads may add in another order.

A batch of one sequence is one slice: its attention's head groups, its output head's chunks of
rows (model.py) and its linears' blocks of rows (ops/linear.py) share the threads instead, the
chunks' sums again in chunk order, the blocks fixed by the shapes.

So 1, 2 or 16 threads give bitwise the same loss and gradients. They differ from one
`loss_and_grads_on_device` over the whole batch by rounding only: the same sums, in another order.
Memory: each busy thread holds one slice's activations and gradients, and the batch's gradients
are one more set of the parameters' size.

    with workers(threads) as pool:
        loss, grads = sliced_loss_and_grads(params, config, tokens, targets, pool)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from . import model as llama
from .backend import array_namespace
from .ops import cross_entropy
from .params import FINAL_NORM

SLICE_ROWS = 1  # rows (sequences) per slice


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def workers(threads: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of `threads` worker threads, the BLAS held to one thread while it is open."""
    from threadpoolctl import threadpool_limits

    if threads < 1:
        raise ValueError(f"workers: threads must be at least 1, got {threads}")
    with threadpool_limits(limits=1), ThreadPoolExecutor(threads, thread_name_prefix="npllama-worker") as pool:
        yield pool


def sliced_loss_and_grads(params, config, tokens, targets, pool: ThreadPoolExecutor, ignore_index=-100,
                          loss_scale=1.0, grad_dtype=None):
    """(loss, grads) of the batch as `model.loss_and_grads_on_device` defines them (the mean
    cross-entropy over the targets not ignored, as a 0-d float64 array, and the gradients of
    loss_scale times it), computed slice by slice on `pool`'s threads and added in slice order (see
    the module docstring). With `grad_dtype` each slice's gradients are converted to it before they
    are added (float32, for float16 weights: the slices' sum then rounds as float32 does)."""
    xp = array_namespace(params[FINAL_NORM])
    rows = tokens.shape[0]
    slices = [slice(start, min(start + SLICE_ROWS, rows)) for start in range(0, rows, SLICE_ROWS)]
    counted = [int((targets[part] != ignore_index).sum()) for part in slices]
    if sum(counted) == 0:
        raise ValueError("sliced_loss_and_grads: every target is ignore_index; there is no loss to take")
    n_counted = cross_entropy.batch_count(targets, ignore_index, params[FINAL_NORM].dtype)  # every slice's divisor
    if len(slices) == 1:  # one sequence: the threads share its attention heads and output head's chunks
        value, grads = llama.loss_and_grads_on_device(params, config, tokens, targets, ignore_index=ignore_index,
                                                      pool=pool, loss_scale=loss_scale)
        return value.astype(xp.float64), _converted(grads, grad_dtype)
    total: dict = {}
    loss = xp.zeros((), dtype=xp.float64)
    added = 0  # slices whose gradients are in `total`; slice k waits for k
    turn, failed = threading.Condition(), threading.Event()

    def run(k: int) -> None:
        nonlocal loss, added
        try:
            grads: dict = {}
            if counted[k]:  # a slice of ignored targets only has no loss to take: it adds nothing
                value, grads = llama.loss_and_grads_on_device(params, config, tokens[slices[k]], targets[slices[k]],
                                                              ignore_index=ignore_index, n_counted=n_counted,
                                                              loss_scale=loss_scale)
                grads = _converted(grads, grad_dtype)
            with turn:
                turn.wait_for(lambda: added == k or failed.is_set())
            if failed.is_set():
                return
            for name, grad in grads.items():
                if name in total:
                    total[name] += grad
                else:
                    total[name] = grad
            if counted[k]:
                loss = loss + value.astype(xp.float64)
        except BaseException:
            failed.set()  # the slices after this one stop waiting for it
            raise
        finally:
            with turn:
                if not failed.is_set():
                    added += 1
                turn.notify_all()

    for done in [pool.submit(run, k) for k in range(len(slices))]:
        done.result()  # the first failure is raised here
    return loss, total


def _converted(grads: dict, dtype) -> dict:
    return grads if dtype is None else {name: grad.astype(dtype, copy=False) for name, grad in grads.items()}
