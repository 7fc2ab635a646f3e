"""The CuPy backend on a CUDA device: the kernels against the float64 NumPy reference, bitwise
determinism, the whole model and every gradient against NumPy, training that tracks NumPy's run,
checkpoints that move between backends, and the audit on the GPU.

Every test here carries the `gpu` marker: without CuPy or a device, conftest skips them with the
reason (as in CI). scripts/gpu_check.sh runs them where a GPU is available.
"""

import math
import subprocess
import sys

import numpy
import pytest

from npllama import model as llama
from npllama.kernels import attention as cuda_attention
from npllama.kernels import embedding as cuda_embedding
from npllama.ops import attention, embedding
from npllama.train import train
from npllama.train.config import TrainConfig
from training import common, measured, run_under_mpi, train_cli

pytestmark = pytest.mark.gpu

SEQUENCE_LENGTHS = (1, 17, 63, 64, 65, 129, 257)


@pytest.fixture(scope="module")
def cupy():
    import cupy

    return cupy


def draw_qkv(rng, batch, n_heads, n_queries, n_keys, head_dim, logit_scale=1.0, n_kv_heads=None):
    """q, k, v in float64; k and v have n_kv_heads heads (n_heads unless given)."""
    q = rng.standard_normal((batch, n_heads, n_queries, head_dim)) * logit_scale
    kv_shape = (batch, n_heads if n_kv_heads is None else n_kv_heads, n_keys, head_dim)
    k = rng.standard_normal(kv_shape)
    v = rng.standard_normal(kv_shape)
    return q, k, v


def reference_gradients(q, k, v, dout):
    """out, lse and dq, dk, dv of sum(O * dout) in float64, through the NumPy reference. For k, v with
    fewer heads than q (grouped-query attention), through no grouped-query code: each key/value head
    repeated over its G query heads, multi-head attention, and its dk, dv the sum of its G copies'."""
    batch, n_kv_heads, n_keys, head_dim = k.shape
    group = q.shape[1] // n_kv_heads
    out, cache = attention.forward(q, numpy.repeat(k, group, axis=1), numpy.repeat(v, group, axis=1), tile_size=16)
    dq, dk, dv = attention.backward(dout, cache)
    dk, dv = (a.reshape(batch, n_kv_heads, group, n_keys, head_dim).sum(axis=2) for a in (dk, dv))
    return out, cache.lse, dq, dk, dv


def launch_on_nan_buffers(cupy, q, k, v, dout, dtype):
    """Run the four kernels on device copies, every output buffer filled with NaN before its launch."""
    q_d, k_d, v_d, dout_d = (cupy.asarray(a.astype(dtype)) for a in (q, k, v, dout))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = cupy.full(q_d.shape, numpy.nan, dtype=dtype)
    lse = cupy.full(q_d.shape[:3], numpy.nan, dtype=dtype)
    cuda_attention.launch(cuda_attention.forward_launch(q_d, k_d, v_d, out, lse, scale), dtype, q.shape[-1])
    dq, dk, dv = (cupy.full(a.shape, numpy.nan, dtype=dtype) for a in (q_d, k_d, v_d))
    dvec = cupy.full(lse.shape, numpy.nan, dtype=dtype)
    for run in cuda_attention.backward_launches(dout_d, q_d, k_d, v_d, out, lse, dvec, dq, dk, dv, scale):
        cuda_attention.launch(run, dtype, q.shape[-1])
    return [a.get() for a in (out, lse, dq, dk, dv)]


# float32 kernels accumulate D-long dot products and T-long sums in float32: relative error grows
# like sqrt(T) * 2^-24; 2e-4 on values of order 1 leaves room for T = 257 and |logits| up to 30.
# float64 kernels agree with the float64 reference to rounding: 1e-10.
TOLERANCES = {"float32": 2e-4, "float64": 1e-10}


@pytest.mark.parametrize("dtype", cuda_attention.DTYPES)
@pytest.mark.parametrize("head_dim", cuda_attention.HEAD_DIMS)
@pytest.mark.parametrize("seq", SEQUENCE_LENGTHS)
def test_kernels_match_the_float64_reference_forward_and_backward(cupy, dtype, head_dim, seq):
    rng = numpy.random.default_rng(seq * 1000 + head_dim)
    q, k, v = draw_qkv(rng, 2, 3, seq, seq, head_dim)
    dout = rng.standard_normal(q.shape)
    expected = reference_gradients(q, k, v, dout)
    got = launch_on_nan_buffers(cupy, q, k, v, dout, dtype)
    for name, want, have in zip(("out", "lse", "dq", "dk", "dv"), expected, got):
        assert numpy.isfinite(have).all(), f"{name}: an element was never written (NaN)"
        numpy.testing.assert_allclose(have, want, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype], err_msg=name)


@pytest.mark.parametrize("dtype", cuda_attention.DTYPES)
@pytest.mark.parametrize("n_queries, n_keys", [(1, 1), (1, 300), (5, 70), (64, 129), (100, 257)])
def test_kernels_handle_fewer_queries_than_keys_as_after_a_kv_cache(cupy, dtype, n_queries, n_keys):
    rng = numpy.random.default_rng(n_queries + n_keys)
    q, k, v = draw_qkv(rng, 1, 2, n_queries, n_keys, 64)
    dout = rng.standard_normal(q.shape)
    for name, want, have in zip(("out", "lse", "dq", "dk", "dv"), reference_gradients(q, k, v, dout),
                                launch_on_nan_buffers(cupy, q, k, v, dout, dtype)):
        numpy.testing.assert_allclose(have, want, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype], err_msg=name)


