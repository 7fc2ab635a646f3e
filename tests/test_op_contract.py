"""The op contract: `y, cache = op.forward(...)`, `op.backward(dy, cache)`, where backward takes
exactly the cache its forward returned and callers never open or build one."""

import ast
import dataclasses
import inspect
import pathlib

import numpy

import npllama
from assertions import assert_same
from npllama import model, ops
from npllama import params as params_table
from npllama.ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu
from strategies import rng_from

PACKAGE_DIR = pathlib.Path(npllama.__file__).parent
OPS = (attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu)


def forward_of_every_op():
    """(op module, its forward's result) for one small input each."""
    rng = rng_from(0)
    x = rng.standard_normal((2, 3, 4))
    heads = rng.standard_normal((2, 1, 3, 4))
    cos, sin = rope.frequencies(4, numpy.arange(3))
    return [
        (attention, attention.forward(heads, heads, heads, tile_size=2)),
        (cross_entropy, cross_entropy.forward(x, numpy.array([[0, 1, 2], [3, 0, 1]]))),
        (embedding, embedding.forward(numpy.array([[0, 1, 1]]), rng.standard_normal((5, 4)))),
        (linear, linear.forward(x, rng.standard_normal((6, 4)))),
        (rmsnorm, rmsnorm.forward(x, numpy.ones(4))),
        (rope, rope.forward(heads.transpose(0, 2, 1, 3), cos, sin)),  # (B, T, H, D)
        (swiglu, swiglu.forward(x, x)),
    ]


def test_every_op_returns_its_own_cache_dataclass():
    for op, (_, cache) in forward_of_every_op():
        cache_types = [value for name, value in vars(op).items() if name.endswith("Cache")]
        assert len(cache_types) == 1, op.__name__
        assert type(cache) is cache_types[0] and dataclasses.is_dataclass(cache), op.__name__


def test_every_backward_names_its_incoming_gradient_dy():
    """backward(dy, cache); anything else is keyword-only with a default (how to run it, such as
    attention's pool of threads, never what it computes)."""
    for op in OPS:
        parameters = list(inspect.signature(op.backward).parameters.values())
        assert [parameter.name for parameter in parameters[:2]] == ["dy", "cache"], op.__name__
        assert all(parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is not inspect.Parameter.empty
                   for parameter in parameters[2:]), op.__name__


def test_linear_save_for_backward_is_the_cache_forward_returns():
    x, weight = rng_from(1).standard_normal((2, 3, 4)), rng_from(2).standard_normal((5, 4))
    _, cache = linear.forward(x, weight)
    rebuilt = linear.save_for_backward(x, weight)
    assert type(rebuilt) is type(cache)
    dy = rng_from(3).standard_normal((2, 3, 5))
    for got, expected in zip(linear.backward(dy, rebuilt), linear.backward(dy, cache)):
        assert_same(got, expected)


def test_model_never_builds_or_opens_an_op_cache():
    """model.py names no op's cache class, passes no literal tuple as a cache, and reads no cache field.

    Every cache it hands to an op's backward came from an op: a forward, or, for a linear whose
    input selective recompute dropped, `linear.save_for_backward`.
    """
    tree = ast.parse((PACKAGE_DIR / "model.py").read_text())
    op_names = set(ops.__all__)
    cache_fields = {field.name for _, (_, cache) in forward_of_every_op() for field in dataclasses.fields(cache)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in op_names:
            assert not node.attr.endswith("Cache"), f"model.py line {node.lineno} names {node.value.id}.{node.attr}"
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in op_names):
            cache_arg = node.args[1]
            assert not isinstance(cache_arg, (ast.Tuple, ast.List, ast.Dict, ast.Call)), \
                f"model.py line {node.lineno} builds a cache for {node.func.value.id}.backward"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and "cache" in node.value.id:
            assert node.attr not in cache_fields - {"ops", "activations"}, \
                f"model.py line {node.lineno} reads {node.value.id}.{node.attr}"


class _OtherAttention:
    """Another attention implementation: same math, a cache of its own making (a dict in a list).
    `pool` (threads it may use, npllama/parallel.py) it is free to ignore."""

    DEFAULT_TILE_SIZE = attention.DEFAULT_TILE_SIZE

    @staticmethod
    def forward(q, k, v, tile_size=attention.DEFAULT_TILE_SIZE, scale=None, *, pool=None):
        out, cache = attention.forward(q, k, v, tile_size, scale)
        return out, [{"wrapped": cache}]

    @staticmethod
    def backward(dy, cache, *, pool=None):
        return attention.backward(dy, cache[0]["wrapped"])


def test_another_attention_implementation_slots_in_without_a_change_to_the_block(monkeypatch):
    config = model.PRESETS["nano"]
    params = model.init_params(config, dtype="float64")
    rng = rng_from(4)
    tokens, targets = rng.integers(0, config.vocab_size, (2, 9)), rng.integers(0, config.vocab_size, (2, 9))
    expected = {recompute: model.loss_and_grads(params, config, tokens, targets, recompute=recompute)
                for recompute in (True, False)}
    monkeypatch.setattr(model, "attention", _OtherAttention)
    for recompute, (expected_loss, expected_grads) in expected.items():
        loss, grads = model.loss_and_grads(params, config, tokens, targets, recompute=recompute)
        assert loss == expected_loss
        for name in params_table.parameter_table(config):
            assert_same(grads[name], expected_grads[name], err_msg=name)
