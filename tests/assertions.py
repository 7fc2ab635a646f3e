"""Comparisons that cannot be passed by NaN.

`numpy.testing.assert_array_equal` and `assert_allclose` count two NaNs in the same place as
equal, and two infinities of one sign as close, so a computation that went non-finite on both
sides of a comparison would pass it. Every equality or closeness check in the suite goes through
these helpers, which first require both sides to be finite.
"""

import numpy


def assert_finite(*arrays, what=""):
    """Every entry of every array is finite (not NaN, not +-inf)."""
    for index, array in enumerate(arrays):
        values = numpy.asarray(array)
        if numpy.issubdtype(values.dtype, numpy.number) and not numpy.isfinite(values).all():
            bad = numpy.argwhere(~numpy.isfinite(values))
            raise AssertionError(f"{what or 'array'} #{index}: {len(bad)} of {values.size} entries are not "
                                 f"finite, the first at {tuple(int(i) for i in bad[0])}")


def assert_same(actual, expected, err_msg=""):
    """Bitwise-equal values (NaN never counts as equal to NaN) of the same shape."""
    assert_finite(actual, expected, what=err_msg)
    numpy.testing.assert_array_equal(actual, expected, err_msg=err_msg, strict=False)


def assert_close(actual, expected, rtol=1e-7, atol=0.0, err_msg=""):
    """|actual - expected| <= atol + rtol * |expected| entry by entry, both sides finite."""
    assert_finite(actual, expected, what=err_msg)
    numpy.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_differ(actual, other, err_msg=""):
    """Finite values that differ somewhere (two NaNs would 'differ' without proving anything)."""
    assert_finite(actual, other, what=err_msg)
    assert not numpy.array_equal(actual, other), f"{err_msg}: the arrays are equal"
