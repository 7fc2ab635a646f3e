"""The one table of Llama-1's parameters: Meta's names, shapes and roles, derived from the config.

Every other module asks this one for a parameter's name, shape or role instead of spelling it:

    tok_embeddings.weight                     (V, C)   embedding
    layers.{i}.attention.wq.weight            (C, C)   linear
    layers.{i}.attention.{wk,wv}.weight       (K, C)   linear, K = n_kv_heads * head_dim (C for Llama-1)
    layers.{i}.attention.wo.weight            (C, C)   linear, writes into the residual stream
    layers.{i}.feed_forward.{w1,w3}.weight    (F, C)   linear
    layers.{i}.feed_forward.w2.weight         (C, F)   linear, writes into the residual stream
    layers.{i}.{attention,ffn}_norm.weight    (C,)     norm gain
    norm.weight                               (C,)     norm gain
    output.weight                             (V, C)   output head; absent when tied to the embedding

Linear weights are [out, in], as in Meta's and PyTorch's checkpoints. The order of the table is
the checkpoint order. Roles decide initialisation (norm gains start at 1; the two projections
into the residual stream get a smaller standard deviation) and weight decay (everything but the
norm gains). The config only needs `dim`, `kv_dim`, `n_layers`, `vocab_size`, `ffn_dim` and
`tie_embeddings`. With tied embeddings (`tie_embeddings`) the output head multiplies by the
embedding matrix itself: one parameter used twice (`head_name`).
"""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDING, LINEAR, NORM, OUTPUT = "embedding", "linear", "norm", "output"

TOK_EMBEDDINGS = "tok_embeddings.weight"
FINAL_NORM = "norm.weight"
OUTPUT_HEAD = "output.weight"

# a block's weights by the short name the block code uses, and the suffix of each one's full name
LAYER_SUFFIXES = {
    "attention_norm": "attention_norm.weight",
    "wq": "attention.wq.weight",
    "wk": "attention.wk.weight",
    "wv": "attention.wv.weight",
    "wo": "attention.wo.weight",
    "ffn_norm": "ffn_norm.weight",
    "w1": "feed_forward.w1.weight",
    "w2": "feed_forward.w2.weight",
    "w3": "feed_forward.w3.weight",
}
_RESIDUAL_WRITERS = ("wo", "w2")

# The same parameters under Hugging Face's names (transformers' LlamaForCausalLM).
HF_NAMES = {TOK_EMBEDDINGS: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight",
            OUTPUT_HEAD: "lm_head.weight"}
HF_LAYER_SUFFIXES = {
    "attention_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "w1": "mlp.gate_proj.weight",
    "w2": "mlp.down_proj.weight",
    "w3": "mlp.up_proj.weight",
}
# wq and wk rows are ordered for Meta's RoPE (interleaved pairs) or for Hugging Face's (rotate-half)
ROPE_PERMUTED = ("wq", "wk")

# The same parameters under llama.cpp's GGUF names (gguf's tensor_mapping for the llama architecture).
GGUF_NAMES = {TOK_EMBEDDINGS: "token_embd.weight", FINAL_NORM: "output_norm.weight", OUTPUT_HEAD: "output.weight"}
GGUF_LAYER_SUFFIXES = {
    "attention_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "w1": "ffn_gate.weight",
    "w2": "ffn_down.weight",
    "w3": "ffn_up.weight",
}
# Llama 3.1's RoPE frequency factors as llama.cpp stores them: a tensor, not a parameter npllama has
GGUF_ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its full name, shape and role."""

    name: str
    shape: tuple[int, ...]
    role: str  # EMBEDDING, LINEAR, NORM or OUTPUT
    residual: bool = False  # a projection that writes into the residual stream (wo, w2)

    @property
    def decays(self) -> bool:
        """AdamW's decoupled weight decay applies to matrices, not to norm gains."""
        return self.role != NORM


def layer_name(layer: int, short: str) -> str:
    """`layers.{layer}.<suffix>` for a block weight's short name ("wq", "ffn_norm", ...)."""
    return f"layers.{layer}.{LAYER_SUFFIXES[short]}"


def layer_weights(params: dict, layer: int) -> dict:
    """One block's weights, keyed by short name."""
    return {short: params[layer_name(layer, short)] for short in LAYER_SUFFIXES}


def _layer_spec(config, layer: int, short: str) -> ParamSpec:
    dim, ffn = config.dim, config.ffn_dim
    if short.endswith("norm"):
        return ParamSpec(layer_name(layer, short), (dim,), NORM)
    shape = {"w1": (ffn, dim), "w2": (dim, ffn), "w3": (ffn, dim),
             "wk": (config.kv_dim, dim), "wv": (config.kv_dim, dim)}.get(short, (dim, dim))
    return ParamSpec(layer_name(layer, short), shape, LINEAR, residual=short in _RESIDUAL_WRITERS)


def parameter_table(config) -> dict[str, ParamSpec]:
    """Every parameter of the model, in checkpoint order."""
    order = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attention_norm", "ffn_norm")
    specs = [ParamSpec(TOK_EMBEDDINGS, (config.vocab_size, config.dim), EMBEDDING)]
    specs += [_layer_spec(config, layer, short) for layer in range(config.n_layers) for short in order]
    specs.append(ParamSpec(FINAL_NORM, (config.dim,), NORM))
    if not config.tie_embeddings:
        specs.append(ParamSpec(OUTPUT_HEAD, (config.vocab_size, config.dim), OUTPUT))
    return {spec.name: spec for spec in specs}


def head_name(config) -> str:
    """The parameter the output head multiplies by: output.weight, or the embedding when tied."""
    return TOK_EMBEDDINGS if config.tie_embeddings else OUTPUT_HEAD


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in checkpoint order."""
    return {name: spec.shape for name, spec in parameter_table(config).items()}


def hf_names(config) -> dict[str, str]:
    """Meta's name -> Hugging Face's name for every parameter, in checkpoint order."""
    names = {}
    for layer in range(config.n_layers):
        names.update({layer_name(layer, short): f"model.layers.{layer}.{suffix}"
                      for short, suffix in HF_LAYER_SUFFIXES.items()})
    return {name: HF_NAMES.get(name) or names[name] for name in parameter_table(config)}


def gguf_names(config) -> dict[str, str]:
    """Meta's name -> llama.cpp's GGUF name for every parameter, in checkpoint order."""
    names = {}
    for layer in range(config.n_layers):
        names.update({layer_name(layer, short): f"blk.{layer}.{suffix}"
                      for short, suffix in GGUF_LAYER_SUFFIXES.items()})
    return {name: GGUF_NAMES.get(name) or names[name] for name in parameter_table(config)}


def rope_permuted_names(config) -> set[str]:
    """The parameters whose rows differ between Meta's and Hugging Face's RoPE layouts (wq, wk)."""
    return {layer_name(layer, short) for layer in range(config.n_layers) for short in ROPE_PERMUTED}