# (query heads, key/value heads): groups of G = 2 and 3, and multi-query attention (Hkv = 1)
GROUPINGS = [(4, 2), (6, 2), (3, 1), (8, 1)]


# The tolerances above hold: a shared head's dK and dV sum G T <= 8 x 129 terms, relative error
# ~ sqrt(G T) 2^-24 ~ 2e-6 in float32, a hundred times below 2e-4.
@pytest.mark.parametrize("dtype", cuda_attention.DTYPES)
@pytest.mark.parametrize("head_dim", cuda_attention.HEAD_DIMS)
@pytest.mark.parametrize("n_heads, n_kv_heads", GROUPINGS)
@pytest.mark.parametrize("n_queries, n_keys", [(129, 129), (5, 70), (1, 300)])
def test_grouped_query_kernels_match_the_repeated_heads_reference(cupy, dtype, head_dim, n_heads, n_kv_heads,
                                                                  n_queries, n_keys):
    rng = numpy.random.default_rng(n_heads * 1000 + head_dim + n_keys)
    q, k, v = draw_qkv(rng, 2, n_heads, n_queries, n_keys, head_dim, n_kv_heads=n_kv_heads)
    dout = rng.standard_normal(q.shape)
    for name, want, have in zip(("out", "lse", "dq", "dk", "dv"), reference_gradients(q, k, v, dout),
                                launch_on_nan_buffers(cupy, q, k, v, dout, dtype)):
        assert have.shape == want.shape and numpy.isfinite(have).all(), name
        numpy.testing.assert_allclose(have, want, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype], err_msg=name)


@pytest.mark.parametrize("dtype", cuda_attention.DTYPES)
@pytest.mark.parametrize("n_heads, n_kv_heads", GROUPINGS)
def test_the_attention_op_on_cupy_gives_numpys_grouped_query_results(cupy, dtype, n_heads, n_kv_heads):
    """The op (npllama.ops.attention) on CuPy arrays, which runs the kernels, against the same op on
    NumPy arrays in float64; dk and dv come back with k's Hkv heads."""
    rng = numpy.random.default_rng(n_heads + n_kv_heads)
    q, k, v = draw_qkv(rng, 2, n_heads, 100, 100, 64, n_kv_heads=n_kv_heads)
    dout = rng.standard_normal(q.shape)
    out, cache = attention.forward(q, k, v)
    expected = (out, *attention.backward(dout, cache))
    out_d, cache_d = attention.forward(*(cupy.asarray(a.astype(dtype)) for a in (q, k, v)))
    got = (out_d, *attention.backward(cupy.asarray(dout.astype(dtype)), cache_d))
    for name, want, have in zip(("out", "dq", "dk", "dv"), expected, got):
        assert have.shape == want.shape, name
        numpy.testing.assert_allclose(have.get(), want, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype], err_msg=name)


@pytest.mark.parametrize("dtype", cuda_attention.DTYPES)
def test_grouped_query_kernels_are_bitwise_identical_over_three_runs(cupy, dtype):
    """A shared head's dK and dV sum its group's query heads in one block, in one order: no atomics."""
    rng = numpy.random.default_rng(5)
    q, k, v = (cupy.asarray(a.astype(dtype)) for a in draw_qkv(rng, 2, 8, 300, 300, 128, n_kv_heads=2))
    dout = cupy.asarray(rng.standard_normal(q.shape).astype(dtype))
    runs = []
    for _ in range(3):
        out, lse = cuda_attention.forward(q, k, v, 0.125)
        runs.append([a.get().tobytes() for a in (out, lse, *cuda_attention.backward(dout, q, k, v, out, lse, 0.125))])
    assert runs[0] == runs[1] == runs[2]


def test_kernels_stay_finite_and_exact_with_large_logits(cupy):
    """Scores of magnitude ~ 100 overflow exp() unless the running max is subtracted first."""
    rng = numpy.random.default_rng(7)
    q, k, v = draw_qkv(rng, 1, 2, 129, 129, 128, logit_scale=30.0)
    dout = rng.standard_normal(q.shape)
    for name, want, have in zip(("out", "lse", "dq", "dk", "dv"), reference_gradients(q, k, v, dout),
                                launch_on_nan_buffers(cupy, q, k, v, dout, "float64")):
        numpy.testing.assert_allclose(have, want, rtol=1e-9, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("dtype", cuda_attention.DTYPES)
def test_attention_and_embedding_backward_are_bitwise_identical_over_three_runs(cupy, dtype):
    rng = numpy.random.default_rng(3)
    q, k, v = (cupy.asarray(a.astype(dtype)) for a in draw_qkv(rng, 2, 4, 300, 300, 128))
    dout = cupy.asarray(rng.standard_normal(q.shape).astype(dtype))
    ids = cupy.asarray(rng.integers(0, 50, (8, 256)))  # many repeats: the order of additions matters
    dy = cupy.asarray(rng.standard_normal((8, 256, 96)).astype(dtype))
    runs = []
    for _ in range(3):
        out, cache = attention.forward(q, k, v)
        grads = attention.backward(dout, cache)
        dweight = embedding.backward(dy, embedding.forward(ids, cupy.zeros((50, 96), dtype=dtype))[1])
        runs.append([a.get().tobytes() for a in (out, cache.lse, *grads, dweight)])
    assert runs[0] == runs[1] == runs[2]


def test_a_whole_training_step_on_the_gpu_is_bitwise_identical_over_three_runs(cupy):
    config = llama.get_preset("nano")
    tokens = numpy.random.default_rng(4).integers(0, config.vocab_size, (4, 65))
    runs = []
    for _ in range(3):
        params = llama.init_params(config, seed=0, xp=cupy)
        loss, grads = llama.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:])
        runs.append((loss, [grads[name].get().tobytes() for name in sorted(grads)]))
    assert runs[0] == runs[1] == runs[2]


