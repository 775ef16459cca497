"""onnxruntime's contrib kernels as torch ops, so a lowering pass can place them in the FX graph and
the exporter can emit them (``com.microsoft`` domain). Each op's PyTorch implementation is the
reference math of the Q/DQ subgraph it replaces, so the rewritten graph still runs (and is checked)
in PyTorch.

* ``matmul_integer_to_float(a_q, b_q, a_scale, b_scale, a_zp, b_zp, bias)``: ``(a_q - a_zp) a_scale
  @ (b_q - b_zp) b_scale + bias`` → ``com.microsoft::MatMulIntegerToFloat``: the int8 GEMM with the
  dequantization and the bias in its epilogue (the standard QDQ form leaves the bias as a separate
  ``Add`` after onnxruntime's own fusion).
* ``matmul_nbits(a, b_packed, scales, zero_points, K, N, bits, block_size, accuracy_level)`` →
  ``MatMulNBits``:
  weight-only low-bit GEMM, weights packed in onnxruntime's [N, K/block, block*bits/8] layout."""
from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("qcompile_ort::matmul_integer_to_float", mutates_args=())
def matmul_integer_to_float(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                            a_zero_point: Optional[torch.Tensor], b_zero_point: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    af = a.float() - (a_zero_point.float() if a_zero_point is not None else 0.0)
    bf = b.float() - (b_zero_point.float() if b_zero_point is not None else 0.0)
    out = (af * a_scale) @ (bf * b_scale)
    return out + bias if bias is not None else out


@matmul_integer_to_float.register_fake
def _(a, b, a_scale, b_scale, a_zero_point, b_zero_point, bias):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("qcompile_ort::matmul_nbits", mutates_args=())
def matmul_nbits(a: torch.Tensor, b_packed: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                 k: int, n: int, bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    w = unpack_nbits(b_packed, scales, zero_points, k, n, bits, block_size)  # [N, K] float
    return a @ w.t()


@matmul_nbits.register_fake
def _(a, b_packed, scales, zero_points, k, n, bits, block_size, accuracy_level):
    return a.new_empty((*a.shape[:-1], n))


def pack_nbits(codes: torch.Tensor, block_size: int, bits: int = 4) -> torch.Tensor:
    """[N, K] unsigned codes → onnxruntime's MatMulNBits B: [N, ceil(K/block), block*bits/8] uint8,
    two 4-bit codes per byte, low nibble first (8 bits: one code a byte); a short last block is
    padded with zeros."""
    if bits not in (4, 8):
        raise NotImplementedError(f"MatMulNBits packing for {bits} bits (4 and 8 are built)")
    n, k = codes.shape
    blocks = -(-k // block_size)
    padded = torch.zeros(n, blocks * block_size, dtype=torch.uint8)
    padded[:, :k] = codes.to(torch.uint8)
    if bits == 8:      # one code a byte
        return padded.reshape(n, blocks, block_size).contiguous()
    pairs = padded.reshape(n, blocks, block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def pack_zero_points(zero_points: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """[N, blocks] codes → [N, ceil(blocks/2)] uint8, two per byte, low nibble first."""
    n, blocks = zero_points.shape
    padded = torch.zeros(n, blocks + blocks % 2, dtype=torch.uint8)
    padded[:, :blocks] = zero_points.to(torch.uint8)
    pairs = padded.reshape(n, -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_nbits(b_packed, scales, zero_points, k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_nbits` followed by dequantization: the [N, K] float weight."""
    if bits == 8:
        codes = b_packed.reshape(n, -1, block_size).float()
    else:
        lo, hi = b_packed & 0x0F, b_packed >> 4
        codes = torch.stack([lo, hi], dim=-1).reshape(n, -1, block_size).float()  # [N, blocks, block]
    blocks = codes.shape[1]
    if zero_points is None:
        zp = torch.full((n, blocks, 1), 2.0 ** (bits - 1))
    elif bits == 8:
        zp = zero_points.reshape(n, -1)[:, :blocks].float()[..., None]
    else:
        zp = torch.stack([zero_points & 0x0F, zero_points >> 4], dim=-1).reshape(n, -1)[:, :blocks].float()[..., None]
    w = (codes - zp) * scales.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :k]


MATMUL_INTEGER_TO_FLOAT = torch.ops.qcompile_ort.matmul_integer_to_float.default
MATMUL_NBITS = torch.ops.qcompile_ort.matmul_nbits.default
