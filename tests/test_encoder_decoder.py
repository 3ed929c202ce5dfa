"""Encoder-decoder models (T5): calibrated methods walk both stacks, the encoder's blocks on the calibration ids, then
the decoder's on the ids shifted right with the quantized encoder's output; `_keep_in_fp32_modules` (T5's `wo`)
stays float; models whose stacks cannot be walked are refused before any weight is read."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

import hf_ptq
from hf_ptq.nn import QUANTIZED_MODULES
from hf_ptq.pipeline import smoothing
from hf_ptq.pipeline.stacks import calibration_free_methods, decoder_input_ids, model_stacks

VOCAB, SEQ = 100, 16


def t5_config(**overrides) -> T5Config:
    kwargs = dict(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5Config(**{**kwargs, **overrides})


def save_t5(folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    T5ForConditionalGeneration(t5_config(**overrides)).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A tiny random bf16 T5 (ReLU feed-forward, v1.0) saved to disk."""
    return save_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def gated_t5_dir(tmp_path_factory) -> Path:
    """A tiny random bf16 T5 v1.1 / Flan-T5 layout (gated GELU: wi_0, wi_1)."""
    return save_t5(tmp_path_factory.mktemp("t5-gated"), feed_forward_proj="gated-gelu")


def ids(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


CALIBRATION = ids(16, seed=1)
EVALUATION = ids(4, seed=2)


def gptq(**kw) -> hf_ptq.PtqConfig:
    return hf_ptq.PtqConfig(
        **{"method": "gptq", "bits": 3, "group_size": 32, "dataset": CALIBRATION, "seq_len": SEQ, **kw}
    )


def load(folder: Path, config=None, dtype: torch.dtype = torch.float32) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration.from_pretrained(folder, quantization_config=config, dtype=dtype)


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The Linears of both stacks' blocks (float or quantized), by name."""
    kinds = (torch.nn.Linear, *QUANTIZED_MODULES)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and ".block." in n}


@torch.no_grad()
def logits(model: T5ForConditionalGeneration, batch: torch.Tensor) -> torch.Tensor:
    """[b, seq, vocab] of teacher-forced decoding of `batch` (fp32)."""
    return model(input_ids=batch, decoder_input_ids=decoder_input_ids(model, batch)).logits.float()


def assert_generates(model: T5ForConditionalGeneration) -> None:
    out = model.generate(EVALUATION[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 5) and int(out.max()) < VOCAB and int(out[0, 0]) == model.config.decoder_start_token_id


def flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in flat_tensors(value[k])]
    return []