def test_the_embedding_kernel_adds_in_position_order_exactly_as_numpy_add_at(cupy):
    rng = numpy.random.default_rng(11)
    ids = rng.integers(0, 30, (4, 100))
    dy = rng.standard_normal((4, 100, 24)).astype(numpy.float32)
    expected = numpy.zeros((40, 24), dtype=numpy.float32)
    numpy.add.at(expected, ids.reshape(-1), dy.reshape(-1, 24))
    got = cuda_embedding.backward(cupy.asarray(dy), cupy.asarray(ids), (40, 24)).get()
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-10), ("float32", 2e-4)])
def test_the_whole_model_gives_numpys_logits_and_gradients(cupy, dtype, tolerance):
    config = llama.LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, max_seq_len=128)
    params = llama.init_params(config, seed=1, dtype=dtype, std=0.1)
    params_gpu = {name: cupy.asarray(p) for name, p in params.items()}
    rng = numpy.random.default_rng(2)
    tokens, targets = rng.integers(0, 300, (2, 100)), rng.integers(0, 300, (2, 100))
    logits = llama.forward(params, config, tokens)
    numpy.testing.assert_allclose(llama.forward(params_gpu, config, tokens).get(), logits, rtol=tolerance,
                                  atol=tolerance)
    loss, grads = llama.loss_and_grads(params, config, tokens, targets)
    loss_gpu, grads_gpu = llama.loss_and_grads(params_gpu, config, tokens, targets)
    assert loss_gpu == pytest.approx(loss, rel=tolerance)
    for name, grad in grads.items():
        scale = float(numpy.abs(grad).max()) or 1.0
        numpy.testing.assert_allclose(grads_gpu[name].get() / scale, grad / scale, atol=tolerance, err_msg=name)


def test_kv_cache_decoding_on_the_gpu_gives_the_logits_of_a_full_forward(cupy):
    config = llama.get_preset("nano")
    params = {n: cupy.asarray(p) for n, p in llama.init_params(config, seed=0, dtype="float64").items()}
    tokens = numpy.random.default_rng(0).integers(0, config.vocab_size, (1, 40))
    full = llama.forward(params, config, tokens).get()
    cache = llama.init_kv_cache(config, batch=1, max_len=64, dtype="float64", xp=cupy)
    prefix = llama.forward(params, config, tokens[:, :25], kv_cache=cache).get()
    steps = [llama.forward(params, config, tokens[:, t:t + 1], kv_cache=cache).get() for t in range(25, 40)]
    numpy.testing.assert_allclose(numpy.concatenate([prefix, *steps], axis=1), full, rtol=1e-10, atol=1e-10)


def small_run(corpus, tmp_path, backend, name, **settings):
    folder, tokenizer = corpus
    config = TrainConfig(preset="nano", batch_size=4, seq_len=64, steps=50, eval_every=0, no_progress=True,
                         sample_tokens=0, data=[str(folder)], tokenizer=str(tokenizer), out=str(tmp_path / name),
                         cache_dir=str(tmp_path / "cache"), backend=backend, **settings)
    return train(config, log=lambda message: None)


def losses(run_folder):
    from training import read_metrics

    return [row["loss"] for row in read_metrics(run_folder) if "loss" in row]


