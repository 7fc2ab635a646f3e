"""Benchmark one full training step (forward, backward, AdamW) of npllama against PyTorch eager.

    python bench/train_step.py [--preset small] [--batch-size 8] [--seq-len 256] [--steps 5] [--backend cupy]

Each framework runs in its own fresh subprocess of this same command, on the same model shape,
the same random batches and the same number of threads, so that their memory can be told apart:

  tokens/s     B * T / (median wall time of one step), after --warmup untimed steps
  step memory  peak resident memory during the steps (VmHWM) minus the resident memory before
               the first step, when the model, optimizer state and batches already exist: what a
               step allocates on top of the weights
  peak RSS     the process's whole peak resident memory (interpreter and libraries included)

PyTorch's side is reference/torch_llama.py (Meta's model.py formulation, autograd, materialised
attention) with torch.optim.AdamW; it is skipped with a note when torch is not installed.
The default shape is the issue's target: dim 288, 6 layers, 6 heads, vocab 32000, seq 256, batch 8.

With --backend cupy both sides run on the GPU in float32 with TF32 off (npllama on CuPy with its
kernels, PyTorch CUDA eager), each step ends with a device synchronisation, and the memory columns
are the device memory each holds after the steps (CuPy's pool, PyTorch's peak reserved), not RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _batches(config, batch_size, seq_len, n, seed=0):
    import numpy

    rng = numpy.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, (batch_size, seq_len + 1)) for _ in range(n)]


def run_npllama(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from npllama import model, optim
    from npllama.backend import get_backend, synchronize

    xp = get_backend(args.backend)
    config = model.get_preset(args.preset)
    params = model.init_params(config, seed=0, xp=xp)
    state = optim.init_state(params)
    batches = _batches(config, args.batch_size, args.seq_len, args.warmup + args.steps)

    def step(tokens):
        loss, grads = model.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:])
        optim.step(params, grads, state, 1e-4)
        synchronize(xp)
        return loss

    result = _measure(step, batches, args)
    if args.backend == "cupy":
        result["device_memory_mib"] = xp.get_default_memory_pool().total_bytes() / 2**20
    return result


def run_torch(args) -> dict:
    import importlib.util

    import torch

    sys.path.insert(0, str(ROOT))
    from npllama import model

    torch.set_num_threads(args.threads)
    device = "cuda" if args.backend == "cupy" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32, as on npllama's side
    torch.backends.cudnn.allow_tf32 = False
    spec = importlib.util.spec_from_file_location("torch_llama", ROOT / "reference" / "torch_llama.py")
    torch_llama = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_llama)
    config = model.get_preset(args.preset)
    params = {name: torch.from_numpy(p).to(device).requires_grad_()
              for name, p in model.init_params(config, seed=0).items()}
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95))
    batches = [torch.from_numpy(b).to(device)
               for b in _batches(config, args.batch_size, args.seq_len, args.warmup + args.steps)]

    def step(tokens):
        optimizer.zero_grad(set_to_none=True)
        loss = torch_llama.loss(params, config, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    result = _measure(step, batches, args)
    if device == "cuda":
        result["device_memory_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return result


def _measure(step, batches, args) -> dict:
    rss_before = _rss_kib("VmRSS")
    times, losses = [], []
    for i, tokens in enumerate(batches):
        started = time.perf_counter()
        losses.append(float(step(tokens)))
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    times.sort()
    median = times[len(times) // 2]
    peak = _rss_kib("VmHWM")
    return {"tokens_per_s": args.batch_size * args.seq_len / median, "step_s": median,
            "step_memory_mib": (peak - rss_before) / 1024, "peak_rss_mib": peak / 1024, "first_loss": losses[0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads; NumPy's BLAS keeps its default, all cores, so the two match only "
                             "at the default")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="cupy: both sides on the GPU (npllama on CuPy, PyTorch CUDA eager)")
    parser.add_argument("--worker", choices=["npllama", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = run_npllama(args) if args.worker == "npllama" else run_torch(args)
        print(json.dumps(result))
        return 0

    sys.path.insert(0, str(ROOT))
    from npllama.backend import BackendError, get_backend

    try:
        get_backend(args.backend)
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    common = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for worker in ("npllama", "torch"):
        if worker == "torch":
            try:
                import torch  # noqa: F401
            except ImportError:
                print("torch is not installed: PyTorch eager is not measured (pip install torch==2.13.0)")
                break
        done = subprocess.run([sys.executable, __file__, *common, "--worker", worker], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{worker} failed:\n{done.stderr.strip()}", file=sys.stderr)
            return 1
        results[worker] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"preset {args.preset}, batch {args.batch_size} x seq {args.seq_len}, {args.steps} timed steps, "
          f"{args.threads} threads, {os.cpu_count()} cores, backend {args.backend}")
    if args.backend == "cupy":
        return _print_gpu(results)
    print(f"{'':16}{'tokens/s':>10}{'step s':>9}{'step memory MiB':>17}{'peak RSS MiB':>14}{'first loss':>12}")
    for name, r in results.items():
        label = "npllama (numpy)" if name == "npllama" else "PyTorch eager"
        print(f"{label:16}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.3f}{r['step_memory_mib']:>17.0f}"
              f"{r['peak_rss_mib']:>14.0f}{r['first_loss']:>12.4f}")
    if len(results) == 2:
        ours, theirs = results["npllama"], results["torch"]
        print(f"ratio npllama / PyTorch: speed {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, "
              f"step memory {ours['step_memory_mib'] / max(theirs['step_memory_mib'], 1e-9):.2f}x")
    return 0


def _print_gpu(results) -> int:
    print(f"{'':22}{'tokens/s':>10}{'step s':>9}{'device MiB':>12}{'first loss':>12}")
    for name, r in results.items():
        label = "npllama (cupy)" if name == "npllama" else "PyTorch CUDA eager"
        print(f"{label:22}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.4f}{r['device_memory_mib']:>12.0f}"
              f"{r['first_loss']:>12.4f}")
    if len(results) == 2:
        ratio = results["npllama"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        print(f"ratio npllama / PyTorch: speed {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
