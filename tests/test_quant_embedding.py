"""`embeddings="int8" | "int4"`: the input embedding and lm_head quantized, tied ones stored once, on every path
(quantize-on-load, `hf_ptq.quantize`, calibrated methods), saved, reloaded, verified and exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, HIDDEN, VOCAB, assert_same_model, input_ids, model_output, reference_rtn, rel_err
from safetensors import safe_open
from test_export_gguf import gguf_file, small_model_dir, tokenizer  # noqa: F401  (fixtures)
from test_hardening_verify import _copy, _edit_config, _load_error, _rewrite
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq import kernels
from hf_ptq.core import embeddings as core_embeddings
from hf_ptq.core.embeddings import embedding_scheme, pack_rows
from hf_ptq.core.scheme import WeightScheme
from hf_ptq.evaluation import model_bytes
from hf_ptq.nn import QuantEmbedding, QuantLinear, QuantOutputHead, TiedQuantHead
from hf_ptq.nn import quant_embedding as qe

FORMATS = ("int8", "int4")


def llama(tied: bool, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    config = FAMILIES["llama"].make_config()
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def cfg(fmt: str, **fields) -> hf_ptq.PtqConfig:
    return hf_ptq.PtqConfig(**{"method": "rtn", "bits": 4, "group_size": 32, "embeddings": fmt, **fields})


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory) -> dict[bool, Path]:
    """The tiny bf16 Llama saved tied and untied."""
    root = tmp_path_factory.mktemp("emb-float")
    out = {}
    for tied in (True, False):
        out[tied] = root / ("tied" if tied else "untied")
        llama(tied).save_pretrained(out[tied])
    return out


# --- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["int2", "INT8", 8, True, ["int8"]])
def test_bad_values_name_the_field_and_the_allowed_values(value):
    for make, cls in ((hf_ptq.PtqConfig, "PtqConfig"), (hf_ptq.SmoothQuantConfig, "SmoothQuantConfig")):
        with pytest.raises(ValueError) as err:
            make(embeddings=value)
        message = str(err.value)
        assert f"{cls}.embeddings={value!r} is invalid" in message and "'int8'" in message and "'int4'" in message


@pytest.mark.parametrize("method", ["nf4", "fp4", "llm_int8"])
def test_bitsandbytes_methods_refuse_embeddings_naming_the_fix(method):
    with pytest.raises(ValueError) as err:
        hf_ptq.PtqConfig(method=method, embeddings="int8")
    message = str(err.value)
    assert "PtqConfig.embeddings='int8'" in message and "bitsandbytes" in message and "embeddings=None" in message


def test_config_round_trips_and_describes_the_option():
    for config in (cfg("int4"), hf_ptq.SmoothQuantConfig(embeddings="int8"), hf_ptq.PtqConfig(method="int8")):
        saved = json.loads(json.dumps(config.to_dict()))
        assert type(config)(**saved) == config
    assert cfg("int4").describe() == "rtn w4 g32 asym embeddings=int4"
    assert hf_ptq.PtqConfig().describe() == "rtn w4 g128 asym" and hf_ptq.PtqConfig().embeddings is None
    assert hf_ptq.SmoothQuantConfig(embeddings="int8").describe().endswith(", embeddings=int8")
    legacy = cfg("int4").to_dict()
    legacy.pop("embeddings")  # a config saved before the field existed
    assert hf_ptq.PtqConfig(**legacy).embeddings is None


def test_grid_choice():
    assert embedding_scheme("int8", 576, 64, False) == WeightScheme(8, -1, True)
    assert embedding_scheme("int4", 576, 64, False) == WeightScheme(4, 64, False)
    assert embedding_scheme("int4", 576, 128, True) == WeightScheme(4, 64, True)  # 128 does not divide 576
    assert embedding_scheme("int4", 4096, -1, False) == WeightScheme(4, 128, False)
    assert embedding_scheme("int4", 96, 0, False) == WeightScheme(4, 32, False)
    assert embedding_scheme("int4", 100, 128, False) == WeightScheme(4, -1, False)


def test_cli_option_builds_the_config():
    from hf_ptq.cli import build_parser
    from hf_ptq.cli.common import config_from_args
    from hf_ptq.cli.quantize import DEFAULT_METHOD

    args = build_parser().parse_args(["quantize", "--embeddings", "int4", "--group-size", "32"])
    assert config_from_args(args.method or DEFAULT_METHOD, args, embedded=False).embeddings == "int4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--embeddings", "int2"])


# --- the modules ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sym", [False, True])
def test_lookup_equals_dequantize_then_index(fmt, sym):
    model = hf_ptq.quantize(llama(tied=True), cfg(fmt, sym=sym))
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.weight_packed.dtype == torch.int32
    weight = llama(tied=True).model.embed_tokens.weight.detach()
    bits, group, s = (8, -1, True) if fmt == "int8" else (4, 32, sym)
    assert (emb.bits, emb.group_size, emb.sym) == (bits, group, s)
    reference = reference_rtn(weight, bits, group, s)  # [vocab, hidden] fp32, from the spec
    ids = torch.tensor([[0, 5, 5, VOCAB - 1], [7, 3, 0, 127]])
    got = emb(ids)
    assert got.shape == (2, 4, HIDDEN) and got.dtype == torch.bfloat16
    assert torch.equal(got, reference[ids].to(torch.bfloat16))
    assert torch.equal(emb.dequantized_weight(torch.float32), reference)


def test_packing_in_chunks_gives_the_same_tensors(monkeypatch):
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)
    for scheme in ((8, -1, True), (4, 32, False)):
        whole = pack_rows(weight, WeightScheme(*scheme), torch.bfloat16)
        monkeypatch.setattr(core_embeddings, "CHUNK_ELEMENTS", 7 * HIDDEN)  # chunks of 7 rows
        chunked = pack_rows(weight, WeightScheme(*scheme), torch.bfloat16)
        monkeypatch.undo()
        assert whole.keys() == chunked.keys() and all(torch.equal(whole[k], chunked[k]) for k in whole)


def _count_calls(monkeypatch, name: str) -> list[int]:
    calls = []
    original = getattr(kernels, name)

    def counted(*args):
        calls.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("own_kernel", [False, True])
def test_head_matches_the_fp32_reference_on_kernel_and_dense_paths(fmt, tied, own_kernel, monkeypatch):
    """The head on torch's kernels (every CPU), on hf_ptq's packed kernel (AVX512-BF16) and on the dense path."""
    if own_kernel and not kernels.packed_matmul_cpu_available():
        pytest.skip("hf_ptq's packed kernel needs AVX512-BF16 and a C compiler")
    if not own_kernel:
        monkeypatch.setattr(kernels, "packed_matmul_cpu_available", lambda: False)
    head = hf_ptq.quantize(llama(tied), cfg(fmt)).lm_head
    assert isinstance(head, TiedQuantHead if tied else QuantOutputHead)
    packed = head.embedding if tied else head
    if own_kernel and kernels.packed_matmul_group(packed.in_features, packed.group_size, packed.bits) is None:
        pytest.skip("4-bit rows of 64 values do not fill the packed kernel's 128-value block (see the next test)")
    reference_weight = packed.dequantized_weight(torch.float32)
    kernel = "packed_matmul_cpu" if own_kernel else "int8_matmul" if fmt == "int8" else "int4_cpu_matmul"
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = x.float() @ reference_weight.t()
    assert torch.allclose(packed.matmul_reference(x), expected, rtol=1e-5, atol=1e-5)

    calls = _count_calls(monkeypatch, kernel)
    monkeypatch.setattr(kernels, "KERNEL_MAX_ROWS", 16)  # as HF_PTQ_KERNEL_MAX_ROWS=16
    packed.invalidate_caches()
    few = head(x[:1, :2])  # 2 rows: the packed kernel
    assert calls == [2] and few.dtype == torch.bfloat16
    assert rel_err(few, expected[:1, :2]) < 1e-2
    many = head(x)  # 15 rows: still the kernel
    assert calls == [2, 15] and rel_err(many, expected) < 1e-2

    monkeypatch.setattr(kernels, "KERNEL_MAX_ROWS", 0)  # as HF_PTQ_KERNEL_MAX_ROWS=0: dense path only
    monkeypatch.setattr(qe, "DENSE_CHUNK_ELEMENTS", 40 * HIDDEN)  # the vocabulary in chunks of 40 rows
    packed.invalidate_caches()
    dense = head(x)
    assert calls == [2, 15] and rel_err(dense, expected) < 1e-2
    assert torch.allclose(head(x.float()), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("fmt", FORMATS)
def test_wide_head_runs_the_packed_kernel(fmt, monkeypatch):
    """A head of 256-value rows (int4: groups of 64 asymmetric, with zero points packed along the vocabulary) on
    hf_ptq's packed kernel matches the fp32 reference."""
    if not kernels.packed_matmul_cpu_available():
        pytest.skip("hf_ptq's packed kernel needs AVX512-BF16 and a C compiler")
    scheme = embedding_scheme(fmt, 256, 64, False)
    head = QuantOutputHead(256, 300, False, scheme)
    weight = torch.randn(300, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 0.05
    head.set_packed(pack_rows(weight, scheme, torch.bfloat16))
    calls = _count_calls(monkeypatch, "packed_matmul_cpu")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = head(x)
    assert calls == [3] and y.dtype == torch.bfloat16
    assert rel_err(y, head.matmul_reference(x)) < 4e-3


# --- tied and untied models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_model_stores_one_tensor_and_reloads_bit_identically(fmt, float_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(float_dirs[True], quantization_config=cfg(fmt))
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, TiedQuantHead) and head.embedding is emb
    assert model.get_output_embeddings() is head and model.get_input_embeddings() is emb
    state = model.state_dict()
    assert not [k for k in state if k.startswith("lm_head.")]
    assert {k for k in state if "embed_tokens" in k} >= {
        f"model.embed_tokens.{t}" for t in ("weight_packed", "weight_scale")
    }
    assert head.embedding.weight_packed.data_ptr() == emb.weight_packed.data_ptr()  # shared storage
    ids = input_ids()
    logits = model_output(model, ids)
    model.tie_weights()  # transformers re-tying must not break it
    assert torch.equal(model_output(model, ids), logits)

    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert not [k for k in saved if k.startswith("lm_head.")] and "model.embed_tokens.weight_packed" in saved
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["quantization_config"]["quant_method"] == "hf_ptq"  # not a portable compressed-tensors block
    assert config["quantization_config"]["embeddings"] == fmt
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.lm_head, TiedQuantHead) and reloaded.lm_head.embedding is reloaded.model.embed_tokens
    assert_same_model(reloaded, model)
    reloaded.tie_weights()
    assert torch.equal(model_output(reloaded, ids), logits)
    assert hf_ptq.verify(tmp_path / "q").checksums_checked == len(saved)


