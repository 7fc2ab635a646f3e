"""npllama.load and `python -m npllama.generate --checkpoint` open the three kinds of model
directory: npllama's own, Hugging Face's and Meta's, with the same logits and the same text."""

import subprocess
import sys

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npllama
from npllama import model as llama
from npllama.checkpoint import save_checkpoint
from npllama.convert.load import LoadError
from npllama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def npllama_run(tmp_path_factory, corpus):
    _, tokenizer_path = corpus
    config = llama.LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=512, multiple_of=8, max_seq_len=64)
    params = llama.init_params(config, seed=5, std=0.3)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, 7, config=config, params=params, tokenizer_model=tokenizer_path.read_bytes())
    return run, config, params, tokenizer_path


def test_an_npllama_run_loads_with_its_tokenizer_and_gives_the_models_logits(npllama_run):
    run, config, params, tokenizer_path = npllama_run
    loaded = npllama.load(run)
    assert (loaded.kind, loaded.config) == ("npllama", config)
    assert loaded.tokenizer.fingerprint == Tokenizer.load(tokenizer_path).fingerprint
    tokens = numpy.arange(12).reshape(2, 6)
    assert loaded.logits(tokens).tobytes() == llama.forward(params, config, tokens).tobytes()
    loss, grads = loaded.loss_and_grads(tokens, tokens)
    assert set(grads) == set(params) and numpy.isfinite(loss)
    # one checkpoint folder holds config.json and model.safetensors too: it is still npllama's
    step = npllama.load(run / "step-00000007")
    assert step.kind == "npllama" and step.logits(tokens).tobytes() == loaded.logits(tokens).tobytes()


def test_a_folder_that_holds_no_model_is_refused_naming_the_kinds_it_looked_for(tmp_path):
    with pytest.raises(LoadError, match="holds no model npllama knows; pass an npllama run") as refused:
        npllama.load(tmp_path)
    assert "\n" not in str(refused.value)
    with pytest.raises(LoadError, match="does not exist"):
        npllama.load(tmp_path / "nothing")


@pytest.mark.oracle
def test_a_hugging_face_directory_loads_and_generates_the_same_text_from_python_and_the_command_line(
        npllama_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, _, _, tokenizer_path = npllama_run
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=16, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64)).eval()
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    loaded = npllama.load(tmp_path)
    assert loaded.kind == "huggingface" and loaded.tokenizer is not None
    tokens = numpy.arange(10).reshape(1, 10)
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens)).logits.numpy()
    got = loaded.logits(tokens)
    assert float(numpy.abs(got - expected).max() / numpy.abs(expected).max()) <= 1e-5
    text = loaded.generate("def ", max_new_tokens=12, temperature=0)
    result = subprocess.run([sys.executable, "-m", "npllama.generate", "--checkpoint", str(tmp_path), "--prompt",
                             "def ", "--max-new-tokens", "12", "--temperature", "0"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "def " + text + "\n"


@pytest.mark.oracle
def test_a_model_without_a_tokenizer_loads_but_cannot_generate_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64)).save_pretrained(tmp_path)
    loaded = npllama.load(tmp_path)
    assert loaded.tokenizer is None and loaded.logits(numpy.zeros((1, 3), dtype=int)).shape == (1, 3, 40)
    with pytest.raises(LoadError, match="has no tokenizer.model"):
        loaded.generate("hi")
    result = subprocess.run([sys.executable, "-m", "npllama.generate", "--checkpoint", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "holds no tokenizer" in result.stderr


# Hugging Face's names of Meta's tensors (transformers' convert_llama_weights_to_hf), the oracle below
HF_TO_META = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
HF_TO_META_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                    "post_attention_layernorm": "ffn_norm"}


def meta_name(hf_name: str) -> str:
    if hf_name in HF_TO_META:
        return HF_TO_META[hf_name]
    _, _, layer, *module, _ = hf_name.split(".")
    return f"layers.{layer}.{HF_TO_META_LAYER['.'.join(module)]}.weight"


@settings(max_examples=20, deadline=None)
@given(value=st.sampled_from([numpy.nan, numpy.inf, -numpy.inf]), data=st.data())
def test_a_weight_that_is_nan_or_infinite_anywhere_is_refused_naming_its_tensor(tmp_path_factory, value, data):
    """Any tensor of a Hugging Face folder, any element, NaN or either infinity: npllama.load says
    which tensor (by Meta's name) in one line, whatever the position."""
    from safetensors.numpy import save_file

    from npllama.convert.hf import export_hf, read_safetensors

    config = llama.LlamaConfig(dim=16, n_layers=2, n_heads=2, vocab_size=40, multiple_of=8, max_seq_len=32)
    folder = tmp_path_factory.mktemp("hf")
    export_hf(folder, config, llama.init_params(config, seed=0))
    weights = read_safetensors(folder / "model.safetensors")
    name = data.draw(st.sampled_from(sorted(weights)), label="tensor")
    index = data.draw(st.integers(0, weights[name].size - 1), label="element")
    weights[name].reshape(-1)[index] = value
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(LoadError, match=f"tensor '{meta_name(name)}' holds NaN or infinite values") as refused:
        npllama.load(folder)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("dtype", [None, "float16", "float32", "float64"])
def test_the_weights_come_in_the_dtype_asked_for_or_the_one_they_were_saved_in(npllama_run, dtype):
    run, config, params, _ = npllama_run
    loaded = npllama.load(run, dtype=dtype)
    assert {str(array.dtype) for array in loaded.params.values()} == {dtype or "float32"}
    for name, array in loaded.params.items():  # the same numbers, rounded to the dtype asked for
        assert numpy.array_equal(array, params[name].astype(dtype or "float32")), name
