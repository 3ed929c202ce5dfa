"""`full_range=True`: the symmetric grid of all 2^b levels (llama.cpp's Q4_0), scale = signed extreme / -2^(b-1).

Checked against references written here from that definition (RTN, the clipping search, a naive GPTQ), then
through everything a symmetric model goes through: the packed kernels (negative scales), save / reload, the
compressed-tensors export and portable save read by plain transformers, the GPTQ export read by the reference v1
reader, GGUF Q4_0 blocks, config validation and config.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, input_ids, model_output, rel_err
from optional_extras import require_extra
from safetensors.torch import load_file
from test_kernels import calls  # noqa: F401  (the fixture counting which matmul ran)
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.core.clip_search import clipped_qparams
from hf_ptq.core.quant import compute_qparams, fake_quantize, quantize, round_scale
from hf_ptq.methods.gptq import gptq_quantize
from hf_ptq.nn import QuantLinear

BF16_EPS = 2.0**-8


def reference_full_range(w: torch.Tensor, bits: int, group_size: int, scale_dtype=torch.bfloat16):
    """(dequantized weight [out, in] fp32, q, scale [groups]) from the definition, as llama.cpp's
    `quantize_row_q4_0_ref` writes it: per group the value m of largest magnitude (on a tie between +a and -a, which
    bf16 weights often have, -a: a positive scale; llama.cpp takes whichever comes first), d = m / -2^(b-1) (stored
    in `scale_dtype`), q = clamp(round(w / d), -2^(b-1), 2^(b-1) - 1)."""
    out_f, in_f = w.shape
    members = {0: out_f * in_f, -1: in_f}.get(group_size, group_size)
    g = w.float().reshape(-1, members)
    m = g.gather(1, _extreme_index(g))
    d = (m / -(2 ** (bits - 1))).to(scale_dtype).float()
    q = torch.clamp(torch.round(g / d), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * d).reshape(out_f, in_f), q.reshape(out_f, in_f), d.reshape(-1)


def _extreme_index(g: torch.Tensor) -> torch.Tensor:
    """Index [rows, 1] of each row's value of largest magnitude, the negative one on a tie."""
    largest = g.abs() == g.abs().amax(1, keepdim=True)
    return (largest.double() * (1 + (g < 0).double())).argmax(1, keepdim=True)


def random_weight(out_f: int = 48, in_f: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * 0.05).to(torch.bfloat16)


# --- core: RTN grid, scales, clip search ---------------------------------------------------------------------
@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("group_size", (32, -1, 0))
def test_rtn_matches_the_reference_and_uses_the_lowest_level(bits: int, group_size: int) -> None:
    w = random_weight()
    qw = quantize(w, bits, group_size, True, full_range=True)
    ref, ref_q, ref_scale = reference_full_range(w, bits, group_size)
    assert qw.zero_point is None
    assert torch.equal(qw.dequantize(), ref)
    assert torch.equal(qw.q.float(), ref_q)
    assert torch.equal(qw.scale.reshape(-1), ref_scale)
    # every group's extreme sits exactly on -2^(b-1); the scale's sign is the opposite of the extreme's
    members = {0: w.numel(), -1: w.shape[1]}.get(group_size, group_size)
    groups, q = w.float().reshape(-1, members), qw.q.reshape(-1, members)
    at = _extreme_index(groups)
    assert bool((q.gather(1, at) == -(2 ** (bits - 1))).all())
    assert torch.equal(torch.sign(qw.scale.reshape(-1)), -torch.sign(groups.gather(1, at).reshape(-1)))
    assert bool((qw.scale < 0).any()) or group_size == 0


def test_step_is_max_over_2_pow_b_minus_1_and_error_lower_than_default() -> None:
    w = random_weight(64, 256, seed=3)
    full, plain = quantize(w, 4, 32, True, full_range=True), quantize(w, 4, 32, True)
    amax = w.float().reshape(64, -1, 32).abs().amax(-1)
    assert torch.equal(full.scale.abs(), (amax / 8).to(torch.bfloat16).float())
    assert torch.equal(plain.scale, (amax / 7).to(torch.bfloat16).float())
    err_full = (full.dequantize() - w.float()).square().mean()
    err_plain = (plain.dequantize() - w.float()).square().mean()
    assert err_full < 0.9 * err_plain, (err_full, err_plain)


