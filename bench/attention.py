"""Benchmark npllama's CUDA attention kernels against PyTorch and a cuBLAS-composed CuPy attention.

    python bench/attention.py [--seq-lens 1024 2048 4096 8192] [--head-dims 64 128] [--reps 5]
    python bench/attention.py --dtype float16      # mixed precision: against FlashAttention-2
    python bench/attention.py --tf32               # float32 with TF32 allowed on every side

Causal attention in float32 (TF32 off everywhere unless --tf32), batch x seq = 16384 tokens and heads x head dim
= 2048 (FlashAttention's benchmark shape), for each implementation, in this one process:

  npllama        npllama.ops.attention on CuPy arrays: the CUDA kernels of npllama/kernels/
  sdpa           torch.nn.functional.scaled_dot_product_attention(is_causal=True), default backend
  sdpa-math      the same, restricted to its math backend (materialised attention; float32 only)
  sdpa-flash     the same, restricted to its flash backend (FlashAttention-2; float16 only)
  cupy-composed  S = s Q K^T, mask, softmax, O = P V as CuPy/cuBLAS calls (and their backward by
                 hand; float32 only: CuPy runs a batched float16 matmul as float32 GEMMs on copies)

With --dtype float16 the inputs are float16: npllama runs its tensor-core kernels (attention_mma.cu),
forward and backward (Dvec = rowsum(dO * O) by CuPy's array code in between). With --tf32 the inputs
stay float32 and TF32 is allowed everywhere: npllama runs the TF32 instance of the same kernels (as
`--tf32` training does), cupy-composed's cuBLAS products and PyTorch's (allow_tf32) may use TF32.

FLOP count (FlashAttention's convention): a causal forward is 2 matrix products of B*H*T*T*D
multiply-adds, half of them masked: 4 * B * H * T^2 * D / 2. The backward is 2.5 forwards (5
products instead of 2), so forward + backward is 3.5 forwards. TFLOP/s = that count / median time.
Times are CUDA events around the call, median of --reps after 2 warm-ups. Before timing, each
implementation's output is compared with npllama's (max abs difference is printed).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def causal_flops(batch, n_heads, seq, head_dim, backward: bool) -> float:
    forward = 4 * batch * n_heads * seq * seq * head_dim / 2
    return forward * (3.5 if backward else 1.0)


def time_cupy(fn, reps):
    import cupy

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return sorted(times)[len(times) // 2]


def time_torch(fn, reps):
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def npllama_calls(q, k, v, dout):
    from npllama.ops import attention

    def forward():
        return attention.forward(q, k, v)[0]

    def forward_backward():
        out, cache = attention.forward(q, k, v)
        return attention.backward(dout, cache)

    return forward, forward_backward


def composed_calls(q, k, v, dout):
    """Causal attention from CuPy/cuBLAS building blocks, materialising the (B, H, T, T) scores."""
    import cupy

    seq, scale = q.shape[2], 1.0 / math.sqrt(q.shape[3])
    # -inf above the diagonal, 0 elsewhere: added to the scores, a (T, T) mask that broadcasts for free
    future = cupy.triu(cupy.full((seq, seq), -cupy.inf, dtype=q.dtype), k=1)

    def probs_of(q, k):
        scores = cupy.matmul(q, k.swapaxes(-1, -2))
        scores *= scale
        scores += future
        scores -= scores.max(axis=-1, keepdims=True)
        cupy.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return scores

    def forward():
        return cupy.matmul(probs_of(q, k), v)

    def forward_backward():
        probs = probs_of(q, k)
        out = cupy.matmul(probs, v)
        dv = cupy.matmul(probs.swapaxes(-1, -2), dout)
        dprobs = cupy.matmul(dout, v.swapaxes(-1, -2))
        dprobs -= (dout * out).sum(axis=-1, keepdims=True)
        dscores = dprobs
        dscores *= probs
        return cupy.matmul(dscores, k) * scale, cupy.matmul(dscores.swapaxes(-1, -2), q) * scale, dv

    return forward, forward_backward


def torch_calls(q, k, v, dout, only=None):
    """SDPA on the same device memory (DLPack), with its default backend choice or only `only`
    ("math" or "flash")."""
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.from_dlpack(a).requires_grad_() for a in (q, k, v))
    dout = torch.from_dlpack(dout)

    def backends():
        if only is None:
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.MATH if only == "math" else SDPBackend.FLASH_ATTENTION])

    def forward():
        with backends(), torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward():
        with backends():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    return forward, forward_backward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16384, help="batch x seq")
    parser.add_argument("--width", type=int, default=2048, help="heads x head dim")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--tf32", action="store_true", help="float32 with TF32 allowed on every side")
    args = parser.parse_args(argv)
    if args.tf32 and args.dtype != "float32":
        parser.error("--tf32 is for float32 inputs; --dtype float16 runs float16 products already")
    from npllama.backend import BackendError, float32_products, get_backend

    try:
        cupy = get_backend("cupy")
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import numpy

    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    except ImportError:
        torch = None
        print("torch is not installed: PyTorch's SDPA is not measured")
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"device {device}; CuPy {cupy.__version__}; torch {torch.__version__ if torch else '-'}; {args.dtype}, "
          f"causal, TF32 {'allowed' if args.tf32 else 'off'}; batch x seq = {args.tokens}, "
          f"heads x head dim = {args.width}")
    print(f"{'T':>5} {'D':>4} {'implementation':15} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}"
          f" {'max |diff|':>10}")
    with float32_products(cupy, args.tf32):  # npllama's attention and CuPy's cuBLAS calls, TF32 or not
        rows = measure(args, cupy, numpy, torch)
    print_ratios(rows)
    return 0


def measure(args, cupy, numpy, torch) -> list[dict]:
    """Every implementation at every (head dim, T): a row each, printed as measured."""
    rows = []
    for head_dim in args.head_dims:
        for seq in args.seq_lens:
            batch, n_heads = max(1, args.tokens // seq), args.width // head_dim
            rng = numpy.random.default_rng(0)
            q, k, v, dout = (cupy.asarray(rng.standard_normal((batch, n_heads, seq, head_dim), dtype=numpy.float32)
                                          .astype(args.dtype)) for _ in range(4))
            calls = {"npllama": npllama_calls(q, k, v, dout)}
            if args.dtype == "float32":
                calls["cupy-composed"] = composed_calls(q, k, v, dout)
            if torch is not None:
                calls["sdpa"] = torch_calls(q, k, v, dout)
                if args.dtype == "float16":
                    calls["sdpa-flash"] = torch_calls(q, k, v, dout, only="flash")
                else:
                    calls["sdpa-math"] = torch_calls(q, k, v, dout, only="math")
            reference = calls["npllama"][0]().get().astype(numpy.float64)
            for name, (forward, forward_backward) in calls.items():
                timer = time_torch if name.startswith("sdpa") else time_cupy
                try:
                    got = numpy.asarray(cupy.asarray(forward()).get(), dtype=numpy.float64)
                    diff = float(numpy.abs(got - reference).max())
                    fwd, both = timer(forward, args.reps), timer(forward_backward, args.reps)
                except (cupy.cuda.memory.OutOfMemoryError, RuntimeError) as error:  # torch raises RuntimeError
                    print(f"{seq:5d} {head_dim:4d} {name:15} out of memory or failed: {str(error).splitlines()[0]}")
                    continue
                finally:  # what one implementation cached is not left to crowd out the next
                    cupy.get_default_memory_pool().free_all_blocks()
                    if torch is not None:
                        torch.cuda.empty_cache()
                row = {"seq": seq, "head_dim": head_dim, "name": name, "fwd_s": fwd, "both_s": both,
                       "fwd_tflops": causal_flops(batch, n_heads, seq, head_dim, False) / fwd / 1e12,
                       "both_tflops": causal_flops(batch, n_heads, seq, head_dim, True) / both / 1e12}
                rows.append(row)
                print(f"{seq:5d} {head_dim:4d} {name:15} {fwd * 1e3:8.2f} {row['fwd_tflops']:8.1f} "
                      f"{both * 1e3:11.2f} {row['both_tflops']:8.1f} {diff:10.2e}", flush=True)
            del q, k, v, dout, calls
            cupy.get_default_memory_pool().free_all_blocks()
            if torch is not None:
                torch.cuda.empty_cache()
    return rows


def print_ratios(rows):
    """npllama's forward+backward speed over each other implementation's, per shape."""
    by_shape = {}
    for row in rows:
        by_shape.setdefault((row["seq"], row["head_dim"]), {})[row["name"]] = row
    print("ratios, npllama time / other time (below 1: npllama faster), forward | forward+backward:")
    for (seq, head_dim), found in by_shape.items():
        ours = found.get("npllama")
        if ours is None:
            continue
        parts = [f"{name} {ours['fwd_s'] / other['fwd_s']:.2f} | {ours['both_s'] / other['both_s']:.2f}"
                 for name, other in found.items() if name != "npllama"]
        print(f"  T {seq:5d} D {head_dim:4d}: " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
