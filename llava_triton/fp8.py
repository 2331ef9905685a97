"""FP8 (e4m3) projection weights: the language model's (ServingConfig.lm_weight_dtype) and the
vision encoder's and projector's (ServingConfig.vision_weight_dtype).

Why: a decode step reads every weight once, so its time is the weights' bytes over the memory
bandwidth, and FP8 halves those bytes (on the H100, a 7B batch-1 decode step took 3.7 ms instead
of 6.0). Prefill is compute-bound, and the H100's FP8 tensor cores do twice the bfloat16 rate: four
608-token prompts took 37 ms of GPU time instead of 61. The model-dtype copies are dropped, so the
projections take half the memory, left to the KV cache.

How: each weight row (output channel) is scaled so its largest magnitude maps to FP8's largest
value (448) and rounded to FP8 once, at load. Then, by the number of activation rows M:
- M = 1 on a GPU (decode at batch 1): llava_triton.gemv's Triton kernel reads the FP8 weights and
  multiplies in float32: weight-only quantisation, the activations stay bfloat16;
- M > 1 on a GPU (decode batches, prefill): each activation row (token) is scaled and rounded to
  FP8 too, and `torch._scaled_mm` (cuBLASLt's FP8 GEMM) multiplies with both row-wise scales and
  the tensor cores' fast FP8 accumulation (no measured loss against the slower one, 4-17 % less
  time at prefill sizes). It takes bfloat16 activations and sizes in multiples of 16; otherwise as on
  the CPU;
- on the CPU (tests): the FP8 weights dequantised, in the activations' dtype.
Not bit-exact with transformers: the weights keep 3 mantissa bits, and so do M > 1 activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gemv import fp8_gemv

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) → (FP8 weight (N, K), float32 scale (N,)) with weight ≈ fp8 * scale[:, None]."""
    amax = weight.abs().amax(dim=1).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


class Fp8Linear(nn.Module):
    """An nn.Linear whose weight is held in FP8 with per-output-channel scales (see the module doc);
    built from an nn.Linear, whose weight it does not keep. A bias stays in the model's dtype and is
    added after the product (CLIP's and the projector's linears have one, Llama's do not)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # (N, K) FP8
        self.register_buffer("weight_scale", scale)  # (N,) float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())  # (N,) or None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # cuBLASLt's FP8 GEMM takes sizes in multiples of 16 and, with row-wise scales, bfloat16 out.
        self.scaled_mm_sizes = self.in_features % 16 == 0 and self.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        on_gpu = x.device.type == "cuda"
        if on_gpu and rows.shape[0] == 1:
            y = fp8_gemv(rows, self.weight, self.weight_scale)
        elif not (on_gpu and self.scaled_mm_sizes and x.dtype == torch.bfloat16):
            dequantized = (self.weight.float() * self.weight_scale[:, None]).to(x.dtype)
            y = F.linear(rows, dequantized)
        else:
            # Per-row (per-token) activation scales, so one large activation does not flatten the others.
            amax = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
            x_scale = amax / FP8_MAX  # (M, 1)
            x_fp8 = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None, :],
                                 out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None:
            y = y + self.bias  # a separate add: torch.compile fuses it into the next elementwise kernel
        return y.reshape(*x.shape[:-1], self.out_features)


def concat_linears(*linears: nn.Linear) -> nn.Linear:
    """Linears of the same input as one (q, k, v or gate, up): weights, and biases if they have them,
    concatenated along the output features, in order. Shared by llama.py and vision.py."""
    weight = torch.cat([linear.weight.detach() for linear in linears])  # (sum of out_features, in_features)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    return fused


def quantize_linears(module: nn.Module, names: tuple[str, ...]) -> None:
    """Replace module.<name> (nn.Linear) by an Fp8Linear of it, for each name present."""
    for name in names:
        linear = getattr(module, name, None)
        if isinstance(linear, nn.Linear):
            setattr(module, name, Fp8Linear(linear))
