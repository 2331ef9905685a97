"""Decode attention as a Triton kernel: one query token per sequence against its keys and values
in the block-pooled KV cache, read through the sequence's block table only up to its own length,
from a bfloat16/float16 or an FP8 (e4m3) cache.

Why not PyTorch's SDPA: at decode, attention is a read of the KV cache (at batch 128 on an H100,
73 % of a step). SDPA takes a dense (B, nkv, L, hs) tensor and a mask: from a block pool that is
a gathered copy of every row's whole length bucket (the batch's KV read, written and read again),
and from an FP8 cache a bfloat16 one. This kernel reads a row's `length` positions where they are,
in whatever dtype the cache holds, converting to float32 in registers.

Block tables: a program walks its positions a tile at a time (`Tiling.block`, chosen by a sweep,
below); each position's block id comes from the row's table (int32, a few hundred bytes a row,
read from cache) and its keys from offset position % block_size of that block. A tile spans
block / block_size blocks, each a contiguous run of block_size * head_dim values (4 KiB in
bfloat16 at block 16, head_dim 128): the loads stay as coalesced as over a contiguous slot.

Split-K ("flash-decoding"): with few rows there are too few (row, head) programs to fill the
GPU, so each row's positions are cut into `num_splits` ranges, each giving a partial output and
its log-sum-exp; a second kernel merges them. With one split the first kernel writes the output.

The kernels are plain Triton: `TRITON_INTERPRET=1` runs them on the CPU (the tests do).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch does not bring Triton; then SDPA serves (llama.py)
    triton = None


@dataclasses.dataclass(frozen=True)
class Tiling:
    block: int  # cache positions per loop iteration
    num_warps: int
    num_stages: int  # software-pipeline stages
    # Aim for this many (row, head, split) programs per streaming multiprocessor, so that a small
    # batch still keeps every SM's memory pipeline busy.
    programs_per_sm: int
    # Each of a tile's `block` lanes keeps its own softmax state over the positions it sees (lane j:
    # start + j, start + j + block, ...), merged once after the loop, instead of one state reduced
    # over the tile at every iteration. Why: that per-iteration reduction over positions crosses warps
    # (shared memory and a barrier) between a tile's loads and the next's; deferred, the loop's only
    # reduction is each position's dot product, within a warp. It costs block x head_dim float32
    # accumulators.
    deferred: bool = False


# By the cache's bytes per value: the fastest summed over batch 1, 8, 32 and 128 at 7B shapes
# (head_dim 128, W1's contexts) in `python -m bench.kernels` on the H200
# (bench/results/2026-12-04-h200-kernel-sweep.md, 2026-12-04-h200-attention-lanes.md).
# - bfloat16: lanes (`deferred`) over tiles of 16 positions with 4 warps, 375 µs a layer at batch 128
#   against 407 for the best reducing tiling (32 positions, 2 warps).
# - FP8: the reducing variant over tiles of 32 positions with one warp (a warp's reduction needs no
#   barrier); no tiling with lanes came within 5 % of it.
# - float32 (a float32 export) was not swept: the bfloat16 reducing tile's bytes.
TILINGS = {1: Tiling(block=32, num_warps=1, num_stages=1, programs_per_sm=8),
           2: Tiling(block=16, num_warps=4, num_stages=1, programs_per_sm=4, deferred=True),
           4: Tiling(block=16, num_warps=2, num_stages=1, programs_per_sm=4)}


def available() -> bool:
    return triton is not None


def num_splits(batch: int, num_heads: int, max_length: int, num_sms: int, tiling: Tiling) -> int:
    """How many ranges to cut each row's positions into: enough programs for the GPU, at
    least a tile of positions each."""
    wanted = math.ceil(tiling.programs_per_sm * num_sms / max(batch * num_heads, 1))
    return max(1, min(wanted, math.ceil(max_length / tiling.block)))


if triton is not None:

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, part_ptr, lse_ptr,
                        stride_qb, stride_qh,
                        stride_kb, stride_kh, stride_ks,
                        stride_vb, stride_vh, stride_vs,
                        stride_tb,
                        stride_ob, stride_oh,
                        split_len, sm_scale_log2,
                        NUM_SPLITS: tl.constexpr, KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, DEFERRED: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        kv_head = head // KV_GROUP
        length = tl.load(lengths_ptr + row)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims).to(tl.float32)
        table = tables_ptr + row * stride_tb
        k_head = k_ptr + kv_head * stride_kh
        v_head = v_ptr + kv_head * stride_vh
        if DEFERRED:
            # Per lane (see Tiling.deferred): running max (log2 domain), sum of exp2, weighted values.
            m_lane = tl.full((BLOCK,), float("-inf"), tl.float32)
            total_lane = tl.zeros((BLOCK,), tl.float32)
            acc_lane = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
        else:
            # Running max (log2 domain), running sum of exp2 and the weighted sum of values.
            m = tl.full((), float("-inf"), tl.float32)
            total = tl.full((), 0.0, tl.float32)
            acc = tl.zeros((HEAD_DIM,), tl.float32)
        for block_start in range(start, end, BLOCK):
            positions = block_start + tl.arange(0, BLOCK)
            valid = positions < end
            # Each position's block (int64: a layer's pool may pass 2**31 elements) and offset in it.
            kv_blocks = tl.load(table + positions // KV_BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            k_at = kv_blocks[:, None] * stride_kb + (positions % KV_BLOCK_SIZE)[:, None] * stride_ks + dims[None, :]
            v_at = kv_blocks[:, None] * stride_vb + (positions % KV_BLOCK_SIZE)[:, None] * stride_vs + dims[None, :]
            k = tl.load(k_head + k_at, mask=valid[:, None], other=0.0)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * sm_scale_log2  # (BLOCK,)
            scores = tl.where(valid, scores, float("-inf"))
            # Where each variant loads the values is part of its tiling: loaded here (both tiles live at
            # once), the reducing variant took 33 % more time at batch 128 in bfloat16.
            if DEFERRED:
                v = tl.load(v_head + v_at, mask=valid[:, None], other=0.0)
                m_new = tl.maximum(m_lane, scores)
                # A lane that has seen no valid position yet keeps max -inf: subtract 0 there, not -inf
                # (-inf - -inf is NaN); its exp2 terms are 0 either way.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_lane - m_safe)
                p = tl.exp2(scores - m_safe)
                acc_lane = acc_lane * alpha[:, None] + p[:, None] * v.to(tl.float32)
                total_lane = total_lane * alpha + p
                m_lane = m_new
            else:
                m_new = tl.maximum(m, tl.max(scores, axis=0))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(scores - m_new)
                v = tl.load(v_head + v_at, mask=valid[:, None], other=0.0)
                acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
                total = total * alpha + tl.sum(p, axis=0)
                m = m_new
        if DEFERRED:
            # The lanes merged: each weighted by exp2 of its max against the largest (an empty range
            # leaves every lane at -inf: weights 0, total 0, as below).
            m = tl.max(m_lane, axis=0)
            weights = tl.exp2(m_lane - tl.where(m == float("-inf"), 0.0, m))
            acc = tl.sum(acc_lane * weights[:, None], axis=0)
            total = tl.sum(total_lane * weights, axis=0)
        if NUM_SPLITS == 1:
            tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, (acc / total).to(out_ptr.dtype.element_ty))
        else:
            # An empty range (a row shorter than this split's start) leaves total 0: weight 0 below.
            # (m stays -inf there, so its log-sum-exp is -inf.)
            index = (row * tl.num_programs(1) + head) * NUM_SPLITS + split
            denominator = tl.where(total > 0, total, 1.0)
            tl.store(part_ptr + index * HEAD_DIM + dims, acc / denominator)
            tl.store(lse_ptr + index, m + tl.log2(denominator))

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh,
                      NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS_POW2)
        valid = splits < NUM_SPLITS
        base = (row * tl.num_programs(1) + head) * NUM_SPLITS
        lse = tl.load(lse_ptr + base + splits, mask=valid, other=float("-inf"))
        weights = tl.exp2(lse - tl.max(lse, axis=0))  # every row has a non-empty split: max is finite
        dims = tl.arange(0, HEAD_DIM)
        parts = tl.load(part_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        out = tl.sum(weights[:, None] * parts, axis=0) / tl.sum(weights, axis=0)
        tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lengths: torch.Tensor, splits: int, tiling: Tiling | None = None) -> torch.Tensor:
    """q (B, nh, hs): one query per row; k_cache, v_cache (num_blocks, nkv, block_size, hs): the
    block pool; block_tables (B, nb) int32: row b's position p is in block block_tables[b, p //
    block_size] at offset p % block_size; lengths (B,) int: row b attends to positions
    0..lengths[b]-1 (each >= 1, at most nb * block_size) → (B, nh, hs) in q's dtype. Softmax
    scale 1/sqrt(hs), as Llama's. `tiling`: TILINGS' for the cache's dtype unless given."""
    B, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    max_len = block_tables.shape[1] * block_size
    if num_heads % num_kv_heads or head_dim & (head_dim - 1) or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"unsupported shapes: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.shape[0] != B or block_tables.stride(-1) != 1:
        raise ValueError(f"block_tables must be int32 ({B}, nb) with unit stride, got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    tiling = tiling or TILINGS[k_cache.element_size()]
    q = q.contiguous()
    out = torch.empty_like(q)
    split_len = math.ceil(math.ceil(max_len / splits) / tiling.block) * tiling.block
    if splits > 1:
        part = torch.empty((B, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # not written
    sm_scale_log2 = 1.0 / math.sqrt(head_dim) * math.log2(math.e)
    _partial_kernel[(B, num_heads, splits)](
        q, k_cache, v_cache, block_tables, lengths, out, part, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        split_len, sm_scale_log2,
        NUM_SPLITS=splits, KV_GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK=tiling.block,
        KV_BLOCK_SIZE=block_size, DEFERRED=tiling.deferred, num_warps=tiling.num_warps,
        num_stages=tiling.num_stages)
    if splits > 1:
        _merge_kernel[(B, num_heads)](part, lse, out, out.stride(0), out.stride(1),
                                      NUM_SPLITS=splits, SPLITS_POW2=triton.next_power_of_2(splits),
                                      HEAD_DIM=head_dim)
    return out


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@torch.library.custom_op("llava_triton::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """`decode_attention` as one opaque op for torch.compile; the number of splits comes from the
    batch and `max_length` (the longest length this call may see: a CUDA graph's length bucket)."""
    tiling = TILINGS[k_cache.element_size()]
    splits = num_splits(q.shape[0], q.shape[1], max_length, _num_sms(q.device), tiling)
    return decode_attention(q, k_cache, v_cache, block_tables, lengths, splits, tiling)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, lengths, max_length):
    return q.new_empty(q.shape)
