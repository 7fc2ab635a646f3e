"""Launch every CUDA kernel once on small shapes (for compute-sanitizer in scripts/gpu_check.sh).

    compute-sanitizer --tool racecheck python scripts/gpu_kernels_once.py

Each attention instance runs forward and backward on T = 70 (a partial last tile) with Tq < Tk
too, with multi-head, grouped-query (4 query heads on 2 key/value heads) and multi-query (3 on 1)
shapes, the tensor-core kernels in both formats (float16, and float32 under --tf32's TF32
products), forward and backward, on the same shapes (against NumPy's float32 attention on the same
inputs), the embedding backward on repeated ids, AdamW's
update in float32 and float64, and the fused SwiGLU, RMSNorm, RoPE and cross-entropy in all three
dtypes (RMSNorm on rows that end mid-warp and mid-block, RoPE's backward on a transposed gradient,
cross-entropy on rows of 1000 with an ignored one); the results are compared
with NumPy so a run that the sanitizer passes is also a correct one. Exit 1 on a mismatch.
"""

import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npllama import optim  # noqa: E402
from npllama.backend import float32_products, get_backend  # noqa: E402
from npllama.kernels import attention as cuda_attention  # noqa: E402
from npllama.kernels import attention_mma  # noqa: E402
from npllama.ops import attention, cross_entropy, embedding, rmsnorm, rope, swiglu  # noqa: E402


