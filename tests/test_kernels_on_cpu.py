"""npllama's CUDA kernels, run on the CPU: the kernel source itself (npllama/kernels/*.cu), launched
exactly as the CuPy path launches it (npllama.kernels.attention's launch functions give grid, block,
shared memory and the exact scalar types for both), under AddressSanitizer + UBSan and under
ThreadSanitizer, against the float64 NumPy reference. Every output buffer starts as NaN and every
block's shared memory is NaN, so an element never written or a tile read before it was filled shows.
Grouped-query attention (k, v with fewer heads than q) is checked against an oracle of its own:
multi-head attention on keys and values repeated over each group (`grouped_reference`).

And the compile report: every instance compiles through NVRTC for sm_80 and sm_90 without spilling.
"""

import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import kernel_harness
from kernel_harness import HarnessFailure, build, run
from npllama import optim
from npllama.kernels import adamw as cuda_adamw
from npllama.kernels import attention as cuda_attention
from npllama.kernels import attention_mma
from npllama.kernels import cross_entropy as cuda_cross_entropy
from npllama.kernels import embedding as cuda_embedding
from npllama.kernels import rmsnorm as cuda_rmsnorm
from npllama.kernels import rope as cuda_rope
from npllama.kernels import swiglu as cuda_swiglu
from npllama.ops import attention

KERNELS = Path(cuda_attention.__file__).parent
# The instances the harness builds (all 40 would take a minute under ASan): every head-dim class
# of float32 (one column per lane, several, the largest) and the float64 instance the audit uses.
INSTANCES = [("float32", 16), ("float32", 48), ("float32", 128), ("float64", 16)]
NAMES = [name for dtype, head_dim in INSTANCES for name in cuda_attention.kernel_names(dtype, head_dim)]
# tiles other than the defaults, of the kind bench/attention_tiles.py sweeps: the kernels' code for any tile
OTHER_TILES = cuda_attention.Tiles(forward=(32, 64), dkdv=(16, 64), dq=(16, 32))
OTHER_NAMES = cuda_attention.kernel_names("float32", 48, OTHER_TILES)
# the barrier after the forward kernel loads a key tile's V into the buffer K had: without it, P V
# reads V while it is written. (The barrier before that load, after P, keeps V from overwriting K
# while S still reads it; with that one removed, ThreadSanitizer reported nothing in our runs at
# T = 70, so compute-sanitizer's racecheck on a GPU is what checks it.)
BARRIER = "    __syncthreads();  // the whole V tile is loaded\n"


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """The harness built once per session: the kernels under "address" and "thread", and a copy of
    attention.cu with one __syncthreads removed, under "thread"."""
    if kernel_harness.unavailable_reason():
        pytest.skip(kernel_harness.unavailable_reason())
    folder = tmp_path_factory.mktemp("kernels-on-cpu")
    source = (KERNELS / "attention.cu").read_text()
    assert source.count(BARRIER) == 1, "the barrier the race test removes is no longer in attention.cu"
    racy = folder / "attention_without_a_barrier.cu"
    racy.write_text(source.replace(BARRIER, ""))
    sources = [KERNELS / "attention.cu", KERNELS / "embedding.cu", KERNELS / "adamw.cu"]
    others = cuda_embedding.kernel_names() + cuda_adamw.kernel_names()
    with ThreadPoolExecutor(max_workers=3) as pool:
        builds = {"address": pool.submit(build, sources, NAMES + OTHER_NAMES + others, "address", folder),
                  "thread": pool.submit(build, sources, NAMES + cuda_adamw.kernel_names(), "thread", folder),
                  "racy": pool.submit(build, [racy], cuda_attention.kernel_names("float32", 16), "thread", folder)}
        return {name: future.result() for name, future in builds.items()}


def draw_problem(seed, batch, n_heads, n_queries, n_keys, head_dim, logit_scale=1.0, n_kv_heads=None):
    """q, k, v, dout in float64; k and v have n_kv_heads heads (n_heads unless given)."""
    rng = numpy.random.default_rng(seed)
    q = rng.standard_normal((batch, n_heads, n_queries, head_dim)) * logit_scale
    kv_shape = (batch, n_heads if n_kv_heads is None else n_kv_heads, n_keys, head_dim)
    k, v = (rng.standard_normal(kv_shape) for _ in range(2))
    return q, k, v, rng.standard_normal(q.shape)


