"""Benchmark one full training step (forward, backward, clipping, AdamW): npllama against what a
user would otherwise pick, PyTorch in each of its usual forms.

    python bench/train_step.py [--preset small] [--seq-len 256,1024,2048] [--tokens 2048] [--steps 5]
    python bench/train_step.py --backend cupy                 # preset 134M, T = 1024, on the GPU, float32
    python bench/train_step.py --backend cupy --tf32          # the same with TF32 allowed on every side
    python bench/train_step.py --backend cupy --precision fp16   # mixed precision on every side

Sides, each in a fresh subprocess of this same command, on the same model shape, weights and batches:

  npllama              as `python -m npllama.train` runs a step: on NumPy, --threads worker threads
                       (npllama.parallel: a row of the batch each, a one-thread BLAS) and AdamW on
                       them; with --backend cupy, npllama.model.loss_and_grads + npllama.optim on CuPy
  npllama, 1 thread    the same on one worker thread (NumPy): the scaling line compares the two, and
                       with them this machine's own scaling, one-thread sgemms alone and --threads at once
  torch reference      reference/torch_llama.py (Meta's formulation, autograd, materialised attention)
  reference + compile  the reference's loss under torch.compile (on cupy's default sides only)
  transformers sdpa    LlamaForCausalLM with attn_implementation="sdpa" (PyTorch's fused attention)
  transformers eager   LlamaForCausalLM with attn_implementation="eager"
  sdpa + compile       the sdpa model under torch.compile (its compilation is the untimed warm-up)
  sdpa bf16, sdpa + compile bf16
                       with --precision fp16: the sdpa model under autocast to bfloat16 (no loss
                       scale), eager and compiled: PyTorch's other mixed precision

All PyTorch sides use torch.optim.AdamW (weight decay 0.1 on matrices) and clip_grad_norm_, as
npllama does. For each sequence length T the batch is --tokens / T sequences. Float32 means float32
on every side (PyTorch's allow_tf32 off, CuPy's float32 compute type full float32), unless --tf32
allows TF32 on every side (allow_tf32 on; npllama as `--tf32` trains). With --precision fp16 every
side trains in mixed precision: npllama as `--precision fp16` trains (a float16 copy of the float32
weights, a loss scale of 2^16 that halves on an overflow, AdamW on float32), the PyTorch sides under
torch.autocast to float16 with a GradScaler (float32 weights and AdamW), the "bf16" sides under
autocast to bfloat16. Reported per side:

  tokens/s     B * T / (median wall time of one step), after --warmup untimed steps
  step memory  peak resident memory during the steps minus the resident memory before the first
               step (weights, optimizer state and batches exist by then)
  device MiB   on a GPU: the device memory the side holds after its steps (CuPy's pool, PyTorch's
               peak reserved), which the ratio line compares there
  floor %      the step's arithmetic (6 x parameters x tokens for the matrix products, plus causal
               attention) over the time a single-precision GEMM of this side's BLAS, measured in
               the same process, would need for it: how close the side comes to the machine
  busy cores   CPU seconds of all the side's threads over the wall seconds of the timed steps
               (and, for npllama, each thread's share: what stays serial shows as one busy thread)
  BLAS         the library, its kernel and threads (threadpoolctl for NumPy, torch's build config)
  MFU %        on a GPU: the step's arithmetic over the time the card's dense peak for the
               precision (float32, TF32 with --tf32, float16/bfloat16 with --precision fp16) would
               need for it, the peak from the card's name (CARD_PEAK_TFLOPS; "?" for a card not
               listed there)
  skipped      with --precision fp16: the steps whose float16 gradients overflowed (npllama's and
               the GradScaler's skip), of warm-up and timed steps together

The ratio line compares npllama with the fastest PyTorch side at that T. A side that fails (no
transformers, torch.compile without a working compiler) is reported with why, not counted.
Where OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are set, each side's subprocess runs without both,
so that OpenBLAS picks its kernel for this CPU as on a user's machine; the BLAS column says which.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"npllama": "npllama", "npllama-1": "npllama, 1 thread", "torch": "torch reference",
         "torch-compile": "reference + compile", "hf-sdpa": "transformers sdpa", "hf-eager": "transformers eager",
         "hf-compile": "sdpa + compile", "hf-sdpa-bf16": "sdpa bf16", "hf-compile-bf16": "sdpa + compile bf16"}
CPU_SIDES = ("npllama", "npllama-1", "torch", "hf-sdpa", "hf-eager", "hf-compile")
GPU_SIDES = ("npllama", "torch", "torch-compile", "hf-sdpa", "hf-compile")
FP16_GPU_SIDES = ("npllama", "torch", "hf-sdpa", "hf-sdpa-bf16", "hf-compile", "hf-compile-bf16")
# Dense peak TFLOP/s of float32, TF32 and float16/bfloat16 (NVIDIA's data sheets), by a fragment of
# the card's name; the first fragment the name contains wins, so the PCIe H100 comes before the SXM one
CARD_PEAK_TFLOPS = {"H100 PCIe": (51.0, 378.0, 756.0), "H100 NVL": (60.0, 417.0, 835.0),
                    "H100": (67.0, 495.0, 989.0), "H200 NVL": (60.0, 417.0, 835.0), "H200": (67.0, 495.0, 989.0),
                    "A100": (19.5, 156.0, 312.0)}
WORKER_TIMEOUT_S = 1200  # torch.compile's first step compiles C++ for minutes on two cores


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _config(preset: str, seq_len: int):
    """The preset's shape, with a context long enough for `seq_len`."""
    from npllama import model

    config = model.get_preset(preset)
    return dataclasses.replace(config, max_seq_len=max(config.max_seq_len, seq_len))


