"""Prefill's keys and values into the block-pooled KV cache as a Triton kernel: each token's rows for
every KV head, copied to its position's block and offset.

Why: PyTorch's `pool[blocks, :, offsets] = new` (advanced indexing around a slice) runs an index
kernel that moves one element a thread, from the prefill's head-major keys: at 7B shapes and 128
streams on the H200 it took 0.96 ms of a ~30 ms step. This kernel copies a token's (heads, head_dim)
tile with vector loads and stores, keys and values in one launch: 0.14 ms there
(bench/results/2026-12-04-h200-w1-lanes-cache-write.md).

The copy is of bits: both sides are viewed as integers of the cache's width (FP8 as uint8), so
one kernel serves every cache dtype and the result equals the index_put's, bit for bit.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch does not bring Triton; then index_put serves (llama.py)
    triton = None

# The integer type of each cache width, for a copy of bits.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _write_kernel(k_pool, v_pool, k_new, v_new, blocks_ptr, offsets_ptr,
                      stride_pb, stride_ph, stride_po, stride_kn, stride_kh, stride_vn, stride_vh,
                      NUM_HEADS: tl.constexpr, HEADS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr):
        token = tl.program_id(0)
        # int64: a layer's pool may pass 2**31 elements.
        block = tl.load(blocks_ptr + token).to(tl.int64)
        offset = tl.load(offsets_ptr + token).to(tl.int64)
        heads = tl.arange(0, HEADS_POW2)
        dims = tl.arange(0, HEAD_DIM)
        mask = (heads < NUM_HEADS)[:, None]
        target = block * stride_pb + offset * stride_po + heads[:, None] * stride_ph + dims[None, :]
        k_at = token * stride_kn + heads[:, None] * stride_kh + dims[None, :]
        v_at = token * stride_vn + heads[:, None] * stride_vh + dims[None, :]
        tl.store(k_pool + target, tl.load(k_new + k_at, mask=mask), mask=mask)
        tl.store(v_pool + target, tl.load(v_new + v_at, mask=mask), mask=mask)


def write(k_pool: torch.Tensor, v_pool: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
          k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v (N, nkv, hs) in the pools' dtype (any strides, each its own, but a unit last one) go to
    positions `offsets` (N,) of `blocks` (N,) of k_pool, v_pool (num_blocks, nkv, block_size, hs), as
    `pool[blocks, :, offsets] = new` would put them."""
    N, num_heads, head_dim = k.shape
    if (k_pool.shape != v_pool.shape or k_pool.stride() != v_pool.stride() or k.shape != v.shape
            or k.dtype != k_pool.dtype or v.dtype != v_pool.dtype or tuple(k_pool.shape[1::2]) != (num_heads, head_dim)
            or k.stride(-1) != 1 or v.stride(-1) != 1 or k_pool.stride(-1) != 1
            or head_dim & (head_dim - 1) or blocks.shape != (N,) or offsets.shape != (N,)):
        raise ValueError(f"cannot write keys {tuple(k.shape)} {k.dtype} (strides {k.stride()}), values "
                         f"{tuple(v.shape)} {v.dtype} (strides {v.stride()}) into a pool "
                         f"{tuple(k_pool.shape)} {k_pool.dtype} at {tuple(blocks.shape)} blocks")
    if N == 0:
        return
    bits = _BITS[k_pool.element_size()]
    _write_kernel[(N,)](k_pool.view(bits), v_pool.view(bits), k.view(bits), v.view(bits), blocks, offsets,
                        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), k.stride(0), k.stride(1), v.stride(0),
                        v.stride(1),
                        NUM_HEADS=num_heads, HEADS_POW2=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
                        num_warps=4)
