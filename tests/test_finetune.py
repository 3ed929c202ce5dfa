"""Fine-tuning: every hf_ptq method is trainable with a peft LoRA adapter (and bitsandbytes' methods as QLoRA).

hf_ptq's layers (`QuantLinear` at every grid, `W8A8Linear`) are wrapped by `hf_ptq.finetune.lora.QuantLoraLinear`;
their frozen weights give input gradients by dequantizing in backward only (`hf_ptq.nn.frozen_grad`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, input_ids
from optional_extras import import_optional
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq import PtqConfig, SmoothQuantConfig, kernels, method_names
from hf_ptq.core.quant import quantize
from hf_ptq.nn import QuantLinear, W8A8Linear
from hf_ptq.quantizer import PtqHfQuantizer, SmoothQuantHfQuantizer

pytestmark = pytest.mark.extra("finetune")
peft = import_optional("peft")  # None without the extra: every test here is skipped then

CALIB = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))
CALIBRATION = dict(dataset=CALIB, num_samples=8, seq_len=16, batch_size=8)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]

# one config per kind of quantized layer: grids (2/3/4/8-bit; groups, channels, tensor; sym / asym), act-order,
# HQQ's float zero points, W8A8 (dynamic / static activations), a quantized tied head
LAYER_KINDS = {
    "rtn-w4-g32-asym": lambda: PtqConfig(method="rtn", bits=4, group_size=32, sym=False),
    "rtn-w2-g32-sym": lambda: PtqConfig(method="rtn", bits=2, group_size=32),
    "rtn-w3-channel": lambda: PtqConfig(method="rtn", bits=3, group_size=-1, sym=False),
    "rtn-w4-tensor": lambda: PtqConfig(method="rtn", bits=4, group_size=0),
    "int8": lambda: PtqConfig(method="int8"),
    "hqq-w4-g32": lambda: PtqConfig(method="hqq", bits=4, group_size=32),
    "gptq-w4-act-order": lambda: PtqConfig(method="gptq", bits=4, group_size=32, desc_act=True, **CALIBRATION),
    "w8a8-dynamic": lambda: SmoothQuantConfig(**CALIBRATION),
    "w8a8-static": lambda: SmoothQuantConfig(activations="static", **CALIBRATION),
    "rtn-w4-emb-int4": lambda: PtqConfig(method="rtn", bits=4, group_size=32, embeddings="int4"),
}


def quantized(folder: Path, config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype)


def with_lora(model: torch.nn.Module, checkpointing: bool = False, **lora: object) -> torch.nn.Module:
    model = hf_ptq.prepare_for_training(
        model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    settings = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, **lora)
    return peft.get_peft_model(model, peft.LoraConfig(**settings))


def train_steps(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = input_ids(batch=4, seq=16)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not an adapter's (packed buffers and float parameters), cloned."""
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}


def test_every_method_is_trainable() -> None:
    for method in method_names():
        assert PtqHfQuantizer(PtqConfig(method=method)).is_trainable, method
    assert SmoothQuantHfQuantizer(SmoothQuantConfig()).is_trainable


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))
def test_lora_on_every_layer_kind_three_steps_lower_the_loss(kind: str, tiny_llama_dir: Path) -> None:
    model = with_lora(quantized(tiny_llama_dir, LAYER_KINDS[kind]()))
    layers = model.base_model.model.model.layers
    wrapped = [layers[0].self_attn.q_proj, layers[1].mlp.down_proj]
    for module in wrapped:
        assert type(module).__name__ == "QuantLoraLinear"
        assert isinstance(module.get_base_layer(), (QuantLinear, W8A8Linear))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = frozen_state(model)

    losses = train_steps(model)

    assert losses[2] < losses[1] < losses[0], losses
    after = frozen_state(model)
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name  # only the adapter trained


@pytest.mark.parametrize("method", ["rtn", "nf4"])
def test_gradient_checkpointing_reruns_the_blocks(method: str, tiny_llama_dir: Path) -> None:
    config = PtqConfig(method=method, group_size=32) if method == "rtn" else PtqConfig(method=method)
    model = with_lora(quantized(tiny_llama_dir, config), checkpointing=True)
    assert model.base_model.model.is_activation_checkpointing
    mlp = model.base_model.model.model.layers[0].mlp
    calls = []
    mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    losses = train_steps(model)
    assert losses[2] < losses[1] < losses[0], losses
    assert len(calls) == 3 * 2  # checkpointing reruns the block in backward


