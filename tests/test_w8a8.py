"""W8A8Linear: int8 x int8 kernel path against integer references written here, the few-row weight-only path,
activation quantization, buffers and state dict."""

from __future__ import annotations

import pytest
import torch

from hf_ptq import kernels
from hf_ptq.core.quant import W8A8Weight, quantize
from hf_ptq.kernels import native, w8a8
from hf_ptq.nn import W8A8Linear

FP32_EPS = 2.0**-24
BF16_EPS = 2.0**-8


def make_layer(in_f: int = 96, out_f: int = 40, static: bool = False, bias: bool = True, seed: int = 0) -> W8A8Linear:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(torch.bfloat16)
    layer = W8A8Linear(in_f, out_f, bias, static, dtype=torch.bfloat16)
    input_scale = torch.tensor([0.02]) if static else None
    layer.set_quantized(W8A8Weight(quantize(w, 8, -1, True), input_scale))
    if bias:
        layer.bias.data.copy_(torch.randn(out_f, generator=g) * 0.1)
    return layer


def activations(rows: int, in_f: int = 96, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g)
    x[:, 3] *= 20  # an outlier channel
    return x.to(dtype)


def reference_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: m = max|x_row|, q = round_half_even(x * (127 / m)) in [-127, 127], scale = m / 127."""
    m = x.float().abs().amax(1, keepdim=True)
    return torch.round(x.float() * (127 / m)), m / 127


@pytest.mark.parametrize("shape", [(1, 7, 9), (5, 96, 40), (33, 576, 64), (300, 130, 17)])
def test_int8_mm_is_the_exact_integer_product(shape) -> None:
    rows, inner, out = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (rows, inner), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (out, inner), generator=g, dtype=torch.int8)
    acc = w8a8.int8_mm(q, w)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), q.long() @ w.long().t())


@pytest.mark.parametrize("shape", [(1, 7, 9), (16, 64, 64), (20, 13, 30)])
def test_padded_int_mm_equals_unpadded(shape) -> None:
    """The padding CUDA needs (rows > 16, sizes multiple of 8), exercised on CPU."""
    rows, inner, out = shape
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (rows, inner), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (out, inner), generator=g, dtype=torch.int8)
    acc = w8a8.padded_int_mm(q, w, min_rows=17, multiple=8)
    assert acc.shape == (rows, out)
    assert torch.equal(acc.long(), q.long() @ w.long().t())


def test_per_token_quantization_matches_reference() -> None:
    x = activations(64, dtype=torch.bfloat16)
    x[5] = 0  # a row of zeros quantizes to zeros
    q, scale = w8a8.quantize_per_token(x)
    ref_q, ref_scale = reference_per_token(x)
    assert q.dtype == torch.int8 and scale.shape == (64, 1)
    assert torch.equal(q.float()[torch.arange(64) != 5], ref_q[torch.arange(64) != 5])
    assert torch.equal(q[5], torch.zeros_like(q[5]))
    assert torch.equal(scale[torch.arange(64) != 5], ref_scale[torch.arange(64) != 5])
    assert q.abs().amax(1).eq(127)[torch.arange(64) != 5].all()  # every row's largest value uses the full range


def test_static_quantization_clamps_beyond_the_calibrated_range() -> None:
    scale = torch.tensor([0.01])
    x = torch.tensor([[0.004, -0.016, 1.27, 5.0, -3.0]])
    q = w8a8.quantize_per_tensor(x, scale)
    assert q.tolist() == [[0, -2, 127, 127, -127]]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_equals_reference_within_int32_exactness(static: bool, dtype: torch.dtype) -> None:
    """Many rows run torch._int_mm: its int32 accumulator is exact, so the only difference from the float64
    reference is the fp32 rescaling (two products) and the final rounding to the input's dtype."""
    layer = make_layer(static=static)
    x = activations(48, dtype=dtype)
    assert x.shape[0] > w8a8.weight_only_max_rows(x)
    y = layer(x)
    ref = layer.forward_reference(x)
    # the reference from first principles: integer activations and weights, scales, bias
    if static:
        scale = layer.input_scale.float()  # 0.02 as stored in bf16
        q = torch.clamp(torch.round(x.float() * (1 / scale)), -127, 127)
    else:
        q, scale = reference_per_token(x)
    product = (q.double() @ layer.weight.double().t()) * scale.double() * layer.weight_scale.double().t()
    manual = product + layer.bias.double()
    magnitude = product.abs() + layer.bias.double().abs()  # rounding errors scale with it, not with |manual|
    assert ((ref.double() - manual).abs() <= 2 * FP32_EPS * magnitude).all()
    out_eps = FP32_EPS if dtype == torch.float32 else BF16_EPS
    assert y.dtype == dtype
    assert ((y.double() - manual).abs() <= (4 * FP32_EPS + out_eps) * magnitude).all()
    assert ((layer.forward_w8a8(x).double() - manual).abs() <= 4 * FP32_EPS * magnitude).all()


