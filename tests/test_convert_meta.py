"""Meta's original layout: a state dict under Meta's names, split into two model-parallel shards
saved with torch.save, and params.json, imports with transformers' logits; broken directories
are refused in one line naming the file."""

import json
import os

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllama import model as llama
from npllama.convert import ConvertError
from npllama.convert.hf import import_hf
from npllama.convert.meta import import_meta
from npllama.ops.rope import RopeScaling
from npllama.params import EMBEDDING, LAYER_SUFFIXES, NORM, parameter_table

pytestmark = pytest.mark.oracle
torch = pytest.importorskip("torch", reason="torch writes Meta's .pth files: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="the oracle needs transformers: pip install '.[test]'")

ROW_PARALLEL = (LAYER_SUFFIXES["wo"], LAYER_SUFFIXES["w2"])


def write_meta_layout(folder, config, params, n_ranks=2, params_json=None):
    """What Meta's download holds: each tensor cut as its model-parallel layer cuts it, one .pth per rank."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [{} for _ in range(n_ranks)]
    for name, spec in parameter_table(config).items():
        if spec.role == NORM:
            pieces = [params[name]] * n_ranks
        else:
            axis = 1 if spec.role == EMBEDDING or name.endswith(ROW_PARALLEL) else 0
            pieces = numpy.split(params[name], n_ranks, axis=axis)
        for shard, piece in zip(shards, pieces):
            shard[name] = torch.from_numpy(numpy.ascontiguousarray(piece)).to(torch.bfloat16)
    for rank, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    fields = params_json or {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
                             "multiple_of": config.multiple_of, "norm_eps": config.norm_eps, "vocab_size": -1,
                             "n_kv_heads": config.n_kv_heads}
    (folder / "params.json").write_text(json.dumps(fields))
    return folder


@pytest.fixture(scope="module")
def hf_model_and_meta_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6)
    hf_model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()  # bf16 as Meta ships them
    hf_model.save_pretrained(root / "hf")
    imported = import_hf(root / "hf")
    return hf_model, imported, write_meta_layout(root / "7B", imported.config, imported.params)


def test_two_model_parallel_shards_import_to_transformers_logits(hf_model_and_meta_folder):
    hf_model, imported, folder = hf_model_and_meta_folder
    meta = import_meta(folder)
    assert meta.config.ffn_dim == 96 and meta.config.vocab_size == 64  # vocab_size -1: read from the weights
    assert all(meta.params[name].tobytes() == imported.params[name].tobytes() for name in imported.params)
    tokens = numpy.random.default_rng(1).integers(0, 64, (2, 21))
    with torch.no_grad():
        expected = hf_model.float()(torch.from_numpy(tokens)).logits.numpy()
    hf_model.to(torch.bfloat16)
    logits = llama.forward(meta.params, meta.config, tokens)
    assert float(numpy.abs(logits - expected).max() / numpy.abs(expected).max()) <= 1e-5


def test_grouped_query_shards_import_to_transformers_logits(tmp_path):
    """Llama 2 70B's layout: each model-parallel rank holds some of the key/value heads."""
    torch.manual_seed(1)
    hf_config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf_model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()  # bf16 as Meta ships them
    hf_model.save_pretrained(tmp_path / "hf")
    imported = import_hf(tmp_path / "hf")
    meta = import_meta(write_meta_layout(tmp_path / "70B", imported.config, imported.params))
    assert meta.config.n_kv_heads == 2 and meta.params["layers.1.attention.wv.weight"].shape == (16, 32)
    tokens = numpy.random.default_rng(2).integers(0, 64, (2, 21))
    with torch.no_grad():
        expected = hf_model.float()(torch.from_numpy(tokens)).logits.numpy()
    logits = llama.forward(meta.params, meta.config, tokens)
    assert float(numpy.abs(logits - expected).max() / numpy.abs(expected).max()) <= 1e-5  # float32, other orders


def test_use_scaled_rope_is_llama_3_1s_frequency_scaling(hf_model_and_meta_folder, tmp_path):
    _, imported, _ = hf_model_and_meta_folder
    config = imported.config
    fields = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads, "vocab_size": -1,
              "rope_theta": 500000.0, "use_scaled_rope": True}
    meta = import_meta(write_meta_layout(tmp_path / "m", config, imported.params, params_json=fields))
    # the constants of Meta's apply_scaling (llama-models, Llama 3.1)
    assert meta.config.rope_scaling == RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192)


def test_the_tokenizer_is_found_beside_the_shards_or_one_folder_up(hf_model_and_meta_folder, tmp_path):
    _, imported, _ = hf_model_and_meta_folder
    folder = write_meta_layout(tmp_path / "7B", imported.config, imported.params)
    assert import_meta(folder).tokenizer is None
    (tmp_path / "tokenizer.model").write_bytes(b"a sentencepiece model")
    assert import_meta(folder).tokenizer == tmp_path / "tokenizer.model"


def test_a_missing_shard_is_named(hf_model_and_meta_folder, tmp_path):
    _, imported, _ = hf_model_and_meta_folder
    folder = write_meta_layout(tmp_path / "m", imported.config, imported.params, n_ranks=4)
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(ConvertError, match=f"^{folder / 'consolidated.01.pth'}: missing shard"):
        import_meta(folder)