def _layer(grid: dict, out_features: int = 48, in_features: int = 64, bias: bool = True) -> QuantLinear:
    """A QuantLinear holding a random weight rounded onto `grid` (bits, group_size, sym), with a trainable bias."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    qw = quantize(weight, grid["bits"], grid["group_size"], grid["sym"], torch.bfloat16)
    layer = QuantLinear(in_features, out_features, bias, qw.bits, qw.group_size, grid["sym"], dtype=torch.bfloat16)
    layer.set_quantized(qw)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, dtype=torch.bfloat16))
    return layer


@pytest.mark.parametrize(
    "grid",
    [
        {"bits": 4, "group_size": 32, "sym": False},
        {"bits": 8, "group_size": -1, "sym": True},
        {"bits": 3, "group_size": 16, "sym": True},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_and_bias_gradients_equal_the_dequantized_reference(
    grid: dict, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    if dtype == torch.float32:  # the dense path (and so the backward) in fp32, as on CPUs without fast bf16
        monkeypatch.setattr(kernels, "cpu_has_fast_bf16", lambda: False)
    layer = _layer(grid)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    x_ref = x.detach().float().clone().requires_grad_(True)
    bias_ref = layer.bias.detach().float().clone().requires_grad_(True)
    grad_y = torch.randn(3, 5, 48)

    layer(x).backward(grad_y.to(dtype))
    F.linear(x_ref, layer.dequantized_weight(torch.float32), bias_ref).backward(grad_y)

    dense = kernels.compute_dtypes(layer.compute_dtype, x)[1]  # the backward multiplies in the dense path's dtype
    tol = 1e-5 if dtype == dense == torch.float32 else 3e-2
    assert torch.allclose(x.grad.float(), x_ref.grad, rtol=tol, atol=tol * x_ref.grad.abs().max().item())
    assert torch.allclose(layer.bias.grad.float(), bias_ref.grad, rtol=1e-2, atol=1e-2)


def test_w8a8_input_gradient_is_the_straight_through_one(tiny_llama_dir: Path) -> None:
    model = quantized(tiny_llama_dir, SmoothQuantConfig(**CALIBRATION))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, W8A8Linear)
    x = torch.randn(2, 7, layer.in_features, requires_grad=True)
    grad_y = torch.randn(2, 7, layer.out_features)
    layer(x).backward(grad_y)
    expected = grad_y @ layer.dequantized_weight(torch.float32)
    tol = 1e-5 if kernels.compute_dtypes("auto", x)[1] == torch.float32 else 2e-2
    assert torch.allclose(x.grad, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_forward_with_gradients_saves_no_copy_of_the_weight() -> None:
    """Autograd through the dense path would save the dequantized weight [out, in] of every layer until backward."""
    layer = _layer({"bits": 4, "group_size": 32, "sym": False}, out_features=96, in_features=128)
    saved: list[torch.Size] = []
    x = torch.randn(16, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert y.requires_grad
    assert all(shape.numel() < 96 * 128 for shape in saved), saved
    with torch.no_grad():
        assert torch.equal(y.detach(), layer(x))  # the same kernels as inference


def test_adapter_saves_and_reloads_on_the_reloaded_quantized_base(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = quantized(tiny_llama_dir, PtqConfig(method="gptq", bits=4, group_size=32, desc_act=True, **CALIBRATION))
    base.save_pretrained(tmp_path / "base")
    model = with_lora(base)
    train_steps(model)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    ids = input_ids(batch=2, seq=10)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    reloaded_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        without_adapter = reloaded_base(input_ids=ids).logits
    reloaded = peft.PeftModel.from_pretrained(reloaded_base, tmp_path / "adapter").eval()
    assert type(reloaded.base_model.model.model.layers[0].mlp.down_proj).__name__ == "QuantLoraLinear"
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - without_adapter).abs().max() > 100 * (got - expected).abs().max()  # the adapter is in use


def test_peft_imported_before_hf_ptq_dispatches_too(tiny_llama_dir: Path) -> None:
    script = (
        "import peft, torch, hf_ptq\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}, "
        "quantization_config=hf_ptq.PtqConfig(method='int8'))\n"
        "m = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=['down_proj']))\n"
        "print(type(m.base_model.model.model.layers[0].mlp.down_proj).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "QuantLoraLinear"


def _reference_on_grid(layer: QuantLinear, weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded onto `layer`'s asymmetric per-group grid, dequantized: (clamp(round(w/s) + z) - z) * s."""
    qw = layer.quantized_weight()
    members = layer.group_size
    s = qw.scale.float().repeat_interleave(members, dim=1)
    z = qw.zero_point.float().repeat_interleave(members, dim=1)
    q = torch.clamp(torch.round(weight / s) + z, -(2 ** (layer.bits - 1)), 2 ** (layer.bits - 1) - 1)
    return (q - z) * s


