"""Worker threads (npllama/parallel.py): the batch cut into rows whose forward and backward run on
threads, added in row order, so the numbers are the same to the bit on any number of threads, and
those of the whole batch up to rounding (which, with the finite-difference tests of the whole
batch's gradients, makes them the loss's gradients)."""

from unittest import mock

import numpy
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from assertions import assert_close
from npllama import model as llama
from npllama import optim
from npllama.ops import attention, linear
from npllama.parallel import sliced_loss_and_grads, workers
from strategies import grouped_attention_problems, small_model_configs
from training import common, measured, read_metrics, train_cli


def batch(config, rows: int, length: int, seed: int, ignored: float = 0.0):
    rng = numpy.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (rows, length + 1))
    targets = tokens[:, 1:].copy()
    targets[rng.random(targets.shape) < ignored] = -100  # positions the loss ignores
    return tokens[:, :-1], targets


def on_threads(threads, params, config, tokens, targets):
    with workers(threads) as pool:
        loss, grads = sliced_loss_and_grads(params, config, tokens, targets, pool)
    return float(loss), grads


@settings(max_examples=8, deadline=None)
@given(config=small_model_configs(), rows=st.integers(1, 5), seed=st.integers(0, 2**16),
       ignored=st.sampled_from([0.0, 0.3]))
def test_the_loss_and_gradients_are_the_same_to_the_bit_on_one_two_and_three_threads(config, rows, seed, ignored):
    params = llama.init_params(config, seed=seed, std=0.5)
    tokens, targets = batch(config, rows, 6, seed, ignored)
    if (targets == -100).all():
        targets[0, 0] = 0
    one = on_threads(1, params, config, tokens, targets)
    for threads in (2, 3):
        loss, grads = on_threads(threads, params, config, tokens, targets)
        assert loss == one[0]
        assert all(numpy.array_equal(grads[name], one[1][name]) for name in params)


@settings(max_examples=8, deadline=None)
@given(config=small_model_configs(), rows=st.integers(1, 5), seed=st.integers(0, 2**16),
       ignored=st.sampled_from([0.0, 0.3]))
def test_the_sliced_loss_and_gradients_are_the_whole_batchs_up_to_rounding(config, rows, seed, ignored):
    """In float64, where the other order of the sums moves the last bits only (rtol 1e-10: the
    rounding of some thousand additions of terms of one size, with room)."""
    params = llama.init_params(config, seed=seed, std=0.5, dtype="float64")
    tokens, targets = batch(config, rows, 6, seed, ignored)
    if (targets == -100).all():
        targets[0, 0] = 0
    whole_loss, whole = llama.loss_and_grads(params, config, tokens, targets)
    loss, grads = on_threads(2, params, config, tokens, targets)
    assert loss == pytest.approx(whole_loss, rel=1e-12)
    for name in params:
        assert_close(grads[name], whole[name], rtol=1e-10, atol=1e-14, err_msg=name)


@settings(max_examples=4, deadline=None)
@given(config=small_model_configs(), rows=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_gradients_on_threads_match_finite_differences_of_the_loss(config, rows, seed):
    """The model's finite-difference check (npllama.audit), with the gradients from two threads."""
    from npllama.audit import gradcheck

    params = llama.init_params(config, seed=seed, std=0.5, dtype="float64")
    tokens, targets = batch(config, rows, 5, seed, ignored=0.2)
    if (targets == -100).all():
        targets[0, 0] = 0
    _, grads = on_threads(2, params, config, tokens, targets)
    rng = numpy.random.default_rng(seed)
    results = [gradcheck.check_gradient("threads", lambda values: llama.loss(values, config, tokens, targets), params,
                                        name, grads[name], rng, n_directions=2, max_elements=24) for name in params]
    assert all(result.passed for result in results), [result for result in results if not result.passed][:2]


def test_one_long_sequence_shares_its_heads_chunks_and_products_with_the_same_bits_on_any_thread_count(monkeypatch):
    """A batch of one row is one slice; the threads share its attention's heads, its output head's
    chunks of rows (made small here: 9 chunks), whose sums run in chunk order, and its linears'
    blocks of rows and of weight-gradient rows (made small here: 5 blocks of 8 rows, 1 to 6 blocks
    of features). The blocks are fixed by the shapes, so 1, 2 and 3 threads give the same bits; in
    float64 they are the serial numbers up to rounding (a BLAS may sum a block of 8 rows in
    another order than the whole product; rtol 1e-10 as in the whole-batch test above)."""
    config = llama.PRESETS["nano"]
    monkeypatch.setattr(llama, "HEAD_CHUNK_ELEMENTS", 4 * config.vocab_size)  # 4 rows a chunk
    monkeypatch.setattr(linear, "ROWS_PER_TASK", 8)
    monkeypatch.setattr(linear, "FEATURES_PER_TASK", 32)
    tokens, targets = batch(config, 1, 35, seed=2, ignored=0.2)
    params = llama.init_params(config, seed=0, std=0.5)
    one = on_threads(1, params, config, tokens, targets)
    for threads in (2, 3):
        loss, grads = on_threads(threads, params, config, tokens, targets)
        assert loss == one[0]
        assert all(numpy.array_equal(grads[name], one[1][name]) for name in params)
    params = llama.init_params(config, seed=0, std=0.5, dtype="float64")
    serial_loss, serial = llama.loss_and_grads(params, config, tokens, targets)
    loss, grads = on_threads(2, params, config, tokens, targets)
    assert loss == pytest.approx(serial_loss, rel=1e-12)
    for name in params:
        assert_close(grads[name], serial[name], rtol=1e-10, atol=1e-14, err_msg=name)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), n_in=st.integers(1, 12), n_out=st.integers(1, 40), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["float32", "float64"]))