@pytest.mark.parametrize("change, fragment", [
    ({"n_kv_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3"),
    ({"n_heads": None}, "missing field 'n_heads'"),
    ({"dim": 48}, "params.json implies"),
    ({"n_layers": 100_000_000}, "n_layers is 100000000, the shards hold 2 layers"),
    ({"rope_theta": True}, "rope_theta must be a positive finite number, got True"),
    ({"vocab_size": "512"}, "vocab_size must be a positive integer, got '512'"),
    ({"norm_eps": "1e-5"}, "norm_eps must be a positive finite number"),
])
def test_a_params_json_that_does_not_fit_is_refused_in_one_line(hf_model_and_meta_folder, tmp_path, change, fragment):
    _, imported, _ = hf_model_and_meta_folder
    config = imported.config
    fields = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads, "vocab_size": -1}
    fields.update(change)
    fields = {name: value for name, value in fields.items() if value is not None}
    folder = write_meta_layout(tmp_path / "m", config, imported.params, params_json=fields)
    with pytest.raises(ConvertError, match=fragment) as refused:
        import_meta(folder)
    assert "\n" not in str(refused.value)


def linked_copy(folder, to, params_json: dict):
    """`folder`'s shards, hard-linked (regular files of their own folder), under another params.json."""
    to.mkdir()
    for shard in folder.glob("consolidated.*.pth"):
        os.link(shard, to / shard.name)
    (to / "params.json").write_text(json.dumps(params_json))
    return to


@settings(max_examples=25, deadline=None)
@given(norm_eps=st.floats(1e-8, 1e-2), rope_theta=st.floats(1.0, 1e7), max_seq_len=st.integers(1, 1 << 17),
       multiple_of=st.integers(1, 1024), n_kv_heads=st.sampled_from([None, 4]), explicit_vocab=st.booleans(),
       scaled=st.sampled_from([None, (2.0, 1.5), (32.0, 8.0)]))
def test_every_field_of_params_json_is_the_configs_whatever_its_value(
        hf_model_and_meta_folder, tmp_path_factory, norm_eps, rope_theta, max_seq_len, multiple_of, n_kv_heads,
        explicit_vocab, scaled):
    """Fields far from their defaults (a fixture of default values cannot tell a field read from a
    default taken); the FFN width is the weights', whatever multiple_of says."""
    _, imported, folder = hf_model_and_meta_folder
    config = imported.config
    fields = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "vocab_size": config.vocab_size if explicit_vocab else -1, "norm_eps": norm_eps,
              "rope_theta": rope_theta, "max_seq_len": max_seq_len, "multiple_of": multiple_of}
    if n_kv_heads is not None:
        fields["n_kv_heads"] = n_kv_heads
    if scaled is not None:
        fields.update(use_scaled_rope=True, rope_scaling_factor=scaled[0], high_freq_factor=scaled[1])
    meta = import_meta(linked_copy(folder, tmp_path_factory.mktemp("fields") / "m", fields))
    assert (meta.config.norm_eps, meta.config.rope_theta, meta.config.max_seq_len) == (norm_eps, rope_theta,
                                                                                       max_seq_len)
    assert meta.config.n_kv_heads == config.n_heads and meta.config.vocab_size == 64 and meta.config.ffn_dim == 96
    expected_scaling = None if scaled is None else RopeScaling(
        "llama3", factor=scaled[0], low_freq_factor=1.0, high_freq_factor=scaled[1],
        original_max_position_embeddings=8192)
    assert meta.config.rope_scaling == expected_scaling


@settings(max_examples=15, deadline=None)
@given(n_ranks=st.sampled_from([2, 4]), data=st.data())
def test_a_tensor_every_rank_holds_whole_that_differs_on_any_rank_in_any_element_is_refused(
        hf_model_and_meta_folder, tmp_path_factory, n_ranks, data):
    """The RMSNorm gains are replicated on every rank; one bit of one element of one rank's copy
    differing means the shards are not one model's, and the refusal names that shard and tensor."""
    _, imported, _ = hf_model_and_meta_folder
    config = imported.config
    folder = write_meta_layout(tmp_path_factory.mktemp("replicated") / "m", config, imported.params, n_ranks)
    norms = sorted(name for name, spec in parameter_table(config).items() if spec.role == NORM)
    name = data.draw(st.sampled_from(norms), label="tensor")
    rank = data.draw(st.integers(1, n_ranks - 1), label="rank")
    index = data.draw(st.integers(0, config.dim - 1), label="element")
    shard_path = folder / f"consolidated.{rank:02d}.pth"
    shard = torch.load(shard_path, weights_only=True)
    shard[name].view(torch.int16)[index] ^= 1  # the last bit of the bfloat16's mantissa
    torch.save(shard, shard_path)
    with pytest.raises(ConvertError, match=f"^{shard_path}: tensor '{name}' differs from rank 0's") as refused:
        import_meta(folder)
    assert "\n" not in str(refused.value)