def test_default_grid_is_unchanged() -> None:
    w = random_weight()
    a, b = quantize(w, 4, 32, True), quantize(w, 4, 32, True, full_range=False)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    assert int(a.q.min()) >= -7 and bool((a.scale > 0).all())


def test_zero_groups_and_sign_keeping_round_scale() -> None:
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-0.1, 0.3, 32)
    qw = quantize(w, 4, 32, True, torch.float32, full_range=True)
    assert bool((qw.scale[1:] > 0).all()) and qw.scale[0, 0] < 0  # zero groups: the smallest positive scale
    assert torch.equal(qw.dequantize()[1:], torch.zeros(3, 64))
    s = torch.tensor([-1e-3, 1e-3, -1e-30, 1e-30, -0.0, 0.0])
    fp16 = round_scale(s, torch.float16)
    tiny = torch.finfo(torch.float16).tiny
    assert fp16.tolist()[2:] == [-tiny, tiny, tiny, tiny]
    assert fp16[0] == -fp16[1] == -torch.tensor(1e-3).half().float()
    assert torch.equal(
        round_scale(s.abs(), torch.bfloat16),
        s.abs().to(torch.bfloat16).clamp(min=torch.finfo(torch.bfloat16).tiny).float(),
    )
    with pytest.raises(ValueError, match="sym=True"):
        compute_qparams(w.amin(1), w.amax(1), 4, False, full_range=True)


def _errors(w, scale, bits, importance):
    return (w - fake_quantize(w, scale[:, None], None, bits)).square() @ importance


