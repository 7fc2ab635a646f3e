"""Data parallelism over processes: MPI starts them and carries their gradients.

    mpirun -n N python -m npllama.train ...        (srun under Slurm, mpiexec elsewhere)

Each process, a rank, holds the whole model. Every rank draws the same global batch from the
seeded sampler and takes its own contiguous slice of the rows (`batch_slice`), runs forward and
backward on it, and the ranks' gradients are averaged (`average_gradients`): with slices of equal
size, the mean of the ranks' mean-loss gradients is the gradient of the global batch's mean
loss, so a run is the same computation for any N that divides the batch, up to the order in
which the gradient's terms are added.

The gradients travel in buckets of about `BUCKET_BYTES`, each one flat buffer and one
MPI_Allreduce, last layer first (the order in which backward produces them). MPI adds the ranks'
buffers in an order its library fixes for a given number of ranks and message size, so a run with
a given N on a given MPI is reproducible bitwise; with N = 2 the order cannot matter at all
(a + b is b + a exactly).

With `--backend cupy` each rank binds to GPU `local rank mod device count` and the gradients,
which stay on the GPU, are averaged by NCCL (`cupy.cuda.nccl`; rank 0 makes the communicator's
unique id and MPI broadcasts it). Under a launcher the NCCL communicator is made and used even
for one rank, so that path runs wherever a GPU does.

A process not started by an MPI launcher is a world of one (`World()`), and mpi4py is not even
imported: with one process nothing changes. `python -m pip install "npllama[mpi]"` brings mpi4py;
MPI itself comes from the system (Open MPI: `apt install openmpi-bin libopenmpi-dev`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import numpy

from .backend import array_namespace
from .errors import NpllamaError

# Set by the launchers in every process they start: Open MPI, MPICH/Hydra and Intel MPI (PMI),
# Slurm's srun with PMIx. A plain `python` sees none of them.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
BUCKET_BYTES = 32 << 20


class DistributedError(NpllamaError):
    """A multi-process run that cannot start or go on, in one line: which rank, what, how to fix."""


@dataclass(frozen=True)
class World:
    """The processes of one run: this process's rank, their number, its rank on its machine, and
    the MPI communicator that joins them (None for one process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    comm: object = None
    nccl: object = None  # the ranks' NCCL communicator, when their gradients live on GPUs

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes metrics, samples and checkpoints."""
        return self.rank == 0


def launched_by_mpi(environ=os.environ) -> bool:
    """True when an MPI launcher started this process."""
    return any(name in environ for name in LAUNCHER_VARIABLES)


_world = None  # the world init_world found, for the messages of `where` and `stop_all`


def init_world(environ=os.environ) -> World:
    """The world this process belongs to: a world of one unless an MPI launcher started it."""
    global _world
    if not launched_by_mpi(environ):
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        variable = next(name for name in LAUNCHER_VARIABLES if name in environ)
        raise DistributedError(f"this process was started by an MPI launcher ({variable} is set) but mpi4py is "
                               'not installed: pip install "npllama[mpi]" (or run without mpirun)') from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    _world = World(comm.Get_rank(), comm.Get_size(), local.Get_rank(), comm)
    local.Free()
    return _world


def current() -> World:
    """The world init_world last found (a world of one before it ran, or without a launcher)."""
    return _world or World()


def where() -> str:
    """'rank R of N: ' under mpirun, '' in one process: the start of an error message."""
    world = current()
    return f"rank {world.rank} of {world.size}: " if world.size > 1 else ""


def stop_all(status: int) -> None:
    """Under mpirun, end every rank now (MPI_Abort): one rank's error must not leave the others
    waiting for it in a collective. Nothing in one process."""
    world = current()
    if world.size > 1:
        world.comm.Abort(status)


def broadcast(value, world: World):
    """Rank 0's value, on every rank."""
    return value if world.size == 1 else world.comm.bcast(value, root=0)


def mean(value: float, world: World) -> float:
    """The mean of a number over the ranks."""
    if world.size == 1:
        return value
    from mpi4py import MPI

    return world.comm.allreduce(float(value), op=MPI.SUM) / world.size


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is True on any."""
    if world.size == 1:
        return bool(flag)
    from mpi4py import MPI

    return bool(world.comm.allreduce(int(bool(flag)), op=MPI.MAX))


@contextlib.contextmanager
def writer_first(world: World):
    """Rank 0 runs the block first (filling caches on disk), then the other ranks (reading them)."""
    if world.size == 1:
        yield
        return
    if world.is_writer:
        yield
        world.comm.Barrier()
    else:
        world.comm.Barrier()
        yield


def use_gpus(world: World, xp) -> World:
    """For CuPy under a launcher: bind this rank to GPU local_rank mod count and join the ranks' NCCL
    communicator. Any other world is returned as it is."""
    global _world
    if world.comm is None or xp is numpy:
        return world
    from cupy.cuda import nccl

    if not getattr(nccl, "available", True):
        raise DistributedError("--backend cupy under mpirun averages gradients with NCCL, which CuPy cannot load "
                               "here; pip install nvidia-nccl-cu13 (or run one process without mpirun)")
    xp.cuda.Device(world.local_rank % xp.cuda.runtime.getDeviceCount()).use()
    unique_id = world.comm.bcast(nccl.get_unique_id() if world.is_writer else None, root=0)
    _world = dataclasses.replace(world, nccl=nccl.NcclCommunicator(world.size, unique_id, world.rank))
    return _world


def batch_slice(global_batch: int, world: World) -> slice:
    """The rows of the global batch that this rank computes: a contiguous 1/N of them."""
    if global_batch % world.size:
        raise DistributedError(f"--batch-size {global_batch} is the global batch and must be divisible by the "
                               f"number of processes, {world.size}; pick a multiple of {world.size} or another -n")
    rows = global_batch // world.size
    return slice(world.rank * rows, (world.rank + 1) * rows)


def row_shards(n_rows: int, world: World) -> list:
    """[start, stop) rows of each rank: as equal as they can be, the first ranks taking one more."""
    share, extra = divmod(n_rows, world.size)
    starts = [rank * share + min(rank, extra) for rank in range(world.size + 1)]
    return list(zip(starts[:-1], starts[1:]))


def own_rows(params: dict, world: World) -> dict:
    """ZeRO stage 1: the rows of every parameter this rank updates, and keeps AdamW's moments of."""
    return {name: slice(*row_shards(p.shape[0], world)[world.rank]) for name, p in params.items()}


def allgather_rows(params: dict, world: World) -> None:
    """Every rank's own rows of each parameter (own_rows), which it has just updated in place, copied
    into every other rank's copy: afterwards all ranks hold the same whole parameters."""
    from mpi4py import MPI

    for full in params.values():
        world.comm.Allgatherv(MPI.IN_PLACE, [full, _row_layout(full.shape, world)])


def gather_rows_to_writer(shards: dict, shapes: dict, world: World) -> dict | None:
    """The whole arrays, on rank 0, from every rank's own rows of each (None on the other ranks)."""
    whole = {}
    for name, shard in shards.items():
        full = numpy.empty(shapes[name], dtype=shard.dtype) if world.is_writer else None
        world.comm.Gatherv(numpy.ascontiguousarray(shard),
                           [full, _row_layout(shapes[name], world)] if world.is_writer else None, root=0)
        whole[name] = full
    return whole if world.is_writer else None


def _row_layout(shape, world: World) -> tuple:
    """(counts, displacements) in elements of each rank's own rows of an array of this shape."""
    row_size = int(numpy.prod(shape[1:], dtype=numpy.int64))
    counts = [(stop - start) * row_size for start, stop in row_shards(shape[0], world)]
    return counts, [sum(counts[:rank]) for rank in range(world.size)]


def buckets(names, sizes: dict, itemsize: int, bucket_bytes: int = BUCKET_BYTES) -> list:
    """`names` cut, in order, into runs of at most bucket_bytes (a larger array is a bucket alone)."""
    groups, current, current_bytes = [], [], 0
    for name in names:
        nbytes = sizes[name] * itemsize
        if current and current_bytes + nbytes > bucket_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        groups.append(current)
    return groups


def average_gradients(grads: dict, world: World, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace every gradient, in place, by its mean over the ranks.

    The names go last first, as backward produces them, in flat buckets: one allreduce each, by
    MPI for host arrays and by NCCL for GPU arrays.
    """
    if world.size == 1 and world.nccl is None:
        return
    names = list(reversed(grads))
    xp = array_namespace(grads[names[0]])
    dtype = grads[names[0]].dtype
    sizes = {name: grads[name].size for name in names}
    for bucket in buckets(names, sizes, dtype.itemsize, bucket_bytes):
        flat = xp.concatenate([grads[name].reshape(-1) for name in bucket])
        _allreduce_sum(flat, world, xp)
        flat /= world.size
        offset = 0
        for name in bucket:
            grads[name][...] = flat[offset:offset + sizes[name]].reshape(grads[name].shape)
            offset += sizes[name]


def _allreduce_sum(flat, world: World, xp) -> None:
    """flat becomes, in place, its sum over the ranks: NCCL on the GPU, MPI on the host."""
    if world.nccl is None:
        from mpi4py import MPI

        world.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        return
    from cupy.cuda import nccl

    nccl_type = {numpy.dtype("float32"): nccl.NCCL_FLOAT32, numpy.dtype("float64"): nccl.NCCL_FLOAT64}[flat.dtype]
    world.nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, nccl_type, nccl.NCCL_SUM,
                         xp.cuda.get_current_stream().ptr)
