"""Dense bit-stream packing of b-bit integers into int32 words (the compressed-tensors `pack-quantized` layout).

Every run of 32 consecutive values along the packed dimension fills exactly `bits` int32 words: value `i` of the
run occupies bits `[i*bits, (i+1)*bits)` of the little-endian bit stream, so 4-bit values sit eight to a word with
value 0 in the lowest nibble. Values are signed (`[-2^(b-1), 2^(b-1)-1]`) and stored offset by `2^(b-1)`.
"""

from __future__ import annotations

import math

import torch


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words holding `n` values of `bits` bits."""
    return math.ceil(n * bits / 32)


def _bit_weights(bits: int, device: torch.device) -> torch.Tensor:
    return (1 << torch.arange(bits, device=device, dtype=torch.int64)).view(1, 1, bits)


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed `values` (int8, shape [rows, cols]) along `dim` into int32 words.

    Returns int32 of shape [rows, ceil(cols*bits/32)] for dim=1, or [ceil(rows*bits/32), cols] for dim=0.
    """
    if values.ndim != 2:
        raise ValueError(f"pack_int32 expects a 2-D tensor, got shape {tuple(values.shape)}")
    if dim == 0:
        return pack_int32(values.t(), bits, dim=1).t().contiguous()
    rows, cols = values.shape
    unsigned = values.to(torch.int16) + (1 << (bits - 1))
    if unsigned.numel() and (unsigned.min() < 0 or unsigned.max() >= (1 << bits)):
        raise ValueError(f"values out of the signed {bits}-bit range")
    padded = math.ceil(cols / 32) * 32
    unsigned = torch.nn.functional.pad(unsigned, (0, padded - cols))
    width = packed_width(cols, bits)
    if bits in (4, 8):  # whole values per byte: build the little-endian bytes directly
        as_bytes = unsigned if bits == 8 else unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
        # flatten first: `.contiguous()` keeps any stride on a size-1 dim, which `view(torch.int32)` rejects
        words = as_bytes.to(torch.uint8).reshape(-1).view(torch.int32).view(rows, padded * bits // 32)
        return words[:, :width].contiguous()
    chunks = [_pack_rows(unsigned[i : i + 256], bits) for i in range(0, rows, 256)]
    return torch.cat(chunks)[:, :width].contiguous() if chunks else unsigned.new_zeros(0, width, dtype=torch.int32)


def _pack_rows(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-stream packing of unsigned values [rows, 32*k] into int32 [rows, bits*k]."""
    rows = unsigned.shape[0]
    # [rows, runs, 32 values, bits] -> bit stream [rows, runs, bits words, 32 bits]
    stream = (unsigned.to(torch.int64).view(rows, -1, 32, 1) >> torch.arange(bits, device=unsigned.device)) & 1
    stream = stream.reshape(rows, -1, bits, 32)
    words = (stream << torch.arange(32, device=unsigned.device, dtype=torch.int64)).sum(-1).reshape(rows, -1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret the low 32 bits as signed


def unpack_unsigned_bytes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """4- or 8-bit words [rows, w] -> the stored unsigned values (signed value + 2^(bits-1)), uint8 [rows, n].

    Whole values sit in each byte, so this reads the little-endian bytes of the words directly.
    """
    rows = packed.shape[0]
    as_bytes = packed.contiguous().view(torch.uint8).view(rows, -1)
    if bits == 8:
        return as_bytes[:, :n]
    # Spread each byte b into the int16 (b & 0xF) | (b >> 4) << 8, whose little-endian bytes are the low and the
    # high nibble: viewed as uint8, the nibbles come out in order. About 3x faster than stacking two nibble tensors
    # (an interleaving copy) on CPU.
    wide = as_bytes.to(torch.int16)
    spread = torch.bitwise_left_shift(wide >> 4, 8).bitwise_or_(wide.bitwise_and_(0xF))
    return spread.view(torch.uint8).view(rows, -1)[:, :n]


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> signed int8 values, `n` of them along `dim`."""
    if dim == 0:
        return unpack_int32(packed.t(), bits, n, dim=1).t().contiguous()
    if bits in (4, 8):
        return (unpack_unsigned_bytes(packed, bits, n).to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    runs = math.ceil(words.shape[1] / bits)
    words = torch.nn.functional.pad(words, (0, runs * bits - words.shape[1]))
    stream = (words.view(rows, runs, bits, 1) >> torch.arange(32, device=packed.device)) & 1
    stream = stream.reshape(rows, runs, 32, bits)
    vals = (stream * _bit_weights(bits, packed.device).view(1, 1, 1, bits)).sum(-1).reshape(rows, -1)
    return (vals[:, :n] - (1 << (bits - 1))).to(torch.int8)
