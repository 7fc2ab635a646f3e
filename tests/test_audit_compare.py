"""`python -m npllama.audit compare`: transformers' gradients pass the audit; an implementation
with one deliberate fault fails it, and the report points at the layer where the fault is."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from npllama.convert.hf import hf_rows_to_meta

pytestmark = pytest.mark.oracle
torch = pytest.importorskip("torch", reason="the oracle needs torch: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="the oracle needs transformers: pip install '.[test]'")

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hf_gradients", REPO / "reference" / "hf_gradients.py")
hf_gradients_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_gradients_module)


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit-compare")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
        max_position_embeddings=64, rms_norm_eps=1e-6)).eval()
    model.save_pretrained(folder / "model")
    batch = numpy.random.default_rng(0).integers(0, 53, (2, 17))
    numpy.save(folder / "batch.npy", batch)
    return folder, batch


def audit_compare(folder, grads, *extra):
    return subprocess.run([sys.executable, "-m", "npllama.audit", "compare", str(folder / "model"), "--batch",
                           str(folder / "batch.npy"), "--grads", str(grads), *extra],
                          capture_output=True, text=True, timeout=300)


def their_gradients(folder, name, change=None):
    """Transformers' gradients (float32) from the saved model, after `change` plants a fault."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    if change is not None:
        change(model)
    tensors = hf_gradients_module.hf_gradients(model, numpy.load(folder / "batch.npy"))
    path = folder / f"{name}.safetensors"
    save_file({key: numpy.ascontiguousarray(value) for key, value in tensors.items()}, str(path))
    return path


def test_transformers_gradients_pass_the_audit(model_and_batch):
    folder, _ = model_and_batch
    result = audit_compare(folder, their_gradients(folder, "transformers"))
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == "30 of 30 gradients agree within 0.0001 (huggingface names)"
    assert "the first output that diverges" not in result.stdout


def wrong_rmsnorm_epsilon(model):
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-2


def rope_without_the_permutation(model):
    """A port that copied Meta's wq/wk rows into Hugging Face's layout unchanged."""
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                config = type("Shape", (), {"n_heads": 3, "head_dim": 8})
                projection.weight.copy_(torch.from_numpy(hf_rows_to_meta(projection.weight.numpy(), config)))


def missing_residual_in_layer_1(model):
    layer = model.model.layers[1]
    forward = layer.forward

    def without_residual(hidden_states, *args, **kwargs):
        out = forward(hidden_states, *args, **kwargs)
        return (out[0] - hidden_states, *out[1:]) if isinstance(out, tuple) else out - hidden_states

    layer.forward = without_residual


FAULTS = [(wrong_rmsnorm_epsilon, 0), (rope_without_the_permutation, 0), (missing_residual_in_layer_1, 1)]


@pytest.mark.parametrize("fault, layer", FAULTS, ids=lambda value: getattr(value, "__name__", str(value)))
def test_a_faulty_implementation_fails_and_the_report_names_the_layer_where_it_diverges(model_and_batch, fault,
                                                                                           layer):
    folder, _ = model_and_batch
    result = audit_compare(folder, their_gradients(folder, fault.__name__, fault))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the first output that diverges: layer {layer} (hidden_states.{layer + 1})" in result.stdout
    assert "FAILED: " in result.stdout.strip().splitlines()[-1]


def test_the_reference_written_in_either_naming_passes_the_comparison_exactly(model_and_batch):
    folder, _ = model_and_batch
    for names in ("hf", "meta"):
        out = folder / f"reference-{names}.safetensors"
        written = subprocess.run([sys.executable, "-m", "npllama.audit", "reference", str(folder / "model"),
                                  "--batch", str(folder / "batch.npy"), "--out", str(out), "--names", names],
                                 capture_output=True, text=True, timeout=300)
        assert written.returncode == 0, written.stderr
        result = audit_compare(folder, out, "--json", "--tolerance", "1e-12")
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["passed"] and report["first_diverging_layer"] is None
        assert report["first_diverging_gradients"] == []
        assert report["naming"] == ("huggingface" if names == "hf" else "meta")
        assert max(row["rel_err"] for row in report["rows"]) == 0.0