def test_few_rows_use_the_weight_only_kernel_with_bf16_activations() -> None:
    """Up to `weight_only_max_rows(x)` rows: int8 weights x bf16 activations (not quantized), fp32 accumulation."""
    layer = make_layer()
    x = activations(2, dtype=torch.bfloat16)
    y = layer(x)
    w = layer.dequantized_weight(torch.float32)
    ref = x.float() @ w.t() + layer.bias.float()
    mag = x.float().abs() @ w.abs().t() + layer.bias.float().abs()
    assert ((y.float() - ref).abs() <= 4 * BF16_EPS * mag).all()
    # the W8A8 computation differs from it by the activations' int8 rounding, which the outlier makes visible
    assert not torch.allclose(layer.forward_w8a8(x), y.float(), rtol=1e-2, atol=1e-3)


def test_kernel_max_rows_zero_quantizes_activations_on_every_call(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "KERNEL_MAX_ROWS", 0)
    layer = make_layer()
    x = activations(1)
    assert torch.allclose(layer(x), layer.forward_reference(x), rtol=0, atol=1e-6)


def test_leading_dims_and_no_bias() -> None:
    layer = make_layer(bias=False, static=True)
    x = activations(40).reshape(2, 20, 96)
    y = layer(x)
    assert y.shape == (2, 20, 40)
    assert torch.allclose(y, layer.forward_reference(x), rtol=0, atol=1e-6)


def test_state_dict_uses_compressed_tensors_names() -> None:
    dynamic, static = make_layer(), make_layer(static=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in dynamic.state_dict().items()} == {
        "weight": ((40, 96), torch.int8),
        "weight_scale": ((40, 1), torch.bfloat16),
        "bias": ((40,), torch.bfloat16),
    }
    assert static.state_dict()["input_scale"].shape == (1,)
    assert static.state_dict()["input_scale"].dtype == torch.bfloat16


def test_quantized_weight_round_trip() -> None:
    w = torch.randn(8, 32).to(torch.bfloat16)
    stored = W8A8Weight(quantize(w, 8, -1, True), torch.tensor([0.25]))
    layer = W8A8Linear(32, 8, False, static=True)
    layer.set_quantized(stored)
    back = layer.quantized_weight()
    assert torch.equal(back.weight.q, stored.weight.q) and torch.equal(back.weight.scale, stored.weight.scale)
    assert torch.equal(back.input_scale.float(), stored.input_scale)
    assert torch.equal(layer.dequantized_weight(torch.float32), stored.weight.dequantize())


def test_set_quantized_rejects_other_layouts() -> None:
    layer = W8A8Linear(32, 8, False, static=False)
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="8-bit symmetric per-channel"):
        layer.set_quantized(W8A8Weight(quantize(w, 4, -1, True)))
    with pytest.raises(ValueError, match="dynamic activation scales"):
        layer.set_quantized(W8A8Weight(quantize(w, 8, -1, True), torch.ones(1)))
    with pytest.raises(ValueError, match="shape"):
        layer.set_quantized(W8A8Weight(quantize(torch.randn(8, 16), 8, -1, True)))


def test_cached_scales_follow_to() -> None:
    layer = make_layer()
    x = activations(32)
    before = layer(x)
    layer.to(torch.float32)  # scales and bias become fp32: the cached fp32 / bf16 scales are rebuilt
    assert layer.weight.dtype == torch.int8  # `.to(dtype)` leaves the integer buffers alone
    assert torch.allclose(layer(x), before, rtol=1e-6, atol=1e-6)


# --- the CPU fast path: C loops, reusable temporaries, row chunks -------------------------------------------------


def c_kernels_available() -> bool:
    """On a Linux machine with a C compiler the C kernels must build (CI has one): not a silent skip."""
    import shutil
    import sys

    if not sys.platform.startswith("linux") or not (shutil.which("cc") or shutil.which("gcc")):
        return False
    assert native.load("w8a8_cpu.c") is not None, "a C compiler is installed but w8a8_cpu.c did not build"
    return True


