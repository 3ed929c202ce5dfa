"""QuantLinear.forward (packed kernels and dequantize fallback) against forward_reference, and kernel selection."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hf_ptq import kernels
from hf_ptq.core.quant import quantize
from hf_ptq.nn import QuantLinear

BF16_EPS = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def make_layer(
    in_f: int = 128,
    out_f: int = 48,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = False,
    bias: bool = True,
    compute_dtype: str = "auto",
    seed: int = 0,
) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05 + 0.01).to(torch.bfloat16)
    layer = QuantLinear(in_f, out_f, bias, bits, group_size, sym, dtype=torch.bfloat16, compute_dtype=compute_dtype)
    layer.set_quantized(quantize(w, bits, group_size, sym))
    if bias:
        layer.bias.data.copy_(torch.randn(out_f, generator=g) * 0.1)
    return layer


def activations(rows: int, in_f: int = 128, dtype=torch.bfloat16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_f, generator=g).to(dtype)


def per_element(t: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """Expand per-tensor [1] / per-channel [out, 1] / per-group [out, groups] qparams to [out, in]."""
    shape = (layer.out_features, layer.in_features)
    if t.numel() == 1:
        return t.reshape(1, 1).expand(shape)
    return t.repeat_interleave(layer.in_features // t.shape[1], dim=1)


def bf16_bound(layer: QuantLinear, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Worst-case error of a bf16 kernel, elementwise.

    A kernel forms each weight from q, scale and zero point in bf16 (a few roundings, each <= eps * (|q| + |zp|) *
    scale), accumulates the products in fp32, and rounds the output (and the bias sum) to bf16 (<= eps * |y|):
    |y - ref| <= 4 eps * (|x| @ B^T) + 2 eps * |ref|, with B = (|q| + |zp|) * scale (the largest magnitude any
    intermediate of the weight can take). A wrong zero point or scale is off by ~|x| @ B^T, 64x more.
    """
    qw = layer.quantized_weight()
    zp = torch.zeros(1) if qw.zero_point is None else qw.zero_point.float()
    scale, zp = per_element(qw.scale.float(), layer), per_element(zp, layer)
    mag = (qw.q.float().abs() + zp.abs()) * scale
    return 4 * BF16_EPS * (x.float().abs() @ mag.t()) + 2 * BF16_EPS * ref.abs() + 1e-6


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count which matmul ran: torch's int4 kernel, its int8 kernel or the dequantize + dense fallback. hf_ptq's own
    packed kernel (AVX512-BF16 CPUs) is switched off here, so that torch's kernels, which every other CPU runs, are
    tested on every CPU; `packed_calls` tests it."""
    monkeypatch.setattr(kernels, "packed_matmul_cpu_available", lambda: False)
    return count_kernel_calls(monkeypatch, ("int4_cpu_matmul", "int8_matmul", "dense_matmul"))


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> Counter:
    """A Counter of the calls of each `hf_ptq.kernels` function in `names`, which still run."""
    counter: Counter = Counter()
    for name in names:
        original = getattr(kernels, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            counter[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return counter


def check_close(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    ref = layer.forward_reference(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    bound = bf16_bound(layer, x.reshape(-1, layer.in_features), ref.reshape(-1, layer.out_features))
    err = (y.float() - ref).abs().reshape(-1, layer.out_features)
    assert torch.all(err <= bound), (err - bound).max()
    # On average each output suffers ~2 bf16 roundings of rms eps/sqrt(3) relative: ~0.002; a scale 2% off is 0.02.
    assert (y.float() - ref).norm() <= 2 * BF16_EPS * ref.norm()
    return y


@pytest.mark.parametrize(
    ("group_size", "sym"), [(32, False), (32, True), (64, False), (128, True), (-1, False), (-1, True), (0, False)]
)
@pytest.mark.parametrize("rows", (1, 5, 16))
def test_int4_kernel_matches_reference(calls: Counter, group_size: int, sym: bool, rows: int) -> None:
    """Few bf16 rows run the packed int4 kernel; per-channel/per-tensor scales are repeated over its groups."""
    layer = make_layer(bits=4, group_size=group_size, sym=sym)
    check_close(layer, activations(rows))
    assert calls == Counter(int4_cpu_matmul=1, dense_matmul=1)  # dense_matmul once: inside forward_reference


@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("rows", (1, 7, 16))
def test_int8_kernel_matches_reference(calls: Counter, bias: bool, rows: int) -> None:
    layer = make_layer(bits=8, group_size=-1, sym=True, bias=bias)
    check_close(layer, activations(rows))
    assert calls == Counter(int8_matmul=1, dense_matmul=1)


@pytest.mark.parametrize(
    ("bits", "group_size", "sym"),
    [(4, 32, False), (4, -1, True), (8, -1, True), (8, 32, False), (3, 32, True), (5, 32, True), (6, 16, False)],
)
def test_dequant_path_many_rows(calls: Counter, bits: int, group_size: int, sym: bool) -> None:
    layer = make_layer(bits=bits, group_size=group_size, sym=sym)
    check_close(layer, activations(kernels.kernel_max_rows(bits) + 40))
    assert calls == Counter(dense_matmul=2)


@pytest.mark.parametrize(
    ("bits", "group_size", "sym"),
    [(4, 32, False), (8, -1, True), (2, 16, False), (4, 0, True), (5, 32, False), (6, 16, True)],
)
def test_fp32_compute_equals_reference(calls: Counter, bits: int, group_size: int, sym: bool) -> None:
    """compute_dtype="float32" with fp32 input is the reference computation (up to fp32 summation order)."""
    layer = make_layer(bits=bits, group_size=group_size, sym=sym, compute_dtype="float32")
    for rows in (1, 40):
        x = activations(rows, dtype=torch.float32)
        y = layer(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, layer.forward_reference(x), rtol=1e-5, atol=1e-6)
    assert calls == Counter(dense_matmul=4)


def test_3d_input_shape(calls: Counter) -> None:
    layer = make_layer()
    x = activations(6).reshape(2, 3, 128)
    y = check_close(layer, x)
    assert y.shape == (2, 3, 48)
    assert calls["int4_cpu_matmul"] == 1


@pytest.mark.parametrize("max_rows", (0, 4, 64))
def test_kernel_max_rows_selects_path(calls: Counter, monkeypatch: pytest.MonkeyPatch, max_rows: int) -> None:
    monkeypatch.setattr(kernels, "KERNEL_MAX_ROWS", max_rows)
    layer4, layer8 = make_layer(bits=4), make_layer(bits=8, group_size=-1, sym=True)
    for rows in (1, 4, 5, 64, 65):
        calls.clear()
        layer4(activations(rows))
        layer8(activations(rows))
        kernel = rows <= max_rows
        assert calls["int4_cpu_matmul"] == calls["int8_matmul"] == int(kernel), (rows, calls)
        assert calls["dense_matmul"] == 2 * int(not kernel)


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(2, 32, False), (3, 64, True), (3, -1, False), (2, 128, True)])
@pytest.mark.parametrize("rows", (1, 16))
def test_two_and_three_bit_layers_run_the_int4_kernel(calls: Counter, bits, group_size, sym, rows) -> None:
    """Their codes fit int4's range unchanged: the same kernel as 4-bit, against the same reference."""
    layer = make_layer(bits=bits, group_size=group_size, sym=sym)
    check_close(layer, activations(rows))
    assert calls == Counter(int4_cpu_matmul=1, dense_matmul=1)  # dense_matmul once: inside forward_reference