def test_a_linear_by_blocks_on_threads_gives_the_same_bits_on_any_thread_count_and_the_whole_products(
        rows, n_in, n_out, seed, dtype):
    """y and dx by blocks of 4 rows, dW by blocks of 3 of its rows: the same bits on 1, 2 and 3
    threads, and the unblocked products up to the rounding of a sum over n_in or rows terms
    (float32: rtol 1e-5, some 40 terms of one size; float64: 1e-12)."""
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((rows, n_in)).astype(dtype)
    weight = rng.standard_normal((n_out, n_in)).astype(dtype)
    dy = rng.standard_normal((rows, n_out)).astype(dtype)
    whole_y, cache = linear.forward(x, weight)
    whole_dx, whole_dweight = linear.backward(dy, cache)
    results = []
    for threads in (1, 2, 3):
        with pytest.MonkeyPatch.context() as patch, workers(threads) as pool:
            patch.setattr(linear, "ROWS_PER_TASK", 4)
            patch.setattr(linear, "FEATURES_PER_TASK", 3)
            y, cache = linear.forward(x, weight, pool=pool)
            results.append((y, *linear.backward(dy, cache, pool=pool)))
    for other in results[1:]:
        assert all(numpy.array_equal(got, first) for got, first in zip(other, results[0]))
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for got, whole in zip(results[0], (whole_y, whole_dx, whole_dweight)):
        assert got.dtype == whole.dtype and got.shape == whole.shape
        assert_close(got, whole, rtol=rtol, atol=rtol * numpy.abs(whole).max(initial=1.0))


@settings(max_examples=20, deadline=None)
@given(problem=grouped_attention_problems(), multi_head=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["float32", "float64"]))
def test_attention_by_head_groups_on_threads_is_the_serial_attention_to_the_bit(problem, multi_head, seed, dtype):
    batch_size, n_kv_heads, group, seq, head_dim, tile_size = problem
    if multi_head:  # every query head its own key/value head
        n_kv_heads, group = n_kv_heads * group, 1
    rng = numpy.random.default_rng(seed)
    q = rng.standard_normal((batch_size, n_kv_heads * group, seq, head_dim)).astype(dtype)
    k, v = (rng.standard_normal((batch_size, n_kv_heads, seq, head_dim)).astype(dtype) for _ in range(2))
    dy = rng.standard_normal(q.shape).astype(dtype)
    serial_out, serial_cache = attention.forward(q, k, v, tile_size)
    serial_grads = attention.backward(dy, serial_cache)
    with workers(2) as pool:
        out, cache = attention.forward(q, k, v, tile_size, pool=pool)
        grads = attention.backward(dy, cache, pool=pool)
    assert numpy.array_equal(out, serial_out) and numpy.array_equal(cache.lse, serial_cache.lse)
    assert all(numpy.array_equal(got, expected) and got.dtype == expected.dtype
               for got, expected in zip(grads, serial_grads))


def test_a_row_whose_targets_are_all_ignored_adds_nothing_and_a_batch_of_them_is_refused():
    config = llama.PRESETS["nano"]
    params = llama.init_params(config, seed=0, dtype="float64")
    tokens, targets = batch(config, 3, 8, seed=1)
    targets[1] = -100
    loss, grads = on_threads(2, params, config, tokens, targets)
    kept = [0, 2]
    whole_loss, whole = llama.loss_and_grads(params, config, tokens[kept], targets[kept])
    assert loss == pytest.approx(whole_loss, rel=1e-12)
    assert_close(grads["output.weight"], whole["output.weight"], rtol=1e-10, atol=1e-14)
    targets[:] = -100
    with pytest.raises(ValueError, match="every target is ignore_index"):
        on_threads(2, params, config, tokens, targets)


def test_a_failure_on_one_thread_is_raised_and_no_thread_waits_for_ever():
    config = llama.PRESETS["nano"]
    params = llama.init_params(config, seed=0)
    tokens, targets = batch(config, 4, 8, seed=1)
    tokens[1, 3] = config.vocab_size + 5  # outside the embedding: the row on its thread raises
    with pytest.raises(ValueError):
        on_threads(3, params, config, tokens, targets)