def _batches(config, args, seed=0):
    import numpy

    rng = numpy.random.default_rng(seed)
    batch = max(args.tokens // args.seq_len, 1)
    return [rng.integers(0, config.vocab_size, (batch, args.seq_len + 1)) for _ in range(args.warmup + args.steps)]


def step_flops(config, batch: int, seq_len: int) -> float:
    """Multiply-adds x 2 of one training step: forward once, backward twice the forward."""
    per_layer = 4 * config.dim * config.dim + 3 * config.dim * config.ffn_dim
    matmuls = 2 * batch * seq_len * (config.n_layers * per_layer + config.dim * config.vocab_size)
    attention = config.n_layers * 2 * (2 * batch * seq_len * seq_len * config.dim) / 2  # QK^T and PV, causal half
    return 3 * (matmuls + attention)


def card_peak_tflops(card: str, tf32: bool, half: bool = False) -> float | None:
    """The card's dense peak TFLOP/s for float32, TF32 or (`half`) float16, from its name; None for a
    card not listed."""
    for fragment, (float32, tensor_float32, float16) in CARD_PEAK_TFLOPS.items():
        if fragment in card:
            return float16 if half else tensor_float32 if tf32 else float32
    return None


# --- the sides ----------------------------------------------------------------------------------

def run_npllama(args) -> dict:
    from npllama import model, optim
    from npllama.backend import float32_products, get_backend, synchronize

    xp = get_backend(args.backend)
    config = _config(args.preset, args.seq_len)
    params = model.init_params(config, seed=0, xp=xp)
    state = optim.init_state(params)
    mixed = MixedPrecision(params) if args.precision == "fp16" else None
    if args.backend == "numpy":  # as the trainer runs it: --threads workers, a one-thread BLAS in each
        from npllama.parallel import sliced_loss_and_grads, workers

        threads = 1 if args.worker == "npllama-1" else args.threads
        with workers(threads) as pool:
            def threaded_step(tokens):
                weights, scale = mixed.step_inputs() if mixed else (params, 1.0)
                loss, grads = sliced_loss_and_grads(weights, config, tokens[:, :-1], tokens[:, 1:], pool,
                                                    loss_scale=scale, grad_dtype="float32" if mixed else None)
                _update(params, grads, state, mixed, pool)  # clips to global norm 1, then AdamW
                return loss

            result = _measure(threaded_step, _batches(config, args), args)
        blas = _numpy_blas()  # the machine's rate, with every BLAS thread; npllama ran one in each worker
        blas["blas"] = blas["blas"].rsplit(",", 1)[0] + f", 1 thread in each of {threads} workers"
        return {**result, **blas, "sgemm_scaling": _sgemm_scaling(args.threads), **_skipped(mixed)}

    def step(tokens):
        weights, scale = mixed.step_inputs() if mixed else (params, 1.0)
        loss, grads = model.loss_and_grads_on_device(weights, config, tokens[:, :-1], tokens[:, 1:], loss_scale=scale)
        _update(params, grads, state, mixed)  # clips to global norm 1, then AdamW
        synchronize(xp)
        return loss

    with float32_products(xp, args.tf32):  # as `python -m npllama.train --backend cupy [--tf32]` sets it
        result = _measure(step, _batches(config, args), args)
        result["device_memory_mib"] = xp.get_default_memory_pool().total_bytes() / 2**20
        return {**result, **_cupy_blas(xp), **_skipped(mixed)}


class MixedPrecision:
    """The trainer's --precision fp16 for the benchmark: the float16 copy a step runs on, and the
    loss scale (2^16 first, halved and the update skipped when the gradients overflow)."""

    def __init__(self, params):
        from npllama import optim

        self.params, self.scale = params, optim.LossScale()

    def step_inputs(self) -> tuple:
        """(the float16 weights, the loss scale) of the next step."""
        from npllama import optim

        return optim.float16_copy(self.params), self.scale.scale


def _update(params, grads, state, mixed, pool=None):
    """Clip to global norm 1 and take AdamW's step, as the trainer does; under mixed precision on the
    float32 gradients divided by the scale, and only when they are all finite."""
    import math

    from npllama import optim

    if mixed is not None:
        grads = {name: optim.unscaled(grad, mixed.scale.scale) for name, grad in grads.items()}
    norm = optim.global_norm(grads, pool)
    if mixed is not None:
        scale = optim.next_loss_scale(mixed.scale, math.isfinite(norm))
        if scale is None:
            raise RuntimeError(f"the float16 gradients overflowed at loss scale {optim.MIN_LOSS_SCALE:g}: the "
                               "benchmark's step diverged")
        mixed.scale = scale
        if not math.isfinite(norm):
            return
    optim.step(params, grads, state, 1e-4, grad_norm=norm, pool=pool)


def _skipped(mixed) -> dict:
    return {} if mixed is None else {"skipped": mixed.scale.skipped}


def _torch_model(args, side, config, device):
    """(loss of a batch, its parameters) for one PyTorch side, from npllama's initial weights."""
    import torch

    from npllama import model

    side = side.removesuffix("-bf16")  # the same model, under another autocast

    weights = model.init_params(config, seed=0)
    if side in ("torch", "torch-compile"):
        import importlib.util

        spec = importlib.util.spec_from_file_location("torch_llama", ROOT / "reference" / "torch_llama.py")
        torch_llama = importlib.util.module_from_spec(spec)
        sys.modules["torch_llama"] = torch_llama  # where torch.compile looks the function's module up
        spec.loader.exec_module(torch_llama)
        params = {name: torch.from_numpy(p).to(device).requires_grad_() for name, p in weights.items()}

        def reference_loss(tokens):
            return torch_llama.loss(params, config, tokens[:, :-1], tokens[:, 1:])

        return (torch.compile(reference_loss) if side == "torch-compile" else reference_loss), list(params.values())
    import tempfile

    import transformers

    from npllama.convert.hf import export_hf

    with tempfile.TemporaryDirectory() as folder:
        export_hf(folder, config, weights)
        hf = transformers.LlamaForCausalLM.from_pretrained(
            folder, attn_implementation="eager" if side == "hf-eager" else "sdpa", dtype=torch.float32)
    hf = hf.to(device).train()
    forward = torch.compile(hf) if side == "hf-compile" else hf

    def loss(tokens):
        logits = forward(input_ids=tokens[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1))

    return loss, list(hf.parameters())


def run_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if args.backend == "cupy" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # float32 means float32 unless --tf32, as on npllama's side
    torch.backends.cudnn.allow_tf32 = args.tf32
    config = _config(args.preset, args.seq_len)
    loss_of, params = _torch_model(args, args.worker, config, device)
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95))
    batches = [torch.from_numpy(b).to(device) for b in _batches(config, args)]
    autocast = None if args.precision != "fp16" else torch.bfloat16 if args.worker.endswith("-bf16") else torch.float16
    scaler = torch.amp.GradScaler(device) if autocast is torch.float16 else None  # bfloat16 needs no loss scale
    skipped = 0

    def step(tokens):
        nonlocal skipped
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = loss_of(tokens)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        else:  # torch's AMP recipe: backward on the scaled loss, unscale, clip, step (skipped on inf), rescale
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < scale
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    result = _measure(step, batches, args)
    if device == "cuda":
        result["device_memory_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return {**result, **_torch_blas(device), **({"skipped": skipped} if autocast is not None else {})}


def _measure(step, batches, args) -> dict:
    rss_before = _rss_kib("VmRSS")
    times, losses, busy = [], [], {}
    for i, tokens in enumerate(batches):
        if i == args.warmup:
            busy = thread_cpu_seconds()
        started = time.perf_counter()
        losses.append(float(step(tokens)))
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    busy = {name: seconds - busy.get(name, 0.0) for name, seconds in thread_cpu_seconds().items()}
    wall = sum(times)
    times.sort()
    median = times[len(times) // 2]
    peak = _rss_kib("VmHWM")
    return {"tokens_per_s": batches[0].shape[0] * args.seq_len / median, "step_s": median,
            "step_memory_mib": (peak - rss_before) / 1024, "peak_rss_mib": peak / 1024, "first_loss": losses[0],
            "busy_cores": sum(busy.values()) / wall,  # CPU seconds of all threads over wall seconds, timed steps
            "thread_busy": {name: seconds / wall for name, seconds in busy.items() if seconds / wall >= 0.01}}


def thread_cpu_seconds() -> dict:
    """CPU seconds each thread of this process has run, by its name (Linux: /proc/self/task/*/stat,
    fields 14 and 15, user and system time in clock ticks): PyTorch's OpenMP threads and BLAS's
    threads are counted too, which Python's threading module does not list."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        seconds[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


# --- what each side's BLAS can do ---------------------------------------------------------------

GEMM_SIZE = 2048


def _numpy_blas() -> dict:
    import numpy

    a = numpy.random.default_rng(0).standard_normal((GEMM_SIZE, GEMM_SIZE)).astype(numpy.float32)
    best = min(_timed(lambda: a @ a) for _ in range(3))
    try:
        from threadpoolctl import threadpool_info

        blas = next(info for info in threadpool_info() if info["user_api"] == "blas")
        name = f"{blas['internal_api']} {blas.get('version')} {blas.get('architecture')}, {blas['num_threads']} threads"
    except (ImportError, StopIteration):
        name = "unknown (pip install threadpoolctl)"
    return {"sgemm_gflops": 2 * GEMM_SIZE**3 / best / 1e9, "blas": name}


def _sgemm_scaling(threads: int) -> float:
    """How much faster `threads` one-thread sgemms run side by side than one alone: the most that
    threads sharing nothing can gain on this machine (shared caches, memory and clocks set it)."""
    import numpy

    from npllama.parallel import workers

    size, repeats = GEMM_SIZE // 2, 8
    a = numpy.random.default_rng(0).standard_normal((size, size)).astype(numpy.float32)

    def products(_=None):
        for _ in range(repeats):
            a @ a

    with workers(threads) as pool:
        products()  # warm up
        alone = min(_timed(products) for _ in range(2))
        together = min(_timed(lambda: list(pool.map(products, range(threads)))) for _ in range(2))
    return threads * alone / together


def _cupy_blas(cupy) -> dict:
    a = cupy.random.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=cupy.float32)

    def product():
        a @ a
        cupy.cuda.runtime.deviceSynchronize()

    best = min(_timed(product) for _ in range(3))
    return {"sgemm_gflops": 2 * GEMM_SIZE**3 / best / 1e9, "blas": "cuBLAS (CuPy)"}


def _torch_blas(device) -> dict:
    import torch

    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)

    def product():
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()

    best = min(_timed(product) for _ in range(3))
    build = dict(part.split("=", 1) for part in torch.__config__.show().replace(",", " ").split() if "=" in part)
    name = (f"{build.get('BLAS_INFO', '?')} {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")
    return {"sgemm_gflops": 2 * GEMM_SIZE**3 / best / 1e9, "blas": name if device == "cpu" else "cuBLAS"}


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


# --- the driver ---------------------------------------------------------------------------------

def _worker_env() -> dict:
    env = dict(os.environ)
    if "OPENBLAS_CORETYPE" in env and "OPENBLAS_L2_SIZE" in env:
        del env["OPENBLAS_CORETYPE"], env["OPENBLAS_L2_SIZE"]
    return env


def _run_side(side, seq_len, args) -> dict:
    command = [sys.executable, __file__, "--preset", args.preset, "--seq-len", str(seq_len), "--tokens",
               str(args.tokens), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
               str(args.threads), "--backend", args.backend, "--worker", side, "--precision", args.precision] + (
        ["--tf32"] if args.tf32 else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=_worker_env(), timeout=args.side_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"no result within {args.side_timeout} s"}
    if done.returncode != 0:
        last = (done.stderr.strip() or "no output").splitlines()[-1]
        return {"failed": last[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_table(seq_len, args, sides, card=None) -> dict:
    """Run each side at this T and print its row as soon as it is measured (a step that is cut
    short still shows the rows before it), then the lines that compare them; returns the results."""
    config = _config(args.preset, seq_len)
    batch = max(args.tokens // seq_len, 1)
    flops = step_flops(config, batch, seq_len)
    half = args.precision == "fp16"
    peak = card_peak_tflops(card, args.tf32, half) if card else None
    on_gpu = args.backend == "cupy"
    kind = "float16" if half else "TF32" if args.tf32 else "float32"
    print(f"\nT {seq_len} x batch {batch}: {flops / 1e9:.0f} GFLOP a step"
          + (f"; {card}, peak {peak if peak else '?'} TFLOP/s {kind}" if on_gpu else ""))
    memory = "device MiB" if on_gpu else "peak RSS MiB"
    print(f"{'':20}{'tokens/s':>9}{'step s':>8}{'step MiB':>10}{memory:>13}{'floor %':>8}"
          + (f"{'MFU %':>8}" if on_gpu else f"{'busy cores':>11}") + f"{'first loss':>11}  BLAS (sgemm GFLOP/s)",
          flush=True)
    results = {}
    for side in sides:
        r = results[side] = _run_side(side, seq_len, args)
        if "failed" in r:
            print(f"{SIDES[side]:20}  failed: {r['failed']}", flush=True)
            continue
        floor = 100 * flops / (r["sgemm_gflops"] * 1e9) / r["step_s"]
        mfu = f"{100 * flops / (peak * 1e12) / r['step_s']:>8.1f}" if peak else f"{'?':>8}"
        print(f"{SIDES[side]:20}{r['tokens_per_s']:>9.0f}{r['step_s']:>8.3f}{r['step_memory_mib']:>10.0f}"
              f"{r.get('device_memory_mib', r['peak_rss_mib']):>13.0f}{floor:>8.1f}"
              + (mfu if on_gpu else f"{r['busy_cores']:>11.2f}") + f"{r['first_loss']:>11.4f}  {r['blas']} "
              f"({r['sgemm_gflops']:.0f})" + (f", {r['skipped']} skipped" if "skipped" in r else ""), flush=True)
    for side, r in results.items():  # where npllama's serial part is: each thread's share of the wall time
        if side == "npllama" and "thread_busy" in r:
            shares = ", ".join(f"{name} {share:.0%}" for name, share in sorted(r["thread_busy"].items()))
            print(f"{'':20}threads of {SIDES[side]} busy: {shares}")
    one, many = results.get("npllama-1", {}), results.get("npllama", {})
    if "tokens_per_s" in one and "tokens_per_s" in many:
        print(f"scaling npllama on {args.threads} threads / on 1: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x "
              f"(this machine's one-thread sgemms, {args.threads} at once / 1: {many['sgemm_scaling']:.2f}x)")
    torch_sides = {side: r for side, r in results.items() if not side.startswith("npllama") and "failed" not in r}
    if "failed" not in results.get("npllama", {"failed": ""}) and torch_sides:
        fastest = max(torch_sides, key=lambda side: torch_sides[side]["tokens_per_s"])
        ours, theirs = results["npllama"], torch_sides[fastest]
        speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
        key = "device_memory_mib" if on_gpu else "step_memory_mib"
        memory = ours[key] / max(theirs[key], 1e-9)
        print(f"ratio npllama / fastest PyTorch ({SIDES[fastest]}): speed {speed:.2f}x, "
              f"{'device' if on_gpu else 'step'} memory {memory:.2f}x", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="model shape (default small; 134M on cupy)")
    parser.add_argument("--seq-len", default=None, help="comma-separated (default 256,1024,2048; 1024 on cupy)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens a step: batch = tokens / T (default 2048; 16384 on cupy)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch's threads, and npllama's worker threads (each with a one-thread BLAS); "
                             "default: every core")
    parser.add_argument("--sides", default=None, help=f"comma-separated from {', '.join(SIDES)} (default "
                                                      f"{', '.join(CPU_SIDES)}; {', '.join(GPU_SIDES)} on cupy)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="cupy: npllama on CuPy against PyTorch on CUDA, eager and compiled")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in float32 matrix products on every side "
                                                            "(cupy only)")
    parser.add_argument("--precision", choices=["full", "fp16"], default="full",
                        help="fp16: mixed precision on every side (npllama's --precision fp16, PyTorch's autocast "
                             "to float16 with a GradScaler, and to bfloat16 on the bf16 sides)")
    parser.add_argument("--side-timeout", type=float, default=WORKER_TIMEOUT_S,
                        help="seconds each side may take, compilation included (default %(default)s)")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_gpu = args.backend == "cupy"
    args.preset = args.preset or ("134M" if on_gpu else "small")
    args.tokens = args.tokens or (16384 if on_gpu else 2048)
    if args.tf32 and not on_gpu:
        parser.error("--tf32 changes float32 products on the GPU only: add --backend cupy")
    if args.tf32 and args.precision == "fp16":
        parser.error("--tf32 changes float32 products; with --precision fp16 they are float16: drop one")
    if args.worker:
        args.seq_len = int(args.seq_len)
        sys.path.insert(0, str(ROOT))
        print(json.dumps(run_npllama(args) if args.worker.startswith("npllama") else run_torch(args)))
        return 0

    sys.path.insert(0, str(ROOT))
    from npllama.backend import BackendError, get_backend

    try:
        get_backend(args.backend)
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seq_lens = [int(t) for t in (args.seq_len or ("1024" if on_gpu else "256,1024,2048")).split(",")]
    default_sides = (FP16_GPU_SIDES if args.precision == "fp16" else GPU_SIDES) if on_gpu else CPU_SIDES
    sides = (args.sides or ",".join(default_sides)).split(",")
    card = _card_name() if on_gpu else None
    print(f"preset {args.preset}, {args.tokens} tokens a step, {args.steps} timed steps, {args.threads} threads, "
          f"{os.cpu_count()} cores, backend {args.backend}" + (f" ({card}), {'TF32' if args.tf32 else 'float32'}"
                                                               if on_gpu else "")
          + (", mixed precision (float16; bfloat16 on the bf16 sides)" if args.precision == "fp16" else ""),
          flush=True)
    for seq_len in seq_lens:
        _print_table(seq_len, args, sides, card)
    return 0


def _card_name() -> str:
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


if __name__ == "__main__":
    sys.exit(main())