def test_no_kernel_for_unsupported_layouts(calls: Counter) -> None:
    """Asymmetric / grouped 8-bit, group 16 (4- and 3-bit), in_features 48 per-channel and 5- / 6-bit layers (GGUF's
    Q5 / Q6_K grids: no packed kernel) use the dequantize path."""
    layers = [
        make_layer(bits=3, group_size=16),
        make_layer(bits=5, group_size=32, sym=True),
        make_layer(bits=6, group_size=16, sym=True),
        make_layer(bits=8, group_size=-1, sym=False),
        make_layer(bits=8, group_size=32, sym=True),
        make_layer(bits=4, group_size=16),
        make_layer(in_f=48, bits=4, group_size=-1),
        make_layer(in_f=48, bits=4, group_size=0, sym=True),
    ]
    for layer in layers:
        calls.clear()
        check_close(layer, activations(2, in_f=layer.in_features))
        assert calls == Counter(dense_matmul=2), layer


@pytest.mark.parametrize("fast_bf16", (True, False))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16))
def test_auto_compute_dtype(monkeypatch: pytest.MonkeyPatch, fast_bf16: bool, x_dtype: torch.dtype) -> None:
    """auto on CPU: few rows run the packed kernel in bf16 on every CPU; many rows dequantize and multiply in bf16
    on CPUs with native bf16 and in fp32 on others. The output keeps the input dtype."""
    monkeypatch.setattr(kernels, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(kernels, "packed_matmul_cpu_available", lambda: False)  # torch's kernels, as in `calls`
    seen: list[tuple[str, torch.dtype]] = []
    for name in ("int4_cpu_matmul", "dense_matmul"):
        original = getattr(kernels, name)

        def spy(x, *args, _name=name, _original=original):
            seen.append((_name, x.dtype))
            return _original(x, *args)

        monkeypatch.setattr(kernels, name, spy)
    layer = make_layer()
    y = layer(activations(2, dtype=x_dtype))
    assert y.dtype == x_dtype and seen == [("int4_cpu_matmul", torch.bfloat16)]
    seen.clear()
    x = activations(kernels.kernel_max_rows(4) + 1, dtype=x_dtype)
    y = layer(x)
    dense = torch.bfloat16 if fast_bf16 else torch.float32
    assert y.dtype == x_dtype and seen == [("dense_matmul", dense)]
    if dense == x_dtype == torch.float32:  # the reference computation itself
        torch.testing.assert_close(y, layer.forward_reference(x), rtol=1e-5, atol=1e-6)


def test_kernel_max_rows_depends_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "KERNEL_MAX_ROWS", None)
    for fast, table in ((True, kernels.MAX_ROWS_FAST_BF16), (False, kernels.MAX_ROWS_NO_BF16)):
        monkeypatch.setattr(kernels, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert [kernels.kernel_max_rows(b) for b in (2, 3, 4, 8)] == [table[4], table[4], table[4], table[8]]
        assert kernels.kernel_max_rows(4, "cuda") == kernels.MAX_ROWS_FAST_BF16[4]


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(4, 32, False), (8, -1, True)])
def test_kernel_cache_follows_new_weights(bits: int, group_size: int, sym: bool) -> None:
    """The kernel layout is cached; set_quantized with other weights must invalidate it."""
    layer = make_layer(bits=bits, group_size=group_size, sym=sym, seed=0)
    x = activations(3)
    first = layer(x)
    other = make_layer(bits=bits, group_size=group_size, sym=sym, seed=7)
    layer.set_quantized(other.quantized_weight())
    layer.bias.data.copy_(other.bias)
    second = layer(x)
    assert torch.equal(second, other(x))
    assert not torch.equal(first, second)