def test_fifty_training_steps_on_cupy_track_the_numpy_run(corpus, tmp_path):
    on_cpu = small_run(corpus, tmp_path, "numpy", "cpu")
    on_gpu = small_run(corpus, tmp_path, "cupy", "gpu")
    cpu_losses, gpu_losses = losses(on_cpu.out), losses(on_gpu.out)
    assert len(cpu_losses) == len(gpu_losses) == 50
    # the same data and initial weights; float32 rounding differs (cuBLAS vs OpenBLAS, our kernels)
    # and grows through 50 AdamW steps, but stays far below the loss's own step-to-step change
    numpy.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-3)
    assert on_gpu.val_loss == pytest.approx(on_cpu.val_loss, rel=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adamw_on_the_gpu_is_one_kernel_a_parameter_and_gives_numpys_bits(cupy, monkeypatch, dtype):
    """Three AdamW steps of a model's parameters (decayed matrices, undecayed gains, clipped) on
    CuPy, each parameter one launch of adamw.cu, give the bits of NumPy's array code (values in the
    normal range, where CuPy's flush-to-zero changes nothing)."""
    from npllama import optim
    from npllama.kernels import adamw as cuda_adamw

    launches = []
    real_update = cuda_adamw.update
    monkeypatch.setattr(cuda_adamw, "update", lambda *args: (launches.append(args[0].shape), real_update(*args)))
    config = llama.PRESETS["nano"]
    params = llama.init_params(config, seed=0, dtype=dtype)
    rng = numpy.random.default_rng(1)
    grads = [{name: (10 * rng.standard_normal(p.shape)).astype(dtype) for name, p in params.items()} for _ in range(3)]
    on_cpu, on_gpu = dict(params), {name: cupy.asarray(p) for name, p in params.items()}
    cpu_state, gpu_state = optim.init_state(on_cpu), optim.init_state(on_gpu)
    on_cpu = {name: p.copy() for name, p in on_cpu.items()}
    for step_grads in grads:
        norm = optim.global_norm(step_grads)  # one clip factor for both (cuBLAS and BLAS sum squares apart)
        optim.step(on_cpu, step_grads, cpu_state, 1e-2, grad_norm=norm)
        optim.step(on_gpu, {name: cupy.asarray(g) for name, g in step_grads.items()}, gpu_state, 1e-2,
                   grad_norm=norm)
    assert len(launches) == 3 * len(params)
    for name in params:
        for cpu, gpu in ((on_cpu[name], on_gpu[name]), (cpu_state.m[name], gpu_state.m[name]),
                         (cpu_state.v[name], gpu_state.v[name])):
            assert cpu.tobytes() == gpu.get().tobytes(), name


def test_tf32_rounds_float32_products_to_a_10_bit_mantissa_only_when_asked(cupy):
    """Random inputs fill float32's 23-bit mantissa: a float32 product is off the float64 one by
    float32's rounding (about 1e-6 relative, over 1024 terms), a TF32 product by TF32's 10-bit
    mantissa (about 2^-11 an input, 3e-4 or more). 1024 x 1024, so that cuBLAS picks tensor cores."""
    from npllama.backend import float32_products

    rng = numpy.random.default_rng(0)
    a, b = rng.standard_normal((1024, 1024)), rng.standard_normal((1024, 1024))
    exact = a @ b
    errors = {}
    for tf32 in (False, True):
        with float32_products(cupy, tf32):
            product = (cupy.asarray(a, dtype=cupy.float32) @ cupy.asarray(b, dtype=cupy.float32)).get()
        errors[tf32] = float(numpy.abs(product - exact).max() / numpy.abs(exact).max())
    assert errors[False] < 1e-5 < 1e-4 < errors[True] < 1e-2, errors


def test_float16_products_on_the_tensor_cores_accumulate_in_float32(cupy):
    """cuBLAS's float16 GEMM as a training run sets it (float32 compute): within one float16 rounding
    of the float64 product of the same float16 inputs plus float32's accumulation error, which float16
    accumulation (2^-11 a term, over 1024 terms) would exceed many times. 1024 x 1024: tensor cores."""
    from npllama.backend import float32_products, matmul

    rng = numpy.random.default_rng(0)
    a, b = (rng.standard_normal((1024, 1024)).astype(numpy.float16) for _ in range(2))
    exact = a.astype(numpy.float64) @ b.astype(numpy.float64)
    magnitude = numpy.abs(a.astype(numpy.float64)) @ numpy.abs(b.astype(numpy.float64))
    with float32_products(cupy, False):
        product = matmul(cupy.asarray(a), cupy.asarray(b)).get()
    assert product.dtype == numpy.float16
    bound = 2.0**-11 * numpy.abs(exact) + 1024 * 2.0**-24 * magnitude + 2.0**-25
    assert (numpy.abs(product.astype(numpy.float64) - exact) <= bound).all()


def test_a_training_runs_cublas_handle_adds_partial_sums_in_float32_and_is_restored_after(cupy):
    from cupy_backends.cuda.libs import cublas

    from npllama.backend import DISALLOW_REDUCED_PRECISION_REDUCTION, float32_products

    handle = cupy.cuda.device.get_cublas_handle()
    before = cublas.getMathMode(handle)
    with float32_products(cupy, False):
        assert cublas.getMathMode(handle) & DISALLOW_REDUCED_PRECISION_REDUCTION
    assert cublas.getMathMode(handle) == before


def test_fp16_training_on_cupy_tracks_the_numpy_fp16_run_and_float32(corpus, tmp_path):
    """50 steps of --precision fp16 on the GPU (cuBLAS float16 GEMMs, npllama's tensor-core attention,
    nano's head dim being 16): the loss within 1% of the NumPy fp16 run's and of the GPU float32 run's
    at every step."""
    on_cpu = small_run(corpus, tmp_path, "numpy", "cpu", precision="fp16")
    on_gpu = small_run(corpus, tmp_path, "cupy", "gpu", precision="fp16")
    in_float32 = small_run(corpus, tmp_path, "cupy", "gpu32")
    numpy.testing.assert_allclose(losses(on_gpu.out), losses(on_cpu.out), rtol=1e-2)
    numpy.testing.assert_allclose(losses(on_gpu.out), losses(in_float32.out), rtol=1e-2)
    assert on_gpu.val_loss == pytest.approx(in_float32.val_loss, rel=1e-2)


# (query heads, key/value heads, Tq, Tk) of the tensor-core kernels' checks: one position, partial
# tiles, groups of two, multi-query with fewer queries than keys
TENSOR_CORE_SHAPES = [(2, 2, 1, 1), (2, 2, 129, 129), (4, 2, 257, 257), (3, 1, 17, 300)]
TENSOR_CORE_DTYPES = ("float16", "float32")  # float32: the TF32 instance


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
def test_the_mma_instruction_is_c_plus_a_b_in_the_fragment_layouts_the_cpu_emulation_assumes(cupy, dtype):
    """The tensor-core layer of attention_mma.cu, on the instructions themselves: lanes' registers packed
    by the NumPy model of the PTX ISA's layouts (tests/tensor_cores.py, which the harness's emulation is
    tested against on the CPU) give C + A B unpacked by the same model."""
    from npllama.kernels import attention_mma
    from tensor_cores import assert_is_the_product, fragments, mma_problem, unfragment

    for seed in range(5):
        a, b, c = mma_problem(seed, dtype)
        a_regs, b_regs, c_regs = (cupy.asarray(x) for x in fragments(a, b, c))
        attention_mma.launch(attention_mma.mma_launch(a_regs, b_regs, c_regs, dtype))
        assert_is_the_product(unfragment(c_regs.get()), a, b, c)


def test_the_tf32_rounding_instruction_is_the_emulations_bit_for_bit(cupy):
    """cvt.rna.tf32.f32 (then the 13 low bits cleared) against the NumPy model the CPU harness's
    emulation is tested against: random bits, ties, the largest finite values, subnormals; infinities
    stay, NaNs stay NaN (their payloads are the hardware's own)."""
    from npllama.kernels import attention_mma
    from tensor_cores import round_to_tf32

    bits = numpy.random.default_rng(0).integers(0, 2**32, 100_000, dtype=numpy.uint64).astype(numpy.uint32)
    special = numpy.array([0x3F801000, 0xBF803000, 0x7F7FFFFF, 0x00001FFF, 0x7F800000, 0xFF800000, 0x7F800001,
                           0xFF800001, 0x7FC00000], dtype=numpy.uint32)  # ties, overflow, subnormal, infinities, NaNs
    x = numpy.concatenate([bits, special]).view(numpy.float32)
    finite = numpy.isfinite(x)  # NaN payloads are the hardware's own: NaN in, NaN out is all we ask
    device = cupy.asarray(x)
    attention_mma.launch(attention_mma.tf32_rounding_launch(device))
    got = device.get()
    want = round_to_tf32(x)
    wrong = finite & (got.view(numpy.uint32) != want.view(numpy.uint32))
    subnormal = finite & (x != 0) & (abs(x) < numpy.finfo(numpy.float32).tiny)
    assert not wrong.any(), (f"{wrong.sum()} of {finite.sum()} finite values differ ({(wrong & subnormal).sum()} of "
                             f"them subnormal), first {x[wrong][:3]}: got {got[wrong][:3]}, model {want[wrong][:3]}")
    assert numpy.isnan(got[numpy.isnan(x)]).all(), "a NaN whose payload is in the low bits became infinite"
    infinite = numpy.isinf(x)
    assert (got[infinite] == x[infinite]).all()


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 128])
@pytest.mark.parametrize("n_heads, n_kv_heads, n_queries, n_keys", TENSOR_CORE_SHAPES)
def test_the_tensor_core_forward_kernel_meets_its_rounding_bound_on_the_gpu(cupy, head_dim, n_heads, n_kv_heads,
                                                                            n_queries, n_keys, dtype):
    from npllama.kernels import attention_mma
    from tensor_cores import assert_within_the_kernels_roundings, draw_inputs

    q, k, v = draw_inputs(head_dim + n_keys, dtype, 2, n_heads, n_kv_heads, n_queries, n_keys, head_dim)
    out = cupy.full(q.shape, cupy.nan, dtype=dtype)
    lse = cupy.full(q.shape[:3], cupy.nan, dtype=cupy.float32)
    attention_mma.launch(attention_mma.forward_launch(*(cupy.asarray(a) for a in (q, k, v)), out, lse,
                                                      1.0 / math.sqrt(head_dim)))
    assert_within_the_kernels_roundings(out.get(), lse.get(), q, k, v)


