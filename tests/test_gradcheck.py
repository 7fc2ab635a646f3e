"""The checker itself: it fails a wrong gradient, and it fails whatever it cannot compare.

A gradient check that passes a NaN proves nothing, so every way a comparison can go blind (a NaN
or an infinity in the gradient, in the forward or in its finite differences; a gradient of another
shape or dtype; a backward that returns too few gradients) is a failure that says which.
"""

import numpy
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from npllama.audit import gradcheck
from npllama.audit import ops as audit
from npllama.ops import linear, rmsnorm, swiglu
from strategies import rng_from


def rmsnorm_inputs(seed=0):
    rng = rng_from(seed)
    return {"x": rng.standard_normal((2, 3, 5)), "weight": rng.standard_normal(5)}


def check_rmsnorm(backward, forward=rmsnorm.forward, inputs=None):
    return gradcheck.check_op("rmsnorm", forward, backward, inputs or rmsnorm_inputs(), ["x", "weight"],
                              rng_from(1))


def with_dx(make_dx):
    """rmsnorm's backward with dx replaced by make_dx(dx); dweight is left correct."""
    def backward(dy, cache):
        dx, dweight = rmsnorm.backward(dy, cache)
        return make_dx(dx), dweight
    return backward


def test_the_correct_backward_passes_with_no_problem():
    results = check_rmsnorm(rmsnorm.backward)
    assert [(r.passed, r.problem) for r in results] == [(True, None), (True, None)]
    assert all(0 <= r.max_rel_err < 1e-8 for r in results)


@given(seed=st.integers(0, 2**16), exponent=st.floats(-5, 0), sign=st.sampled_from([1, -1]))
@example(seed=0, exponent=-4, sign=1)  # a 0.01% error in dx
@example(seed=0, exponent=-5, sign=-1)  # ten times the relative error limit (1e-6)
def test_a_backward_wrong_by_any_factor_above_the_limit_fails_and_the_right_one_passes(seed, exponent, sign):
    """dx scaled by 1 + d, |d| from 10 rtol (1e-5) to 1: every entry and direction is off by |d| / |1 + d|
    relative to the largest of the two, so the check must fail with an error of about that size, the
    correct dweight must still pass, and the unscaled dx pass (a test that cannot fail is no test)."""
    wrong = sign * 10.0**exponent
    inputs = rmsnorm_inputs(seed)
    results = check_rmsnorm(with_dx(lambda dx: dx * (1 + wrong)), inputs=inputs)
    assert [r.passed for r in results] == [False, True] and results[0].problem is None
    assert abs(wrong) / (1 + abs(wrong)) / 2 < results[0].max_rel_err < 2 * abs(wrong)
    assert [r.passed for r in check_rmsnorm(rmsnorm.backward, inputs=inputs)] == [True, True]


def test_one_wrong_entry_fails():
    rng = rng_from(1)

    def linear_backward_with_one_bad_entry(dy, cache):
        dx, dweight = linear.backward(dy, cache)
        dweight = dweight.copy()
        dweight[1, 2] += 1e-3 * numpy.abs(dweight).max()
        return dx, dweight

    inputs = {"x": rng.standard_normal((4, 3)), "weight": rng.standard_normal((2, 3))}
    results = gradcheck.check_op("linear", linear.forward, linear_backward_with_one_bad_entry, inputs,
                                 ["x", "weight"], rng)
    assert [r.passed for r in results] == [True, False]


@pytest.mark.parametrize("bad_value, kind", [(numpy.nan, "nan"), (numpy.inf, "+inf"), (-numpy.inf, "-inf")])
@pytest.mark.parametrize("where", ["everywhere", "one entry"])
def test_a_gradient_with_a_non_finite_entry_fails_and_says_so(bad_value, kind, where):
    def plant(dx):
        dx = dx.copy()
        if where == "everywhere":
            dx[...] = bad_value
        else:
            dx[1, 2, 3] = bad_value
        return dx

    results = check_rmsnorm(with_dx(plant))
    assert [r.passed for r in results] == [False, True]
    problem = results[0].problem
    assert problem.startswith("the gradient is not finite") and kind in problem, problem
    if where == "one entry":
        assert "1 of 30 entries" in problem and "(1, 2, 3)" in problem, problem


def test_non_finite_finite_differences_fail_and_say_so():
    """A forward that is finite at the input but NaN a step away: nothing can be differenced."""
    inputs = rmsnorm_inputs()
    x0 = inputs["x"]

    def forward_undefined_off_the_input(x, weight):
        y, cache = rmsnorm.forward(x, weight)
        return numpy.where(x == x0, y, numpy.nan), cache

    results = check_rmsnorm(rmsnorm.backward, forward=forward_undefined_off_the_input, inputs=inputs)
    assert not results[0].passed
    assert results[0].problem.startswith("the finite differences are not finite: the forward is nan"), \
        results[0].problem


