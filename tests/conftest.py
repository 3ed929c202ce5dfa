"""Shared fixtures: tiny random models of every supported family, built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from optional_extras import (  # noqa: E402, F401  (pytest hooks: the `extra` marker, its skips, the end-of-run count)
    pytest_configure,
    pytest_runtest_setup,
    pytest_terminal_summary,
)
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

import hf_ptq  # noqa: E402, F401  (registers the "hf_ptq" quantization method)

transformers.logging.set_verbosity_error()

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
VOCAB = 128
SEQ = 12

_COMMON = dict(num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(_COMMON, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_key_value_heads=2)
_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Family:
    """How to build a tiny model of one architecture and which of its layers hf_ptq must quantize."""

    name: str
    make_config: Callable[[], transformers.PretrainedConfig]
    layer_prefix: str  # f"{layer_prefix}.{i}.{suffix}" names the Linears of block i
    linear_suffixes: tuple[str, ...]
    down_proj: str  # the family's MLP output projection, for modules_to_not_convert
    float_modules: tuple[str, ...]  # modules that must stay in full precision (embeddings, lm_head)
    auto_class: type = AutoModelForCausalLM
    extra_linears: tuple[str, ...] = ()
    conv1d: bool = False  # GPT-2: Conv1D layers, weight stored [in, out]
    config_kwargs: dict = field(default_factory=dict)

    def expected_linears(self) -> set[str]:
        names = {f"{self.layer_prefix}.{i}.{s}" for i in range(LAYERS) for s in self.linear_suffixes}
        return names | set(self.extra_linears)

    def build(self, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = self.auto_class.from_config(self.make_config(), dtype=dtype)
        model.eval()
        return model


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
        "model.layers",
        _LLAMA_LINEARS,
        "mlp.down_proj",
        ("model.embed_tokens", "lm_head"),
    ),
    "mistral": Family(
        "mistral",
        lambda: transformers.MistralConfig(**_LLAMA_LIKE),
        "model.layers",
        _LLAMA_LINEARS,
        "mlp.down_proj",
        ("model.embed_tokens", "lm_head"),
    ),
    "qwen2": Family(
        "qwen2",
        lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
        "model.layers",
        _LLAMA_LINEARS,
        "mlp.down_proj",
        ("model.embed_tokens", "lm_head"),
    ),
    "qwen3": Family(
        "qwen3",
        lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=16),
        "model.layers",
        _LLAMA_LINEARS,
        "mlp.down_proj",
        ("model.embed_tokens", "lm_head"),
    ),
    "opt": Family(
        "opt",
        lambda: transformers.OPTConfig(
            **_COMMON, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, max_position_embeddings=64
        ),
        "model.decoder.layers",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        "fc2",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions", "lm_head"),
    ),
    "phi3": Family(
        "phi3",
        lambda: transformers.Phi3Config(
            **_LLAMA_LIKE, pad_token_id=0, max_position_embeddings=64, original_max_position_embeddings=64
        ),
        "model.layers",
        ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        "mlp.down_proj",
        ("model.embed_tokens", "lm_head"),
    ),
    "gemma2": Family(
        "gemma2",
        lambda: transformers.Gemma2Config(**_LLAMA_LIKE, head_dim=16),
        "model.layers",
        _LLAMA_LINEARS,
        "mlp.down_proj",
        ("model.embed_tokens", "lm_head"),
    ),
    "gpt2": Family(
        "gpt2",
        lambda: transformers.GPT2Config(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_inner=INTERMEDIATE,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "transformer.h",
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        "mlp.c_proj",
        ("transformer.wte", "transformer.wpe", "lm_head"),
        conv1d=True,
    ),
    "bert": Family(
        "bert",
        lambda: transformers.BertConfig(
            **_COMMON, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, max_position_embeddings=64, pad_token_id=0
        ),
        "encoder.layer",
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        "intermediate.dense",
        ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
        auto_class=AutoModel,
        extra_linears=("pooler.dense",),
    ),
}


@pytest.fixture(autouse=True)
def _warnings_said_fresh():
    """Every test starts with no warning said yet: hf_ptq.core.warn_once says each one once per run."""
    from hf_ptq.core.warn_once import forget_warnings

    forget_warnings()


def load_with_blocks_on_disk(
    folder: Path, config, on_disk: tuple[int, ...] = (1,), blocks: int = 2, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The Llama saved in `folder` (`blocks` decoder blocks), quantized with `config` while accelerate keeps the
    blocks `on_disk` on disk (offload folder beside `folder`) and the rest on the CPU."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in on_disk else "cpu" for i in range(blocks)}
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=config,
        device_map=device_map,
        offload_folder=str(folder.parent / "offload"),
        dtype=dtype,
    )


def rtn_w4() -> hf_ptq.PtqConfig:
    return hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32, sym=False)


def int8() -> hf_ptq.PtqConfig:
    return hf_ptq.PtqConfig(method="int8")


def input_ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


@torch.no_grad()
def model_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder, as fp32."""
    out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A saved tiny bf16 Llama checkpoint (hidden 64, 2 layers)."""
    path = tmp_path / "llama-float"
    FAMILIES["llama"].build().save_pretrained(path)
    return path


def reference_rtn(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantized RTN weight [out, in] (fp32), computed from the spec, vectorized over groups.

    Groups are runs of `group_size` input channels (`-1`: a whole row, `0`: the whole tensor). Symmetric:
    scale = max|w| / (2^(b-1) - 1), q = round(w / scale). Asymmetric: the range [min, max] is widened to include 0,
    scale = (max - min) / (2^b - 1), zero = qmin - round(min / scale), q = round(w / scale) + zero. Scales are
    rounded to the dtype they are stored in before use; q is clamped to the signed b-bit range.
    """
    out_f, in_f = w.shape
    members = {0: out_f * in_f, -1: in_f}.get(group_size, group_size)
    g = w.float().reshape(-1, members)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if sym:
        scale = g.abs().amax(1, keepdim=True) / qmax
    else:
        lo, hi = g.amin(1, keepdim=True).clamp(max=0), g.amax(1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype).float()
    if sym:
        q = torch.clamp(torch.round(g / scale), qmin, qmax)
        return (q * scale).reshape(out_f, in_f)
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(g / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).reshape(out_f, in_f)


def float_weight(module: torch.nn.Module) -> torch.Tensor:
    """[out, in] weight of an nn.Linear or of GPT-2's Conv1D (stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def save_tiny_llama_with_tokenizer(folder: Path, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> Path:
    """Save a tiny random bf16 Llama (tied embeddings) with SmolLM2's real tokenizer into `folder`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_ptq.default_model import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved with SmolLM2's real tokenizer (for scripts that tokenize and generate)."""
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny-llama-tokenizer"))


def assert_same_model(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Same state-dict keys, the same tensors bit for bit, and the same outputs."""
    got_sd, expected_sd = got.state_dict(), expected.state_dict()
    assert sorted(got_sd) == sorted(expected_sd)
    for key, value in expected_sd.items():
        assert got_sd[key].dtype == value.dtype and torch.equal(got_sd[key], value), key
    ids = input_ids()
    assert torch.equal(model_output(got, ids), model_output(expected, ids))