@pytest.mark.parametrize("fmt", FORMATS)
def test_untied_model_quantizes_its_head_separately(fmt, float_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(float_dirs[False], quantization_config=cfg(fmt))
    head = model.lm_head
    assert isinstance(head, QuantOutputHead) and isinstance(model.model.embed_tokens, QuantEmbedding)
    reference = reference_rtn(
        llama(False).lm_head.weight.detach(), *((8, -1, True) if fmt == "int8" else (4, 32, False))
    )
    assert torch.equal(head.dequantized_weight(torch.float32), reference)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.lm_head, QuantOutputHead)
    assert_same_model(reloaded, model)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tied", [True, False])
def test_quantize_on_load_and_quantize_agree(fmt, tied, float_dirs):
    loaded = AutoModelForCausalLM.from_pretrained(float_dirs[tied], quantization_config=cfg(fmt))
    in_memory = hf_ptq.quantize(AutoModelForCausalLM.from_pretrained(float_dirs[tied]), cfg(fmt))
    assert_same_model(loaded, in_memory)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma2", "qwen2", "bert"])
def test_other_families(family, tmp_path):
    spec = FAMILIES[family]
    float_model = spec.build()
    float_model.save_pretrained(tmp_path / "float")
    config = cfg("int8", group_size=-1)
    loaded = spec.auto_class.from_pretrained(tmp_path / "float", quantization_config=config)
    assert isinstance(loaded.get_input_embeddings(), QuantEmbedding)
    if spec.auto_class is AutoModelForCausalLM:
        tied = float_model.lm_head.weight is float_model.get_input_embeddings().weight
        assert isinstance(loaded.get_output_embeddings(), TiedQuantHead if tied else QuantOutputHead)
    assert_same_model(loaded, hf_ptq.quantize(spec.build(), config))
    ids = input_ids()
    reference = hf_ptq.quantize(spec.build(), hf_ptq.PtqConfig(method="rtn", bits=4, group_size=-1))
    assert rel_err(model_output(loaded, ids), model_output(reference, ids)) < 0.05
    loaded.save_pretrained(tmp_path / "q")
    assert_same_model(spec.auto_class.from_pretrained(tmp_path / "q"), loaded)


