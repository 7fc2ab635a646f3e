"""Run under mpiexec by tests/test_distributed.py: every rank takes its slice of one global batch,
the gradients are averaged over the ranks, and rank 0 checks them against one process's
gradients of the whole batch.

    mpiexec -n 2 python tests/mpi_gradients.py float64 1e-12

The average is taken twice: sent bucket by bucket while backward runs (GradientAverage fed by
backward's on_grad, as training does), and all at once after backward (average_gradients). The
two must agree bitwise, and the first must have sent buckets before backward reached the embedding.
"""

import sys

import numpy

from npllama import model as llama
from npllama.train import distributed

SMALL_BUCKETS = 1 << 16  # several buckets, so that some can go out while backward still runs


def main(dtype: str, tolerance: float) -> int:
    world = distributed.init_world()
    config = llama.PRESETS["nano"]
    params = llama.init_params(config, seed=3, dtype=dtype)
    tokens = numpy.random.default_rng(7).integers(0, config.vocab_size, (4, 17))  # the same on every rank
    rows = distributed.batch_slice(tokens.shape[0], world)
    loss, grads = llama.loss_and_grads(params, config, tokens[rows, :-1], tokens[rows, 1:])
    grads = distributed.average_gradients(grads, world, bucket_bytes=SMALL_BUCKETS)

    average = distributed.GradientAverage(params, world, bucket_bytes=SMALL_BUCKETS)
    sent_before = {}

    def send(name, grad):
        sent_before[name] = average.sent
        return average.add(name, grad)

    llama.loss_and_grads(params, config, tokens[rows, :-1], tokens[rows, 1:], on_grad=send)
    overlapped = average.wait()
    losses = world.comm.allgather(loss)
    if not world.is_writer:
        return 0
    if not 0 < sent_before[llama.TOK_EMBEDDINGS] < len(average.plan):
        print(f"{sent_before[llama.TOK_EMBEDDINGS]} of {len(average.plan)} buckets sent before the last gradient")
        return 1
    differing = [name for name in grads if not numpy.array_equal(overlapped[name], grads[name])]
    if differing:
        print(f"sent during backward differs from sent after it: {differing[:3]}")
        return 1
    whole_loss, whole_grads = llama.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:])
    worst = abs(sum(losses) / world.size - whole_loss) / abs(whole_loss)
    for name, grad in grads.items():
        scale = float(numpy.abs(whole_grads[name]).max()) or 1.0
        worst = max(worst, float(numpy.abs(grad - whole_grads[name]).max()) / scale)
    if not worst <= tolerance:
        print(f"ranks {world.size}: largest relative difference {worst:.2e} > {tolerance:.0e}")
        return 1
    print(f"ranks {world.size}: loss and every gradient within {tolerance:.0e} of one process (largest {worst:.1e}); "
          f"{sent_before[llama.TOK_EMBEDDINGS]} of {len(average.plan)} buckets sent while backward ran")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