def laid_out(values, layout: str):
    """A new array of `values`: C-ordered, Fortran-ordered (a transposed checkpoint's), or every other
    column of a wider buffer (contiguous in neither order)."""
    if layout == "F":
        return numpy.array(values, order="F")  # a copy, even of an array already in that order
    if layout == "strided":
        wide = numpy.zeros((values.shape[0], 2 * values.shape[1]), values.dtype)
        wide[:, ::2] = values
        return wide[:, ::2]
    return values.copy()


EXAMPLE = numpy.random.default_rng(0).standard_normal((12, 8))  # a matrix, a gain: cut into blocks


@st.composite
def parameter_sets(draw):
    """{name: (values, layout, grad)} of float32 or float64: norm gains (1-d, not decayed) and
    matrices (decayed), each in any layout."""
    rng = numpy.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    sets = {}
    for i in range(draw(st.integers(1, 4))):
        matrix = draw(st.booleans())
        shape = (draw(st.integers(1, 9)), draw(st.integers(1, 9))) if matrix else (draw(st.integers(1, 12)),)
        layout = draw(st.sampled_from(["C", "F", "strided"])) if len(shape) == 2 else "C"
        sets[f"p{i}.weight"] = (rng.standard_normal(shape).astype(dtype), layout,
                                rng.standard_normal(shape).astype(dtype))
    return sets


@given(sets=parameter_sets(), block=st.integers(1, 50), threads=st.integers(2, 3), steps=st.integers(1, 3),
       weight_decay=st.sampled_from([0.0, 0.1]))
@example(sets={"w.weight": (EXAMPLE[:6], "C", EXAMPLE[6:12]), "f.weight": (EXAMPLE[:6], "F", EXAMPLE[6:12]),
               "norm.weight": (EXAMPLE[0], "C", EXAMPLE[1])}, block=10, threads=2, steps=2, weight_decay=0.1)
def test_adamw_and_the_gradient_norm_on_threads_are_the_bits_of_one_thread_updating_in_place(sets, block, threads,
                                                                                           steps, weight_decay):
    """On threads, AdamW updates each contiguous parameter of more than UPDATE_BLOCK elements by blocks
    of its flat elements (made small here, so most are cut) and any other whole: the same bits as one
    thread, m and v too, written into the parameters the caller holds, whatever their layout."""
    config = optim.AdamWConfig(weight_decay=weight_decay)
    grads = {name: grad for name, (_, _, grad) in sets.items()}
    serial = {name: laid_out(values, layout) for name, (values, layout, _) in sets.items()}
    threaded = {name: laid_out(values, layout) for name, (values, layout, _) in sets.items()}
    objects = {name: id(param) for name, param in threaded.items()}
    serial_state, threaded_state = optim.init_state(serial), optim.init_state(threaded)
    with mock.patch.object(optim, "UPDATE_BLOCK", block), workers(threads) as pool:
        assert optim.global_norm(grads, pool) == optim.global_norm(grads)
        for _ in range(steps):
            optim.step(serial, grads, serial_state, lr=1e-2, config=config)
            optim.step(threaded, grads, threaded_state, lr=1e-2, config=config, pool=pool)
    for name, (before, _, _) in sets.items():
        assert id(threaded[name]) == objects[name] and not numpy.array_equal(threaded[name], before)
        for ours, theirs in ((threaded[name], serial[name]), (threaded_state.m[name], serial_state.m[name]),
                             (threaded_state.v[name], serial_state.v[name])):
            assert numpy.array_equal(ours, theirs) and ours.tobytes() == theirs.tobytes()


def test_training_on_one_two_and_three_threads_logs_and_saves_the_same_numbers(corpus, tmp_path):
    runs = {}
    for threads in (1, 2, 3):
        out = f"threads-{threads}"
        result = train_cli(*common(corpus, tmp_path, out), "--steps", "4", "--eval-every", "2",
                           "--threads", str(threads))
        assert result.returncode == 0, result.stderr
        assert f"; {threads} worker thread" in result.stderr
        runs[threads] = tmp_path / out
    assert len(read_metrics(runs[1])) > 4
    result = train_cli(*common(corpus, tmp_path, "whole"), "--steps", "4", "--eval-every", "2", "--threads", "0")
    assert result.returncode == 0 and "worker thread" not in result.stderr, result.stderr
    assert measured(tmp_path / "whole") != measured(runs[1])  # the whole batch at once: another order of sums
    for threads in (2, 3):
        assert measured(runs[threads]) == measured(runs[1])
        for file in ("model.safetensors", "optimizer.safetensors"):
            assert (runs[threads] / "step-00000004" / file).read_bytes() == \
                (runs[1] / "step-00000004" / file).read_bytes(), file


def test_the_default_thread_count_is_the_cores_this_process_may_run_on_and_zero_workers_are_refused(monkeypatch):
    """A container or `taskset -c 0` narrows the affinity below os.cpu_count(): the default follows it."""
    from npllama import parallel

    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 64)
    assert parallel.available_cores() == 1
    with pytest.raises(ValueError, match="workers: threads must be at least 1, got 0"):
        with workers(0):
            pass