@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 128])
@pytest.mark.parametrize("n_heads, n_kv_heads, n_queries, n_keys", TENSOR_CORE_SHAPES)
def test_the_tensor_core_backward_kernels_meet_their_rounding_bound_on_the_gpu(cupy, head_dim, n_heads, n_kv_heads,
                                                                               n_queries, n_keys, dtype):
    """Through the op (float32 under TF32 products, as --tf32 runs it)."""
    from npllama.backend import float32_products
    from tensor_cores import assert_gradients_within_the_kernels_roundings, draw_inputs

    q, k, v = draw_inputs(head_dim + n_keys, dtype, 2, n_heads, n_kv_heads, n_queries, n_keys, head_dim)
    dout = (100 * numpy.random.default_rng(n_queries).standard_normal(q.shape)).astype(dtype)
    with float32_products(cupy, dtype == "float32"):
        out, cache = attention.forward(*(cupy.asarray(a) for a in (q, k, v)))
        grads = [g.get() for g in attention.backward(cupy.asarray(dout), cache)]
    out = out.get()
    dvec = (dout.astype(numpy.float32) * out.astype(numpy.float32)).sum(axis=-1)
    assert_gradients_within_the_kernels_roundings(*grads, q, k, v, dout, out, cache.lse.get(), dvec)


