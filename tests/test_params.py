"""The parameter table: Meta's names and shapes, roles that decide initialisation and decay, and
no other module spelling a parameter's name."""

import ast
import pathlib

import numpy
import pytest

import npllama
from npllama import model, optim
from npllama import params as params_table
from npllama.params import FINAL_NORM, GGUF_ROPE_FREQS, OUTPUT_HEAD, TOK_EMBEDDINGS, gguf_names, layer_name

PACKAGE_DIR = pathlib.Path(npllama.__file__).parent


def test_the_table_has_metas_names_and_shapes_for_the_7b_model():
    table = params_table.parameter_table(model.PRESETS["7B"])
    assert len(table) == 1 + 32 * 9 + 2
    assert list(table)[:10] == ["tok_embeddings.weight"] + [
        f"layers.0.{suffix}.weight" for suffix in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                                    "attention_norm", "ffn_norm")]
    assert list(table)[-2:] == ["norm.weight", "output.weight"]
    shapes = {name: spec.shape for name, spec in table.items()}
    assert shapes["tok_embeddings.weight"] == shapes["output.weight"] == (32000, 4096)
    assert shapes["layers.31.attention.wo.weight"] == (4096, 4096)
    # linear weights are [out, in]: W1 and W3 map C -> F, W2 maps F -> C
    assert shapes["layers.5.feed_forward.w1.weight"] == shapes["layers.5.feed_forward.w3.weight"] == (11008, 4096)
    assert shapes["layers.5.feed_forward.w2.weight"] == (4096, 11008)
    assert shapes["layers.5.ffn_norm.weight"] == shapes["norm.weight"] == (4096,)


def test_roles_decide_weight_decay_as_adamw_does():
    """AdamW decays matrices and not 1-D gains; the table's roles say the same for every parameter."""
    config = model.PRESETS["nano"]
    params = model.init_params(config)
    for name, spec in params_table.parameter_table(config).items():
        assert spec.decays == optim.decays(params[name]), name
        assert spec.decays == (spec.role != params_table.NORM), name


@pytest.mark.parametrize("preset", ["nano", "tiny"])
def test_initialisation_follows_the_roles(preset):
    """Norm gains start at 1; wo and w2 (writing into the residual stream) at std / sqrt(2 L); the rest
    at std. The sample standard deviations of these sizes are within 10% of the targets."""
    config = model.PRESETS[preset]
    std = 0.02
    params = model.init_params(config, std=std, dtype="float64")
    residual_std = std / numpy.sqrt(2 * config.n_layers)
    for name, spec in params_table.parameter_table(config).items():
        value = params[name]
        if spec.role == params_table.NORM:
            assert (value == 1.0).all(), name
            continue
        expected = residual_std if spec.residual else std
        assert value.std() == pytest.approx(expected, rel=0.1), name
        assert spec.residual == name.endswith(("wo.weight", "w2.weight")), name


def test_layer_weights_and_layer_name_address_the_same_entries():
    config = model.PRESETS["nano"]
    params = model.init_params(config)
    weights = params_table.layer_weights(params, 1)
    assert set(weights) == set(params_table.LAYER_SUFFIXES)
    assert all(weights[short] is params[params_table.layer_name(1, short)] for short in weights)


def spelled_parameter_names(path):
    """String constants in a module's code (not its docstrings) that look like a parameter's name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and node.value.endswith(".weight")]


def test_no_module_but_the_table_spells_a_parameter_name():
    spelled = {f.relative_to(PACKAGE_DIR).as_posix(): spelled_parameter_names(f) for f in PACKAGE_DIR.rglob("*.py")}
    assert spelled.pop("params.py")  # the table itself, which the scan does see
    assert not any(spelled.values()), {name: found for name, found in spelled.items() if found}


def test_the_gguf_names_are_the_gguf_packages_for_each_role():
    """llama.cpp's names come from its gguf package (the oracle: a GGUF file written and read by
    npllama alone would agree with itself under any names): embedding, final norm, head, each
    block's norms and projections, W1 the gate and W3 the up projection."""
    constants = pytest.importorskip("gguf.constants", reason="the gguf package is the oracle: pip install '.[test]'")
    tensor = constants.MODEL_TENSOR
    by_role = {TOK_EMBEDDINGS: tensor.TOKEN_EMBD, FINAL_NORM: tensor.OUTPUT_NORM, OUTPUT_HEAD: tensor.OUTPUT}
    by_short = {"attention_norm": tensor.ATTN_NORM, "wq": tensor.ATTN_Q, "wk": tensor.ATTN_K, "wv": tensor.ATTN_V,
                "wo": tensor.ATTN_OUT, "ffn_norm": tensor.FFN_NORM, "w1": tensor.FFN_GATE, "w2": tensor.FFN_DOWN,
                "w3": tensor.FFN_UP}
    config = model.get_preset("nano")
    expected = {name: constants.TENSOR_NAMES[kind] + ".weight" for name, kind in by_role.items()}
    expected.update({layer_name(layer, short): constants.TENSOR_NAMES[kind].format(bid=layer) + ".weight"
                     for layer in range(config.n_layers) for short, kind in by_short.items()})
    assert gguf_names(config) == expected
    assert GGUF_ROPE_FREQS == constants.TENSOR_NAMES[tensor.ROPE_FREQS] + ".weight"
