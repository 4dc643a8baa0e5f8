"""Architecture knowledge as data: where modules can attach in each supported model family.

Nothing here is code per architecture. Each family is one `ArchSpec` row naming module paths; the
generic machinery in `sites.py` resolves the names. A model whose `config.model_type` is not in the
table still works by naming target modules (patterns) directly.

Paths are dotted attribute paths. Layer-group paths are relative to `model.base_model` (so a
`BertModel` and a `BertForSequenceClassification` share one row); everything in a `LayerSpec` is
relative to one layer of that group.

Terms used below, for one transformer layer::

        residual r ───────────────────────────────┐
            │                                      │
       [pre-LN?] -> attention -> attn_out ──h──>  (+) -> [post-LN?] -> ...

- a *projection role* (`query`, `key`, `value`, `attn_out`, `ffn_in`, `ffn_out`) names a
  `nn.Linear` (or GPT-2 `Conv1D`): parameter-composition methods such as LoRA target these;
- a *sub-layer output* (`HookPoint`) names the module whose output `h` is the sub-layer's result
  just before the residual add, where the residual `r` can be read (`InputRef`: which module's
  forward input carries it), and the post-residual LayerNorm if the family is post-LN. Bottleneck
  adapters attach here: sequential ones transform `h`, parallel ones add a branch computed from `r`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputRef:
    """The tensor passed to a module's forward: positional index `arg`, or keyword `kwarg`.

    `module` is a path relative to the layer; "" means the layer itself.
    """

    module: str
    arg: int = 0
    kwarg: str = "hidden_states"


@dataclass(frozen=True)
class HookPoint:
    """A sub-layer output: `module`'s output is `h` (a tensor, or a tuple whose first item is `h`).

    `residual` says where the residual stream `r` added to `h` is read; `norm` is the LayerNorm
    applied to `h + r` in post-LN families (None in pre-LN families).
    """

    module: str
    residual: InputRef
    norm: str | None = None


@dataclass(frozen=True)
class LayerSpec:
    """Module paths inside one layer. A role may name several modules (gated FFNs: gate and up).

    `optional` (added for T5) names role paths that exist only under some configs of one
    `config.model_type`: the original T5 has `DenseReluDense.wi`, T5 v1.1 / Flan-T5 (also "t5",
    `feed_forward_proj="gated-gelu"`) have `wi_0` and `wi_1` instead, so `ffn_in` lists all three and
    all three are optional. A resolver skips an optional path that does not resolve; every other path
    must resolve, and every role must resolve to at least one module.
    """

    query: tuple[str, ...]
    key: tuple[str, ...]
    value: tuple[str, ...]
    attn_out: tuple[str, ...]
    ffn_in: tuple[str, ...]
    ffn_out: tuple[str, ...]
    attn_output: HookPoint
    ffn_output: HookPoint
    cross_attn_output: HookPoint | None = None
    optional: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerGroup:
    """A `nn.ModuleList` of identical layers (an encoder stack, a decoder stack)."""

    path: str
    layer: LayerSpec
    name: str = "layers"


@dataclass(frozen=True)
class ArchSpec:
    """One model family: its layer groups and its input word embeddings (relative to base_model)."""

    family: str
    model_types: tuple[str, ...]
    groups: tuple[LayerGroup, ...]
    embeddings: str
    decoder_only: bool = False


PROJECTION_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
HOOK_POINT_ROLES = ("attn_output", "ffn_output")

_BERT_LAYER = LayerSpec(
    query=("attention.self.query",),
    key=("attention.self.key",),
    value=("attention.self.value",),
    attn_out=("attention.output.dense",),
    ffn_in=("intermediate.dense",),
    ffn_out=("output.dense",),
    # The dropout after the projection is the last step before `LayerNorm(h + input_tensor)`.
    attn_output=HookPoint(
        "attention.output.dropout",
        residual=InputRef("attention.output", 1, "input_tensor"),
        norm="attention.output.LayerNorm",
    ),
    ffn_output=HookPoint(
        "output.dropout",
        residual=InputRef("output", 1, "input_tensor"),
        norm="output.LayerNorm",
    ),
)

# DistilBERT is post-LN like BERT, but the residual adds and LayerNorms live in the layer itself.
# The attention returns a tuple `(out_lin output, weights)`; nothing sits between `out_lin` and the add.
# transformers 4.57 calls the attention as `attention(query=x, key=x, value=x, mask=...)` (keywords),
# 5.x as `attention(hidden_states, attention_mask)` (positional): `arg=0` / `kwarg="query"` reads `r` in
# both. The layer's own input is `r` too, but its name differs as well (`x` in 4.57, `hidden_states` in 5).
_DISTILBERT_LAYER = LayerSpec(
    query=("attention.q_lin",),
    key=("attention.k_lin",),
    value=("attention.v_lin",),
    attn_out=("attention.out_lin",),
    ffn_in=("ffn.lin1",),
    ffn_out=("ffn.lin2",),
    attn_output=HookPoint(
        "attention.out_lin",
        residual=InputRef("attention", 0, "query"),
        norm="sa_layer_norm",
    ),
    ffn_output=HookPoint(
        "ffn.dropout",
        residual=InputRef("ffn", 0, "input"),
        norm="output_layer_norm",
    ),
)

# GPT-2 is pre-LN. `attn.c_attn` is one fused Conv1D producing query, key and value; `Conv1D` is
# transformers' transposed linear (weight shape (in, out)). `r` is the input of the pre-sub-layer
# LayerNorm (`nn.LayerNorm.forward(input)`, always called positionally). The optional cross attention
# (`config.add_cross_attention`, GPT-2 used as a seq2seq decoder) is not in the row.
_GPT2_LAYER = LayerSpec(
    query=("attn.c_attn",),
    key=("attn.c_attn",),
    value=("attn.c_attn",),
    attn_out=("attn.c_proj",),
    ffn_in=("mlp.c_fc",),
    ffn_out=("mlp.c_proj",),
    attn_output=HookPoint("attn.resid_dropout", residual=InputRef("ln_1", 0, "input")),
    ffn_output=HookPoint("mlp.dropout", residual=InputRef("ln_2", 0, "input")),
)


def _llama_style_layer(norm_arg: str = "hidden_states") -> LayerSpec:
    """Pre-LN (RMSNorm) decoder layer with separate q/k/v and a gated (gate/up/down) MLP.

    No dropout follows the attention or the MLP, so `h` is the output projection's output (the attention
    module itself returns a tuple whose item 0 is the same tensor). `r` is the input of the RMSNorm in
    front of each sub-layer, passed positionally; `norm_arg` is that RMSNorm's parameter name.
    """
    return LayerSpec(
        query=("self_attn.q_proj",),
        key=("self_attn.k_proj",),
        value=("self_attn.v_proj",),
        attn_out=("self_attn.o_proj",),
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out=("mlp.down_proj",),
        attn_output=HookPoint("self_attn.o_proj", residual=InputRef("input_layernorm", 0, norm_arg)),
        ffn_output=HookPoint("mlp.down_proj", residual=InputRef("post_attention_layernorm", 0, norm_arg)),
    )


# Phi-3: the Llama layout with fused projections (`qkv_proj`: query, key, value in one Linear;
# `gate_up_proj`: gate and up in one Linear) and a residual dropout after each sub-layer.
_PHI3_LAYER = LayerSpec(
    query=("self_attn.qkv_proj",),
    key=("self_attn.qkv_proj",),
    value=("self_attn.qkv_proj",),
    attn_out=("self_attn.o_proj",),
    ffn_in=("mlp.gate_up_proj",),
    ffn_out=("mlp.down_proj",),
    attn_output=HookPoint("resid_attn_dropout", residual=InputRef("input_layernorm", 0, "hidden_states")),
    ffn_output=HookPoint(
        "resid_mlp_dropout", residual=InputRef("post_attention_layernorm", 0, "hidden_states")
    ),
)


def _t5_layer(decoder: bool) -> LayerSpec:
    """A T5 block: `layer` is a ModuleList of pre-LN sub-layers, each `x + dropout(f(layer_norm(x)))`.

    Encoder: `layer.0` self attention, `layer.1` FFN. Decoder: `layer.0` self attention, `layer.1` cross
    attention, `layer.2` FFN. The projection roles include the cross attention's q/k/v/o in the decoder
    (k and v read the encoder output). The FFN's input projection is `wi` (ReLU T5) or `wi_0` + `wi_1`
    (gated T5 v1.1 / Flan-T5), hence `optional`.
    """
    ffn = "layer.2" if decoder else "layer.1"
    attentions = ("layer.0.SelfAttention",) + (("layer.1.EncDecAttention",) if decoder else ())
    wi = tuple(f"{ffn}.DenseReluDense.{name}" for name in ("wi", "wi_0", "wi_1"))
    return LayerSpec(
        query=tuple(f"{a}.q" for a in attentions),
        key=tuple(f"{a}.k" for a in attentions),
        value=tuple(f"{a}.v" for a in attentions),
        attn_out=tuple(f"{a}.o" for a in attentions),
        ffn_in=wi,
        ffn_out=(f"{ffn}.DenseReluDense.wo",),
        attn_output=HookPoint("layer.0.dropout", residual=InputRef("layer.0.layer_norm")),
        ffn_output=HookPoint(f"{ffn}.dropout", residual=InputRef(f"{ffn}.layer_norm")),
        cross_attn_output=(
            HookPoint("layer.1.dropout", residual=InputRef("layer.1.layer_norm")) if decoder else None
        ),
        optional=wi,
    )


ARCHS: tuple[ArchSpec, ...] = (
    # RoBERTa, XLM-RoBERTa and ELECTRA layers are copies of BERT's (same module names, same calls).
    # ELECTRA's base model may add `embeddings_project` (a Linear from `embedding_size` to
    # `hidden_size`, present when they differ): `embeddings.word_embeddings` then has `embedding_size`
    # columns, not `hidden_size`.
    ArchSpec(
        family="bert",
        model_types=("bert", "roberta", "xlm-roberta", "electra"),
        groups=(LayerGroup("encoder.layer", _BERT_LAYER),),
        embeddings="embeddings.word_embeddings",
    ),
    ArchSpec(
        family="distilbert",
        model_types=("distilbert",),
        groups=(LayerGroup("transformer.layer", _DISTILBERT_LAYER),),
        embeddings="embeddings.word_embeddings",
    ),
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        groups=(LayerGroup("h", _GPT2_LAYER),),
        embeddings="wte",
        decoder_only=True,
    ),
    # Qwen3 adds per-head `q_norm`/`k_norm` inside the attention, which does not change any path here.
    ArchSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        groups=(LayerGroup("layers", _llama_style_layer()),),
        embeddings="embed_tokens",
        decoder_only=True,
    ),
    # Gemma (1) has Llama's layout; its own row only because `GemmaRMSNorm.forward(x)` names its
    # input `x` (it is passed positionally all the same). Gemma 2/3 (`gemma2`, `gemma3_text`) add
    # post-sub-layer norms before the residual add and are not covered. The sqrt(hidden_size) scaling
    # of the embeddings happens inside `embed_tokens` (GemmaTextScaledWordEmbedding) in transformers 5,
    # after it (in GemmaModel.forward) in 4.57: the weight is the same, the module's output is not.
    ArchSpec(
        family="gemma",
        model_types=("gemma",),
        groups=(LayerGroup("layers", _llama_style_layer(norm_arg="x")),),
        embeddings="embed_tokens",
        decoder_only=True,
    ),
    ArchSpec(
        family="phi3",
        model_types=("phi3",),
        groups=(LayerGroup("layers", _PHI3_LAYER),),
        embeddings="embed_tokens",
        decoder_only=True,
    ),
    # T5Model and T5ForConditionalGeneration are their own base_model (no `transformer` attribute).
    # T5EncoderModel has no decoder group. `shared` is `get_input_embeddings()` and owns the weight in
    # both versions, but in transformers 5 `encoder.embed_tokens`/`decoder.embed_tokens` are separate
    # Embedding modules tying that weight, so a forward hook on `shared` never fires there (in 4.57
    # they are `shared` itself, called once per stack).
    ArchSpec(
        family="t5",
        model_types=("t5",),
        groups=(
            LayerGroup("encoder.block", _t5_layer(decoder=False), name="encoder"),
            LayerGroup("decoder.block", _t5_layer(decoder=True), name="decoder"),
        ),
        embeddings="shared",
    ),
)


def arch_for(model_type: str) -> ArchSpec | None:
    """The table row for a `config.model_type`, or None for a family the table does not know."""
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    return None


def supported_model_types() -> list[str]:
    """Every `config.model_type` with a row in the table."""
    return sorted(t for spec in ARCHS for t in spec.model_types)