@pytest.mark.parametrize("dtype, tf32", [("float16", False), ("float32", True)])
def test_attention_on_cupy_runs_the_tensor_core_kernels_bitwise_the_same_each_time(cupy, monkeypatch, dtype, tf32):
    """The op sends CuPy float16, and float32 under TF32 products, to the kernels, forward and backward:
    three runs, one set of bits."""
    from npllama.backend import float32_products
    from npllama.kernels import attention_mma
    from tensor_cores import draw_inputs

    calls = []
    for name in ("forward", "backward"):
        real = getattr(attention_mma, name)
        monkeypatch.setattr(attention_mma, name, lambda *args, real=real, name=name: (calls.append(name),
                                                                                        real(*args))[1])
    q, k, v = (cupy.asarray(a) for a in draw_inputs(0, dtype, 2, 4, 2, 200, 200, 64))
    dout = cupy.asarray(numpy.random.default_rng(1).standard_normal(q.shape).astype(dtype))
    runs = []
    with float32_products(cupy, tf32):
        for _ in range(3):
            out, cache = attention.forward(q, k, v)
            runs.append([a.get().tobytes() for a in (out, cache.lse, *attention.backward(dout, cache))])
    assert calls == ["forward", "backward"] * 3
    assert runs[1] == runs[0] and runs[2] == runs[0]


@pytest.mark.parametrize("dtype, unit", [("float32", 2.0**-24), ("float64", 2.0**-53), ("float16", None)])
def test_swiglu_on_cupy_is_the_fused_kernel_and_gives_numpys_numbers(cupy, monkeypatch, dtype, unit):
    """One launch forward and one backward, within a few units in the last place of NumPy's array code
    (exp is CUDA's there), float16 within one float16 spacing (both round float32 results that close)."""
    from npllama.kernels import swiglu as cuda_swiglu
    from npllama.ops import swiglu

    launches = []
    real_launch = cuda_swiglu.launch
    monkeypatch.setattr(cuda_swiglu, "launch", lambda run: (launches.append(run.kernel), real_launch(run)))
    rng = numpy.random.default_rng(0)
    a, b, dy = ((scale * rng.standard_normal((4, 300))).astype(dtype) for scale in (6.0, 1.0, 10.0))
    want = swiglu.forward(a, b)
    want = (want[0], *swiglu.backward(dy, want[1]))
    got = swiglu.forward(cupy.asarray(a), cupy.asarray(b))
    got = (got[0], *swiglu.backward(cupy.asarray(dy), got[1]))
    assert len(launches) == 2
    a64, b64, dy64 = (x.astype(numpy.float64) for x in (a, b, dy))
    magnitudes = (abs(a64 * b64), abs(dy64 * b64) * (1 + abs(a64)), abs(dy64 * a64))
    for have, expected, magnitude in zip(got, want, magnitudes):
        have, expected = have.get().astype(numpy.float64), expected.astype(numpy.float64)
        bound = (2.0**-10 * abs(expected) + 2.0**-24 + 8 * 2.0**-24 * magnitude if unit is None
                 else 8 * unit * magnitude)
        assert (abs(have - expected) <= bound).all()


