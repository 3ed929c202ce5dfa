"""Model-family knowledge, in one table: which op of a block feeds which Linears (for AWQ / SmoothQuant folding).

A per-input-channel scale s can be moved out of a group of Linears that read the same tensor into the op that
produces that tensor: the Linears' weights are multiplied by s (input channels) and the producer's output channels
divided by s, leaving the block's function unchanged before rounding. The producer (`ScaleGroup.prev`) is a norm
(its weight, and bias if any, divided by s) or a Linear (its output rows and bias divided by s; for fused
projections only their last part, which feeds the group: v of a fused qkv, the "up" half of a fused gate_up).

Blocks are keyed by `config.model_type`. A model type not in the table gets the Llama layout (`GENERIC`), which fits
most decoder-only models; entries whose modules a block does not have are ignored, and every fold is checked
numerically by the pipeline (`smoothing.py`), so a layout that does not fit is quantized unscaled, never wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleGroup:
    """A producer op and the Linears (names relative to the block) that read its output."""

    prev: str
    linears: tuple[str, ...]
    parts: int = 1  # prev is a Linear fusing `parts` equal projections, of which the last one feeds `linears`


@dataclass(frozen=True)
class FamilyLayout:
    """The scale groups of one family's blocks; `norm_offset` 1.0 for norms computing `x̂ * (1 + weight)` (Gemma);
    `unscaled`: Linears known to have no producer that can take a scale (after a GELU, or reading the residual
    stream), quantized unscaled without a warning."""

    groups: tuple[ScaleGroup, ...]
    norm_offset: float = 0.0
    unscaled: tuple[str, ...] = ()

    def group_for(self, linears: list[str]) -> ScaleGroup | None:
        """The scale group whose Linears are exactly `linears` (in any order), or None."""
        wanted = set(linears)
        return next((g for g in self.groups if set(g.linears) == wanted), None)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GENERIC = FamilyLayout(
    (
        ScaleGroup("input_layernorm", _QKV),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),  # only when v's width equals o's input (no GQA)
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    )
)
_GEMMA = FamilyLayout(
    (
        ScaleGroup("input_layernorm", _QKV),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),  # post_attention_* is after o
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    norm_offset=1.0,
)


def _t5_feed_forward(layer: int) -> tuple[ScaleGroup, ...]:
    """T5's feed-forward sub-layer `layer.<layer>`: its norm feeds wi (ReLU, T5 v1.0) or wi_0 / wi_1 (gated GELU,
    v1.1 / Flan-T5); wi or wi_1 (the linear half of the gate) feeds wo, which `_keep_in_fp32_modules` keeps float."""
    ff = f"layer.{layer}.DenseReluDense"
    return (
        ScaleGroup(f"layer.{layer}.layer_norm", (f"{ff}.wi",)),
        ScaleGroup(f"layer.{layer}.layer_norm", (f"{ff}.wi_0", f"{ff}.wi_1")),
        ScaleGroup(f"{ff}.wi", (f"{ff}.wo",)),  # through ReLU
        ScaleGroup(f"{ff}.wi_1", (f"{ff}.wo",)),
    )


# Pre-norm T5 blocks (RMS norms without bias): encoder blocks are self-attention (layer.0) and feed-forward (layer.1);
# decoder blocks put cross-attention at layer.1 (its norm feeds q only: k and v read the encoder's output, produced
# outside the block) and the feed-forward at layer.2.
_T5 = FamilyLayout(
    (
        ScaleGroup("layer.0.layer_norm", tuple(f"layer.0.SelfAttention.{p}" for p in "qkv")),
        ScaleGroup("layer.0.SelfAttention.v", ("layer.0.SelfAttention.o",)),
        *_t5_feed_forward(1),
        ScaleGroup("layer.1.layer_norm", ("layer.1.EncDecAttention.q",)),
        ScaleGroup("layer.1.EncDecAttention.v", ("layer.1.EncDecAttention.o",)),
        *_t5_feed_forward(2),
    ),
    unscaled=("layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v"),
)

FAMILY_TABLE: dict[str, FamilyLayout] = {
    "llama": GENERIC,
    "mistral": GENERIC,
    "qwen2": GENERIC,
    "qwen3": GENERIC,
    "gemma": FamilyLayout(GENERIC.groups, norm_offset=1.0),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": FamilyLayout(
        (
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",)),
            ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), parts=3),  # q, k, v of equal width (no GQA)
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
            ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), parts=2),  # down reads up * act(gate)
        )
    ),
    "opt": FamilyLayout(  # pre-norm OPT (do_layer_norm_before); the check rejects the post-norm variant
        (
            ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)),
            ScaleGroup("final_layer_norm", ("fc1",)),
            ScaleGroup("fc1", ("fc2",)),  # through ReLU (relu(x / s) = relu(x) / s), OPT's activation
        )
    ),
    "gpt2": FamilyLayout(
        (
            ScaleGroup("ln_1", ("attn.c_attn",)),
            ScaleGroup("attn.c_attn", ("attn.c_proj",), parts=3),
            ScaleGroup("ln_2", ("mlp.c_fc",)),
        ),
        unscaled=("mlp.c_proj",),  # reads GELU(c_fc(x))
    ),
    "t5": _T5,
    "mt5": _T5,
    # Post-norm encoders: a norm's output is also the residual stream, so only value -> output projection folds.
    "bert": FamilyLayout(
        (ScaleGroup("attention.self.value", ("attention.output.dense",)),),
        unscaled=(
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "intermediate.dense",
            "output.dense",
        ),
    ),
}


def family_layout(model_type: str | None) -> FamilyLayout:
    """The scale groups for blocks of `model_type` (the generic Llama-like layout when the type is unknown)."""
    return FAMILY_TABLE.get(model_type or "", GENERIC)
