"""The audit CLI: every op and the model, all passing, and clear errors."""

import json
import subprocess
import sys

import numpy
import pytest

from npllama.audit import ops as audit
from npllama.audit.__main__ import main as audit_main
from npllama.params import parameter_shapes

EXPECTED_ROWS = {
    ("embedding", "weight"), ("linear", "x"), ("linear", "weight"), ("rmsnorm", "x"), ("rmsnorm", "weight"),
    ("rope", "x"), ("swiglu", "a"), ("swiglu", "b"), ("attention", "q"), ("attention", "k"), ("attention", "v"),
    ("attention_kv", "q"), ("attention_kv", "k"), ("attention_kv", "v"),
    ("attention_gqa", "q"), ("attention_gqa", "k"), ("attention_gqa", "v"), ("cross_entropy", "logits"),
}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "npllama.audit", *args], capture_output=True, text=True)


def test_audit_json_lists_every_op_and_the_model_all_passing():
    result = run_cli("--json", "--seed", "3")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(set(row) == {"op", "wrt", "max_abs_err", "max_rel_err", "passed", "problem"} for row in rows)
    assert EXPECTED_ROWS <= {(row["op"], row["wrt"]) for row in rows}
    model_rows = {row["wrt"] for row in rows if row["op"] == "model"}
    assert model_rows == set(parameter_shapes(audit.AUDIT_CONFIG))
    shipped_rows = {row["wrt"] for row in rows if row["op"] == "model_gqa_tied"}  # no output.weight: tied
    assert shipped_rows == set(parameter_shapes(audit.AUDIT_GQA_TIED_CONFIG)) and "output.weight" not in shipped_rows
    assert all(row["passed"] and row["problem"] is None and 0 <= row["max_rel_err"] <= 1e-6 for row in rows)


def test_audit_table_ends_with_a_summary():
    result = run_cli("--only", "swiglu")
    assert result.returncode == 0
    assert result.stdout.strip().splitlines()[-1].startswith("2 passed, 0 failed")