def w8a8_both_ways(x, layer, out_dtype, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`_w8a8` through the C kernels, then through the torch ops."""
    with_c = layer._w8a8(x, out_dtype)
    monkeypatch.setenv("HF_PTQ_NATIVE_KERNELS", "0")
    with_torch = layer._w8a8(x, out_dtype)
    monkeypatch.delenv("HF_PTQ_NATIVE_KERNELS")
    return with_c, with_torch


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_c_kernels_give_the_bits_of_the_torch_ops(static, bias, x_dtype, out_dtype, monkeypatch) -> None:
    """Same quantized activations (ties to even included), same fp32 rescale, same final rounding."""
    if not c_kernels_available():
        pytest.skip("no C compiler on this machine")
    layer = make_layer(in_f=200, out_f=72, static=static, bias=bias)
    wide = activations(300, in_f=400, dtype=x_dtype)
    wide[7] = 0  # a row of zeros
    wide[9, :200] = (torch.arange(200) - 100 + 0.5) / 8  # max 15.875, so 127 / max = 8: every x * 8 is a tie
    wide[9, 0] = 15.875
    wide[11, 5] = 1e4  # far beyond the static scale's range: saturates
    x = wide[:, :200]  # rows 400 elements apart: the C loop takes the row stride
    with_c, with_torch = w8a8_both_ways(x, layer, out_dtype, monkeypatch)
    assert with_c.dtype == out_dtype
    assert torch.equal(with_c, with_torch)
    if not static:  # the ties went to the even integer
        q, _ = w8a8.quantize_per_token(x[9:10])
        assert torch.equal(q[0, 1:5], torch.tensor([-98, -98, -96, -96], dtype=torch.int8))
    assert torch.allclose(with_c.float(), layer.forward_reference(x), rtol=1e-2, atol=1e-2)


def test_c_quantization_equals_quantize_per_token() -> None:
    if not c_kernels_available():
        pytest.skip("no C compiler on this machine")
    x = activations(64, in_f=576, dtype=torch.bfloat16)
    kernels_c = w8a8._c_kernels(torch.bfloat16, torch.bfloat16)
    q, scale = kernels_c.quantize(x, None, w8a8.Workspace())
    ref_q, ref_scale = w8a8.quantize_per_token(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("native_kernels", ["1", "0"])
def test_rows_in_chunks_give_the_one_chunk_result(native_kernels, monkeypatch) -> None:
    monkeypatch.setenv("HF_PTQ_NATIVE_KERNELS", native_kernels)
    layer = make_layer()
    x = activations(100, dtype=torch.bfloat16)
    whole = layer(x)
    monkeypatch.setattr(w8a8, "WORKSPACE_ELEMENTS", 7 * 96)  # chunks of 7 rows, the last one of 2
    assert torch.equal(layer(x), whole)


def test_workspace_is_reused_across_modes_and_threads() -> None:
    """Temporaries made under inference_mode serve calls outside it (and with grad on); threads get their own."""
    from concurrent.futures import ThreadPoolExecutor

    layer = make_layer()
    x = activations(64)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), first)
    assert torch.equal(layer(x.clone().requires_grad_()), first)
    inputs = [activations(64, seed=s) for s in range(8)]
    expected = [layer(v) for v in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(layer, inputs * 4))
    assert all(torch.equal(g, expected[i % 8]) for i, g in enumerate(got))


def test_load_state_dict_refreshes_the_cached_scales() -> None:
    layer, other = make_layer(seed=0), make_layer(seed=5)
    x = activations(32)
    layer(x)  # caches fp32 scales and bias
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))


def test_native_load_reports_a_missing_compiler(monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level("INFO", logger=native.__name__):
        assert native.load.__wrapped__("w8a8_cpu.c") is None
    assert "could not build w8a8_cpu.c with /nonexistent/cc" in caplog.text


@pytest.mark.parametrize("static", [False, True])
def test_devices_without_int_mm_compute_the_same_with_float_matmuls(static, monkeypatch) -> None:
    """Where `torch._int_mm` is missing, fp32 matmuls of the same integers (exact below 2^24) give the same result."""
    layer = make_layer(static=static)
    x = activations(40)
    with_int_mm = layer(x)
    monkeypatch.setattr(w8a8, "int_mm_supported", lambda device: False)
    assert torch.equal(layer(x), with_int_mm)