def test_dtype_move_rebuilds_kernel_layout() -> None:
    layer = make_layer()
    x = activations(2)
    y_bf16 = layer(x)
    layer.to(torch.float16)
    assert layer.weight_scale.dtype == torch.float16 and layer.weight_packed.dtype == torch.int32
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_bf16.float(), rtol=0.05, atol=0.05)


def test_dequantized_weight_matches_quantized_weight() -> None:
    layer = make_layer(bits=4, group_size=32, sym=False)
    qw = layer.quantized_weight()
    w = layer.dequantized_weight(torch.float32)
    assert torch.equal(w, qw.dequantize(torch.float32))
    assert layer.dequantized_weight().dtype == torch.bfloat16


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(4, 32, False), (8, -1, True), (3, 32, True)])
def test_non_contiguous_input(calls: Counter, bits: int, group_size: int, sym: bool) -> None:
    """Slices such as BERT's pooler input (hidden[:, 0]) are not contiguous; the kernels need contiguous rows."""
    layer = make_layer(bits=bits, group_size=group_size, sym=sym)
    hidden = activations(12).reshape(3, 4, 128)
    x = hidden[:, 0]
    assert not x.is_contiguous()
    y = check_close(layer, x)
    assert torch.equal(y, layer(x.contiguous()))
    x_t = activations(128, in_f=2).t()  # [2, 128] with transposed storage
    check_close(layer, x_t)


