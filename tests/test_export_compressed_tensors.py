"""export(format="compressed-tensors"), read back by plain transformers + compressed-tensors in a subprocess that never
imports hf_ptq: the layers it builds hold exactly hf_ptq's dequantized weights, and its logits match. Weight-only
models (pack-quantized) and W8A8 models of SmoothQuantConfig (int-quantized, dynamic and static activations)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, VOCAB, input_ids, model_output, rel_err

import hf_ptq
from hf_ptq import PtqConfig, SmoothQuantConfig
from hf_ptq.nn import QuantLinear, W8A8Linear

pytestmark = pytest.mark.extra("compressed-tensors")


def _ct_version() -> tuple[int, ...]:
    return tuple(int(p) for p in importlib.metadata.version("compressed-tensors").split(".")[:2])


def _gptq(**kw) -> PtqConfig:
    return PtqConfig(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=16, **kw)


def _w8a8(activations: str) -> SmoothQuantConfig:
    calibration = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))
    return SmoothQuantConfig(activations=activations, dataset=calibration, num_samples=8, seq_len=16, batch_size=4)


CONFIGS = {
    "rtn-w4-g32-asym": lambda: PtqConfig(bits=4, group_size=32),
    "rtn-w4-channel-sym": lambda: PtqConfig(bits=4, group_size=-1, sym=True),
    "int8": lambda: PtqConfig(method="int8"),
    "rtn-w3-tensor-asym": lambda: PtqConfig(bits=3, group_size=0),
    "rtn-w5-g32-sym-full-range": lambda: PtqConfig(bits=5, group_size=32, sym=True, full_range=True),  # GGUF's grids
    "rtn-w6-g16-asym": lambda: PtqConfig(bits=6, group_size=16),
    "rtn-w2-g32-sym-skip-down": lambda: PtqConfig(
        bits=2, group_size=32, sym=True, modules_to_not_convert=["down_proj"]
    ),
    "gptq-act-order-sym": lambda: _gptq(sym=True),
    "rtn-mixed-layer-schemes": lambda: PtqConfig(bits=4, group_size=32, sym=True, layer_schemes=MIXED),
    "w8a8-dynamic": lambda: _w8a8("dynamic"),
    "w8a8-static": lambda: _w8a8("static"),
}
MIXED = {"mlp.down_proj": {"bits": 8, "group_size": -1}, "self_attn.q_proj": {"bits": 2}}  # three schemes
W8A8 = {"w8a8-dynamic", "w8a8-static"}  # built in fp32, so the reader's arithmetic can be checked exactly
ACT_ORDER = {"gptq-act-order-sym"}  # compressed-tensors 0.19 removed actorder="group" (weight_g_idx)

# Run by a fresh interpreter: plain transformers, no hf_ptq. For each folder: the weight of every nn.Linear after a
# forward (compressed-tensors decompresses on the first one), its `input_scale` when it has one, its output on
# `probe(...)` (the reader's own layer forward, activation quantization included) and the logits.
LOADER = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    def probe(in_features, dtype):
        return torch.randn(2, 20, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = torch.load(sys.argv[1])
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
            outputs = {n: m(probe(m.in_features, model.dtype)) for n, m in linears.items()}
        weights = {n: m.weight.detach().clone() for n, m in linears.items()}
        scales = {n: m.input_scale.detach().clone() for n, m in linears.items() if hasattr(m, "input_scale")}
        found = {"logits": logits, "weights": weights, "input_scales": scales, "outputs": outputs}
        torch.save(dict(found, dtype=str(model.dtype)), folder + "/foreign.pt")
    assert "hf_ptq" not in sys.modules, "the foreign reader imported hf_ptq"
    """
)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Every config's quantized tiny Llama and its export, then read by the foreign loader (one subprocess)."""
    root = tmp_path_factory.mktemp("ct")
    names = [n for n in CONFIGS if n not in ACT_ORDER or _ct_version() < (0, 19)]
    out = {}
    for name in names:
        dtype = torch.float32 if name in W8A8 else torch.bfloat16
        model = hf_ptq.quantize(FAMILIES["llama"].build(dtype=dtype), CONFIGS[name]())
        out[name] = (model, hf_ptq.export(model, root / name, format="compressed-tensors"))
    torch.save(input_ids(), root / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    script = [sys.executable, "-c", LOADER, str(root / "ids.pt"), *(str(p) for _, p in out.values())]
    done = subprocess.run(script, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plain_transformers_loads_the_export(exports, name: str) -> None:
    if name not in exports:
        pytest.skip(f"compressed-tensors {importlib.metadata.version('compressed-tensors')} has no actorder='group'")
    model, folder = exports[name]
    foreign = torch.load(folder / "foreign.pt")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear))}
    assert quantized and foreign["dtype"] == str(model.dtype)
    for layer_name, layer in quantized.items():  # the very weights hf_ptq dequantizes, bit for bit
        assert torch.equal(foreign["weights"][layer_name], layer.dequantized_weight(model.dtype)), layer_name
    floats = set(foreign["weights"]) - set(quantized)
    state = model.state_dict()
    assert floats and all(torch.equal(foreign["weights"][n], state[f"{n}.weight"]) for n in floats)
    # logits: hf_ptq runs its own kernels (bf16 int4 / int8 kernels, fp32 dequantize path; W8A8: int8 x int8
    # matmuls), transformers a matmul of the dequantized weights (W8A8: of activations quantized on
    # compressed-tensors' grid, test below): the stated tolerance is 2 % relative L2 error
    assert rel_err(foreign["logits"], model_output(model, input_ids())) < 0.02