def test_gemma_scaled_embedding_keeps_its_scale():
    model = hf_ptq.quantize(FAMILIES["gemma2"].build(dtype=torch.float32), cfg("int8"))
    emb = model.model.embed_tokens
    assert emb.embed_scale == HIDDEN**0.5
    ids = input_ids()
    assert torch.equal(emb(ids), emb.dequantized_weight()[ids] * torch.tensor(HIDDEN**0.5))


def test_memory_footprint_counts_the_packed_embedding_once(float_dirs):
    base = AutoModelForCausalLM.from_pretrained(float_dirs[True], quantization_config=cfg(None))
    sizes = {}
    for fmt in FORMATS:
        model = AutoModelForCausalLM.from_pretrained(float_dirs[True], quantization_config=cfg(fmt))
        emb = model.model.embed_tokens
        packed = sum(t.numel() * t.element_size() for t in emb.buffers())
        assert model.get_memory_footprint() == model_bytes(model)
        assert base.get_memory_footprint() - model.get_memory_footprint() == VOCAB * HIDDEN * 2 - packed
        sizes[fmt] = packed
    words = VOCAB * HIDDEN // 4  # int8 values: 4 to an int32 word
    assert sizes["int8"] == words * 4 + VOCAB * 2 + 16  # + bf16 row scales + weight_shape
    groups = HIDDEN // 32
    assert sizes["int4"] == words * 2 + VOCAB * groups * 2 + VOCAB // 8 * groups * 4 + 16  # + packed zero points