def test_merge_rounds_onto_the_layers_own_grid_and_saves_as_a_quantized_model(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    model = with_lora(quantized(tiny_llama_dir, PtqConfig(method="rtn", bits=4, group_size=32, sym=False)))
    train_steps(model, lr=5e-2)
    wrapper = model.base_model.model.model.layers[0].mlp.down_proj
    base = wrapper.get_base_layer()
    scales = base.weight_scale.clone()
    expected = _reference_on_grid(base, base.dequantized_weight(torch.float32) + wrapper.get_delta_weight("default"))

    merged = model.merge_and_unload()

    layer = merged.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear)
    assert torch.equal(layer.weight_scale, scales)  # the grid is kept
    assert torch.allclose(layer.dequantized_weight(torch.float32), expected, atol=1e-6)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_exact_merge_after_dequantize(tiny_llama_dir: Path) -> None:
    model = with_lora(quantized(tiny_llama_dir, PtqConfig(method="rtn", bits=4, group_size=32)))
    train_steps(model, lr=5e-2)
    model.eval()
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.base_model.model.dequantize()
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].mlp.down_proj, torch.nn.Linear)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, rtol=1e-3, atol=1e-3)


def test_dora_trains_on_quantlinear_and_is_refused_on_w8a8(tiny_llama_dir: Path) -> None:
    model = with_lora(quantized(tiny_llama_dir, PtqConfig(method="rtn", bits=4, group_size=32)), use_dora=True)
    losses = train_steps(model)
    assert losses[2] < losses[1] < losses[0], losses
    w8a8 = quantized(tiny_llama_dir, SmoothQuantConfig(**CALIBRATION))
    with pytest.raises(ValueError, match=r"not supported on hf_ptq's W8A8Linear.*plain LoRA"):
        with_lora(w8a8, use_dora=True)


def test_peft_prepare_model_for_kbit_training_works_too(tiny_llama_dir: Path) -> None:
    """peft's own preparation (freeze, fp32 float parameters) on an hf_ptq model, then plain `get_peft_model`."""
    model = quantized(tiny_llama_dir, PtqConfig(method="int8"), dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.model.norm.weight.dtype == torch.float32  # cast by peft; the int8 buffers stay as they are
    assert model.model.layers[0].mlp.down_proj.weight_scale.dtype == torch.bfloat16
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    losses = train_steps(model)
    assert losses[2] < losses[1] < losses[0], losses


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_initialisations_that_rewrite_the_base_weight_are_refused(init: str, tiny_llama_dir: Path) -> None:
    model = quantized(tiny_llama_dir, PtqConfig(method="rtn", bits=4, group_size=32))
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*packed.*'gaussian'"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=init))


def test_wrapping_does_not_dequantize_for_placement(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft places each adapter submodule on `child.weight.device`: for a QuantLinear, a whole dequantization each."""
    model = quantized(tiny_llama_dir, PtqConfig(method="rtn", bits=4, group_size=32))
    calls = []
    original = QuantLinear.dequantized_weight
    monkeypatch.setattr(QuantLinear, "dequantized_weight", lambda self, *a: calls.append(1) or original(self, *a))
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS))
    assert calls == []


def test_unmerge_takes_the_change_back_out_on_the_grid(tiny_llama_dir: Path) -> None:
    """merge then unmerge: the integers of (merged weight - delta) rounded onto the same grid, and the adapter is
    active again (the outputs equal the unmerged adapter's up to the two roundings)."""
    model = with_lora(quantized(tiny_llama_dir, PtqConfig(method="rtn", bits=4, group_size=32, sym=False)))
    train_steps(model, lr=5e-2)
    wrapper = model.base_model.model.model.layers[0].mlp.down_proj
    base = wrapper.get_base_layer()
    delta = wrapper.get_delta_weight("default").float()
    wrapper.merge()
    assert wrapper.merged
    expected = _reference_on_grid(base, base.dequantized_weight(torch.float32) - delta)
    wrapper.unmerge()
    assert not wrapper.merged
    assert torch.allclose(base.dequantized_weight(torch.float32), expected, atol=1e-6)


def test_quantized_head_input_gradient_in_chunks(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantized (tied) head's input gradient is built a chunk of vocabulary rows at a time: equal to the gradient
    through the whole dequantized matrix."""
    from hf_ptq.nn import quant_embedding

    model = quantized(tiny_llama_dir, PtqConfig(method="rtn", bits=4, group_size=32, embeddings="int4"))
    head = model.lm_head
    assert type(head).__name__ in ("TiedQuantHead", "QuantOutputHead")
    monkeypatch.setattr(quant_embedding, "DENSE_CHUNK_ELEMENTS", 40 * head.in_features)  # 4 chunks of the 128 rows
    x = torch.randn(3, 5, head.in_features, requires_grad=True)
    grad_y = torch.randn(3, 5, head.out_features)
    head(x).backward(grad_y)
    matrix = head.embedding if hasattr(head, "embedding") else head  # a tied head multiplies by its embedding's
    expected = grad_y @ matrix.dequantized_weight(torch.float32)
    tol = 1e-5 if kernels.compute_dtypes("auto", x)[1] == torch.float32 else 2e-2
    assert torch.allclose(x.grad, expected, rtol=tol, atol=tol * expected.abs().max().item())