def test_clip_search_shrinks_the_signed_extreme() -> None:
    """The searched scale is the best of `p * m / -2^(b-1)` and `p * m / (2^(b-1) - 1)` (p = 1, ..., min_shrink),
    then of it and the least-squares scale of its integers, found by brute force here."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 32, generator=g) * torch.exp(0.5 * torch.randn(32, 32, generator=g))
    importance = torch.rand(32, generator=g) + 0.1
    scale, zero = clipped_qparams(w, 4, True, torch.bfloat16, importance, full_range=True)
    assert zero is None
    m = w.gather(1, _extreme_index(w)).reshape(-1)
    best = []
    for row in range(w.shape[0]):
        low = [(m[row] * (1 - 0.25 * i / 25) / -8).to(torch.bfloat16).float() for i in range(26)]
        candidates = low + [(c * -8 / 7).to(torch.bfloat16).float() for c in low]  # the extreme on +7
        errs = [_errors(w[row : row + 1], c.reshape(1), 4, importance).item() for c in candidates]
        chosen = candidates[min(range(len(candidates)), key=errs.__getitem__)]
        q = torch.round(w[row] / chosen).clamp(-8, 7)
        refit = ((importance * w[row] * q).sum() / (importance * q * q).sum()).to(torch.bfloat16).float()
        if _errors(w[row : row + 1], refit.reshape(1), 4, importance) < min(errs):
            chosen = refit
        best.append(chosen)
    assert torch.equal(scale, torch.stack(best))
    plain, _ = compute_qparams(w.amin(1), w.amax(1), 4, True, torch.bfloat16, full_range=True)
    assert bool((_errors(w, scale, 4, importance) <= _errors(w, plain, 4, importance)).all())
    assert 0 < (torch.sign(scale) == -torch.sign(m)).sum() < len(m)  # both orientations win somewhere


# --- GPTQ ----------------------------------------------------------------------------------------------------
def _inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    return torch.randn(n, dim, generator=g) @ mix * torch.exp(torch.randn(dim, generator=g))


def naive_full_range_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, gs: int, damp: float = 0.01) -> torch.Tensor:
    """GPTQ from the paper's equations (float64, no speed-ups) on the full-range grid: at each group start the
    scale is m / -2^(b-1) of the current (updated) weights, stored in bf16."""
    w, h = w.double().clone(), h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    result = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % gs == 0:
            block = w[:, j : j + gs]
            m = block.gather(1, _extreme_index(block)).reshape(-1)
            scale = (m / -(2 ** (bits - 1))).to(torch.bfloat16).double()
        q = torch.clamp(torch.round(w[:, j] / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        result[:, j] = q * scale
        err = (w[:, j] - result[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return result.float()


def test_gptq_matches_the_naive_full_range_reference() -> None:
    torch.manual_seed(1)
    w = torch.randn(40, 64)
    x = _inputs(256, 64, seed=3)
    h = (2 * x.double().T @ x.double() / x.shape[0]).float()
    qw = gptq_quantize(w, h, 4, 16, True, block_size=8, scale_dtype=torch.bfloat16, full_range=True)
    ref = naive_full_range_gptq(w, h, 4, 16)
    deq = qw.dequantize()
    assert (deq == ref).float().mean().item() > 0.99  # a few values may round the other way
    assert int(qw.q.min()) == -8 and bool((qw.scale < 0).any()) and bool((qw.scale > 0).any())
    rtn = quantize(w, 4, 16, True, torch.bfloat16, full_range=True).dequantize()
    out = lambda a: (x.double() @ (w.double() - a.double()).T).norm().item()  # noqa: E731
    assert out(deq) < 0.9 * out(rtn)


@pytest.mark.parametrize(
    "options", [{"clip": True}, {"desc_act": True}, {"desc_act": True, "static_groups": True}, {"group_size": -1}]
)
def test_gptq_options_stay_on_the_full_range_grid(options: dict) -> None:
    torch.manual_seed(2)
    w = torch.randn(32, 64) * torch.exp(0.5 * torch.randn(32, 64))
    x = _inputs(256, 64, seed=4)
    h = (2 * x.T @ x / x.shape[0]).float()
    gs = options.pop("group_size", 16)
    qw = gptq_quantize(w, h, 4, gs, True, scale_dtype=torch.bfloat16, full_range=True, **options)
    assert int(qw.q.min()) == -8 and int(qw.q.max()) <= 7 and bool((qw.scale < 0).any())
    if options.get("static_groups") or gs == -1:  # scales fixed from the original weight: RTN's full-range ones
        assert torch.equal(qw.scale, quantize(w, 4, gs, True, torch.bfloat16, full_range=True).scale)
    with pytest.raises(ValueError, match="sym=True"):
        gptq_quantize(w, h, 4, gs, False, full_range=True)


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"full_range": True}, ["PtqConfig.full_range=True", "sym=True", "sym=False"]),
        ({"method": "gptq", "full_range": True, "sym": False}, ["full_range", "Set sym=True or drop full_range"]),
        ({"method": "int8", "full_range": True}, ["full_range", "'int8'", "'awq' / 'gptq' / 'rtn'", "Drop"]),
        ({"method": "nf4", "full_range": True}, ["full_range", "'nf4'", "'gptq'"]),
        ({"full_range": "yes", "sym": True}, ["PtqConfig.full_range='yes'", "True or False"]),
        ({"full_range": 1, "sym": True}, ["full_range", "True or False"]),
    ],
)
def test_config_refusals_name_the_field_and_the_fix(kwargs: dict, expected: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        PtqConfig(**kwargs)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


def test_config_defaults_and_json_round_trip() -> None:
    assert PtqConfig().full_range is False and PtqConfig(method="gptq").full_range is False
    assert PtqConfig(method="int8").full_range is None and PtqConfig(method="hqq").full_range is None
    for method in ("rtn", "gptq", "awq"):
        cfg = PtqConfig(method=method, bits=4, group_size=32, sym=True, full_range=True)
        again = PtqConfig(**json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and again.full_range is True
        assert "full-range" in cfg.describe()
    old = PtqConfig(sym=True).to_dict()
    del old["full_range"]  # a config.json written before the field existed
    assert PtqConfig(**old).full_range is False


# --- kernels: negative scales ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "group_size", "rows", "kernel"),
    [
        (4, 32, 1, "int4_cpu_matmul"),
        (4, -1, 5, "int4_cpu_matmul"),
        (8, -1, 3, "int8_matmul"),
        (4, 32, 200, "dense_matmul"),
        (8, 32, 2, "dense_matmul"),
        (3, 32, 2, "dense_matmul"),
    ],
)
def test_every_kernel_takes_negative_scales(calls: Counter, bits: int, group_size: int, rows: int, kernel: str) -> None:  # noqa: F811
    w = random_weight()
    layer = QuantLinear(128, 48, True, bits, group_size, True, dtype=torch.bfloat16)
    layer.set_quantized(quantize(w, bits, group_size, True, full_range=True))
    layer.bias.data.normal_(0, 0.1)
    assert bool((layer.weight_scale < 0).any())
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = layer(x)
    ref = layer.forward_reference(x)
    assert calls[kernel] >= 1 and (kernel == "dense_matmul" or calls["dense_matmul"] == 1)
    assert (y.float() - ref).norm() <= 2 * BF16_EPS * ref.norm()  # a sign error would be off by ~100 %
    torch.testing.assert_close(
        layer.dequantized_weight(torch.float32), reference_full_range(w, bits, group_size)[0], rtol=0, atol=0
    )


# --- whole models: RTN / GPTQ / AWQ, save and reload, exports --------------------------------------------------
def _calibrated(method: str, **kw) -> PtqConfig:
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(7))
    return PtqConfig(
        method=method, bits=4, group_size=32, sym=True, full_range=True, dataset=ids, num_samples=8, seq_len=16, **kw
    )


MODELS = {
    "rtn": lambda: PtqConfig(bits=4, group_size=32, sym=True, full_range=True),
    "gptq": lambda: _calibrated("gptq", desc_act=False),
    "gptq-act-order": lambda: _calibrated("gptq"),
    "awq": lambda: _calibrated("awq"),
}


@pytest.fixture(scope="module")
def quantized() -> dict[str, torch.nn.Module]:
    return {
        name: hf_ptq.quantize(FAMILIES["llama"].build(dtype=torch.float32), make()) for name, make in MODELS.items()
    }


def _layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_rtn_model_holds_the_reference_weights(quantized) -> None:
    model, float_model = quantized["rtn"], FAMILIES["llama"].build(dtype=torch.float32)
    layers = _layers(model)
    assert len(layers) == len(FAMILIES["llama"].expected_linears())
    for name, layer in layers.items():
        expected = reference_full_range(float_model.get_submodule(name).weight, 4, 32, torch.float32)[0]
        assert torch.equal(layer.dequantized_weight(torch.float32), expected), name


@pytest.mark.parametrize("name", MODELS)
def test_methods_use_the_lowest_level_and_stay_close_to_the_float_model(quantized, name: str) -> None:
    model = quantized[name]
    for layer in _layers(model).values():
        qw = layer.quantized_weight()
        assert int(qw.q.min()) == -8 and bool((qw.scale < 0).any())
    reference = model_output(FAMILIES["llama"].build(dtype=torch.float32), input_ids())
    assert rel_err(model_output(model, input_ids()), reference) < 0.15  # default grid: 0.09-0.12 on this model


@pytest.mark.parametrize("name", MODELS)
def test_save_and_reload_give_the_same_model(quantized, name: str, tmp_path: Path) -> None:
    model = quantized[name]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    nested = saved.get("hf_ptq", saved)
    assert nested["full_range"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.config.quantization_config == model.config.quantization_config
    assert reloaded.config.quantization_config.full_range is True
    assert reloaded.hf_quantizer.verify_report.checksums_checked > 0
    state, again = model.state_dict(), reloaded.state_dict()
    assert sorted(state) == sorted(again) and all(torch.equal(state[k], again[k]) for k in state)
    assert torch.equal(model_output(reloaded, input_ids()), model_output(model, input_ids()))
    assert hf_ptq.verify(tmp_path).checksums_checked > 0


PLAIN_READER = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    assert "hf_ptq" not in sys.modules
    ids = torch.load(sys.argv[1])
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        torch.save({"logits": logits, "weights": weights}, folder + "/plain.pt")
    """
)