def test_capture_hands_each_block_what_the_model_passes_it(t5_dir):
    """Every block's captured arguments (masks, T5's position bias that block 0 computes for the others, the encoder's
    output for cross-attention) are those the model's own forward passes it."""
    model = load(t5_dir).eval()
    batch = CALIBRATION[:2]
    stacks = model_stacks(model)
    assert [s.prefix for s in stacks] == ["encoder.block", "decoder.block"]
    real: dict[str, list] = {}

    def record(name: str):
        def hook(module, args, kwargs):
            real[name] = flat_tensors((args, kwargs))

        return hook

    handles = [
        block.register_forward_pre_hook(record(f"{s.prefix}.{i}"), with_kwargs=True)
        for s in stacks
        for i, block in enumerate(s.blocks)
    ]
    logits(model, batch)
    for h in handles:
        h.remove()
    for stack in stacks:
        captured = stack.capture([batch])
        assert torch.equal(captured.hidden[0], real[f"{stack.prefix}.0"][0])
        for i, calls in enumerate(captured.calls):
            got, expected = flat_tensors((calls[0].args, calls[0].kwargs)), real[f"{stack.prefix}.{i}"][1:]
            assert len(got) == len(expected) >= min(i, 1), (stack.prefix, i)  # block 0's position bias after it
            for g, e in zip(got, expected, strict=True):
                assert torch.equal(g, e), (stack.prefix, i)
    bias = captured.calls[1][0].args[1]  # decoder block 1's position bias: block 0's, not zeros
    assert bias is not None and bias.abs().max() > 0


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_calibrated_methods_quantize_both_stacks(t5_dir, method, caplog):
    """Every targeted Linear of the encoder and decoder blocks (self- and cross-attention, wi) is quantized, `wo` stays
    float (`_keep_in_fp32_modules`), the family table folds T5's scales without the unscaled warning, and the model
    generates."""
    if method == "smoothquant":
        config = hf_ptq.SmoothQuantConfig(dataset=CALIBRATION, seq_len=SEQ)
    else:
        config = hf_ptq.PtqConfig(method=method, bits=4, group_size=32, dataset=CALIBRATION, seq_len=SEQ)
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        model = load(t5_dir, config)
    linears = block_linears(model)
    targeted = {n: m for n, m in linears.items() if not n.endswith(".wo")}
    assert len(targeted) == 2 * 5 + 2 * 9  # encoder: q k v o wi; decoder: + cross-attention q k v o
    assert any(".EncDecAttention." in n for n in targeted) and any(n.startswith("encoder.") for n in targeted)
    assert all(isinstance(m, QUANTIZED_MODULES) for m in targeted.values()), [
        n for n, m in targeted.items() if not isinstance(m, QUANTIZED_MODULES)
    ]
    assert all(type(m) is torch.nn.Linear for n, m in linears.items() if n.endswith(".wo"))
    assert "absorb a per-channel scale" not in caplog.text
    assert_generates(model)