@pytest.mark.parametrize("dtype, unit", [("float32", 2.0**-24), ("float64", 2.0**-53), ("float16", 2.0**-24)])
def test_rmsnorm_on_cupy_is_the_fused_kernels_and_gives_numpys_numbers(cupy, monkeypatch, dtype, unit):
    """One launch forward and three backward (dx, the gain's two halves), bitwise the same run to run,
    within the bound of tests/test_fused_kernels_on_cpu.py of NumPy's array code (the sums in another
    order: 2 n units of the sum of magnitudes; float16 one float16 spacing more)."""
    from npllama.kernels import rmsnorm as cuda_rmsnorm
    from npllama.ops import rmsnorm

    launches = []
    real_launch = cuda_rmsnorm.launch
    monkeypatch.setattr(cuda_rmsnorm, "launch", lambda run: (launches.append(run.kernel), real_launch(run)))
    rng = numpy.random.default_rng(0)
    x, dy = (rng.standard_normal((3, 100, 768)).astype(dtype) for _ in range(2))
    weight = (1 + rng.standard_normal(768)).astype(dtype)
    want, cache = rmsnorm.forward(x, weight)
    want = (want, cache.xhat, *rmsnorm.backward(dy, cache))
    runs = []
    for _ in range(2):  # backward given NumPy's cache, so that both compute from the same xhat and rstd
        got, cache_d = rmsnorm.forward(cupy.asarray(x), cupy.asarray(weight))
        numpys_cache = rmsnorm.RMSNormCache(*(cupy.asarray(a) for a in (cache.xhat, cache.weight, cache.rstd)))
        runs.append([a.get() for a in (got, cache_d.xhat, *rmsnorm.backward(cupy.asarray(dy), numpys_cache))])
    assert len(launches) == 8 and all(a.tobytes() == b.tobytes() for a, b in zip(*runs))
    r, xhat, g, dy64 = (a.astype(numpy.float64) for a in (cache.rstd, cache.xhat, weight, dy))
    projection = abs(dy64 * g * xhat).mean(axis=-1, keepdims=True)
    by_columns, by_rows = (2 * 768 + 8) * unit, (2 * 300 + 8) * unit  # sums over a row's columns, over the rows
    bounds = (by_columns * abs(xhat * g), by_columns * abs(xhat),
              by_columns * r * (abs(dy64 * g) + abs(xhat) * projection),
              by_rows * abs(dy64 * xhat).reshape(-1, 768).sum(axis=0))
    for have, expected, bound in zip(runs[0], want, bounds):
        expected = expected.astype(numpy.float64)
        if dtype == "float16":
            bound = bound + 2.0**-10 * abs(expected) + 2.0**-24
        assert (abs(have.astype(numpy.float64) - expected) <= bound).all()
    # and backward from the fused forward's own cache: its xhat and rstd are within the bounds above
    # (float16: xhat one spacing away), which move dx by as much again
    dx = rmsnorm.backward(cupy.asarray(dy), cache_d)[0].get().astype(numpy.float64)
    dx_want = want[2].astype(numpy.float64)
    bound = 2 * bounds[2]
    if dtype == "float16":
        bound = bound + 2.0**-9 * r * (abs(dy64 * g) + abs(xhat) * projection) + 2.0**-10 * abs(dx_want) + 2.0**-24
    assert (abs(dx - dx_want) <= bound).all()


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_rope_on_cupy_is_the_fused_kernel_and_gives_numpys_bits(cupy, monkeypatch, dtype):
    """One launch forward and one backward (given attention's gradient transposed, read through its
    strides), NumPy's bits: the same operations in the same order, each rounded once (no value here
    is a float32 subnormal, which the GPU flushes to zero)."""
    from npllama.kernels import rope as cuda_rope
    from npllama.ops import rope

    launches = []
    real_launch = cuda_rope.launch
    monkeypatch.setattr(cuda_rope, "launch", lambda run: (launches.append(run.kernel), real_launch(run)))
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((2, 100, 6, 64)).astype(dtype)
    dy_heads = rng.standard_normal((2, 6, 100, 64)).astype(dtype)  # attention's layout (B, H, T, D)
    cos, sin = rope.frequencies(64, numpy.arange(7, 107), dtype=cuda_rope.COMPUTE[dtype])
    want, cache = rope.forward(x, cos, sin)
    want = (want, rope.backward(dy_heads.transpose(0, 2, 1, 3), cache))
    got, cache_d = rope.forward(cupy.asarray(x), cupy.asarray(cos), cupy.asarray(sin))
    got = (got, rope.backward(cupy.asarray(dy_heads).transpose(0, 2, 1, 3), cache_d))
    assert len(launches) == 2
    assert all(have.get().tobytes() == numpy.ascontiguousarray(expected).tobytes() for have, expected in zip(got, want))


@pytest.mark.parametrize("dtype, unit", [("float32", 2.0**-24), ("float64", 2.0**-53), ("float16", 2.0**-24)])
def test_cross_entropy_on_cupy_is_the_fused_kernels_and_gives_numpys_numbers(cupy, monkeypatch, dtype, unit):
    """One launch forward and one backward on the 32000-word head's rows, an ignored row; the loss and
    the gradient within the bound of tests/test_fused_kernels_on_cpu.py of NumPy's array code (the row
    sum in another order and CUDA's exp: 2 V units of rest moves 1 / (1 + rest) and log1p), bitwise
    the same run to run."""
    from npllama.kernels import cross_entropy as cuda_cross_entropy
    from npllama.ops import cross_entropy

    launches = []
    real_launch = cuda_cross_entropy.launch
    monkeypatch.setattr(cuda_cross_entropy, "launch", lambda run: (launches.append(run.kernel), real_launch(run)))
    rng = numpy.random.default_rng(0)
    logits = (3 * rng.standard_normal((64, 32000))).astype(dtype)
    targets = rng.integers(0, 32000, 64)
    targets[5] = -100
    loss, cache = cross_entropy.forward(logits, targets)
    rest = cache.rest.astype(numpy.float64)
    dlogits = cross_entropy.backward(2.0, cache)
    runs = []
    for _ in range(2):
        loss_d, cache_d = cross_entropy.forward(cupy.asarray(logits), cupy.asarray(targets))
        runs.append((loss_d.get(), cross_entropy.backward(2.0, cache_d).get()))
    assert len(launches) == 4 and all(a.tobytes() == b.tobytes() for a, b in zip(*runs))
    moved = (2 * 32000 + 16) * unit * rest / (1 + rest)
    assert abs(float(runs[0][0]) - float(loss)) <= (moved.sum() + 64 * 16 * unit * float(loss)) / 63
    safe = numpy.where(targets == -100, 0, targets)
    subtracted = (numpy.arange(32000)[None, :] == safe[:, None]) & (safe != cache.argmax)[:, None]
    magnitude = abs(dlogits.astype(numpy.float64)) + 2.0 / 63 * subtracted  # s p_v, and s where p_t - s rounds
    bound = (moved[:, None] + 8 * unit) * magnitude + 2.0 / 63 * (2.0**-1022 if dtype == "float64" else 2.0**-126)
    if dtype == "float16":  # (the GPU flushes float32 subnormals to zero)
        bound = bound + 2.0**-10 * abs(dlogits.astype(numpy.float64)) + 2.0**-24
    assert (abs(runs[0][1].astype(numpy.float64) - dlogits) <= bound).all()