def _float_model_with(model) -> torch.nn.Module:
    """The fp32 float model whose Linears hold `model`'s dequantized weights (what a q * scale reader computes)."""
    reference = FAMILIES["llama"].build(dtype=torch.float32)
    for name, layer in _layers(model).items():
        reference.get_submodule(name).weight.data = layer.dequantized_weight(torch.float32)
    return reference


@pytest.mark.extra("compressed-tensors")
def test_plain_transformers_reads_the_portable_save_and_the_export(quantized, tmp_path: Path) -> None:
    """Negative scales on a symmetric int grid: compressed-tensors' reader computes q * scale, so the portable
    save (quant_method compressed-tensors) and export(format='compressed-tensors') hold the model exactly."""
    folders = {}
    for name in ("rtn", "gptq"):
        model = quantized[name]
        quantized[name].save_pretrained(tmp_path / f"{name}-saved")
        block = json.loads((tmp_path / f"{name}-saved" / "config.json").read_text())["quantization_config"]
        assert block["quant_method"] == "compressed-tensors" and block["hf_ptq"]["full_range"] is True
        assert block["config_groups"]["group_0"]["weights"]["symmetric"] is True
        folders[f"{name}-saved"] = model
        folders[f"{name}-ct"] = model
        hf_ptq.export(model, tmp_path / f"{name}-ct", format="compressed-tensors")
    torch.save(input_ids(), tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = [sys.executable, "-c", PLAIN_READER, str(tmp_path / "ids.pt"), *(str(tmp_path / f) for f in folders)]
    done = subprocess.run(script, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for folder, model in folders.items():
        plain = torch.load(tmp_path / folder / "plain.pt")
        for name, layer in _layers(model).items():
            assert torch.equal(plain["weights"][name], layer.dequantized_weight(torch.float32)), (folder, name)
        torch.testing.assert_close(plain["logits"], model_output(_float_model_with(model), input_ids()))


@pytest.mark.parametrize("checkpoint_format", ("gptq", "gptq_v2"))
def test_gptq_export_is_read_back_exactly(quantized, tmp_path: Path, checkpoint_format: str) -> None:
    from test_export_gptq import reference_dequantize, unpack_stream

    model = quantized["gptq"]
    folder = hf_ptq.export(model, tmp_path, format="gptq", checkpoint_format=checkpoint_format)
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["sym"] is True and config["bits"] == 4
    for name, layer in _layers(model).items():
        zeros = unpack_stream(tensors[f"{name}.qzeros"].t(), 4, layer.out_features)
        assert bool((zeros == (7 if checkpoint_format == "gptq" else 8)).all())  # the symmetric zero point
        assert bool((tensors[f"{name}.scales"] < 0).any())
        if checkpoint_format == "gptq":  # fp32 model: the export's fp16 scales round them, sign kept
            qw = layer.quantized_weight()
            expected = qw.q.float() * qw.scale.half().float().repeat_interleave(32, 1)
            assert torch.equal(reference_dequantize(tensors, name, 4), expected)


def test_gguf_q4_0_export_holds_the_integers_and_negative_scales(tiny_llama_with_tokenizer_dir, tmp_path) -> None:
    """Q4_0 is this grid (d = m / -8): the export writes the integers unchanged, d negative where m > 0, and
    gguf's own reader gives back q * fp16(scale)."""
    gguf = require_extra("gguf", "gguf")
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_with_tokenizer_dir,
        dtype=torch.bfloat16,
        quantization_config=PtqConfig(bits=4, group_size=32, sym=True, full_range=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer_dir)
    folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer)
    (path,) = folder.glob("*.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    checked = 0
    for name, layer in _layers(model).items():  # v_proj / o_proj / mlp: rows not permuted for llama.cpp's rotary
        block = name.split(".")[2]
        gguf_name = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down"}.get(
            name.split(".", 3)[3]
        )
        if gguf_name is None:
            continue
        t = tensors[f"blk.{block}.{gguf_name}.weight"]
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_0:
            continue
        decoded = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        qw = layer.quantized_weight()
        expected = qw.q.float() * qw.scale.to(torch.float16).float().repeat_interleave(32, 1)
        assert torch.equal(decoded.reshape(expected.shape), expected), name
        assert bool((qw.scale < 0).any())
        checked += 1
    assert checked > 0
