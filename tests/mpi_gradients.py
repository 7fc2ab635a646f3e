"""Run under mpiexec by tests/test_distributed.py: every rank takes its slice of one global batch,
the gradients are averaged over the ranks, and rank 0 checks them against one process's
gradients of the whole batch.

    mpiexec -n 2 python tests/mpi_gradients.py float64 1e-12
"""

import sys

import numpy

from npllama import distributed
from npllama import model as llama


def main(dtype: str, tolerance: float) -> int:
    world = distributed.init_world()
    config = llama.PRESETS["nano"]
    params = llama.init_params(config, seed=3, dtype=dtype)
    tokens = numpy.random.default_rng(7).integers(0, config.vocab_size, (4, 17))  # the same on every rank
    rows = distributed.batch_slice(tokens.shape[0], world)
    loss, grads = llama.loss_and_grads(params, config, tokens[rows, :-1], tokens[rows, 1:])
    distributed.average_gradients(grads, world, bucket_bytes=1 << 16)  # small buckets: several allreduces
    losses = world.comm.allgather(loss)
    if not world.is_writer:
        return 0
    whole_loss, whole_grads = llama.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:])
    worst = abs(sum(losses) / world.size - whole_loss) / abs(whole_loss)
    for name, grad in grads.items():
        scale = float(numpy.abs(whole_grads[name]).max()) or 1.0
        worst = max(worst, float(numpy.abs(grad - whole_grads[name]).max()) / scale)
    if not worst <= tolerance:
        print(f"ranks {world.size}: largest relative difference {worst:.2e} > {tolerance:.0e}")
        return 1
    print(f"ranks {world.size}: loss and every gradient within {tolerance:.0e} of one process (largest {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
