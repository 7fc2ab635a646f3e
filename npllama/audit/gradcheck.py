"""Finite-difference checks of hand-derived gradients, shared by the tests and `npllama.audit`.

For a scalar function f and its claimed gradient g = df/dx, two kinds of check, both in float64
with the fourth-order central difference

    D(h) = [8 (f(x + h u) - f(x - h u)) - (f(x + 2h u) - f(x - 2h u))] / (12 h)  ~  f'(x; u)

* directions: u drawn at random with |u| = 1; the check compares D with <g, u> and its
  relative error is |D - <g, u>| / |g|, the error as a fraction of the steepest slope
  (the largest <g, u> any unit direction can give);
* elements: u = e_i for every entry of a small tensor (or a random sample of a big one); the
  relative error is |D - g_i| / max_j |g_j|, the error as a fraction of the largest entry.

Both are scale-free norm-wise relative errors: they cannot be inflated by an entry that happens
to be near zero, and a wrong entry anywhere above a millionth of the gradient's size fails.

The step. D(h) has a truncation error of order (h/s)^4 when f varies on a scale s, and a
rounding error of about r = eps_machine * F / h, F the size of the terms summed into f. The
first step is h = 1e-4 * rms(x), relative to the input's own scale; then D(h/4) is computed too,
and while the two disagree by more than rounding can explain, h is divided by 4 again (at most
five times). Near a feature much narrower than x (an RMSNorm row whose entries are all near 0
varies on the scale sqrt(eps)) the step shrinks until the difference has converged; elsewhere
the first pair already agrees. The choice never looks at g.

A gradient can also be exactly zero (attention's dq at T = 1: one key, softmax = 1 whatever q
is), where any relative error is rounding noise over nothing. So the denominator never drops
below the scale the differences can resolve: gradients smaller than r * 100 / rtol (about
2e-4 F / rms(x)) are judged against that floor, i.e. with an absolute tolerance of 100 r.
Above it, the check is purely relative.

An op is checked through f(x) = sum(forward(x) * w) for a fixed random cotangent w, whose
gradient is exactly what backward(w) claims to return.

What cannot be compared fails, with the reason in `CheckResult.problem`: a gradient of another
shape or dtype than its input, a gradient with a NaN or an infinity, a forward value that is not
finite at the input, a finite difference that is not finite (the forward blows up within a few
steps of the input), or a backward that returns the wrong number of gradients. A NaN never
compares as an error of 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy

from ..backend import array_namespace, to_host

DEFAULT_RTOL = 1e-6
DEFAULT_STEP = 1e-4
MAX_REFINEMENTS = 5
EPS = float(numpy.finfo(numpy.float64).eps)


@dataclass
class CheckResult:
    """One row of the audit: the gradient of `op` with respect to `wrt`."""

    op: str
    wrt: str
    max_abs_err: float
    max_rel_err: float
    passed: bool
    n_directions: int = 0
    n_elements: int = 0
    problem: str | None = None  # why the gradient could not be compared (then passed is False)

    def to_dict(self) -> dict:
        """The JSON row: errors that are not finite (or were never computed) become null."""
        data = asdict(self)
        row = {key: data[key] for key in ("op", "wrt", "max_abs_err", "max_rel_err", "passed", "problem")}
        for key in ("max_abs_err", "max_rel_err"):
            row[key] = row[key] if math.isfinite(row[key]) else None
        return row


class NotComparable(Exception):
    """A gradient check that cannot produce a number: the message says what and where."""


def _failed(op: str, wrt: str, problem: str) -> CheckResult:
    return CheckResult(op, wrt, math.nan, math.nan, False, problem=problem)


def describe_non_finite(array) -> str | None:
    """None if every entry is finite, else e.g. "3 of 12 entries are not finite (nan), the first at (0, 2)"."""
    finite = numpy.isfinite(array)
    if finite.all():
        return None
    bad = array[~finite]
    kinds = [kind for kind, present in (("nan", numpy.isnan(bad).any()), ("+inf", (bad == numpy.inf).any()),
                                        ("-inf", (bad == -numpy.inf).any())) if present]
    first = tuple(int(i) for i in numpy.argwhere(~finite)[0])
    return f"{bad.size} of {array.size} entries are not finite ({', '.join(kinds)}), the first at {first}"


def directional_derivative(func, inputs: dict, name: str, direction, step: float = DEFAULT_STEP) -> float:
    """The fourth-order central difference D(step) of func(inputs) along `direction` in inputs[name].

    Raises NotComparable if func is not finite at one of the four points.
    """
    base = inputs[name]

    def at(t):
        shifted = dict(inputs)
        shifted[name] = base + t * direction
        value = float(func(shifted))
        if not math.isfinite(value):
            raise NotComparable(f"the finite differences are not finite: the forward is {value} at "
                                f"{t:+.3g} x a unit direction from the input")
        return value

    # Python floats: finite values whose differences overflow give inf or nan here, silently
    estimate = (8.0 * (at(step) - at(-step)) - (at(2 * step) - at(-2 * step))) / (12.0 * step)
    if not math.isfinite(estimate):
        raise NotComparable(f"the finite differences are not finite: the forward is finite near the input, "
                            f"but its differences overflow to {estimate} (step {step:.3g})")
    return estimate


def converged_derivative(func, inputs: dict, name: str, direction, step: float, f_scale: float,
                         agreement: float) -> float:
    """D(h) for h = step, step/4, ...: stop when two successive estimates agree.

    They agree when they differ by less than `agreement` (a small fraction of the gradient's
    scale) or by less than what rounding alone produces at the finer step.
    """
    coarse = directional_derivative(func, inputs, name, direction, step)
    for _ in range(MAX_REFINEMENTS):
        step /= 4.0
        fine = directional_derivative(func, inputs, name, direction, step)
        if abs(fine - coarse) <= max(agreement, 10.0 * EPS * f_scale / step):
            return fine
        coarse = fine
    return coarse


def check_gradient(op: str, func, inputs: dict, name: str, grad, rng, *, n_directions: int = 4,
                   max_elements: int = 48, rtol: float = DEFAULT_RTOL, step: float = DEFAULT_STEP,
                   f_scale: float | None = None, label: str | None = None) -> CheckResult:
    """Compare `grad` (claimed df/d inputs[name]) with finite differences of the scalar `func`.

    Checks `n_directions` random unit directions and up to `max_elements` single entries (all of
    them when the tensor is that small, else a random sample without repetition). `f_scale` is
    the size of the terms summed into f (default |f(inputs)|), which sets the rounding floor.
    A gradient that cannot be compared (see the module's docstring) fails with its `problem`.
    """
    label = label or name
    try:
        return _check_gradient(op, func, inputs, name, grad, rng, n_directions=n_directions,
                               max_elements=max_elements, rtol=rtol, step=step, f_scale=f_scale, label=label)
    except NotComparable as reason:
        return _failed(op, label, str(reason))


def _comparable_gradient(inputs: dict, name: str, grad) -> numpy.ndarray:
    """grad on the host as float64, after checking its shape, dtype and finiteness against inputs[name]."""
    grad_host = to_host(grad)
    expected = inputs[name]
    if grad_host.shape != tuple(expected.shape):
        raise NotComparable(f"the gradient has shape {grad_host.shape}, the input {tuple(expected.shape)}")
    if grad_host.dtype != expected.dtype:
        raise NotComparable(f"the gradient has dtype {grad_host.dtype}, the input {expected.dtype}")
    non_finite = describe_non_finite(grad_host)
    if non_finite:
        raise NotComparable(f"the gradient is not finite: {non_finite}")
    return grad_host.astype(numpy.float64)


def _norm(array) -> float:
    """|array|, without the overflow of squaring entries above 1e154."""
    with numpy.errstate(over="ignore"):  # the overflow is the case handled below
        norm = float(numpy.linalg.norm(array))
    if math.isinf(norm):
        largest = float(numpy.abs(array).max())
        norm = largest * float(numpy.linalg.norm(array / largest))
    return norm


def _check_gradient(op, func, inputs, name, grad, rng, *, n_directions, max_elements, rtol, step, f_scale, label):
    xp = array_namespace(inputs[name])
    x_host = to_host(inputs[name]).astype(numpy.float64)
    non_finite = describe_non_finite(x_host)
    if non_finite:
        raise NotComparable(f"the input is not finite: {non_finite}")
    grad_host = _comparable_gradient(inputs, name, grad)
    shape = x_host.shape
    size = grad_host.size
    dtype = inputs[name].dtype
    input_rms = float(numpy.sqrt(numpy.mean(x_host**2))) if size else 0.0
    step = step * input_rms if input_rms > 0 else step
    value = float(func(inputs))
    if not math.isfinite(value):
        raise NotComparable(f"the forward is {value} at the input")
    f_scale = abs(value) if f_scale is None else f_scale
    if not math.isfinite(f_scale):
        raise NotComparable(f"the forward's terms are not finite at the input (their size is {f_scale})")
    floor = max(EPS * f_scale / step * 100.0 / rtol, numpy.finfo(numpy.float64).tiny)
    grad_norm = max(_norm(grad_host), floor)
    grad_max = max(float(numpy.abs(grad_host).max()) if size else 0.0, floor)
    if not (math.isfinite(floor) and math.isfinite(grad_norm)):
        raise NotComparable(f"the scales overflow float64: |gradient| = {grad_norm:.3g}, rounding floor {floor:.3g}")
    max_abs, max_rel = 0.0, 0.0

    def compare(direction, analytic, scale):
        nonlocal max_abs, max_rel
        numeric = converged_derivative(func, inputs, name, xp.asarray(direction.astype(dtype)), step, f_scale,
                                       agreement=1e-2 * rtol * scale)
        abs_err = abs(numeric - analytic)
        rel_err = abs_err / max(scale, abs(numeric))
        if not (math.isfinite(analytic) and math.isfinite(rel_err)):
            raise NotComparable(f"the comparison overflows float64: <gradient, direction> = {analytic:.3g}, "
                                f"finite difference {numeric:.3g}")
        max_abs = max(max_abs, abs_err)
        max_rel = max(max_rel, rel_err)

    for _ in range(n_directions):
        direction = rng.standard_normal(shape)
        direction /= numpy.linalg.norm(direction) or 1.0
        compare(direction, float((grad_host * direction).sum()), grad_norm)

    if size <= max_elements:
        flat_indices = numpy.arange(size)
    else:
        flat_indices = rng.choice(size, size=max_elements, replace=False)
    for flat in flat_indices:
        unit = numpy.zeros(size)
        unit[flat] = 1.0
        compare(unit.reshape(shape), float(grad_host.reshape(-1)[flat]), grad_max)

    passed = bool(math.isfinite(max_rel) and max_rel <= rtol)
    return CheckResult(op, label, max_abs, max_rel, passed, n_directions, len(flat_indices))


def check_op(op: str, forward, backward, inputs: dict, wrt: list[str], rng, **kwargs) -> list[CheckResult]:
    """Check every differentiable input of an op.

    `forward(**inputs)` returns (out, cache); `backward(dy, cache)` returns the gradients of
    the inputs named in `wrt`, in that order (a bare array when there is one).
    """
    xp = array_namespace(next(iter(inputs.values())))
    out, cache = forward(**inputs)
    cotangent = xp.asarray(rng.standard_normal(out.shape).astype(out.dtype))
    grads = backward(cotangent, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(wrt):
        return [_failed(op, name, f"backward returned {len(grads)} gradients for the {len(wrt)} inputs "
                                  f"{', '.join(wrt)}") for name in wrt]

    def func(values):
        value, _ = forward(**values)
        return (value * cotangent).sum()

    f_scale = float(abs(out * cotangent).sum())
    return [check_gradient(op, func, inputs, name, grad, rng, f_scale=f_scale, **kwargs)
            for name, grad in zip(wrt, grads)]
