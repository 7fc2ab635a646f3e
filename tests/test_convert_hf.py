"""Hugging Face checkpoints in and out: tiny random LlamaForCausalLM models saved offline import
with transformers' logits, greedy continuations and dtypes; npllama's export loads back into
transformers; what npllama cannot represent is refused in one line naming the file and field."""

import json

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllama import model as llama
from npllama.convert import ConvertError
from npllama.convert.hf import export_hf, hf_rows_to_meta, import_hf, read_safetensors
from npllama.params import hf_names, rope_permuted_names

pytestmark = pytest.mark.oracle
torch = pytest.importorskip("torch", reason="the oracle needs torch: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="the oracle needs transformers: pip install '.[test]'")


def tiny_hf_model(seed=0, **overrides):
    settings = dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                    max_position_embeddings=96, rms_norm_eps=1e-5, rope_theta=500.0)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    with torch.no_grad():  # random norm gains too, so a swapped or missing norm shows in the logits
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def relative_error(got, expected):
    return float(numpy.abs(got - expected).max() / numpy.abs(expected).max())


TOKENS = numpy.random.default_rng(0).integers(0, 61, (2, 37))


def test_an_imported_model_gives_transformers_logits(tmp_path):
    model = tiny_hf_model()
    model.save_pretrained(tmp_path)
    imported = import_hf(tmp_path)
    assert imported.config.ffn_dim == 40 and imported.config.rope_theta == 500.0 and imported.config.norm_eps == 1e-5
    logits = llama.forward(imported.params, imported.config, TOKENS)
    assert relative_error(logits, hf_logits(model, TOKENS)) <= 1e-5  # float32 on both sides, other summation orders


def test_greedy_continuations_of_32_tokens_are_identical(tmp_path):
    model = tiny_hf_model(seed=1)
    model.save_pretrained(tmp_path)
    imported = import_hf(tmp_path)
    prompt = TOKENS[:1, :5]
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt), max_new_tokens=32, do_sample=False,
                                  pad_token_id=0).numpy()[0, 5:]
    sequence = list(prompt[0])
    for _ in range(32):
        sequence.append(int(llama.forward(imported.params, imported.config, numpy.array([sequence]))[0, -1].argmax()))
    assert sequence[5:] == expected.tolist()


def float64_throughout(model):
    """transformers computes RMSNorm's statistics and RoPE's angles in float32 even in a float64
    model (a 1e-7 relative difference). This computes both in float64, by the same formulas, and
    leaves the rest of the model (embedding, attention with its key/value heads, MLP, head) as
    transformers' own."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / config.rope_parameters["rope_theta"] ** exponents

    def rope_tables(x, position_ids):
        angles = position_ids[..., None].double() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    def rms_norm(norm):
        return lambda x: norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    model.model.rotary_emb.forward = rope_tables
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = rms_norm(module)
    return model


def float64_loss_and_grads(model, tokens, targets):
    """transformers' loss and gradients by autograd, everything in float64."""
    model.zero_grad(set_to_none=True)
    logits = model(torch.from_numpy(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(targets).reshape(-1))
    loss.backward()
    return loss.item(), logits.detach().numpy(), {name: p.grad.numpy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_kv_heads, tied", [(1, False), (2, False), (4, True), (2, True)],
                         ids=["multi-query", "two-key-value-heads", "tied-embeddings", "both"])
def test_grouped_query_and_tied_models_give_transformers_float64_logits_loss_and_every_gradient(
        tmp_path, n_kv_heads, tied):
    model = tiny_hf_model(hidden_size=32, num_attention_heads=4, num_key_value_heads=n_kv_heads,
                          tie_word_embeddings=tied).double()
    model.save_pretrained(tmp_path)
    imported = import_hf(tmp_path)
    config = imported.config
    assert config.n_kv_heads == n_kv_heads and config.tie_embeddings == tied
    assert ("output.weight" in imported.params) != tied
    assert imported.params["layers.0.attention.wk.weight"].shape == (8 * n_kv_heads, 32)
    tokens, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    expected_loss, expected_logits, expected_grads = float64_loss_and_grads(float64_throughout(model), tokens, targets)
    # float64 on both sides, two blocks of O(1) activations: rounding is ~1e-14 relative
    assert relative_error(llama.forward(imported.params, config, tokens), expected_logits) <= 1e-10
    value, grads = llama.loss_and_grads(imported.params, config, tokens, targets, tile_size=8)
    assert abs(value - expected_loss) <= 1e-12 * abs(expected_loss)
    permuted = rope_permuted_names(config)
    for name, hf_name in hf_names(config).items():
        expected = expected_grads[hf_name]  # wq and wk rows permute like the weights they belong to
        expected = hf_rows_to_meta(expected, config) if name in permuted else expected
        # autograd's order of operations against the hand-written one: 1e-10 of the largest
        # gradient is far below any real error (a missing sum over the group is O(1) off)
        assert numpy.abs(grads[name] - expected).max() <= 1e-10 * numpy.abs(expected).max(), name


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}],
                         ids=["linear", "llama3"])
