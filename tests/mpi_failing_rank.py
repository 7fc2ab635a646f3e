"""Run under mpiexec by tests/test_distributed.py: `python -m npllama.train` whose rank 1 fails at
its third step, as a rank of a real job might (a full disk, a bad node); every rank must stop.

    mpiexec -n 2 python tests/mpi_failing_rank.py TRAIN_FLAGS...
"""

import sys

from npllama import optim
from npllama.errors import NpllamaError
from npllama.train import distributed
from npllama.train.__main__ import main as train_main

step = optim.step


def step_that_fails_on_rank_1(params, grads, state, *args, **kwargs):
    if distributed.current().rank == 1 and state.step == 2:
        raise NpllamaError("planted failure at step 3")
    return step(params, grads, state, *args, **kwargs)


if __name__ == "__main__":
    optim.step = step_that_fails_on_rank_1
    sys.exit(train_main(sys.argv[1:]))