def main() -> int:
    cupy = get_backend("cupy")
    # straight cudaMalloc per array: inside CuPy's pool an overrun lands in the pool's own memory,
    # where compute-sanitizer's memcheck cannot see it
    cupy.cuda.set_allocator(None)
    rng = numpy.random.default_rng(0)
    bad = []
    for dtype in cuda_attention.DTYPES:
        for head_dim in cuda_attention.HEAD_DIMS:
            for n_queries, n_keys, heads, kv_heads in ((70, 70, 2, 2), (5, 70, 2, 2), (70, 70, 4, 2), (5, 70, 3, 1)):
                q = rng.standard_normal((1, heads, n_queries, head_dim))
                k, v = (rng.standard_normal((1, kv_heads, n_keys, head_dim)) for _ in range(2))
                dout = rng.standard_normal(q.shape)
                out, cache = attention.forward(q, k, v)
                expected = (out, *attention.backward(dout, cache))
                device = [cupy.asarray(a.astype(dtype)) for a in (q, k, v, dout)]
                out_d, cache_d = attention.forward(*device[:3])
                got = (out_d, *attention.backward(device[3], cache_d))
                tolerance = 2e-4 if dtype == "float32" else 1e-10
                for name, want, have in zip(("out", "dq", "dk", "dv"), expected, got):
                    if not numpy.allclose(have.get(), want, rtol=tolerance, atol=tolerance):
                        bad.append(f"{dtype} D={head_dim} Tq={n_queries} Tk={n_keys} H={heads} Hkv={kv_heads}: "
                                   f"{name}")
    # the tensor-core kernels: float16, and float32 while float32 products are TF32 (as --tf32 runs
    # them); O to the operands' precision (2^-11), L to float32's, the gradients within 2e-2
    for dtype, tf32 in (("float16", False), ("float32", True)):
        for head_dim in attention_mma.HEAD_DIMS:
            for n_queries, n_keys, heads, kv_heads in ((70, 70, 2, 2), (5, 70, 2, 2), (70, 70, 4, 2), (5, 70, 3, 1)):
                q = rng.standard_normal((1, heads, n_queries, head_dim)).astype(dtype)
                k, v = (rng.standard_normal((1, kv_heads, n_keys, head_dim)).astype(dtype) for _ in range(2))
                dout = rng.standard_normal(q.shape).astype(dtype)
                out, cache = attention.forward(*(a.astype(numpy.float32) for a in (q, k, v)))
                expected = attention.backward(dout.astype(numpy.float32), cache)
                with float32_products(cupy, tf32):
                    out_d, cache_d = attention.forward(*(cupy.asarray(a) for a in (q, k, v)))
                    got = attention.backward(cupy.asarray(dout), cache_d)
                if not (numpy.allclose(out_d.get(), out, rtol=4e-3, atol=4e-3)
                        and numpy.allclose(cache_d.lse.get(), cache.lse, rtol=1e-3, atol=1e-3)
                        and all(numpy.allclose(have.get(), want, rtol=2e-2, atol=2e-2)
                                for have, want in zip(got, expected))):
                    bad.append(f"{dtype} on the tensor cores D={head_dim} Tq={n_queries} Tk={n_keys} H={heads} "
                               f"Hkv={kv_heads}: out, lse or a gradient")
    for dtype in ("float32", "float64", "float16"):  # the fused SwiGLU kernels, forward and backward
        a, b, dy = (rng.standard_normal(1000).astype(dtype) for _ in range(3))
        y, cache = swiglu.forward(a, b)
        expected = (y, *swiglu.backward(dy, cache))
        y_d, cache_d = swiglu.forward(*(cupy.asarray(x) for x in (a, b)))
        got = (y_d, *swiglu.backward(cupy.asarray(dy), cache_d))
        if not all(numpy.allclose(have.get(), want, rtol=2e-3, atol=2e-3) for have, want in zip(got, expected)):
            bad.append(f"swiglu ({dtype}) differs from NumPy's")
        x, dy = rng.standard_normal((11, 300)).astype(dtype), rng.standard_normal((11, 300)).astype(dtype)
        weight = rng.standard_normal(300).astype(dtype)
        y, cache = rmsnorm.forward(x, weight)
        expected = (y, *rmsnorm.backward(dy, cache))
        y_d, cache_d = rmsnorm.forward(cupy.asarray(x), cupy.asarray(weight))
        got = (y_d, *rmsnorm.backward(cupy.asarray(dy), cache_d))
        if not all(numpy.allclose(have.get(), want, rtol=2e-3, atol=2e-3) for have, want in zip(got, expected)):
            bad.append(f"rmsnorm ({dtype}) differs from NumPy's")
        x, dy = rng.standard_normal((2, 9, 3, 16)).astype(dtype), rng.standard_normal((2, 3, 9, 16)).astype(dtype)
        cos, sin = rope.frequencies(16, numpy.arange(9), dtype="float64" if dtype == "float64" else "float32")
        y, cache = rope.forward(x, cos, sin)
        expected = (y, rope.backward(dy.transpose(0, 2, 1, 3), cache))
        y_d, cache_d = rope.forward(*(cupy.asarray(a) for a in (x, cos, sin)))
        got = (y_d, rope.backward(cupy.asarray(dy).transpose(0, 2, 1, 3), cache_d))
        if not all(numpy.allclose(have.get(), want, rtol=2e-3, atol=2e-3) for have, want in zip(got, expected)):
            bad.append(f"rope ({dtype}) differs from NumPy's")
        logits, targets = rng.standard_normal((9, 1000)).astype(dtype), rng.integers(0, 1000, 9)
        targets[3] = -100
        loss, cache = cross_entropy.forward(logits, targets)
        expected = (loss, cross_entropy.backward(1.0, cache))
        loss_d, cache_d = cross_entropy.forward(cupy.asarray(logits), cupy.asarray(targets))
        got = (loss_d, cross_entropy.backward(1.0, cache_d))
        if not all(numpy.allclose(have.get(), want, rtol=2e-3, atol=2e-5) for have, want in zip(got, expected)):
            bad.append(f"cross_entropy ({dtype}) differs from NumPy's")
    ids = rng.integers(0, 20, (4, 50))
    dy = rng.standard_normal((4, 50, 32)).astype(numpy.float32)
    expected = numpy.zeros((20, 32), dtype=numpy.float32)
    numpy.add.at(expected, ids.reshape(-1), dy.reshape(-1, 32))
    got = embedding.backward(cupy.asarray(dy), embedding.forward(cupy.asarray(ids), cupy.zeros((20, 32)))[1])
    if got.get().tobytes() != expected.tobytes():
        bad.append("embedding backward differs from numpy.add.at")
    for dtype in ("float32", "float64"):  # AdamW's kernel: a matrix (decayed) of 300 elements, a gain (not)
        params = {"w.weight": rng.standard_normal((20, 15)).astype(dtype), "norm.weight": rng.standard_normal(15)
                  .astype(dtype)}
        grads = {name: rng.standard_normal(p.shape).astype(dtype) for name, p in params.items()}
        on_gpu = {name: cupy.asarray(p) for name, p in params.items()}
        optim.step(params, grads, optim.init_state(params), 1e-2, grad_norm=1.0)
        optim.step(on_gpu, {name: cupy.asarray(g) for name, g in grads.items()}, optim.init_state(on_gpu), 1e-2,
                   grad_norm=1.0)
        if any(on_gpu[name].get().tobytes() != params[name].tobytes() for name in params):
            bad.append(f"AdamW's kernel ({dtype}) differs from NumPy's update")
    cupy.cuda.Device().synchronize()
    print("\n".join(bad) if bad else "every kernel ran and matched NumPy")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