def test_a_swiglu_gradient_of_another_dtype_than_the_fused_forwards_inputs_takes_the_array_code(cupy):
    """float32 gradients of float16 activations: computed in float32 and returned in dy's dtype, as on
    NumPy, never rounded to float16 first."""
    from npllama.ops import swiglu

    rng = numpy.random.default_rng(0)
    a, b = (rng.standard_normal(300).astype(numpy.float16) for _ in range(2))
    dy = (1e5 * rng.standard_normal(300)).astype(numpy.float32)  # beyond float16's range
    _, cache = swiglu.forward(cupy.asarray(a), cupy.asarray(b))
    assert cache.sigmoid is None  # the fused kernel ran
    got = [g.get() for g in swiglu.backward(cupy.asarray(dy), cache)]
    want = swiglu.backward(dy, swiglu.forward(a, b)[1])
    for have, expected in zip(got, want):
        assert have.dtype == numpy.float32 and numpy.isfinite(have).all()
        numpy.testing.assert_allclose(have, expected, rtol=1e-5)


def test_a_tf32_run_trains_and_its_checkpoint_resumes_only_with_tf32(corpus, tmp_path):
    first = train_cli(*common(corpus, tmp_path), "--backend", "cupy", "--tf32", "--steps", "2")
    assert first.returncode == 0, first.stderr
    assert "float32 products in TF32" in first.stderr
    without = train_cli(*common(corpus, tmp_path), "--backend", "cupy", "--steps", "3", "--resume")
    assert without.returncode == 2 and "tf32 True -> False" in without.stderr
    again = train_cli(*common(corpus, tmp_path), "--backend", "cupy", "--tf32", "--steps", "3", "--resume")
    assert again.returncode == 0, again.stderr


def test_a_checkpoint_trained_on_cupy_resumes_on_numpy_and_back(corpus, tmp_path):
    import dataclasses

    from npllama.checkpoint import load_checkpoint

    first = small_run(corpus, tmp_path, "cupy", "run", checkpoint_every=25)
    on_cpu = load_checkpoint(first.out / "step-00000025")
    assert all(isinstance(p, numpy.ndarray) for p in on_cpu.params.values())
    folder, tokenizer = corpus
    base = TrainConfig(preset="nano", batch_size=4, seq_len=64, steps=60, eval_every=0, no_progress=True,
                       sample_tokens=0, data=[str(folder)], tokenizer=str(tokenizer), out=str(first.out),
                       cache_dir=str(tmp_path / "cache"), checkpoint_every=25, resume="")
    resumed_on_cpu = train(dataclasses.replace(base, backend="numpy"), log=lambda message: None)
    assert resumed_on_cpu.step == 60
    resumed_on_gpu = train(dataclasses.replace(base, backend="cupy", steps=70), log=lambda message: None)
    assert resumed_on_gpu.step == 70 and math.isfinite(resumed_on_gpu.val_loss)


def test_the_audit_passes_on_the_gpu():
    result = subprocess.run([sys.executable, "-m", "npllama.audit", "--backend", "cupy"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


def test_the_evaluator_on_cupy_gives_numpys_scores_and_answers(cupy, corpus, tmp_path):
    from conftest import TASK_FIXTURES, save_random_run
    from npllama.convert.load import load
    from npllama.eval.report import evaluate_task
    from npllama.eval.tasks import load_task

    _, tokenizer_path = corpus
    config = llama.LlamaConfig(dim=64, n_layers=2, n_heads=2, vocab_size=512, multiple_of=16, max_seq_len=256)
    save_random_run(tmp_path, tokenizer_path, config, seed=4, std=0.2)
    on_cpu, on_gpu = load(tmp_path, dtype="float64"), load(tmp_path, backend="cupy", dtype="float64")
    for name in ("hellaswag", "winogrande", "boolq", "nq_open"):
        task = load_task(name, TASK_FIXTURES)
        expected = evaluate_task(on_cpu, task, shots=2, limit=10, progress=False)
        got = evaluate_task(on_gpu, task, shots=2, limit=10, progress=False)
        assert got["metrics"] == expected["metrics"], name
        for mine, reference in zip(got["examples"], expected["examples"]):
            if "logprobs" in reference:  # float64 both sides; only summation orders differ
                numpy.testing.assert_allclose(mine["logprobs"], reference["logprobs"], rtol=1e-9)
            else:
                assert mine["prediction"] == reference["prediction"]


def test_under_mpirun_one_rank_averages_through_nccl_and_trains_as_one_process_does(corpus, tmp_path):
    # one rank: NCCL's sum over one GPU is a copy and the mean divides by 1, so the losses are bitwise
    steps = ["--steps", "20", "--eval-every", "10", "--backend", "cupy"]
    one = train_cli(*common(corpus, tmp_path, "one"), *steps)
    assert one.returncode == 0, one.stderr
    ranks = run_under_mpi(1, "-m", "npllama.train", *common(corpus, tmp_path, "mpi"), *steps)
    assert ranks.returncode == 0, ranks.stdout + ranks.stderr
    assert "1 process, 4 rows of each batch apiece, gradients averaged by NCCL" in ranks.stderr
    assert measured(tmp_path / "mpi") == measured(tmp_path / "one") and len(measured(tmp_path / "one")) == 21