def run_kernels(binary, q, k, v, dout, dtype, tiles=None):
    """out, lse, dq, dk, dv from the four kernels (with `tiles`: by default the dtype's), each output
    starting as NaN."""
    q, k, v, dout = (a.astype(dtype) for a in (q, k, v, dout))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = numpy.full(q.shape, numpy.nan, dtype=dtype), numpy.full(q.shape[:3], numpy.nan, dtype=dtype)
    args = run(binary, cuda_attention.forward_launch(q, k, v, out, lse, scale, tiles))
    out, lse = args[3], args[4]
    dq, dk, dv = (numpy.full(a.shape, numpy.nan, dtype=dtype) for a in (q, k, v))
    dvec = numpy.full(lse.shape, numpy.nan, dtype=dtype)
    # the harness returns new arrays: each launch is made with what the launches before it wrote
    dvec_run = cuda_attention.backward_launches(dout, q, k, v, out, lse, dvec, dq, dk, dv, scale, tiles)[0]
    dvec = run(binary, dvec_run)[2]
    _, dkdv_run, dq_run = cuda_attention.backward_launches(dout, q, k, v, out, lse, dvec, dq, dk, dv, scale, tiles)
    dk, dv = run(binary, dkdv_run)[6:8]
    dq = run(binary, dq_run)[6]
    return out, lse, dq, dk, dv


def grouped_reference(q, k, v, dout):
    """out, lse, dq, dk, dv in float64 for k, v with Hkv heads shared by groups of G = H / Hkv query
    heads, through no grouped-query code: each key/value head repeated G times (copy h is what query
    head h reads, head h // G), multi-head attention through the NumPy reference, and each shared
    head's dk, dv the sum of its G copies' (it was read G times). With G = 1 it is the reference."""
    batch, n_kv_heads, n_keys, head_dim = k.shape
    group = q.shape[1] // n_kv_heads
    k_repeated, v_repeated = numpy.repeat(k, group, axis=1), numpy.repeat(v, group, axis=1)
    out, cache = attention.forward(q, k_repeated, v_repeated, tile_size=16)
    dq, dk_repeated, dv_repeated = attention.backward(dout, cache)
    dk, dv = (a.reshape(batch, n_kv_heads, group, n_keys, head_dim).sum(axis=2) for a in (dk_repeated, dv_repeated))
    return out, cache.lse, dq, dk, dv


def assert_matches_reference(got, q, k, v, dout, tolerance):
    expected = grouped_reference(q, k, v, dout)
    for name, want, have in zip(("out", "lse", "dq", "dk", "dv"), expected, got):
        assert have.shape == want.shape, f"{name}: shape {have.shape}, expected {want.shape}"
        assert numpy.isfinite(have).all(), f"{name}: some element was never written (still NaN)"
        numpy.testing.assert_allclose(have, want, rtol=tolerance, atol=tolerance, err_msg=name)


# float32 kernels: dot products of D terms and sums of T terms in float32, relative error ~ sqrt(T)
# 2^-24 on values of order 1; 2e-5 leaves a margin of 10 at T = 129. float64: rounding only.
TOLERANCES = {"float32": 2e-5, "float64": 1e-12}


@pytest.mark.parametrize("seq", [1, 17, 63, 64, 65, 129])
@pytest.mark.parametrize("dtype, head_dim", INSTANCES, ids=lambda value: str(value))
def test_kernels_match_the_reference_under_address_and_undefined_behaviour_sanitizers(harness, dtype, head_dim,
                                                                                       seq):
    problem = draw_problem(seq + head_dim, 2, 3, seq, seq, head_dim)
    got = run_kernels(harness["address"], *problem, dtype)
    assert_matches_reference(got, *problem, TOLERANCES[dtype])