def test_rope_scaling_imports_with_transformers_logits_and_exports_back(tmp_path, rope):
    # an original context of 32 positions with theta 500 and head dim 8: llama3 keeps some
    # frequencies, divides some and blends the rest over these 36 positions
    model = tiny_hf_model(rope_parameters={**rope, "rope_theta": 500.0})
    model.save_pretrained(tmp_path / "hf")
    imported = import_hf(tmp_path / "hf")
    assert imported.config.rope_scaling.rope_type == rope["rope_type"]
    logits = llama.forward(imported.params, imported.config, TOKENS)
    assert relative_error(logits, hf_logits(model, TOKENS)) <= 1e-5  # float32 on both sides
    export_hf(tmp_path / "out", imported.config, imported.params)
    assert import_hf(tmp_path / "out").config == imported.config
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert relative_error(hf_logits(loaded, TOKENS), logits) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_import_exactly_as_torch_widens_them(tmp_path, dtype):
    model = tiny_hf_model().to(dtype)
    model.save_pretrained(tmp_path)
    imported = import_hf(tmp_path)
    expected = model.model.embed_tokens.weight.detach().float().numpy()
    got = imported.params["tok_embeddings.weight"].astype(numpy.float32)
    assert got.tobytes() == expected.tobytes()


def test_a_sharded_checkpoint_imports_like_a_single_file(tmp_path):
    model = tiny_hf_model()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    one, shards = import_hf(tmp_path / "one"), import_hf(tmp_path / "shards")
    assert all(one.params[name].tobytes() == shards.params[name].tobytes() for name in one.params)


def test_an_older_style_config_with_rope_theta_and_torch_dtype_imports_the_same(tmp_path):
    model = tiny_hf_model()
    model.save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    theta = fields.pop("rope_parameters")["rope_theta"]
    fields.update(rope_theta=theta, torch_dtype=fields.pop("dtype"))
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert import_hf(tmp_path).config.rope_theta == 500.0


@pytest.mark.parametrize("n_kv_heads, tied", [(3, False), (1, True)], ids=["llama-1", "multi-query-tied"])
def test_an_exported_model_loads_into_transformers_with_the_same_logits(tmp_path, n_kv_heads, tied):
    config = llama.LlamaConfig(dim=24, n_layers=2, n_heads=3, vocab_size=61, multiple_of=8, max_seq_len=96,
                               n_kv_heads=n_kv_heads, tie_embeddings=tied)
    params = llama.init_params(config, seed=3, std=0.2)
    export_hf(tmp_path, config, params)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert relative_error(hf_logits(loaded, TOKENS), llama.forward(params, config, TOKENS)) <= 1e-5
    back = import_hf(tmp_path)
    # the FFN width comes back stated (intermediate_size), so multiple_of no longer matters
    assert back.config == llama.LlamaConfig(**{**config.to_dict(), "hidden_dim": config.ffn_dim, "multiple_of": 256})
    assert all(back.params[name].tobytes() == params[name].tobytes() for name in params)


