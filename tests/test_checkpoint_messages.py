"""The sentences of npllama.checkpoint.messages that say why tensors or a config do not fit, and
CheckpointError's one line, as contracts over any input rather than the few a checkpoint fixture
produces: any set of tensors against any expected set, any two configs, any what/where/fix text.
"""

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from npllama.checkpoint.messages import CheckpointError, config_differences, tensor_problem
from npllama.errors import NpllamaError, few

# names without commas or newlines, so a message can be split back into them
names = st.text(string.ascii_letters + string.digits + "._", min_size=1, max_size=12)


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


CHANGES = ["none", "missing", "unexpected", "missing-and-unexpected", "shape", "dtype", "mixed"]


@st.composite
def tensor_sets(draw, change):
    """(expected {name: shape}, found {name: (shape, dtype)}, what changed): found is expected in
    float32 or float64, then changed as `change` says: tensors missing, tensors added, both, one
    shape one size off (the same rank), some tensors in another dtype, or some in the other float."""
    expected = draw(st.dictionaries(names, shapes, min_size=2, max_size=8))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    found = {name: (shape, dtype) for name, shape in expected.items()}
    some = draw(st.lists(st.sampled_from(sorted(expected)), min_size=1, max_size=len(expected) - 1, unique=True))
    detail = some
    if change in ("missing", "missing-and-unexpected"):
        for name in some:
            del found[name]
    if change in ("unexpected", "missing-and-unexpected"):
        detail = draw(st.lists(names.filter(lambda n: n not in expected), min_size=1, max_size=5, unique=True))
        found.update({name: ((1,), dtype) for name in detail})
    if change == "shape":
        shape = expected[some[0]]
        detail = (some[0], shape, shape[:-1] + (shape[-1] + 1,))
        found[some[0]] = (detail[2], dtype)
    if change in ("dtype", "mixed"):
        other = (draw(st.sampled_from(["float16", "bfloat16", "int64", "uint8"])) if change == "dtype"
                 else {"float32": "float64", "float64": "float32"}[dtype])
        found.update({name: (expected[name], other) for name in some})
        detail = other
    return expected, found, detail


@pytest.mark.parametrize("change", CHANGES)
@given(data=st.data())
def test_tensors_fit_exactly_when_every_name_and_shape_is_expected_in_one_float_dtype(change, data):
    expected, found, detail = data.draw(tensor_sets(change))
    problem = tensor_problem(found, expected)
    if change == "none":
        assert problem is None
    elif change == "missing":
        in_order = [name for name in expected if name in detail]  # named as the config lists them
        assert problem == f"missing {len(detail)} tensor(s): {few(in_order)}"
    elif change == "unexpected":
        assert problem.startswith(f"{len(detail)} unexpected tensor(s): ")
    elif change == "missing-and-unexpected":
        assert problem.startswith("missing ") and f" and {len(detail)} unexpected tensor(s): " in problem
    elif change == "shape":
        name, wanted, got = detail
        assert problem == f"{name} has shape {got}, this config needs {wanted}"
    elif change == "dtype":
        assert f"{detail}; checkpoints hold float32 or float64" in problem
    else:
        assert problem.startswith("mixed dtypes: ") and "float32 (" in problem and "float64 (" in problem


config_values = st.one_of(st.integers(-3, 3), st.floats(allow_nan=False), st.booleans(), st.none(), names)


@given(st.dictionaries(names, st.tuples(config_values, config_values), min_size=1, max_size=8))
def test_config_differences_name_every_field_that_differs_with_both_values_and_no_other(fields):
    theirs = {key: pair[0] for key, pair in fields.items()}
    ours = {key: pair[1] for key, pair in fields.items()}
    message = config_differences(theirs, ours)
    parts = [part for part in message.split(", checkpoint has ") if part]
    differing = [key for key in fields if theirs[key] != ours[key]]
    assert len(parts) == len(differing)
    for key in differing:
        assert f"{key}={theirs[key]!r}, this run has {key}={ours[key]!r}" in message


@given(st.text(max_size=40), st.text(string.printable, max_size=20), st.text(max_size=40))
@example("a tensor\nis missing", "run/step-1", "pass\r\n--resume\tagain")
def test_a_checkpoint_error_is_one_line_whatever_its_parts(what, where, fix):
    error = CheckpointError(what, where, fix)
    message = str(error)
    assert isinstance(error, NpllamaError) and isinstance(error, ValueError)
    assert "\n" not in message and "\r" not in message
    assert message.startswith("checkpoint ") and (error.what, error.fix) == (what, fix)
    assert message.split() == f"checkpoint {where}: {what}; {fix}".split()  # the words kept, in order