def test_audit_fails_with_exit_1_when_a_gradient_is_wrong(monkeypatch, capsys):
    original = audit.swiglu.backward
    monkeypatch.setattr(audit.swiglu, "backward", lambda dy, cache: tuple(1.001 * g for g in original(dy, cache)))
    assert audit_main(["--only", "swiglu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def nan_like(grads):
    return tuple(g * numpy.nan for g in grads) if isinstance(grads, tuple) else grads * numpy.nan


@pytest.mark.parametrize("op", [op for op in audit.OPS if op not in audit.MODELS])
def test_an_op_whose_backward_returns_nan_fails_the_audit_which_names_it(op, monkeypatch, capsys):
    module = getattr(audit, op.split("_")[0] if op.startswith("attention") else op)  # attention_kv, _gqa: attention
    original = module.backward
    monkeypatch.setattr(module, "backward", lambda dy, cache: nan_like(original(dy, cache)))
    assert audit_main(["--only", op]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line for line in lines if line.startswith(op)]
    assert rows and all("FAIL: the gradient is not finite" in row and "(nan)" in row for row in rows), lines
    assert f"failed: {op} (" in lines[-1], lines[-1]


def test_a_model_gradient_with_nan_fails_the_audit_which_names_the_parameter(monkeypatch, capsys):
    original = audit.llama.loss_and_grads

    def loss_and_grads_with_a_nan(*args, **kwargs):
        value, grads = original(*args, **kwargs)
        grads["layers.1.ffn_norm.weight"] = grads["layers.1.ffn_norm.weight"] * numpy.nan
        return value, grads

    monkeypatch.setattr(audit.llama, "loss_and_grads", loss_and_grads_with_a_nan)
    assert audit_main(["--only", "model", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)  # strict JSON: no NaN literals
    failed = [row for row in rows if not row["passed"]]
    assert [row["wrt"] for row in failed] == ["layers.1.ffn_norm.weight"]
    assert failed[0]["max_rel_err"] is None and "not finite" in failed[0]["problem"]


def test_audit_rejects_an_unknown_backend_op_and_a_bad_seed_in_one_line():
    for args in (["--backend", "cupy"], ["--backend", "jax"], ["--only", "conv2d"], ["--seed", "-1"], ["--seed", "x"]):
        result = run_cli(*args)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# (--only takes every word up to the next option, so a real command line ends it with another option)
@pytest.mark.parametrize("before", [["--json"], ["--seed", "3"], ["--only", "model", "--json"], ["--backend", "cupy"]])
def test_an_op_audit_option_before_compare_is_refused_not_ignored(before, capsys):
    """`--json compare ...` would print a table: the option belongs to the op audit, so it is an error."""
    with pytest.raises(SystemExit) as stopped:
        audit_main([*before, "compare", "model", "--batch", "b.npy", "--grads", "g.safetensors"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "an option of the op audit, not of compare" in error and before[0] in error


def compared(failing: set[str]) -> list:
    """Rows of `audit compare` in forward order, the names in `failing` failed."""
    from npllama.audit.compare import Row
    from npllama.model import LlamaConfig

    config = LlamaConfig(dim=16, n_layers=3, n_heads=2, vocab_size=32)
    return [Row(name, 1.0 if name in failing else 0.0, 1.0, 0.0, name not in failing)
            for name in parameter_shapes(config)]


@pytest.mark.parametrize("failing, first", [
    (set(), []),
    ({"tok_embeddings.weight"}, ["tok_embeddings.weight"]),
    ({"tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.2.attention.wk.weight",
      "layers.2.attention.wv.weight"}, ["layers.2.attention.wk.weight", "layers.2.attention.wv.weight"]),
    ({"layers.1.feed_forward.w1.weight", "norm.weight", "layers.2.ffn_norm.weight"}, ["norm.weight"]),
    ({"output.weight", "layers.0.attention_norm.weight"}, ["output.weight"]),
])
def test_the_first_diverging_gradients_are_the_failures_the_backward_pass_meets_first(failing, first):
    from npllama.audit.compare import first_diverging_gradients

    assert first_diverging_gradients(compared(failing)) == first


def test_the_model_audit_fails_a_backward_that_forgets_the_norm_gain(monkeypatch, capsys):
    """dx = r (dy g - ...) with g left out is right only where every gain is 1: the audit's model must
    have other gains, or the bug passes it (the op audit differences rmsnorm alone, not in the model)."""
    import dataclasses

    original = audit.rmsnorm.backward

    def backward_without_the_gain(dy, cache):
        dx, _ = original(dy, dataclasses.replace(cache, weight=numpy.ones_like(cache.weight)))
        return dx, original(dy, cache)[1]  # the gain's own gradient stays right

    monkeypatch.setattr(audit.rmsnorm, "backward", backward_without_the_gain)
    assert audit_main(["--only", "model", "model_gqa_tied"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert "failed: model (" in lines[-1] and "model_gqa_tied (" in lines[-1], lines[-1]


def test_the_cross_entropy_audit_fails_a_gradient_on_a_row_whose_target_is_ignored(monkeypatch, capsys):
    """An ignored row adds nothing to the loss, so its gradient is 0: a backward that gives it one
    fails only if the audit's targets ignore a row."""
    original = audit.cross_entropy.backward

    def backward_that_counts_every_row(dy, cache):
        dlogits = original(dy, cache).copy()
        dlogits.reshape(-1, dlogits.shape[-1])[~cache.counted.reshape(-1)] += 0.1
        return dlogits

    monkeypatch.setattr(audit.cross_entropy, "backward", backward_that_counts_every_row)
    assert audit_main(["--only", "cross_entropy"]) == 1
    assert "failed: cross_entropy (logits)" in capsys.readouterr().out