def test_dequantize_gives_float_modules_tied_again(float_dirs):
    model = AutoModelForCausalLM.from_pretrained(float_dirs[True], quantization_config=cfg("int4"))
    emb_weight = model.model.embed_tokens.dequantized_weight()
    model.dequantize()
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb_weight)


# --- calibrated methods --------------------------------------------------------------------------------------------
def _calibration(**fields):
    return dict(dataset=input_ids(4, 16, seed=3), num_samples=4, seq_len=16, **fields)


@pytest.mark.parametrize(
    "make",
    [
        lambda emb: hf_ptq.PtqConfig(method="gptq", bits=4, group_size=32, embeddings=emb, **_calibration()),
        lambda emb: hf_ptq.SmoothQuantConfig(embeddings=emb, **_calibration()),
    ],
    ids=["gptq", "smoothquant"],
)
def test_calibrated_methods_quantize_the_embeddings_after_calibrating(make, tmp_path):
    with_emb = hf_ptq.quantize(llama(tied=True), make("int8"))
    without = hf_ptq.quantize(llama(tied=True), make(None))
    assert isinstance(with_emb.lm_head, TiedQuantHead) and isinstance(with_emb.model.embed_tokens, QuantEmbedding)
    # calibration ran with the float embedding: every quantized Linear is the same as without `embeddings`
    body = {k: v for k, v in without.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    state = with_emb.state_dict()
    assert all(torch.equal(state[k], v) for k, v in body.items())
    assert rel_err(model_output(with_emb, input_ids()), model_output(without, input_ids())) < 0.05
    with_emb.save_pretrained(tmp_path / "q")
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), with_emb)


def test_gptq_on_load_quantizes_the_embeddings_after_calibration(float_dirs):
    config = hf_ptq.PtqConfig(method="gptq", bits=4, group_size=32, embeddings="int4", **_calibration())
    loaded = AutoModelForCausalLM.from_pretrained(float_dirs[True], quantization_config=config)
    assert isinstance(loaded.lm_head, TiedQuantHead) and isinstance(loaded.model.embed_tokens, QuantEmbedding)
    assert_same_model(loaded, hf_ptq.quantize(AutoModelForCausalLM.from_pretrained(float_dirs[True]), config))


# --- verification --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_int4(float_dirs, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("emb-int4") / "q"
    AutoModelForCausalLM.from_pretrained(float_dirs[True], quantization_config=cfg("int4")).save_pretrained(folder)
    return folder


def test_damaged_embedding_scale_is_refused_naming_the_tensor(saved_int4, tmp_path):
    folder = _copy(saved_int4, tmp_path / "q")
    scale = "model.embed_tokens.weight_scale"
    _rewrite(folder / "model.safetensors", lambda t: t.update({scale: t[scale][:, :1].contiguous()}))
    message = _load_error(folder)
    assert f"{scale} in model.safetensors: shape [{VOCAB}, 1], expected [{VOCAB}, {HIDDEN // 32}]" in message
    assert "embeddings='int4'" in message