def test_gradients_under_unknown_names_are_refused_in_one_line(model_and_batch):
    folder, _ = model_and_batch
    path = folder / "unknown.safetensors"
    save_file({"some.weight": numpy.zeros(3)}, str(path))
    result = audit_compare(folder, path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "neither Meta's nor Hugging Face's names" in result.stderr


@settings(max_examples=60, deadline=None)
@given(data=st.data(), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       scale=st.sampled_from([0.0, 1e-30, 1.0, 1e30]))
def test_a_nan_or_infinity_anywhere_in_their_gradients_fails_that_parameter_and_only_it(data, bad, scale):
    """Whatever the position, and whatever the size of our gradient there (zero included), a
    non-finite value of theirs fails its row; every other row, equal to ours, passes at tolerance 0."""
    from npllama.audit.compare import compare_rows

    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2, 2)}
    rng = numpy.random.default_rng(data.draw(st.integers(0, 2**16)))
    ours = {name: rng.standard_normal(shape) * scale for name, shape in shapes.items()}
    theirs = {name: grad.copy() for name, grad in ours.items()}
    planted = data.draw(st.sampled_from(sorted(shapes)))
    position = data.draw(st.integers(0, theirs[planted].size - 1))
    theirs[planted].reshape(-1)[position] = bad
    rows = {row.name: row for row in compare_rows(ours, theirs, tolerance=0.0, source="fuzzed")}
    assert not rows[planted].passed
    assert all(row.passed for name, row in rows.items() if name != planted)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), factor=st.floats(-4.0, 4.0).filter(lambda c: abs(c) > 1e-3),
       scale=st.sampled_from([1e-20, 1.0, 1e20]))
@example(seed=0, factor=0.99999, scale=1e20).via("differences that cancel all but 1e-5 of c x")
def test_their_gradient_a_multiple_of_ours_has_the_relative_error_and_cosine_of_that_multiple(seed, factor, scale):
    """theirs = c * ours: relative error |c - 1|, cosine sign(c), max abs error |c - 1| max|ours|,
    at any size of the gradients. Tolerance: c x is rounded once (a relative 2^-53), and theirs -
    ours cancels all but |c - 1| of it, so the differences carry a relative error of about
    2^-53 / |c - 1| (1e-11 for c = 0.99999); 4x that, plus 1e-12 for the norms' sums of 12 terms."""
    from npllama.audit.compare import compare_rows

    ours = {"w": numpy.random.default_rng(seed).standard_normal((3, 4)) * scale}
    (row,) = compare_rows(ours, {"w": ours["w"] * factor}, tolerance=abs(factor - 1), source="scaled")
    rtol = 1e-12 + 4 * 2.0**-53 / max(abs(factor - 1), 2.0**-52)  # c = 1: exact, nothing cancels
    assert row.rel_err == pytest.approx(abs(factor - 1), rel=rtol, abs=1e-15)
    assert row.cosine == pytest.approx(numpy.sign(factor), rel=1e-12)
    assert row.max_abs_err == pytest.approx(abs(factor - 1) * numpy.abs(ours["w"]).max(), rel=rtol)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n_states=st.integers(1, 5), data=st.data())
def test_the_first_diverging_layer_is_the_first_hidden_state_off_by_more_than_the_tolerance_or_not_finite(
        seed, n_states, data):
    """Their hidden states equal ours up to one layer, from which on they are off by 10% or hold
    a NaN or an infinity: that layer is named, with its relative error; none off, none named."""
    from npllama.audit.compare import HIDDEN_PREFIX, first_diverging_layer

    rng = numpy.random.default_rng(seed)
    ours = [rng.standard_normal((2, 3, 4)) for _ in range(n_states)]
    theirs = {f"{HIDDEN_PREFIX}{index}": state.copy() for index, state in enumerate(ours)}
    assert first_diverging_layer(ours, theirs, tolerance=0.0) is None
    first = data.draw(st.integers(0, n_states - 1), label="first diverging")
    bad = data.draw(st.sampled_from([1.1, float("nan"), float("inf")]), label="what goes wrong")
    for index in range(first, n_states):
        state = theirs[f"{HIDDEN_PREFIX}{index}"]
        if bad == 1.1:
            state *= bad
        else:
            state.reshape(-1)[data.draw(st.integers(0, state.size - 1), label="position")] = bad
    with numpy.errstate(invalid="ignore"):
        index, rel = first_diverging_layer(ours, theirs, tolerance=1e-3)
    assert index == first
    assert rel == pytest.approx(0.1, rel=1e-9) if bad == 1.1 else not numpy.isfinite(rel)