def test_gptq_walks_both_stacks_of_bart(tmp_path):
    """Another encoder-decoder family (post-norm BART, learned positions) calibrates the same way and generates."""
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "bart")
    reference = logits(BartForConditionalGeneration.from_pretrained(tmp_path / "bart"), EVALUATION)
    model = BartForConditionalGeneration.from_pretrained(tmp_path / "bart", quantization_config=gptq(bits=4))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)]
    assert len(quantized) == 2 * 6 + 2 * 10  # q k v out fc1 fc2; the decoder adds encoder_attn's q k v out
    assert {n.split(".")[1] for n in quantized} == {"encoder", "decoder"}
    assert rel_err(logits(model, EVALUATION), reference) < 0.05
    out = model.generate(EVALUATION[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and int(out.max()) < VOCAB


def test_gptq_on_t5_beats_rtn_on_the_same_layers(t5_dir):
    """GPTQ's error compensation works on both stacks: its logits are closer to the float model's than RTN's with the
    same grid on the same layers (held-out ids)."""
    reference = logits(load(t5_dir), EVALUATION)
    rtn = load(t5_dir, hf_ptq.PtqConfig(method="rtn", bits=3, group_size=32))
    calibrated = load(t5_dir, gptq())
    assert set(n for n, m in block_linears(rtn).items() if isinstance(m, QUANTIZED_MODULES)) == set(
        n for n, m in block_linears(calibrated).items() if isinstance(m, QUANTIZED_MODULES)
    )
    rtn_error = rel_err(logits(rtn, EVALUATION), reference)
    gptq_error = rel_err(logits(calibrated, EVALUATION), reference)
    assert gptq_error < 0.85 * rtn_error, (gptq_error, rtn_error)


def test_decoder_is_calibrated_on_the_quantized_encoders_output(t5_dir):
    """The cross-attention input the decoder blocks calibrate on is the quantized encoder's final hidden states."""
    model = load(t5_dir).eval()
    with torch.no_grad():
        float_encoded = model.get_encoder()(input_ids=CALIBRATION).last_hidden_state
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("encoder_hidden_states", args[3] if len(args) > 3 else None))

    handle = model.decoder.block[1].register_forward_pre_hook(hook, with_kwargs=True)
    hf_ptq.quantize(model, gptq(batch_size=len(CALIBRATION)))
    handle.remove()
    with torch.no_grad():
        quantized_encoded = model.get_encoder()(input_ids=CALIBRATION).last_hidden_state
    assert seen and all(s is not None for s in seen)
    for s in seen:
        torch.testing.assert_close(s.float(), quantized_encoded.float())
    assert rel_err(seen[0], float_encoded) > 1e-2  # the encoder's quantization error is in what the decoder saw


@pytest.mark.parametrize("feed_forward", ["t5_dir", "gated_t5_dir"])
def test_smoothquant_folds_every_t5_scale_group(feed_forward, request, monkeypatch):
    """SmoothQuant folds a scale for each T5 group the family table names, in both stacks (ReLU and gated GELU),
    each fold checked exact on the block's output."""
    folds: list[tuple[str, tuple[str, ...], bool]] = []
    checked = smoothing.fold_checked

    def spy(block, group, layout, s, run_block):
        folds.append((group.prev, group.linears, ok := checked(block, group, layout, s, run_block)))
        return ok

    monkeypatch.setattr(smoothing, "fold_checked", spy)
    load(request.getfixturevalue(feed_forward), hf_ptq.SmoothQuantConfig(dataset=CALIBRATION, seq_len=SEQ))
    assert folds and all(ok for *_, ok in folds), [f for f in folds if not f[2]]
    wi = ("wi_0", "wi_1") if feed_forward == "gated_t5_dir" else ("wi",)
    per_encoder_block = {
        ("layer.0.layer_norm", ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v")),
        ("layer.0.SelfAttention.v", ("layer.0.SelfAttention.o",)),
        ("layer.1.layer_norm", tuple(f"layer.1.DenseReluDense.{w}" for w in wi)),
    }
    per_decoder_block = {
        ("layer.0.layer_norm", ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v")),
        ("layer.0.SelfAttention.v", ("layer.0.SelfAttention.o",)),
        ("layer.1.layer_norm", ("layer.1.EncDecAttention.q",)),
        ("layer.1.EncDecAttention.v", ("layer.1.EncDecAttention.o",)),
        ("layer.2.layer_norm", tuple(f"layer.2.DenseReluDense.{w}" for w in wi)),
    }
    done = [(prev, linears) for prev, linears, _ in folds]
    assert len(done) == 2 * len(per_encoder_block) + 2 * len(per_decoder_block)
    assert set(done) == per_encoder_block | per_decoder_block


def test_target_bits_measures_the_layers_of_both_stacks(t5_dir):
    """Mixed precision (`target_bits`) measures every layer's error on the decoder's loss, encoder layers included
    (their gradients flow through cross-attention), then GPTQ walks both stacks."""
    config = gptq(target_bits=3.5, num_samples=4)
    model = load(t5_dir, config)
    rows = config._mixed_report
    assert {r[0] for r in rows} == {n for n in block_linears(model) if not n.endswith(".wo")}
    assert all(share > 0 for name, _, _, share in rows if name.startswith("encoder.")), rows
    assert all(isinstance(m, QUANTIZED_MODULES) for n, m in block_linears(model).items() if not n.endswith(".wo"))
    assert_generates(model)


def test_data_free_calibration_of_t5(t5_dir):
    """`dataset=None` samples calibration text from the model's own decoder (generate from its start token), then
    walks both stacks."""
    model = load(t5_dir, gptq(dataset=None, num_samples=4))
    assert all(isinstance(m, QUANTIZED_MODULES) for n, m in block_linears(model).items() if not n.endswith(".wo"))
    assert_generates(model)


@pytest.mark.parametrize("method", ["rtn", "int8", "hqq", "gptq"])
def test_fp16_t5_keeps_wo_in_fp32(t5_dir, method):
    """An fp16 load keeps `_keep_in_fp32_modules` (T5's `wo`) float in fp32, calibration-free or calibrated, and
    the quantized model generates."""
    config = {
        "rtn": hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32),
        "int8": hf_ptq.PtqConfig(method="int8"),
        "hqq": hf_ptq.PtqConfig(method="hqq", bits=4, group_size=32),
        "gptq": gptq(),
    }[method]
    model = load(t5_dir, config, dtype=torch.float16)
    wo = [m for n, m in block_linears(model).items() if n.endswith(".wo")]
    assert len(wo) == 4 and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in wo)
    others = [m for n, m in block_linears(model).items() if not n.endswith(".wo")]
    assert others and all(isinstance(m, QUANTIZED_MODULES) for m in others)
    assert_generates(model)


def test_wo_computes_in_fp32_while_a_float16_walk_calibrates(t5_dir, monkeypatch):
    """With a float16 work dtype (GPUs, CPUs with native half math), the walk casts each block to it but for `wo`,
    which keeps computing in float32 (what `_keep_in_fp32_modules` is for: T5's `wo` overflows in float16)."""
    from hf_ptq.pipeline import sequential

    monkeypatch.setattr(sequential, "cpu_has_fast_bf16", lambda: True)  # the walk computes in the model's dtype
    model = load(t5_dir, dtype=torch.float16).eval()
    seen: dict[str, set[torch.dtype]] = {"wo": set(), "q": set()}

    def hook(kind: str):
        def fn(module, args):
            seen[kind].add(getattr(module, "weight", args[0]).dtype)

        return fn

    for name, module in block_linears(model).items():
        if name.endswith((".wo", "SelfAttention.q")):
            module.register_forward_pre_hook(hook("wo" if name.endswith(".wo") else "q"))
    hf_ptq.quantize(model, gptq(num_samples=4))
    assert seen["q"] == {torch.float16} and seen["wo"] == {torch.float32}, seen
    assert all(m.weight.dtype == torch.float32 for n, m in block_linears(model).items() if n.endswith(".wo"))


def corrupt_weights(folder: Path) -> Path:
    """`folder`'s checkpoint with its safetensors file overwritten by junk: reading any weight fails."""
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + bytes(64))
    return folder