def test_embedding_tensors_are_checked_against_the_config(saved_int4, tmp_path):
    folder = _copy(saved_int4, tmp_path / "none")
    _edit_config(folder, embeddings=None)
    message = _load_error(folder)
    assert "model.embed_tokens.weight_packed in model.safetensors: model.embed_tokens is quantized" in message
    assert "(embeddings=None)" in message
    folder = _copy(saved_int4, tmp_path / "missing")
    _rewrite(folder / "model.safetensors", lambda t: t.pop("model.embed_tokens.weight_zero_point"))
    assert "model.embed_tokens.weight_zero_point: missing from model.safetensors" in _load_error(folder)
    folder = _copy(saved_int4, tmp_path / "nan")
    scale = "model.embed_tokens.weight_scale"
    _rewrite(folder / "model.safetensors", lambda t: t[scale].view(-1)[3:5].fill_(float("nan")))
    assert f"{scale} in model.safetensors: 2 non-finite value(s)" in _load_error(folder)


# --- exports -------------------------------------------------------------------------------------------------------
@pytest.mark.extra("compressed-tensors")
@pytest.mark.parametrize("tied", [True, False])
def test_compressed_tensors_export_holds_the_dequantized_embeddings(tied, tmp_path):
    from test_export_compressed_tensors import LOADER

    model = hf_ptq.quantize(llama(tied), cfg("int4", sym=True))
    folder = hf_ptq.export(model, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), model.model.embed_tokens.dequantized_weight())
    assert ("lm_head.weight" in keys) != tied and not [k for k in keys if "embed_tokens.weight_" in k]
    torch.save(input_ids(), tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path / "ids.pt"), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    foreign = torch.load(folder / "foreign.pt")
    assert rel_err(foreign["logits"], model_output(model, input_ids())) < 0.02
    head = model.lm_head.embedding if tied else model.lm_head
    assert torch.equal(foreign["weights"]["lm_head"], head.dequantized_weight())


@pytest.mark.extra("gguf")
def test_gguf_export_encodes_the_embedding_from_its_dequantized_weight(small_model_dir, tokenizer, tmp_path):  # noqa: F811
    config = hf_ptq.PtqConfig(bits=4, group_size=32, sym=True, embeddings="int8")
    model = AutoModelForCausalLM.from_pretrained(small_model_dir, quantization_config=config)
    folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf")
    path = gguf_file(folder)
    import gguf

    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["token_embd.weight"] == "F16" and kinds["blk.0.attn_q.weight"] == "Q4_0"
    assert "output.weight" not in kinds  # tied: written once
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name)
    expected = model.model.embed_tokens.dequantized_weight().float()  # in the model's dtype, then F16
    assert torch.allclose(loaded.model.embed_tokens.weight.float(), expected, rtol=1e-3, atol=1e-6)
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    assert rel_err(model_output(loaded, ids), model_output(model, ids)) < 0.02
    q4 = hf_ptq.export(model, tmp_path / "q4km", format="gguf", gguf_type="q4_k_m")  # K-quant preset from float
    assert gguf_file(q4).exists()


def test_gptq_export_reloads_on_hf_ptq(tmp_path):
    model = hf_ptq.quantize(llama(tied=False), cfg("int8", sym=True))
    folder = hf_ptq.export(model, tmp_path / "gptq", format="gptq")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert rel_err(model_output(loaded, input_ids()), model_output(model, input_ids())) < 0.02


def test_model_card_states_the_embeddings(float_dirs):
    from hf_ptq.formats.model_card import build_model_card

    model = AutoModelForCausalLM.from_pretrained(float_dirs[True], quantization_config=cfg("int4"))
    text = build_model_card(model, "me/tiny").text
    assert "| embeddings and lm_head | `int4` (4-bit, groups of 32, asymmetric, RTN); lm_head tied" in text
    assert "layers kept in full precision | none" in text
    plain = AutoModelForCausalLM.from_pretrained(float_dirs[True], quantization_config=cfg(None))
    assert "| embeddings and lm_head | full precision" in build_model_card(plain, "me/tiny").text


def test_already_quantized_embeddings_are_refused():
    model = hf_ptq.quantize(llama(tied=True), cfg("int8"))
    with pytest.raises(ValueError, match="already quantized"):
        hf_ptq.quantize(model, cfg("int8"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
