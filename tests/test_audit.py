"""The audit CLI: every op and the model, all passing, and clear errors."""

import json
import subprocess
import sys

from npllama import audit

EXPECTED_ROWS = {
    ("embedding", "weight"), ("linear", "x"), ("linear", "weight"), ("rmsnorm", "x"), ("rmsnorm", "weight"),
    ("rope", "x"), ("swiglu", "a"), ("swiglu", "b"), ("attention", "q"), ("attention", "k"), ("attention", "v"),
    ("cross_entropy", "logits"),
}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "npllama.audit", *args], capture_output=True, text=True)


def test_audit_json_lists_every_op_and_the_model_all_passing():
    result = run_cli("--json", "--seed", "3")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(set(row) == {"op", "wrt", "max_abs_err", "max_rel_err", "passed"} for row in rows)
    assert EXPECTED_ROWS <= {(row["op"], row["wrt"]) for row in rows}
    model_rows = {row["wrt"] for row in rows if row["op"] == "model"}
    assert model_rows == set(audit.llama.parameter_shapes(audit.AUDIT_CONFIG))
    assert all(row["passed"] and row["max_rel_err"] <= 1e-6 for row in rows)


def test_audit_table_ends_with_a_summary():
    result = run_cli("--only", "swiglu")
    assert result.returncode == 0
    assert result.stdout.strip().splitlines()[-1].startswith("2 passed, 0 failed")


def test_audit_fails_with_exit_1_when_a_gradient_is_wrong(monkeypatch, capsys):
    original = audit.swiglu.backward
    monkeypatch.setattr(audit.swiglu, "backward", lambda dy, cache: tuple(1.001 * g for g in original(dy, cache)))
    assert audit.main(["--only", "swiglu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_audit_rejects_an_unknown_backend_and_op_in_one_line():
    for args in (["--backend", "cupy"], ["--backend", "jax"], ["--only", "conv2d"]):
        result = run_cli(*args)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