def test_weight_attribute_is_the_dequantized_weight() -> None:
    """Code written for nn.Linear (GPT-2's _init_weights) reads `.weight`: a copy, not a parameter."""
    layer = make_layer(bits=4, group_size=32)
    w = layer.weight
    assert torch.equal(w, layer.dequantized_weight()) and w.shape == (48, 128)
    w.zero_()
    assert torch.equal(layer.weight, layer.dequantized_weight()) and layer.weight.abs().sum() > 0
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()
    with torch.device("meta"):
        empty = QuantLinear(128, 48, False, 4, 32, False)
    assert not hasattr(empty, "weight")  # free for the quantize-on-load placeholder
    empty.weight = torch.nn.Parameter(torch.empty(48, 128, device="meta"), requires_grad=False)
    with pytest.raises(AttributeError):
        layer.no_such_attribute  # noqa: B018


@pytest.mark.parametrize(
    ("bits", "group_size", "sym"),
    [(4, 32, False), (4, 32, True), (4, -1, False), (4, 0, False), (8, -1, True), (8, 32, False)],
)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_dense_weight_is_the_reference_rounded_once(bits: int, group_size: int, sym: bool, dtype: torch.dtype) -> None:
    layer = make_layer(bits=bits, group_size=group_size, sym=sym)
    reference = layer.dequantized_weight(torch.float32).to(dtype)
    assert torch.equal(layer._dense_weight(dtype), reference)


def act_order_layer(g_idx: torch.Tensor, group_size: int = 32, in_f: int = 128, out_f: int = 48) -> QuantLinear:
    """A 4-bit layer whose input channels belong to groups `g_idx` (act-order), from random codes and scales."""
    from hf_ptq.core.quant import QuantizedWeight

    g = torch.Generator().manual_seed(5)
    groups = in_f // group_size
    q = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = (torch.rand(out_f, groups, generator=g) * 0.01 + 0.001).to(torch.bfloat16)
    zero = torch.randint(-8, 8, (out_f, groups), generator=g, dtype=torch.int8)
    layer = QuantLinear(in_f, out_f, True, 4, group_size, False, dtype=torch.bfloat16, act_order=True)
    layer.set_quantized(QuantizedWeight(q, scale, zero, 4, group_size, g_idx.to(torch.int32)))
    layer.bias.data.copy_(torch.randn(out_f, generator=g) * 0.1)
    return layer


