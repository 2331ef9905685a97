"""One activation row times a weight matrix (a decode step at batch 1) as a Triton kernel.

Why: at batch 1 a decode step is the weights' bytes over the memory bandwidth. For one row cuBLAS
runs GEMV kernels that read a 7B layer's bfloat16 projections and lm_head at 66 % of the H200's
HBM bandwidth; this kernel reads them at 74 % (`python -m bench.kernels`,
bench/results/2026-12-04-h200-kernel-sweep.md). With FP8 weights (llava_triton.fp8) it is the only
batch-1 path: cuBLASLt's FP8 GEMM scales activations to FP8 and pads the row to 16.

How: each program reduces `block_n` weight rows over K, `block_k` columns at a time, in float32,
and multiplies by the rows' scales (FP8) at the end. The tiling depends on the weight's bytes per
value (TILINGS). Not bit-exact with cuBLAS: another summation order.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch does not bring Triton; then F.linear serves
    triton = None


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_n: int  # weight rows per program
    block_k: int  # columns per loop iteration
    num_warps: int
    num_stages: int  # software-pipeline stages


# By the weight's bytes per value: the fastest over a 7B Llama layer's four projections (each
# counted 32 times) and the lm_head in `python -m bench.kernels` on the H200. float32 was not swept:
# the bfloat16 tile's rows with half its columns.
TILINGS = {1: Tiling(block_n=8, block_k=1024, num_warps=4, num_stages=4),
           2: Tiling(block_n=2, block_k=4096, num_warps=4, num_stages=3),
           4: Tiling(block_n=2, block_k=2048, num_warps=4, num_stages=3)}


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, N, K, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        # y[n] = scale[n] * sum_k w[n, k] * x[k] (no scale: 1) for BLOCK_N rows n; float32 accumulation.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                        other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:
            y *= tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
         tiling: Tiling | None = None) -> torch.Tensor:
    """x (1, K) · weight (N, K)ᵀ (FP8 or the activations' dtype, contiguous), each output n times
    scale[n] if given → (1, N) in x's dtype. `tiling`: TILINGS' for the weight's dtype unless given."""
    N, K = weight.shape
    tiling = tiling or TILINGS[weight.element_size()]
    x = x.contiguous()
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, tiling.block_n),)](x, weight, weight if scale is None else scale, y, N, K,
                                                    HAS_SCALE=scale is not None, BLOCK_N=tiling.block_n,
                                                    BLOCK_K=tiling.block_k, num_warps=tiling.num_warps,
                                                    num_stages=tiling.num_stages)
    return y


# The kernel as opaque ops for torch.compile (inside the compiled decode layers).

@torch.library.custom_op("llava_triton::fp8_gemv", mutates_args=())
def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (1, K) · FP8 weight (N, K)ᵀ, each output n times scale[n] → (1, N) in x's dtype."""
    return gemv(x, weight, scale)


@fp8_gemv.register_fake
def _(x, weight, scale):
    return x.new_empty((1, weight.shape[0]))


@torch.library.custom_op("llava_triton::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (1, K) · weight (N, K)ᵀ in x's dtype → (1, N)."""
    return gemv(x, weight)


@gemv_op.register_fake
def _(x, weight):
    return x.new_empty((1, weight.shape[0]))


class GemvLinear(nn.Module):
    """An nn.Linear (its weight and bias, not copies) whose one-row products run as `gemv` on a GPU;
    more rows, or the CPU, as F.linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if x.device.type != "cuda" or rows.shape[0] != 1:
            return F.linear(x, self.weight, self.bias)
        y = gemv_op(rows, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def use_gemv_linears(module: nn.Module, names: tuple[str, ...]) -> None:
    """Replace module.<name> by a GemvLinear of it, for each name that is an nn.Linear (not an
    FP8 one: llava_triton.fp8 runs its own rows)."""
    for name in names:
        linear = getattr(module, name, None)
        if type(linear) is nn.Linear:
            setattr(module, name, GemvLinear(linear))