def test_config_block_follows_compressed_tensors_schema(exports) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    model, folder = exports["rtn-w4-g32-asym"]
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert block.pop("dequantize") is True  # asymmetric: transformers unpacks the packed zero points on load
    parsed = QuantizationConfig.model_validate(block)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.symmetric, weights.strategy) == (4, 32, False, "group")
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"]
    skipping = json.loads((exports["rtn-w2-g32-sym-skip-down"][1] / "config.json").read_text())["quantization_config"]
    assert "dequantize" not in skipping
    assert skipping["ignore"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]


def test_a_mixed_precision_model_gets_one_config_group_per_scheme(exports) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    model, folder = exports["rtn-mixed-layer-schemes"]
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate(block).config_groups
    found = {(g.weights.num_bits, g.weights.group_size): sorted(g.targets) for g in groups.values()}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert found == {
        (bits, None if group == -1 else group): sorted(
            n for n, m in layers.items() if (m.bits, m.group_size) == (bits, group)
        )
        for bits, group in ((4, 32), (8, -1), (2, 32))
    }
    asymmetric = hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(bits=4, group_size=32, layer_schemes=MIXED))
    with pytest.raises(ValueError, match="cannot write asymmetric mixed-precision weights.*sym=True"):
        hf_ptq.export(asymmetric, folder.parent / "asym-mixed", format="compressed-tensors")


def test_w8a8_config_block_is_int_quantized(exports) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    for name, strategy in (("w8a8-dynamic", "token"), ("w8a8-static", "tensor")):
        block = json.loads((exports[name][1] / "config.json").read_text())["quantization_config"]
        parsed = QuantizationConfig.model_validate(block)
        assert parsed.format == "int-quantized" and parsed.quantization_status == "compressed"
        assert parsed.ignore == ["lm_head"] and "dequantize" not in block
        group = parsed.config_groups["group_0"]
        w, a = group.weights, group.input_activations
        assert (w.num_bits, w.type, w.symmetric, w.strategy, w.dynamic) == (8, "int", True, "channel", False)
        dynamic = strategy == "token"
        assert (a.num_bits, a.type, a.symmetric, a.strategy, a.dynamic) == (8, "int", True, strategy, dynamic)


def _ct_w8a8(layer: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' W8A8 computation, written from its quantization args, on hf_ptq's stored integers: the
    input x [..., in] fake-quantized to int8 on [-128, 127] with a symmetric scale (dynamic per token: max|x| over
    the token / 127.5, half the int8 range; static: the stored `input_scale`), in x's dtype, then multiplied by
    `weight * weight_scale` (float64, exact for these operands) -> [..., out]."""
    scale = layer.input_scale if layer.static else x.abs().amax(-1, keepdim=True) / 127.5
    xq = torch.round(x / scale).clamp(-128, 127) * scale
    y = xq.double() @ (layer.weight.double() * layer.weight_scale.double()).t()
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("name", sorted(W8A8))
def test_w8a8_reader_quantizes_the_activations_with_the_exported_scales(exports, name: str) -> None:
    """The reader's layers run W8A8 from the exported tensors: static `input_scale`s come back bit for bit (dynamic
    layers have none) and each layer's output equals compressed-tensors' W8A8 computed from hf_ptq's integers.

    hf_ptq quantizes activations on a slightly different grid (per-token scale max|x| / 127, clamp to ±127), so its
    own layer outputs differ from the reader's by a fraction of one int8 step: within 1 % relative L2 error."""
    model, folder = exports[name]
    foreign = torch.load(folder / "foreign.pt")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    static = name == "w8a8-static"
    assert set(foreign["input_scales"]) == (set(layers) if static else set())
    for layer_name, layer in layers.items():
        if static:
            assert torch.equal(foreign["input_scales"][layer_name].reshape(1), layer.input_scale), layer_name
        x = torch.randn(2, 20, layer.in_features, generator=torch.Generator().manual_seed(0))  # LOADER's probe
        got = foreign["outputs"][layer_name].double()
        assert torch.allclose(got, _ct_w8a8(layer, x), rtol=1e-5, atol=1e-5), layer_name
        with torch.no_grad():
            assert rel_err(got.float(), layer(x)) < 0.01, layer_name


def test_tensors_are_written_as_hf_ptq_holds_them(exports) -> None:
    from safetensors.torch import load_file

    model, folder = exports["rtn-w4-g32-asym"]
    written = load_file(folder / "model.safetensors")
    assert sorted(written) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(written[key], value), key


def test_tied_output_embedding_is_written_once(tiny_llama_with_tokenizer_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_with_tokenizer_dir, quantization_config=PtqConfig(group_size=32)
    )
    assert model.config.tie_word_embeddings
    folder = hf_ptq.export(model, tmp_path / "ct", format="compressed-tensors")
    written = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in written and "model.embed_tokens.weight" in written
    assert (folder / "tokenizer.json").exists()  # the tokenizer saved with the model comes along


def test_asymmetric_act_order_is_refused_before_writing(tmp_path: Path) -> None:
    model = hf_ptq.quantize(FAMILIES["llama"].build(), _gptq(sym=False))
    with pytest.raises(ValueError, match="asymmetric act-order.*format='gptq'"):
        hf_ptq.export(model, tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
