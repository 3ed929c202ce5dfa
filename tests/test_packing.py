"""pack_int32 / unpack_int32 against a naive bit-by-bit reference of the compressed-tensors layout."""

from __future__ import annotations

import math

import pytest
import torch

from hf_ptq.core.packing import pack_int32, packed_width, unpack_int32

BITS = (2, 3, 4, 5, 6, 8)
COLS = (1, 7, 31, 32, 33, 50, 64, 97)


def naive_pack_row(values: list[int], bits: int) -> list[int]:
    """Little-endian bit stream: value j (offset by 2^(b-1)) fills bits [j*b, (j+1)*b); words are 32 bits."""
    stream: list[int] = []
    for v in values:
        u = v + (1 << (bits - 1))
        assert 0 <= u < (1 << bits)
        stream.extend((u >> k) & 1 for k in range(bits))
    n_words = math.ceil(len(values) * bits / 32)
    stream.extend([0] * (n_words * 32 - len(stream)))
    words = []
    for w in range(n_words):
        word = sum(stream[w * 32 + k] << k for k in range(32))
        words.append(word - (1 << 32) if word >= (1 << 31) else word)  # the same 32 bits as a signed int32
    return words


def naive_pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    rows = values.t() if dim == 0 else values
    packed = torch.tensor([naive_pack_row(r.tolist(), bits) for r in rows], dtype=torch.int32)
    return packed.t().contiguous() if dim == 0 else packed


def random_values(shape: tuple[int, int], bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    v = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64)
    v.view(-1)[:2] = torch.tensor([lo, hi])[: v.numel()]  # both extremes appear
    return v.to(torch.int8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", COLS)
def test_pack_dim1_matches_reference(bits: int, cols: int) -> None:
    values = random_values((3, cols), bits, seed=cols * 10 + bits)
    packed = pack_int32(values, bits, dim=1)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, packed_width(cols, bits)) == (3, math.ceil(cols * bits / 32))
    assert torch.equal(packed, naive_pack(values, bits, dim=1))
    assert torch.equal(unpack_int32(packed, bits, cols, dim=1), values)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows", COLS)
def test_pack_dim0_matches_reference(bits: int, rows: int) -> None:
    values = random_values((rows, 5), bits, seed=rows * 10 + bits + 1)
    packed = pack_int32(values, bits, dim=0)
    assert packed.dtype == torch.int32
    assert packed.shape == (math.ceil(rows * bits / 32), 5)
    assert torch.equal(packed, naive_pack(values, bits, dim=0))
    assert torch.equal(unpack_int32(packed, bits, rows, dim=0), values)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (64, 1), (1, 45), (45, 1), (128, 1)])
@pytest.mark.parametrize("dim", (0, 1))
def test_single_row_or_column(bits: int, shape: tuple[int, int], dim: int) -> None:
    """Zero points of per-channel layers are [out, 1] packed along dim 0: strides of size-1 dims must not matter."""
    values = random_values(shape, bits, seed=sum(shape) + bits)
    packed = pack_int32(values, bits, dim=dim)
    assert torch.equal(packed, naive_pack(values, bits, dim=dim))
    assert torch.equal(unpack_int32(packed, bits, shape[dim], dim=dim), values)
    as_column = values.t().contiguous().t()  # same values, another stride layout
    assert torch.equal(pack_int32(as_column, bits, dim=dim), packed)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_of_reference_words(bits: int) -> None:
    """unpack reads words packed by the reference (not only its own output)."""
    values = random_values((4, 45), bits, seed=bits)
    assert torch.equal(unpack_int32(naive_pack(values, bits, dim=1), bits, 45, dim=1), values)


def test_four_bit_layout_is_nibbles_low_first() -> None:
    """compressed-tensors 4-bit: eight values per word, value 0 in the lowest nibble, stored as q + 8."""
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(2).view(1, 32)
    words = pack_int32(values, 4, dim=1)[0].tolist()
    expected = []
    for w in range(4):
        word = sum((values[0, w * 8 + i].item() + 8) << (4 * i) for i in range(8))
        expected.append(word - (1 << 32) if word >= (1 << 31) else word)
    assert words == expected
    assert words[0] == 0x76543210


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_large(bits: int) -> None:
    """Many rows (the chunked code path for 2/3 bits) and a non-multiple-of-32 width, both dims."""
    values = random_values((600, 70), bits, seed=42 + bits)
    assert torch.equal(unpack_int32(pack_int32(values, bits, dim=1), bits, 70, dim=1), values)
    assert torch.equal(unpack_int32(pack_int32(values, bits, dim=0), bits, 600, dim=0), values)


@pytest.mark.parametrize("bits", BITS)
def test_out_of_range_values_raise(bits: int) -> None:
    too_big = torch.full((1, 4), (1 << (bits - 1)), dtype=torch.int16)
    with pytest.raises(ValueError, match=f"{bits}-bit"):
        pack_int32(too_big, bits)
    too_small = torch.full((1, 4), -(1 << (bits - 1)) - 1, dtype=torch.int16)
    with pytest.raises(ValueError, match=f"{bits}-bit"):
        pack_int32(too_small, bits)


def test_non_2d_raises() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pack_int32(torch.zeros(2, 3, 4, dtype=torch.int8), 4)