def test_missing_decoder_start_token_is_refused_before_weights_load(tmp_path):
    folder = corrupt_weights(save_t5(tmp_path / "t5", decoder_start_token_id=None))
    with pytest.raises(Exception) as read_error:  # the junk is read when a load gets that far
        load(folder, hf_ptq.PtqConfig(method="rtn"))
    assert "decoder_start_token_id" not in str(read_error.value)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration.*config\.decoder_start_token_id"):
        load(folder, gptq())
    assert time.perf_counter() - start < 30


class T5WithoutEncoder(T5ForConditionalGeneration):
    """An encoder-decoder class whose encoder cannot be found (stands in for layouts the walk does not know)."""

    def get_encoder(self, modality=None):
        raise NotImplementedError


@pytest.mark.parametrize("calibrated", ["gptq", "awq", "smoothquant", "target_bits"])
def test_unwalkable_encoder_decoder_is_refused_before_weights_load(tmp_path, calibrated):
    """Calibrated methods on an encoder-decoder model without a findable encoder / decoder pair stop before any
    weight is read, naming the class and the methods that need no calibration."""
    folder = corrupt_weights(save_t5(tmp_path / "t5"))
    config = {
        "gptq": gptq(),
        "awq": hf_ptq.PtqConfig(method="awq", bits=4, group_size=32, dataset=CALIBRATION, seq_len=SEQ),
        "smoothquant": hf_ptq.SmoothQuantConfig(dataset=CALIBRATION, seq_len=SEQ),
        "target_bits": hf_ptq.PtqConfig(method="rtn", target_bits=4.5, dataset=CALIBRATION, seq_len=SEQ),
    }[calibrated]
    with pytest.raises(ValueError) as refused:
        T5WithoutEncoder.from_pretrained(folder, quantization_config=config, dtype=torch.float32)
    message = str(refused.value)
    assert "T5WithoutEncoder" in message
    for method in ("rtn", "int8", "hqq", "nf4"):
        assert f"'{method}'" in message
    assert set(calibration_free_methods()) >= {"rtn", "int8", "hqq", "nf4"}
    assert not {"gptq", "awq"} & set(calibration_free_methods())
