"""Data parallelism over processes: MPI starts them and carries their gradients.

    mpirun -n N python -m npllama.train ...        (srun under Slurm, mpiexec elsewhere)

Each process, a rank, holds the whole model. Every rank draws the same global batch from the
seeded sampler and takes its own contiguous slice of the rows (`batch_slice`), runs forward and
backward on it, and the ranks' gradients are averaged (`average_gradients`): with slices of equal
size, the mean of the ranks' mean-loss gradients is the gradient of the global batch's mean
loss, so a run is the same computation for any N that divides the batch, up to the order in
which the gradient's terms are added.

The gradients travel in buckets of about `BUCKET_BYTES`, each one flat buffer and one allreduce,
last layer first (`GradientAverage`): backward hands over each gradient as it finishes it, and a
bucket goes out as soon as it is whole, so the sums of the later layers travel while backward
computes the earlier ones (the overlap the paper describes). MPI adds the ranks' buffers in an
order its library fixes for a given number of ranks and message size, so a run with a given N on
a given MPI is reproducible bitwise; with N = 2 the order cannot matter at all (a + b is b + a
exactly).

With `--backend cupy` each rank binds to GPU `local rank mod device count` and the gradients,
which stay on the GPU, are averaged by NCCL (`cupy.cuda.nccl`; rank 0 makes the communicator's
unique id and MPI broadcasts it) on a CUDA stream of their own, beside the one backward runs
on. Under a launcher the NCCL communicator is made and used even for one rank, so that path runs
wherever a GPU does.

A process not started by an MPI launcher is a world of one (`World()`), and mpi4py is not even
imported: with one process nothing changes. `python -m pip install "npllama[mpi]"` brings mpi4py;
MPI itself comes from the system (Open MPI: `apt install openmpi-bin libopenmpi-dev`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy

from ..backend import array_namespace
from ..errors import NpllamaError

# Set by the launchers in every process they start: Open MPI, MPICH/Hydra and Intel MPI (PMI),
# Slurm's srun with PMIx. A plain `python` sees none of them.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
BUCKET_BYTES = 32 << 20


class DistributedError(NpllamaError):
    """A multi-process run that cannot start or go on, in one line: which rank, what, how to fix.

    `every_rank`: every rank raises this very error at the same point (a setting none can run, a
    difference they have found together), so rank 0 alone says it and none needs to stop the rest.
    """

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


@dataclass(frozen=True)
class World:
    """The processes of one run: this process's rank, their number, its rank on its machine, and
    the MPI communicator that joins them (None for one process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    comm: Any = None  # an mpi4py communicator
    nccl: Any = None  # the ranks' NCCL communicator, when their gradients live on GPUs
    nccl_stream: Any = None  # the CUDA stream its sums run on, beside the compute stream

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
    return _reduce(float(value), "SUM", world) / world.size


def largest(value: int, world: World) -> int:
    """The largest of an integer over the ranks, on every rank."""
    return _reduce(int(value), "MAX", world)


def _reduce(value, op_name: str, world: World):
    """One Python number combined over the ranks by MPI's operation `op_name`, on every rank."""
    if world.size == 1:
        return value
    from mpi4py import MPI

    return world.comm.allreduce(value, op=getattr(MPI, op_name))


def check_same(value: str, world: World, what: str, fix: str) -> None:
    """Stop every rank, naming those whose `value` is not rank 0's: ranks on machines of their own
    can read different files under one path, and would then train apart without a word."""
    if world.size == 1:
        return
    values = world.comm.allgather(value)
    differing = [rank for rank, other in enumerate(values) if other != values[0]]
    if differing:
        ranks = ", ".join(map(str, differing))
        raise DistributedError(f"{what} of rank{'s' if len(differing) > 1 else ''} {ranks} of {world.size} differ "
                               f"from rank 0's ({values[differing[0]][:12]}... against {values[0][:12]}...); {fix}",
                               every_rank=True)


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
    _world = dataclasses.replace(world, nccl=nccl.NcclCommunicator(world.size, unique_id, world.rank),
                                 nccl_stream=xp.cuda.Stream(non_blocking=True))
    return _world


def batch_slice(global_batch: int, world: World) -> slice:
    """The rows of the global batch that this rank computes: a contiguous 1/N of them."""
    if global_batch % world.size:
        raise DistributedError(f"--batch-size {global_batch} is the global batch and must be divisible by the "
                               f"number of processes, {world.size}; pick a multiple of {world.size} or another -n",
                               every_rank=True)
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
    groups: list[list] = []
    current: list = []
    current_bytes = 0
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


def averages(world: World) -> bool:
    """Whether this world averages gradients: several ranks, or GPUs joined by NCCL (even one)."""
    return world.size > 1 or world.nccl is not None


class GradientAverage:
    """The mean over the ranks of every gradient of one step, sent while backward is still running.

    The gradients are planned, last layer first (the order backward produces them), into buckets of
    about `bucket_bytes`, each one flat buffer. `add(name, grad)` copies a gradient into its place
    in its bucket and returns that place, a view; a bucket whose gradients are all in is summed over
    the ranks at once, without waiting (MPI_Iallreduce, or NCCL on a CUDA stream of its own), so
    the later layers' sums travel while backward computes the earlier layers. `wait()` returns
    when every sum is in, divides them by N, and gives the views: then they hold the means.

    Every rank adds the same names in the same order, so the buckets go out in one order on all.
    """

    def __init__(self, params: dict, world: World, bucket_bytes: int = BUCKET_BYTES):
        self.names = list(params)
        sizes = {name: params[name].size for name in self.names}
        first = params[self.names[0]]
        self.world, self.xp, self.dtype = world, array_namespace(first), first.dtype
        self.plan = buckets(list(reversed(self.names)), sizes, self.dtype.itemsize, bucket_bytes)
        self.places = {}  # name: (bucket, offset, shape)
        for index, bucket in enumerate(self.plan):
            offset = 0
            for name in bucket:
                self.places[name] = (index, offset, params[name].shape)
                offset += sizes[name]
        self.bucket_sizes = [sum(sizes[name] for name in bucket) for bucket in self.plan]
        self.flats: list = [None] * len(self.plan)  # each made when its first gradient comes, as backward's would be
        self.views: dict = {}
        self.missing = [len(bucket) for bucket in self.plan]
        self.sent = 0  # buckets whose sum has been started
        self.requests: list = []  # MPI's, for buckets on their way

    def add(self, name: str, grad):
        """Copy one gradient into its bucket, send the bucket if it is now whole; return the view."""
        index, offset, shape = self.places[name]
        if len(self.plan[index]) == 1 and grad.flags.c_contiguous:
            # a bucket of its own (the head's gradient, at peak memory): sent as it is, not copied
            self.flats[index], view = grad.reshape(-1), grad
        else:
            if self.flats[index] is None:
                self.flats[index] = self.xp.empty(self.bucket_sizes[index], dtype=self.dtype)
            view = self.flats[index][offset:offset + grad.size].reshape(shape)
            view[...] = grad
        self.views[name] = view
        self.missing[index] -= 1
        if self.missing[index] == 0:
            request = _start_sum(self.flats[index], self.world, self.xp)
            self.sent += 1
            if request is not None:
                self.requests.append(request)
        if self.requests:
            from mpi4py import MPI

            MPI.Request.Testall(self.requests)  # MPI moves a non-blocking collective on inside its calls
        return view

    def wait(self) -> dict:
        """Every gradient's mean over the ranks (the views add returned, in the order of `params`),
        once every sum is in."""
        if any(self.missing):
            unsent = [name for name in self.names if name not in self.views]
            raise RuntimeError(f"gradients never added: {', '.join(unsent[:5])}")
        if self.world.nccl is None:
            from mpi4py import MPI

            MPI.Request.Waitall(self.requests)
        else:  # the compute stream goes on only once the NCCL stream has summed every bucket
            self.xp.cuda.get_current_stream().wait_event(self.world.nccl_stream.record())
        for flat in self.flats:
            flat /= self.world.size
        return {name: self.views[name] for name in self.names}


def average_gradients(grads: dict, world: World, bucket_bytes: int = BUCKET_BYTES) -> dict:
    """Every gradient's mean over the ranks, all of them sent once backward has ended (the training
    loop sends them during backward instead, through GradientAverage)."""
    if not averages(world):
        return grads
    average = GradientAverage(grads, world, bucket_bytes)
    for name in reversed(grads):
        average.add(name, grads[name])
    return average.wait()


def _start_sum(flat, world: World, xp):
    """Start summing flat over the ranks, in place; MPI's request for it (None for NCCL, which
    queues the sum on its own stream behind the copies the compute stream has made so far)."""
    if world.nccl is None:
        from mpi4py import MPI

        return world.comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    from cupy.cuda import nccl

    nccl_type = {numpy.dtype("float32"): nccl.NCCL_FLOAT32, numpy.dtype("float64"): nccl.NCCL_FLOAT64}[flat.dtype]
    world.nccl_stream.wait_event(xp.cuda.get_current_stream().record())
    world.nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, nccl_type, nccl.NCCL_SUM, world.nccl_stream.ptr)
    return None