@pytest.mark.parametrize("n_queries, n_keys", [(1, 1), (65, 65), (17, 129)])
def test_kernels_with_other_tiles_than_the_defaults_match_the_reference(harness, n_queries, n_keys):
    """The tiles bench/attention_tiles.py may choose change where the sums split, not what they are."""
    problem = draw_problem(n_keys, 2, 3, n_queries, n_keys, 48)
    got = run_kernels(harness["address"], *problem, "float32", OTHER_TILES)
    assert_matches_reference(got, *problem, TOLERANCES["float32"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_the_tile_sweep_tries_only_tiles_the_kernels_take_and_the_defaults_among_them(dtype, head_dim):
    sys.path.insert(0, str(KERNELS.parents[1] / "bench"))
    import attention_tiles

    found = attention_tiles.candidates(dtype, head_dim)
    assert found and all(cuda_attention.tiles_problem(tiles, dtype, head_dim) is None for _, tiles in found)
    default = cuda_attention.TILES[dtype]
    assert all(default in [tiles for kind, tiles in found if kind == wanted] for wanted in attention_tiles.KINDS)
    assert cuda_attention.tiles_problem(default, dtype, head_dim) is None


@pytest.mark.parametrize("tiles, message", [
    (cuda_attention.Tiles(forward=(24, 64), dkdv=(32, 32), dq=(64, 32)), "forward tile 24 x 64: its rows"),
    (cuda_attention.Tiles(forward=(64, 60), dkdv=(32, 32), dq=(64, 32)), "forward tile 64 x 60: its rows"),
    (cuda_attention.Tiles(forward=(64, 64), dkdv=(32, 24), dq=(64, 32)), "dkdv tile 32 x 24"),
    (cuda_attention.Tiles(forward=(64, 64), dkdv=(12, 32), dq=(64, 32)), "dkdv tile 12 x 32"),
    (cuda_attention.Tiles(forward=(64, 64), dkdv=(32, 32), dq=(256, 256)), "dq tile 256 x 256 needs more than"),
])
def test_tiles_the_kernels_cannot_take_are_named_with_the_reason(tiles, message):
    assert message in cuda_attention.tiles_problem(tiles, "float32", 128)


@pytest.mark.parametrize("n_queries, n_keys", [(1, 65), (17, 129), (64, 100)])
def test_kernels_handle_fewer_queries_than_keys_as_after_a_kv_cache(harness, n_queries, n_keys):
    problem = draw_problem(n_keys, 1, 2, n_queries, n_keys, 48)
    assert_matches_reference(run_kernels(harness["address"], *problem, "float32"), *problem, TOLERANCES["float32"])


def test_kernels_stay_exact_with_large_logits(harness):
    """Scores near 100 overflow exp() unless each row's running max is subtracted first."""
    problem = draw_problem(5, 1, 2, 70, 70, 16, logit_scale=30.0)
    assert_matches_reference(run_kernels(harness["address"], *problem, "float64"), *problem, 1e-10)


@pytest.mark.parametrize("dtype, head_dim, seq", [("float32", 128, 129), ("float32", 48, 65), ("float64", 16, 70)])
def test_kernels_have_no_data_race_under_thread_sanitizer(harness, dtype, head_dim, seq):
    problem = draw_problem(seq, 1, 2, seq, seq, head_dim)
    assert_matches_reference(run_kernels(harness["thread"], *problem, dtype), *problem, TOLERANCES[dtype])


# dK/dV's block walks the query tiles of each query head of its group in turn, through the same shared tiles
@pytest.mark.parametrize("dtype, head_dim, n_heads, n_kv_heads, n_queries, n_keys",
                         [("float32", 48, 6, 2, 65, 65), ("float64", 16, 3, 1, 5, 70)])
def test_grouped_query_kernels_have_no_data_race_under_thread_sanitizer(harness, dtype, head_dim, n_heads, n_kv_heads,
                                                                        n_queries, n_keys):
    problem = draw_problem(n_keys, 1, n_heads, n_queries, n_keys, head_dim, n_kv_heads=n_kv_heads)
    assert_matches_reference(run_kernels(harness["thread"], *problem, dtype), *problem, TOLERANCES[dtype])


# (query heads, key/value heads): groups of G = 2 and 3 query heads, and multi-query attention (Hkv = 1)
GROUPINGS = [(4, 2), (6, 2), (3, 1)]


# The tolerances above hold: a shared head's dK and dV add G heads' sums of T terms, G T <= 390 terms
# of order 1 here, relative error ~ sqrt(G T) 2^-24 ~ 1.2e-6 in float32, still 15 times below 2e-5.
@pytest.mark.parametrize("n_heads, n_kv_heads", GROUPINGS, ids=lambda value: str(value))
@pytest.mark.parametrize("dtype, head_dim", INSTANCES, ids=lambda value: str(value))
def test_grouped_query_kernels_match_the_repeated_heads_reference_under_address_and_undefined_behaviour_sanitizers(
        harness, dtype, head_dim, n_heads, n_kv_heads):
    """Two batches, so that a key/value head taken as h // G instead of (b H + h) // G shows; 65 queries,
    a partial last tile and, for dK/dV, two query tiles in each of the G query heads."""
    problem = draw_problem(head_dim + n_heads, 2, n_heads, 65, 65, head_dim, n_kv_heads=n_kv_heads)
    assert_matches_reference(run_kernels(harness["address"], *problem, dtype), *problem, TOLERANCES[dtype])


@pytest.mark.parametrize("n_heads, n_kv_heads", GROUPINGS, ids=lambda value: str(value))
@pytest.mark.parametrize("dtype, n_queries, n_keys", [("float32", 1, 65), ("float32", 17, 129), ("float64", 5, 70)])
def test_grouped_query_kernels_handle_fewer_queries_than_keys_as_after_a_kv_cache(harness, dtype, n_queries, n_keys,
                                                                                  n_heads, n_kv_heads):
    problem = draw_problem(n_keys + n_heads, 2, n_heads, n_queries, n_keys, 48 if dtype == "float32" else 16,
                           n_kv_heads=n_kv_heads)
    assert_matches_reference(run_kernels(harness["address"], *problem, dtype), *problem, TOLERANCES[dtype])


@pytest.mark.parametrize("n_heads, n_kv_heads", [(2, 2), *GROUPINGS], ids=lambda value: str(value))
def test_grouped_query_out_lse_and_dq_are_the_bits_of_multi_head_kernels_on_repeated_keys(harness, n_heads,
                                                                                          n_kv_heads):
    """A query head reads its shared key/value head where multi-head attention reads its own copy: the
    same numbers in the same order, so the same bits. dK and dV only agree to rounding (G > 1): the
    shared head adds its G query heads' terms in one sum, not G sums added afterwards."""
    q, k, v, dout = draw_problem(n_heads, 2, n_heads, 40, 70, 48, n_kv_heads=n_kv_heads)
    group = n_heads // n_kv_heads
    grouped = run_kernels(harness["address"], q, k, v, dout, "float32")
    repeated = run_kernels(harness["address"], q, numpy.repeat(k, group, axis=1), numpy.repeat(v, group, axis=1),
                           dout, "float32")
    for name, mine, theirs in zip(("out", "lse", "dq"), grouped, repeated):
        assert mine.tobytes() == theirs.tobytes(), name
    if group == 1:
        assert grouped[3].tobytes() == repeated[3].tobytes() and grouped[4].tobytes() == repeated[4].tobytes()


def test_the_harness_reports_a_kernel_with_a_barrier_removed(harness):
    problem = draw_problem(0, 1, 1, 70, 70, 16)
    with pytest.raises(HarnessFailure, match="ThreadSanitizer: data race"):
        run_kernels(harness["racy"], *problem, "float32")


@given(dtype=st.sampled_from(["float32", "float64"]), batch=st.integers(1, 3), seq=st.integers(1, 50),
       dim=st.integers(1, 40), n_ids=st.integers(1, 20), unused_ids=st.integers(0, 3), distinct=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
@example(dtype="float32", batch=3, seq=40, dim=24, n_ids=12, unused_ids=3, distinct=False, seed=1)  # long runs
# every id once: each position starts its run, and 7 x 24 = 168 threads leave the second block of 128 partial
@example(dtype="float32", batch=1, seq=7, dim=24, n_ids=12, unused_ids=0, distinct=True, seed=1)
@example(dtype="float64", batch=1, seq=1, dim=1, n_ids=1, unused_ids=0, distinct=False, seed=0)  # one thread
def test_the_embedding_kernel_adds_each_ids_rows_in_position_order_as_numpy_add_at(harness, dtype, batch, seq, dim,
                                                                                  n_ids, unused_ids, distinct, seed):
    rng = numpy.random.default_rng(seed)
    vocab = n_ids + unused_ids  # ids that never occur keep a zero gradient
    if distinct and batch * seq <= vocab:
        ids = rng.permutation(vocab)[:batch * seq].reshape(batch, seq)
    else:
        ids = rng.integers(0, n_ids, (batch, seq))
    dy = rng.standard_normal((batch, seq, dim)).astype(dtype)
    expected = numpy.zeros((vocab, dim), dtype=dtype)
    numpy.add.at(expected, ids.reshape(-1), dy.reshape(-1, dim))
    sorted_ids, order = cuda_embedding.sort_positions(numpy, ids)
    dweight = numpy.zeros((vocab, dim), dtype=dtype)
    got = run(harness["address"], cuda_embedding.backward_launch(sorted_ids, order, dy.reshape(-1, dim), dweight))[3]
    assert got.tobytes() == expected.tobytes()  # the same additions in the same order: the same bits


@given(batch=st.integers(1, 4), seq=st.integers(1, 1200), vocab=st.integers(1, 2**20),
       dtype=st.sampled_from(["int32", "int64"]), seed=st.integers(0, 2**32 - 1))
@example(batch=4, seq=1024, vocab=2**20, dtype="int32", seed=0)  # id x positions passes 2^31: no int32 key
@example(batch=1, seq=2, vocab=1, dtype="int64", seed=0)  # one id, at every position
def test_positions_are_sorted_by_id_then_position_for_any_ids_of_any_integer_type(batch, seq, vocab, dtype, seed):
    ids = numpy.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(dtype)
    sorted_ids, order = cuda_embedding.sort_positions(numpy, ids)
    flat = ids.reshape(-1).astype(numpy.int64)
    expected_order = numpy.lexsort((numpy.arange(flat.size), flat))  # by id, then by position
    assert sorted_ids.dtype == order.dtype == numpy.int64
    numpy.testing.assert_array_equal(order, expected_order)
    numpy.testing.assert_array_equal(sorted_ids, flat[expected_order])


@given(sanitizer=st.sampled_from(["address", "thread"]), dtype=st.sampled_from(["float32", "float64"]),
       rows=st.integers(1, 12), cols=st.integers(1, 70), matrix=st.booleans(), step=st.integers(1, 5),
       clip=st.sampled_from([1.0, 0.25]), lr=st.floats(1e-5, 1e-1), seed=st.integers(0, 2**32 - 1))
@example(sanitizer="address", dtype="float32", rows=4, cols=64, matrix=True, step=1, clip=1.0, lr=1e-3, seed=0)
@example(sanitizer="thread", dtype="float32", rows=257, cols=1, matrix=False, step=3, clip=0.25, lr=1e-2, seed=1)
def test_the_adamw_kernel_gives_the_bits_of_the_array_code(harness, sanitizer, dtype, rows, cols, matrix, step,
                                                          clip, lr, seed):
    """One pass of adamw.cu over p, m, v and g leaves exactly the bits optim's array code leaves
    (each operation rounded once, in its order), for a decayed matrix or an undecayed gain, whatever
    its size against the 256-thread blocks, under AddressSanitizer + UBSan and ThreadSanitizer."""
    rng = numpy.random.default_rng(seed)
    shape = (rows, cols) if matrix else (rows * cols,)
    p, g = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    m = (1e-2 * rng.standard_normal(shape)).astype(dtype)
    v = (1e-4 * rng.random(shape) + 1e-6).astype(dtype)  # normal numbers: CuPy's -ftz changes nothing
    config = optim.AdamWConfig()
    state = optim.AdamWState(m={"w": m.copy()}, v={"w": v.copy()}, step=step)
    expected = {"w": p.copy()}
    optim._update(expected, {"w": g}, state, lr, config, clip, "w")
    scalars = optim.update_scalars(config, lr, clip, step, decay=matrix)
    launch = cuda_adamw.update_launch(p, m, v, g, scalars)  # in the parameter's own shape, as optim passes it
    got_p, got_m, got_v = run(harness[sanitizer], launch)[:3]
    assert got_p.tobytes() == expected["w"].tobytes() and not numpy.array_equal(got_p, p)
    assert got_m.tobytes() == state.m["w"].tobytes() and got_v.tobytes() == state.v["w"].tobytes()


def test_the_adamw_kernel_takes_contiguous_moments_and_parameters_of_one_dtype_it_was_built_for():
    """Anything else (a Fortran-ordered or strided parameter, float16, moments of another dtype than
    the parameter's) takes the array code; a gradient in any layout is made contiguous."""
    shape = (6, 4)
    p, m, v, g = (numpy.zeros(shape, "float32") for _ in range(4))
    assert cuda_adamw.supports(p, m, v, g) and cuda_adamw.supports(p, m, v, numpy.asfortranarray(g))
    assert not cuda_adamw.supports(numpy.asfortranarray(p), m, v, g)
    assert not cuda_adamw.supports(p, m, numpy.zeros((6, 8), "float32")[:, ::2], g)
    assert not cuda_adamw.supports(*(a.astype("float16") for a in (p, m, v, g)))
    assert not cuda_adamw.supports(p, m.astype("float64"), v.astype("float64"), g)
    assert not cuda_adamw.supports(p, m, v, numpy.zeros((4, 6), "float32"))


def launches(q_shape, kv_shape, dtype="float32", v_shape=None, kv_dtype=None):
    """The forward launch and the three backward launches for arrays of these shapes (zeros)."""
    q = numpy.zeros(q_shape, dtype)
    k = numpy.zeros(kv_shape, kv_dtype or dtype)
    v = numpy.zeros(v_shape or kv_shape, kv_dtype or dtype)
    lse = numpy.zeros(q_shape[:3], dtype)
    return [cuda_attention.forward_launch(q, k, v, q.copy(), lse, 0.25),
            *cuda_attention.backward_launches(q, q, k, v, q, lse, lse.copy(), q.copy(), k.copy(), v.copy(), 0.25)]


@pytest.mark.parametrize("batch, n_heads, n_kv_heads", [(2, 4, 4), (2, 6, 2), (3, 8, 1)])
def test_forward_and_dq_have_a_block_row_per_query_head_and_dkdv_per_key_value_head(batch, n_heads, n_kv_heads):
    forward, dvec, dkdv, dq = launches((batch, n_heads, 70, 16), (batch, n_kv_heads, 70, 16))
    assert forward.grid[1] == dq.grid[1] == batch * n_heads and dkdv.grid[1] == batch * n_kv_heads
    assert dvec.grid[1] == 1
    for launch in (forward, dkdv, dq):  # the group size travels as an int, just before the scale
        assert launch.args[-2] == n_heads // n_kv_heads and isinstance(launch.args[-2], numpy.int32)


@pytest.mark.parametrize("q_shape, kv_shape, v_shape, kv_dtype, message", [
    ((2, 6, 8, 16), (2, 4, 8, 16), None, None, "do not fit"),  # 6 query heads, 4 key/value heads
    ((2, 4, 8, 16), (1, 2, 8, 16), None, None, "do not fit"),  # another batch
    ((2, 4, 8, 16), (2, 2, 8, 32), None, None, "do not fit"),  # another head dim
    ((2, 4, 8, 16), (2, 0, 8, 16), None, None, "do not fit"),  # no key/value head
    ((2, 4, 8, 16), (2, 2, 8, 16), (2, 1, 8, 16), None, "need q"),  # k and v differ
    ((2, 4, 8, 16), (2, 2, 8), None, None, "need q"),  # k is not 4-d
    ((2, 4, 8, 16), (2, 2, 8, 16), None, "float64", "one dtype"),
    ((1, 65536, 1, 16), (1, 1, 1, 16), None, None, "batch x heads = 65536"),  # gridDim.y at most 65535
], ids=["heads-not-a-multiple", "batch", "head-dim", "zero-kv-heads", "k-v-differ", "k-not-4d", "dtype", "grid"])
def test_launches_refuse_keys_and_values_that_do_not_fit_the_queries(q_shape, kv_shape, v_shape, kv_dtype, message):
    with pytest.raises(ValueError, match=message):
        launches(q_shape, kv_shape, v_shape=v_shape, kv_dtype=kv_dtype)


@pytest.mark.parametrize("batch, n_heads, n_kv_heads", [(1, 65535, 1), (65535, 1, 1), (3, 21845, 5)])
def test_launches_take_batch_times_heads_up_to_the_grids_limit(batch, n_heads, n_kv_heads):
    forward, dvec, dkdv, dq = launches((batch, n_heads, 1, 16), (batch, n_kv_heads, 1, 16))
    assert forward.grid[1] == dq.grid[1] == batch * n_heads <= 65535


def test_every_instance_fits_the_shared_memory_of_an_a100():
    for name, shared in cuda_attention.instances():
        assert shared <= cuda_attention.MAX_SHARED_BYTES, name


@pytest.mark.skipif(__import__("importlib").util.find_spec("cupy_backends") is None,
                    reason="CuPy is not installed: pip install '.[test]' installs it with the pinned NVRTC")
def test_every_instance_compiles_for_sm80_and_sm90_without_spills():
    result = subprocess.run([sys.executable, "-m", "npllama.kernels"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    n_instances = 2 * sum(len(kernels.instances()) for kernels in (cuda_attention, attention_mma, cuda_embedding,
                                                                     cuda_adamw, cuda_swiglu, cuda_rmsnorm, cuda_rope,
                                                                     cuda_cross_entropy))
    assert f"{n_instances} instances, 0 with a problem, 0 compile errors" in result.stdout


PTXAS_LOG_WITH_A_SPILL = """\
ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90'
ptxas info    : Function properties for _Z6kernelv
ptxas         .     16 bytes stack frame, 48 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 1024 bytes smem
"""


def test_the_compile_report_flags_a_spill_and_counts_static_and_dynamic_shared_memory():
    from npllama.kernels.__main__ import parse_ptxas

    [row] = parse_ptxas(PTXAS_LOG_WITH_A_SPILL, {"_Z6kernelv": "kernel"}, {"kernel": 2048}, "sm_90")
    assert (row.kernel, row.registers, row.stack_bytes, row.spill_bytes) == ("kernel", 96, 16, 80)
    assert (row.static_shared_bytes, row.dynamic_shared_bytes) == (1024, 2048)
    assert row.problem == "spills 80 bytes"
    [too_big] = parse_ptxas(PTXAS_LOG_WITH_A_SPILL.replace("48 bytes spill stores, 32", "0 bytes spill stores, 0"),
                            {"_Z6kernelv": "kernel"}, {"kernel": 300 * 1024}, "sm_90")
    assert too_big.problem.startswith("asks for 308224 bytes of shared memory, more than sm_90's")


@given(arch=st.sampled_from(["sm_80", "sm_90"]), stores=st.integers(0, 64), loads=st.integers(0, 64),
       static=st.integers(0, 64 * 1024), dynamic=st.integers(0, 240 * 1024))
@example(arch="sm_80", stores=0, loads=0, static=1024, dynamic=163 * 1024 - 1024)  # exactly sm_80's limit: fits
@example(arch="sm_80", stores=0, loads=0, static=1024, dynamic=163 * 1024 - 1023)  # one byte over, in two parts
@example(arch="sm_80", stores=0, loads=0, static=0, dynamic=200 * 1024)  # over sm_80's limit, under sm_90's
@example(arch="sm_90", stores=0, loads=8, static=0, dynamic=0)  # a spill of loads only
def test_a_kernel_has_a_problem_exactly_when_it_spills_or_its_shared_memory_exceeds_its_architectures(
        arch, stores, loads, static, dynamic):
    from npllama.kernels.__main__ import MAX_SHARED_BYTES, parse_ptxas

    spills = f"{stores} bytes spill stores, {loads} bytes spill loads"
    log = PTXAS_LOG_WITH_A_SPILL.replace("sm_90", arch).replace("48 bytes spill stores, 32 bytes spill loads", spills)
    [row] = parse_ptxas(log.replace("1024 bytes smem", f"{static} bytes smem"), {"_Z6kernelv": "kernel"},
                        {"kernel": dynamic}, arch)
    limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}[arch]  # the CUDA guide's opt-in maximum per block
    assert MAX_SHARED_BYTES[arch] == limit
    if stores + loads:
        assert row.problem == f"spills {stores + loads} bytes"
    elif static + dynamic > limit:
        assert row.problem == f"asks for {static + dynamic} bytes of shared memory, more than {arch}'s {limit}"
    else:
        assert row.problem is None


@pytest.mark.parametrize("arch, registers, dynamic, threads, blocks", [
    ("sm_80", 210, 82_688, 128, 2),  # the D = 128 float32 forward, K and V in one buffer: 2 x 83,712 <= 164 KiB
    ("sm_80", 197, 115_712, 128, 1),  # the same with K and V apart (before): 2 x 116,736 > 164 KiB
    ("sm_90", 238, 115_712, 128, 2),  # on sm_90's 228 KiB two fit even so, and 240 x 32 x 8 warps <= 65,536
    ("sm_90", 64, 116_000, 128, 1),  # 2 x (116,000 + the 1 KiB each block keeps) > 228 KiB
    ("sm_90", 255, 0, 128, 2),  # registers: 8,192 a warp, 8 warps, 4 a block
    ("sm_90", 100, 0, 32, 16),  # 100 x 32 = 3,200 rounds up to 3,328 a warp: 4 in each quarter of 16,384, not 5
    ("sm_90", 32, 0, 1024, 2),  # threads: 2,048 a multiprocessor
    ("sm_90", 16, 0, 32, 32),  # at most 32 blocks
    ("sm_90", 80, 0, 32, 24),  # 2,560 a warp: 6 warps in each quarter of 16,384 registers, not 25 in all
    ("sm_80", 32, 54_954, 32, 2),  # 55,978 bytes round up to 56,064: 3 x 56,064 > 164 KiB
])
def test_the_compile_report_counts_the_blocks_one_multiprocessor_holds(arch, registers, dynamic, threads, blocks):
    from npllama.kernels.__main__ import Resources

    assert Resources("kernel", arch, registers, 0, 0, 0, dynamic, threads).blocks_per_sm == blocks


@pytest.mark.parametrize("problems, errors, status", [(0, 0, 0), (1, 0, 1), (0, 1, 1), (2, 3, 1)])
def test_the_compile_report_exits_1_on_any_problem_or_compile_error_and_prints_each(monkeypatch, capsys, problems,
                                                                                   errors, status):
    from npllama.kernels import __main__ as report

    class FakeNvrtc:
        @staticmethod
        def getVersion():
            return (13, 0)

    fine = report.Resources("fine", "sm_80", 32, 0, 0, 0, 1024)
    spilling = report.Resources("spilling", "sm_90", 255, 8, 8, 0, 1024)
    monkeypatch.setattr(report, "nvrtc_module", FakeNvrtc)
    monkeypatch.setattr(report, "report", lambda nvrtc: ([fine] + [spilling] * problems,
                                                         [f"broken.cu for sm_80: error {i}" for i in range(errors)]))
    assert report.main([]) == status
    out, err = capsys.readouterr()
    assert f"{1 + problems} instances, {problems} with a problem, {errors} compile errors" in out
    assert out.count("spills 8 bytes") == problems
    assert err.count("error: broken.cu for sm_80: error") == errors


@pytest.mark.skipif(__import__("importlib").util.find_spec("cupy_backends") is None,
                    reason="CuPy is not installed: pip install '.[test]' installs it with the pinned NVRTC")
def test_the_compile_report_fails_on_a_compile_error_with_nvrtcs_message():
    from npllama.kernels.__main__ import CompileError, compile_instances, nvrtc_module

    with pytest.raises(CompileError, match="undefined"):
        compile_instances(nvrtc_module(), "__global__ void kernel() { undefined_name(); }", "broken.cu",
                          ["kernel"], "sm_80")


def test_every_kernel_source_and_header_ships_in_the_wheel_and_each_header_is_pasted_once():
    """A wheel carries the kernel folder's files that pyproject.toml's package data names: every
    .cu a module compiles and every header one includes must match those globs (a header left out
    breaks every CuPy run of an installed npllama, while tests from the checkout pass)."""
    import fnmatch
    import re

    from npllama import kernels
    from npllama.kernels.__main__ import SOURCES

    pyproject = (KERNELS.parents[1] / "pyproject.toml").read_text()
    globs = re.findall(r'"([^"]+)"', re.search(r'^"npllama\.kernels" = \[(.*)\]$', pyproject, re.MULTILINE).group(1))
    assert tuple(globs) == kernels.PACKAGE_DATA
    needed = set(SOURCES)
    for source in SOURCES:
        needed |= set(kernels.LOCAL_INCLUDE.findall((KERNELS / source).read_text()))
    for name in needed:
        assert (KERNELS / name).is_file() and any(fnmatch.fnmatch(name, glob) for glob in globs), name
    for source, module in SOURCES.items():
        text = module.source()
        assert not kernels.LOCAL_INCLUDE.search(text), f"{source}: an include left for NVRTC to find"
    assert kernels.kernel_source("swiglu.cu").count("unsigned short float_to_half(float f)") == 1
    assert "float_to_half(float f)" not in kernels.kernel_source("swiglu.cu", pasted={"float16.cuh"})