def test_finite_differences_that_overflow_fail_and_say_so():
    """f = 1.7e308 tanh(1e30 x0) is finite everywhere, but its differences around 0 overflow:
    a NaN estimate must not vanish from the running maximum (max(0, nan) is 0)."""
    x = numpy.array([0.0, 0.5])
    result = gradcheck.check_gradient("steep", lambda v: 1.7e308 * numpy.tanh(1e30 * v["x"][0]), {"x": x}, "x",
                                      numpy.array([1.0, 0.0]), rng_from(3), f_scale=1.0)
    assert not result.passed
    assert result.problem.startswith("the finite differences are not finite") and "overflow" in result.problem, \
        result.problem


def test_a_gradient_too_large_to_square_still_fails_where_it_is_wrong():
    """One entry of 1e160 is wrong by 1e160; its square overflows, which must not make every
    relative error err / inf = 0 (the entry checks sample 8 of 200 and may miss it)."""
    rng = rng_from(4)
    x = rng.standard_normal(200)
    wrong = 2 * x  # the gradient of sum(x^2) ...
    wrong[17] = 1e160  # ... but one entry
    for seed in range(5):
        result = gradcheck.check_gradient("square", lambda v: (v["x"] ** 2).sum(), {"x": x}, "x", wrong,
                                          rng_from(seed), max_elements=8)
        assert not result.passed and result.max_rel_err > 1e-2, result


def test_a_non_finite_input_fails_and_says_so_before_looking_at_the_gradient():
    inputs = rmsnorm_inputs()
    inputs["x"][0, 1, 2] = numpy.nan
    result = gradcheck.check_gradient("rmsnorm", lambda v: 0.0, inputs, "x", inputs["x"] * numpy.nan, rng_from(5))
    assert not result.passed
    assert result.problem == "the input is not finite: 1 of 30 entries are not finite (nan), the first at (0, 1, 2)"


def test_a_non_finite_scale_of_the_forwards_terms_fails_and_says_so():
    x = rng_from(6).standard_normal(4)
    result = gradcheck.check_gradient("square", lambda v: (v["x"] ** 2).sum(), {"x": x}, "x", 2 * x, rng_from(6),
                                      f_scale=numpy.inf)
    assert not result.passed and result.problem.startswith("the forward's terms are not finite"), result.problem


def test_a_forward_that_is_not_finite_at_the_input_fails_and_says_so():
    def forward_with_an_infinite_output(a, b):
        y, cache = swiglu.forward(a, b)
        y = y.copy()
        y[0, 0] = numpy.inf
        return y, cache

    rng = rng_from(2)
    inputs = {"a": rng.standard_normal((2, 4)), "b": rng.standard_normal((2, 4))}
    results = gradcheck.check_op("swiglu", forward_with_an_infinite_output, swiglu.backward, inputs, ["a", "b"], rng)
    assert [r.passed for r in results] == [False, False]
    assert all(r.problem == "the forward is inf at the input" for r in results), results


def test_a_gradient_of_the_wrong_shape_fails_and_names_both_shapes():
    results = check_rmsnorm(with_dx(lambda dx: dx[..., :4]))
    assert not results[0].passed
    assert results[0].problem == "the gradient has shape (2, 3, 4), the input (2, 3, 5)"


def test_a_transposed_gradient_of_the_right_size_fails_and_names_both_shapes():
    """dW as x^T dy is [in, out], the input's size but not its shape: it must not be reshaped to fit."""
    rng = rng_from(7)
    inputs = {"x": rng.standard_normal((4, 3)), "weight": rng.standard_normal((2, 3))}

    def linear_backward_with_dweight_transposed(dy, cache):
        dx, dweight = linear.backward(dy, cache)
        return dx, dweight.T

    results = gradcheck.check_op("linear", linear.forward, linear_backward_with_dweight_transposed, inputs,
                                 ["x", "weight"], rng)
    assert [r.passed for r in results] == [True, False]
    assert results[1].problem == "the gradient has shape (3, 2), the input (2, 3)"


def test_a_gradient_of_the_wrong_dtype_fails_and_names_both_dtypes():
    """The op contract is dtype in = dtype out: a float64 check given a float32 gradient fails."""
    results = check_rmsnorm(with_dx(lambda dx: dx.astype(numpy.float32)))
    assert not results[0].passed
    assert results[0].problem == "the gradient has dtype float32, the input float64"


def test_a_backward_returning_too_few_gradients_fails_every_input():
    results = check_rmsnorm(lambda dy, cache: rmsnorm.backward(dy, cache)[0])
    assert [(r.wrt, r.passed) for r in results] == [("x", False), ("weight", False)]
    assert results[0].problem == "backward returned 1 gradients for the 2 inputs x, weight"


def test_a_failed_row_writes_null_errors_to_json_and_its_problem_to_the_table():
    results = check_rmsnorm(with_dx(lambda dx: dx * numpy.nan))
    row = results[0].to_dict()
    assert row == {"op": "rmsnorm", "wrt": "x", "max_abs_err": None, "max_rel_err": None, "passed": False,
                   "problem": row["problem"]}
    table = audit.format_table(results)
    assert "FAIL: the gradient is not finite" in table
    assert table.splitlines()[-1] == "1 passed, 1 failed (relative error limit 1e-06, float64); failed: rmsnorm (x)"