@pytest.mark.parametrize("rows", (1, 5))
def test_act_order_weights_run_the_int4_kernel(calls: Counter, rows: int) -> None:
    """GPTQ act-order groups (every group has group_size channels, scattered) run the int4 kernel on reordered
    input channels, and match the reference."""
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    layer = act_order_layer((torch.arange(128) // 32)[torch.argsort(perm)])
    check_close(layer, activations(rows))
    assert calls == Counter(int4_cpu_matmul=1, dense_matmul=1)
    calls.clear()
    check_close(layer, activations(64))  # many rows: the dequantize path
    assert calls == Counter(dense_matmul=2)


def test_unbalanced_act_order_groups_use_the_dequantize_path(calls: Counter) -> None:
    g_idx = torch.arange(128) // 32
    g_idx[:40] = 0  # group 0 has 40 channels, group 1 only 24: no contiguous reordering fits the kernel
    layer = act_order_layer(g_idx)
    check_close(layer, activations(2))
    assert calls == Counter(dense_matmul=2)


def test_keep_dense_weights_builds_each_dense_weight_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside `keep_dense_weights` repeated dense-path calls reuse one dequantized weight (same outputs); outside,
    every call rebuilds it and nothing is kept."""
    from hf_ptq.nn.quant_linear import keep_dense_weights

    layer = make_layer(bits=4, group_size=32)
    builds = Counter()
    original = QuantLinear._build_dense_weight

    def counting(self, dtype, reuse=False):
        builds[dtype] += 1
        return original(self, dtype, reuse)

    monkeypatch.setattr(QuantLinear, "_build_dense_weight", counting)
    x = activations(64, dtype=torch.float32)
    dense_dtype = kernels.compute_dtypes(layer.compute_dtype, x)[1]  # bf16 on CPUs with native bf16, else fp32
    expected = layer(x)
    with keep_dense_weights(torch.nn.Sequential(layer)):
        outputs = [layer(x) for _ in range(3)]
    assert builds == Counter({dense_dtype: 2}) and layer._dense_cache is None
    assert all(torch.equal(y, expected) for y in outputs)


# --- the dense weight: one C pass on CPU, act-order in natural channel order ----------------------------------------


def dense_c_kernel_available() -> bool:
    """On a Linux machine with a C compiler the dense-weight kernel must build (CI has one): not a silent skip."""
    import shutil
    import sys

    from hf_ptq.kernels import native

    if not sys.platform.startswith("linux") or not (shutil.which("cc") or shutil.which("gcc")):
        return False
    assert native.load("dense_weight_cpu.c") is not None, (
        "a C compiler is installed but dense_weight_cpu.c did not build"
    )
    return True


def shuffled_groups(in_f: int = 128, group_size: int = 32, seed: int = 2) -> torch.Tensor:
    """GPTQ act-order groups: every group has group_size channels, scattered over the input."""
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
    return (torch.arange(in_f) // group_size)[torch.argsort(perm)]


@pytest.mark.parametrize("native_kernels", ("1", "0"))
@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "in_f"),
    [
        (4, 32, False, 128),
        (4, 32, True, 96),
        (4, -1, False, 50),
        (4, 0, True, 128),
        (8, 32, False, 128),
        (8, -1, True, 7),
        (4, -1, True, 7),
    ],
)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_dense_weight_c_and_torch_paths_give_the_reference(
    monkeypatch: pytest.MonkeyPatch, native_kernels: str, bits: int, group_size: int, sym: bool, in_f: int, dtype
) -> None:
    """Both builds of the dense weight (the C pass and the torch ops) give exactly the reference rounded once, for
    grouped, per-channel and per-tensor qparams and for input widths that are not a multiple of 8."""
    monkeypatch.setenv("HF_PTQ_NATIVE_KERNELS", native_kernels)
    if native_kernels == "1":
        dense_c_kernel_available()
    layer = make_layer(in_f=in_f, bits=bits, group_size=group_size, sym=sym)
    assert torch.equal(layer._build_dense_weight(dtype), layer.dequantized_weight(torch.float32).to(dtype))


@pytest.mark.parametrize("native_kernels", ("1", "0"))
@pytest.mark.parametrize("balanced", (True, False))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_act_order_dense_weight_is_the_reference(
    monkeypatch: pytest.MonkeyPatch, native_kernels: str, balanced: bool, dtype: torch.dtype
) -> None:
    """Act-order layers (GPTQ's scattered groups, or groups of unequal sizes) build their dense weight from the
    packed buffer in the natural channel order: exactly the reference weight, and no reordered copy is kept."""
    monkeypatch.setenv("HF_PTQ_NATIVE_KERNELS", native_kernels)
    g_idx = shuffled_groups()
    if not balanced:
        g_idx[:40] = 0
    layer = act_order_layer(g_idx)
    assert torch.equal(layer._build_dense_weight(dtype), layer.dequantized_weight(torch.float32).to(dtype))
    assert {name for name, _ in layer._kernel_cache} == {"dense"}  # qparams only: no second copy of the codes


def test_act_order_dense_path_matches_reference(calls: Counter) -> None:
    """200 rows of an act-order layer run the dense path and stay within the bf16 bound of the fp32 reference, the
    tolerance the other layouts meet."""
    layer = act_order_layer(shuffled_groups())
    check_close(layer, activations(200))
    assert calls == Counter(dense_matmul=2)


@pytest.mark.parametrize("compute_dtype", ("auto", "float32"))
def test_act_order_equals_natural_order_on_gathered_input(compute_dtype: str) -> None:
    """An act-order layer on x computes what the same integers and scales with the channels in group order compute
    on x's channels gathered into that order. Exact here: small integer inputs and power-of-two scales make every
    product and partial sum exact, so the summation order cannot matter."""
    from hf_ptq.core.quant import QuantizedWeight

    in_f, out_f, gs, rows = 128, 48, 32, 200
    g = torch.Generator().manual_seed(9)
    g_idx = shuffled_groups(in_f, gs)
    order = torch.argsort(g_idx, stable=True)  # channels in group order
    q = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = (2.0 ** -torch.randint(3, 7, (out_f, in_f // gs), generator=g)).to(torch.bfloat16)
    zero = torch.randint(-8, 8, (out_f, in_f // gs), generator=g, dtype=torch.int8)
    act = QuantLinear(in_f, out_f, False, 4, gs, False, act_order=True, compute_dtype=compute_dtype)
    act.set_quantized(QuantizedWeight(q, scale, zero, 4, gs, g_idx.to(torch.int32)))
    natural = QuantLinear(in_f, out_f, False, 4, gs, False, compute_dtype=compute_dtype)
    natural.set_quantized(QuantizedWeight(q[:, order].contiguous(), scale, zero, 4, gs))
    x = torch.randint(-2, 3, (rows, in_f), generator=g).to(torch.bfloat16)
    y = act(x)
    assert torch.equal(y, natural(x[:, order].contiguous()))
    assert torch.equal(y, act.forward_reference(x).to(y.dtype))  # the exact sums, rounded once


# --- hf_ptq's packed kernel (AVX512-BF16 CPUs) -------------------------------------------------------------------
needs_packed_kernel = pytest.mark.skipif(
    not kernels.packed_matmul_cpu_available(), reason="the packed kernel needs AVX512-BF16 and a C compiler"
)


@pytest.fixture
def packed_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count the packed kernel's calls beside torch's kernels and the dense path."""
    return count_kernel_calls(monkeypatch, ("packed_matmul_cpu", "int4_cpu_matmul", "int8_matmul", "dense_matmul"))


@needs_packed_kernel
@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "in_f"),
    [
        (4, 128, False, 256),
        (4, 32, True, 256),
        (4, 64, False, 384),
        (4, 256, False, 512),
        (4, -1, False, 256),
        (4, 0, True, 128),
        (8, -1, True, 192),
        (8, 32, False, 128),
        (8, 128, True, 256),
    ],
)
@pytest.mark.parametrize("rows", (1, 3, 6))
def test_packed_kernel_matches_reference(
    packed_calls: Counter, bits: int, group_size: int, sym: bool, in_f: int, rows: int
) -> None:
    """Few bf16 rows run hf_ptq's packed kernel straight from `weight_packed` (every grouping it takes, 1 to 6 rows:
    more than one pass over its 4 accumulated inputs) and match the fp32 reference within bf16 rounding."""
    layer = make_layer(in_f=in_f, bits=bits, group_size=group_size, sym=sym, bias=True)
    check_close(layer, activations(rows, in_f=in_f))
    assert packed_calls == Counter(packed_matmul_cpu=1, dense_matmul=1)  # dense once: inside forward_reference


@needs_packed_kernel
def test_packed_kernel_keeps_no_copy_of_the_weights(packed_calls: Counter) -> None:
    """The kernel reads the packed tensor itself: after a decode step the layer holds no second layout of its
    codes (torch's kernels keep one as large as `weight_packed`), only fp32 qparams."""
    layer = make_layer(in_f=256, bits=4, group_size=32)
    layer(activations(1, in_f=256))
    assert packed_calls["packed_matmul_cpu"] == 1
    cached = [t for value in layer._kernel_cache.values() for t in value if isinstance(t, torch.Tensor)]
    assert any(t.data_ptr() == layer.weight_packed.data_ptr() for t in cached)
    distinct = {t.data_ptr(): t for t in cached if t.data_ptr() != layer.weight_packed.data_ptr()}
    extra = sum(t.numel() * t.element_size() for t in distinct.values())  # the dense path's qparams are shared
    assert extra <= layer.weight_scale.numel() * 8  # fp32 scale and center per group


@needs_packed_kernel
def test_packed_kernel_refuses_shapes_it_does_not_take() -> None:
    """in_features not a multiple of the kernel's block, or groups it cannot split, fall back to torch's kernels."""
    assert kernels.packed_matmul_group(96, 32, 4) is None  # 96 % 128
    assert kernels.packed_matmul_group(256, 4, 4) is None  # a lane covers 8 codes at 4 bits
    assert kernels.packed_matmul_group(256, 48, 8) is None  # neither a multiple nor a divisor of 64
    assert kernels.packed_matmul_group(256, -1, 8) == 256 and kernels.packed_matmul_group(256, 16, 8) == 16
    layer = make_layer(in_f=96, bits=4, group_size=32)
    x = activations(1, in_f=96)
    torch.testing.assert_close(layer(x).float(), layer.forward_reference(x), rtol=2e-2, atol=2e-2)


@needs_packed_kernel
def test_packed_kernel_can_be_switched_off(packed_calls: Counter, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_PTQ_PACKED_KERNEL=0 gives torch's kernels back (for layers planned after it is set)."""
    monkeypatch.setenv(kernels.PACKED_KERNEL_ENV, "0")
    layer4, layer8 = make_layer(in_f=256, bits=4), make_layer(in_f=256, bits=8, group_size=-1, sym=True)
    check_close(layer4, activations(1, in_f=256))
    check_close(layer8, activations(1, in_f=256))
    assert packed_calls == Counter(int4_cpu_matmul=1, int8_matmul=1, dense_matmul=2)


def test_dense_path_workspace_is_shared_but_never_corrupts_a_result() -> None:
    """Layers of one thread write their dense weights into one reused workspace: results stay each layer's own, and
    weights kept by `keep_dense_weights` are their own tensors."""
    from hf_ptq.nn.quant_linear import keep_dense_weights

    torch.manual_seed(0)
    layers = []
    for out_f, in_f in ((96, 128), (64, 256)):
        qw = quantize(torch.randn(out_f, in_f), 4, 32, False, torch.bfloat16)
        layer = QuantLinear(in_f, out_f, False, 4, 32, False, dtype=torch.bfloat16)
        layer.set_quantized(qw)
        layers.append(layer)
    a, b = layers
    xa, xb = torch.randn(200, 128, dtype=torch.bfloat16), torch.randn(200, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        first = a(xa)
        b(xb)  # overwrites the workspace with b's weight
        assert torch.equal(a(xa), first)
        dtype = kernels.compute_dtypes(a.compute_dtype, xa)[1]
        reference = a.forward_reference(xa.float())
        assert (first.float() - reference).norm() / reference.norm() < 1e-2
        with keep_dense_weights(a):
            a(xa)
            kept = a._dense_cache[dtype]
            b(xb)
            assert torch.equal(kept, a.dequantized_weight(dtype))