@pytest.mark.parametrize("change, field", [
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope_parameters"),
    ({"attention_bias": True}, "attention_bias"),
    ({"tie_word_embeddings": "yes"}, "tie_embeddings"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_what_npllama_cannot_represent_is_refused_naming_the_file_and_field(tmp_path, change, field):
    tiny_hf_model().save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    fields.update(change)
    if change.get("hidden_size", 0) is None:
        del fields["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ConvertError) as refused:
        import_hf(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: ") and field in message and "\n" not in message


def test_a_missing_shard_a_wrong_shape_and_an_unknown_dtype_are_named(tmp_path):
    model = tiny_hf_model()
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    shard = sorted((tmp_path / "shards").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConvertError, match=f"{shard}: missing shard"):
        import_hf(tmp_path / "shards")

    from safetensors.numpy import save_file

    model.save_pretrained(tmp_path / "shape")
    weights = read_safetensors(tmp_path / "shape" / "model.safetensors")
    weights["model.norm.weight"] = numpy.ones(25, dtype=numpy.float32)
    save_file(weights, str(tmp_path / "shape" / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"'model.norm.weight' has shape \(25,\), the config.json implies \(24,\)"):
        import_hf(tmp_path / "shape")

    weights["model.norm.weight"] = numpy.ones(24, dtype=numpy.int32)
    save_file(weights, str(tmp_path / "shape" / "model.safetensors"))
    with pytest.raises(ConvertError, match="'model.norm.weight' has dtype 'I32'"):
        import_hf(tmp_path / "shape")


def test_the_convert_command_imports_and_exports_in_one_line_each(tmp_path):
    import subprocess
    import sys

    model = tiny_hf_model()
    model.save_pretrained(tmp_path / "hf")

    def convert(*args):
        return subprocess.run([sys.executable, "-m", "npllama.convert", *args], capture_output=True, text=True,
                              timeout=120)

    imported = convert("import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"))
    assert imported.returncode == 0, imported.stderr
    assert "huggingface model" in imported.stdout and "no tokenizer.model found" in imported.stdout
    exported = convert("export", str(tmp_path / "run"), "--out", str(tmp_path / "back"), "--dtype", "float16")
    assert exported.returncode == 0, exported.stderr
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert relative_error(hf_logits(again, TOKENS), hf_logits(model, TOKENS)) <= 1e-2  # float16 weights: 2^-11
    refused = convert("import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "already exists" in refused.stderr
    nowhere = convert("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert nowhere.returncode == 2 and "source" in nowhere.stderr and "does not exist" in nowhere.stderr


def break_config(folder, **change):
    fields = json.loads((folder / "config.json").read_text())
    fields.update(change)
    fields = {name: value for name, value in fields.items() if value is not None}
    (folder / "config.json").write_text(json.dumps(fields))


def break_weights(folder, name, value):
    from safetensors.numpy import save_file

    weights = read_safetensors(folder / "model.safetensors")
    weights[name] = value
    save_file(weights, str(folder / "model.safetensors"))


BROKEN = {
    "key/value heads that do not divide the query heads": (lambda f: break_config(f, num_key_value_heads=2),
                                                           "num_key_value_heads 2 does not divide"),
    "a missing config field": (lambda f: break_config(f, vocab_size=None), "missing field 'vocab_size'"),
    "a mismatched shape": (lambda f: break_weights(f, "model.norm.weight", numpy.ones(7, numpy.float32)),
                           "'model.norm.weight' has shape (7,)"),
    "an unknown dtype": (lambda f: break_weights(f, "model.norm.weight", numpy.ones(24, numpy.int16)),
                         "has dtype 'I16'"),
    "a missing shard": (lambda f: (f / "model.safetensors").unlink() or (f / "model.safetensors.index.json")
                        .write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}})),
                        "missing shard"),
}


@pytest.mark.parametrize("what", BROKEN)
def test_every_command_refuses_a_broken_directory_in_one_line_with_exit_status_2(tmp_path, what):
    import subprocess
    import sys

    tiny_hf_model().save_pretrained(tmp_path / "model")
    damage, fragment = BROKEN[what]
    damage(tmp_path / "model")
    for command in (["npllama.generate", "--checkpoint", str(tmp_path / "model")],
                    ["npllama.convert", "import", str(tmp_path / "model"), "--out", str(tmp_path / "run")]):
        result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'model'}") and fragment in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_bfloat16_export_holds_what_torch_rounds_to_and_loads_in_transformers(tmp_path):
    config = llama.LlamaConfig(dim=24, n_layers=1, n_heads=3, vocab_size=61, multiple_of=8, max_seq_len=96)
    params = llama.init_params(config, seed=4, std=0.2)
    params["norm.weight"][:3] = [numpy.nan, 1.00390625, 1.01171875]  # NaN, and two ties that round to even
    export_hf(tmp_path, config, params, dtype="bfloat16")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    hf_parameters = dict(loaded.named_parameters())
    for name, hf_name in (("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")):
        expected = torch.from_numpy(params[name]).to(torch.bfloat16).float().numpy()
        got = hf_parameters[hf_name].detach().float().numpy()
        # NaN where torch has NaN (torch's canonical bfloat16 NaN is 0xFFFF, ours 0x7FC0: both NaN),
        # and every other value bit for bit
        assert (numpy.isnan(got) == numpy.isnan(expected)).all(), name
        assert got[~numpy.isnan(got)].tobytes() == expected[~numpy.isnan(expected)].tobytes(), name


@settings(max_examples=40, deadline=None)
@given(norm_eps=st.floats(1e-8, 1e-2), rope_theta=st.floats(1.0, 1e7), positions=st.integers(1, 1 << 20),
       kv_heads=st.sampled_from([1, 2, 4]), tied=st.booleans(), newer=st.booleans())
def test_every_field_of_config_json_is_the_configs_whatever_its_value(norm_eps, rope_theta, positions, kv_heads,
                                                                     tied, newer):
    """Fields far from their defaults, and RoPE's base where either version of transformers puts
    it (`rope_theta`, or inside `rope_parameters` since transformers 5)."""
    from pathlib import Path

    from npllama.convert.hf import config_from_hf

    fields = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": kv_heads, "intermediate_size": 80, "vocab_size": 300, "rms_norm_eps": norm_eps,
              "max_position_embeddings": positions, "tie_word_embeddings": tied}
    if newer:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    else:
        fields["rope_theta"] = rope_theta
    config = config_from_hf(fields, Path("config.json"))
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_dim, config.vocab_size) == \
        (32, 3, 4, kv_heads, 80, 300)
    assert (config.norm_eps, config.rope_theta, config.max_seq_len, config.tie_embeddings) == \
        (norm_eps, rope_theta, positions, tied)
