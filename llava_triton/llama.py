"""A Llama decoder for serving: the Hugging Face weights, a KV cache in fixed-size blocks read and
written through per-sequence block tables, and separate prefill (prompt chunks of several
sequences packed together) and decode (many sequences, one token each).

Numerically it follows transformers' `LlamaForCausalLM` (same RMSNorm, RoPE tables and
attention), so greedy generation matches `generate()` token for token on the same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import cache_write
from .decode_attention import decode_attention_op
from .fp8 import concat_linears, quantize_linears
from .gemv import use_gemv_linears
from .host_tensors import upload
from .kv_blocks import NULL_BLOCK, blocks_needed

# Prefill attention: every prompt length is a new shape. cuDNN's SDPA, PyTorch's first choice on
# an H100, builds an execution plan for each new shape: 40-800 ms each there (measured), a stall
# of every stream whenever a prompt of a new length arrives. Flash (causal) and memory-efficient
# (masked) attention need no plan. Decode keeps cuDNN: its CUDA graphs have fixed shapes, whose
# plans are built once at capture.
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face Llama `config.json` that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, text_config: dict[str, Any]) -> LlamaConfig:
        c = text_config
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {c['hidden_act']!r} (Llama uses silu)")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError("attention_bias / mlp_bias are not supported")
        heads = int(c["num_attention_heads"])
        # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", None) or c.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        )


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), as transformers' rope init functions compute them."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: smooth interpolation between low and high frequency bands.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Variance in float32 whatever the compute dtype, as transformers' LlamaRMSNorm.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, nh, T, hs); cos/sin (B, 1, T, hs)
    return x * cos + rotate_half(x) * sin


class KVBlockPool(nn.Module):
    """One layer's keys and values in `num_blocks` blocks of `block_size` token positions each.

    Preallocated once; a sequence's positions live in the blocks its block table lists (position p
    in block table[p // block_size] at offset p % block_size; llava_triton.kv_blocks hands them
    out), so neither prefill nor decode allocates cache memory. Layout (block, kv head, offset,
    head dim): a block's positions of one head are one contiguous run of block_size * head_dim
    values, which the decode kernel reads as it read a slot's, and a sequence's keys gathered
    block by block are SDPA's (kv head, position, head dim) after one transpose.
    """

    def __init__(self, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (N, nkv, hs) in the cache's dtype go to positions `offsets` (N,) of `blocks` (N,)."""
        if self.k.device.type == "cuda" and cache_write.available():
            cache_write.write(self.k, self.v, blocks, offsets, k, v)
            return
        for pool, new in ((self.k, k), (self.v, v)):
            if pool.element_size() == 1:  # FP8: copy the same bytes as uint8, which every index kernel has
                pool, new = pool.view(torch.uint8), new.view(torch.uint8)
            pool[blocks, :, offsets] = new


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """pool (num_blocks, nkv, bs, hs), tables (B, nb) block ids → (B, nkv, nb * bs, hs): each row's
    positions 0..nb*bs-1 in order (a copy, for SDPA; the decode kernel reads through the tables)."""
    B, nb = tables.shape
    blocks = pool[tables]  # (B, nb, nkv, bs, hs)
    return blocks.transpose(1, 2).reshape(B, pool.shape[1], nb * pool.shape[2], pool.shape[3])


def to_cache_dtype(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x in the cache's dtype. FP8 has no infinity and torch's cast makes NaN of what is past its
    largest finite value (448 for e4m3): saturate instead, as FP8 KV caches elsewhere do."""
    if x.dtype == cache.dtype:
        return x
    if cache.dtype.itemsize == 1:
        largest = torch.finfo(cache.dtype).max
        x = x.clamp(-largest, largest)
    return x.to(cache.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        # Only ask SDPA for grouped-query attention when there is some: it narrows the kernels.
        self.gqa = self.num_kv_heads != self.num_heads
        self.cache: KVBlockPool | None = None
        self.decode_kernel = False  # decode attention by llava_triton.decode_attention instead of SDPA
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one matrix, after fuse()

    def fuse(self) -> None:
        """One GEMM for q, k and v instead of three (the same rows, concatenated)."""
        self.qkv_proj = concat_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                              self.num_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cached: torch.Tensor,
               v_cached: torch.Tensor, writes: tuple[torch.Tensor, torch.Tensor], lengths: list[int],
               prefixes: list[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
        """Prefill attention over prompt chunks of several sequences packed one after another:
        q (1, nh, N, hs), k and v (1, nkv, N, hs), k_cached and v_cached: k and v in the cache's
        dtype (see prefill_qkv); segment i is the next lengths[i] tokens → (1, N, nh * hs), contiguous.

        Every token's key and value go to the cache at writes = (blocks (N,), offsets (N,)), its
        position in its sequence's blocks; attention runs per segment, so no token sees another
        sequence's. prefixes[i] is None for a first chunk (plain causal attention on its own keys),
        else (table (nb,), mask (length, end)): the chunk attends to its sequence's positions
        0..end-1, read through its block table, with the mask (its cached prefix, causally itself).
        """
        self.cache.write(*writes, k_cached[0].transpose(0, 1), v_cached[0].transpose(0, 1))  # (N, nkv, hs)
        with sdpa_kernel(PREFILL_SDPA_BACKENDS):
            return self._attend(q, k, v, lengths, prefixes)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                prefixes: list[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
        ys, offset = [], 0
        for length, prefix in zip(lengths, prefixes):
            rows = slice(offset, offset + length)
            if prefix is None:
                y = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], is_causal=True,
                                                   enable_gqa=self.gqa)
            else:
                table, mask = prefix
                end = mask.shape[-1]
                # (1, nkv, end, hs); .to is a no-op unless the cache is FP8
                keys = gather_blocks(self.cache.k, table[None])[:, :, :end].to(q.dtype)
                values = gather_blocks(self.cache.v, table[None])[:, :, :end].to(q.dtype)
                y = F.scaled_dot_product_attention(q[:, :, rows], keys, values, attn_mask=mask, enable_gqa=self.gqa)
            ys.append(y.transpose(1, 2))  # (1, length, nh, hs)
            offset += length
        # Whatever the attention kernel's output layout, the same contiguous one for what follows
        # (the compiled prefill_out would compile again for other strides).
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
        return y.reshape(1, y.shape[1], -1).contiguous()

    def attend_first_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cached: torch.Tensor,
                           v_cached: torch.Tensor, writes: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`attend` for the first chunk of one sequence, with no host values (so it can be captured
        in a CUDA graph): q (1, nh, T, hs), k and v (1, nkv, T, hs); their cache-dtype copies go to
        writes = (blocks (T,), offsets (T,)), device tensors → (1, T, nh * hs)."""
        T = q.shape[2]
        self.cache.write(*writes, k_cached[0].transpose(0, 1), v_cached[0].transpose(0, 1))  # (T, nkv, hs)
        with sdpa_kernel(PREFILL_SDPA_BACKENDS):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return y.transpose(1, 2).reshape(1, T, -1).contiguous()

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               tables: torch.Tensor, writes: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """x (B, 1, C): one new token for each of B sequences, at `positions` (B,), its key and value
        going to writes = (blocks (B,), offsets (B,)); tables (B, nb): each row's block table, read up
        to position L - 1 (L = nb * block_size); mask (B, 1, 1, L): which of those positions each row
        attends to (row b: 0..positions[b])."""
        B, L = x.shape[0], mask.shape[-1]
        q, k, v = self._qkv(x, cos, sin)
        blocks, offsets = writes
        # Plain index_put (not KVBlockPool.write's uint8 view): what the compiled decode layer has
        # always done, FP8 included.
        self.cache.k[blocks, :, offsets] = to_cache_dtype(k[:, :, 0], self.cache.k)  # (B, nkv, hs)
        self.cache.v[blocks, :, offsets] = to_cache_dtype(v[:, :, 0], self.cache.v)
        if self.decode_kernel:
            # Each row reads its own positions + 1 cached tokens (not all L) through its block
            # table, in the cache's dtype.
            y = decode_attention_op(q[:, :, 0], self.cache.k, self.cache.v, tables, positions + 1, L)  # (B, nh, hs)
            return self.o_proj(y.reshape(B, 1, -1))
        # (B, nkv, L, hs): a gathered copy (in q's dtype: converted from FP8 on the way).
        keys = gather_blocks(self.cache.k, tables).to(q.dtype)
        values = gather_blocks(self.cache.v, tables).to(q.dtype)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one matrix, after fuse()

    def fuse(self) -> None:
        self.gate_up_proj = concat_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# A layer's work as free functions, so that one compiled version of each (LlamaForCausalLM.compile_layers)
# serves every layer: only the weights differ.

def decode_layer(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, tables: torch.Tensor, writes: tuple[torch.Tensor, torch.Tensor],
                 mask: torch.Tensor) -> torch.Tensor:
    """One layer of a decode step, h (B, 1, C) (Attention.decode says what the rest are)."""
    h = h + layer.self_attn.decode(layer.input_layernorm(h), cos, sin, positions, tables, writes, mask)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def prefill_qkv(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A prefill layer up to attention: h (1, N, C) → q, k, v with RoPE applied, and k, v in the
    cache's dtype (the same tensors unless it is FP8: converted here, where it fuses into RoPE)."""
    attention = layer.self_attn
    q, k, v = attention._qkv(layer.input_layernorm(h), cos, sin)
    return q, k, v, to_cache_dtype(k, attention.cache.k), to_cache_dtype(v, attention.cache.v)


def prefill_out(layer: DecoderLayer, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A prefill layer after attention: h (1, N, C), y (1, N, nh * hs) → the layer's output."""
    h = h + layer.self_attn.o_proj(y)
    return h + layer.mlp(layer.post_attention_layernorm(h))


_LAYER_FUNCTIONS = {"decode_layer": decode_layer, "prefill_qkv": prefill_qkv, "prefill_out": prefill_out}


class LlamaModel(nn.Module):
    """Parameter names match Hugging Face's `LlamaForCausalLM` (`model.layers.N...`, `lm_head`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_blocks = 0
        self.block_size = 0
        self.max_seqs = 0
        self.max_seq_len = 0
        self.padding_row = 0
        self.uncompile_layers()

    # -- set-up -------------------------------------------------------------------------
    def setup_caches(self, num_blocks: int, block_size: int, max_seqs: int, max_seq_len: int,
                     kv_cache_dtype: torch.dtype | None = None, decode_kernel: bool = False) -> None:
        """Allocate once, on the weights' device: each layer's pool of `num_blocks` KV-cache blocks of
        `block_size` positions (block 0 the null block, kv_blocks.NULL_BLOCK; in the weights' dtype
        unless `kv_cache_dtype`), the block tables of `max_seqs` sequences of up to `max_seq_len`
        tokens, and the RoPE tables. `decode_kernel`: decode attention by the Triton kernel.

        Block-table row r (0 <= r < max_seqs) is the table of the sequence the caller put there
        (set_block_table); row max_seqs, `padding_row`, stays all null blocks, for the padding rows
        of a CUDA graph's batch bucket."""
        c = self.config
        weight = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.cache = KVBlockPool(num_blocks, c.num_key_value_heads, block_size, c.head_dim,
                                                kv_cache_dtype or weight.dtype, weight.device)
            layer.self_attn.decode_kernel = decode_kernel
        # int32: what the decode kernel loads; every entry no sequence owns is the null block.
        tables = torch.full((max_seqs + 1, blocks_needed(max_seq_len, block_size)), NULL_BLOCK, dtype=torch.int32)
        self.register_buffer("block_tables", tables.to(weight.device), persistent=False)
        # Tables in float32 then cast, as transformers' LlamaRotaryEmbedding does per call.
        positions = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(c))  # (S, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hs)
        self.register_buffer("rope_cos", emb.cos().to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(weight.device, weight.dtype), persistent=False)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_seqs, self.max_seq_len, self.padding_row = max_seqs, max_seq_len, max_seqs

    def set_block_table(self, row: int, blocks: list[int]) -> None:
        """Make `blocks` the block table in row `row` (positions 0..len(blocks) * block_size - 1), the
        rest of the row the null block."""
        if not 0 <= row < self.max_seqs:
            raise ValueError(f"block-table row {row} is not one of 0..{self.max_seqs - 1}")
        width = self.block_tables.shape[1]
        if len(blocks) > width:
            raise ValueError(f"{len(blocks)} blocks exceed a block table's {width} ({self.max_seq_len} tokens)")
        table = torch.full((width,), NULL_BLOCK, dtype=torch.int32)
        table[: len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        # Queued on the stream like the steps that read the row: after those in flight, before the next.
        self.block_tables[row].copy_(upload(table, self.block_tables.device))

    def fuse(self) -> None:
        """Concatenate q/k/v and gate/up weights: 4 GEMMs a layer instead of 7. The same
        products, so the same results up to the GEMM library's blocking (the engine fuses on every
        device; the CPU tests still equal transformers token for token)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def quantize_fp8(self) -> None:
        """Every layer's projection weights in FP8 with per-output-channel scales, in place of the
        model's (llava_triton.fp8). The embeddings and lm_head stay in the model's dtype."""
        for layer in self.model.layers:
            quantize_linears(layer.self_attn, ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"))
            quantize_linears(layer.mlp, ("gate_up_proj", "gate_proj", "up_proj", "down_proj"))

    def use_gemv(self) -> None:
        """Every projection still in the model's dtype (FP8 ones run their own rows) and the lm_head
        as llava_triton.gemv's GemvLinear: one-row products (decode at batch 1) by its Triton kernel
        instead of cuBLAS; the same weights."""
        for layer in self.model.layers:
            use_gemv_linears(layer.self_attn, ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"))
            use_gemv_linears(layer.mlp, ("gate_up_proj", "gate_proj", "up_proj", "down_proj"))
        use_gemv_linears(self, ("lm_head",))

    def compile_layers(self) -> None:
        """Fuse each layer's small kernels (norms, RoPE, SiLU, residual adds) with torch.compile,
        for decode and for the parts of prefill around attention (which stays eager: it is a loop
        over the packed sequences). One compiled function serves all layers and, with dynamic
        shapes, nearly every batch, length and prompt size; it compiles on its first calls, so
        make those before capturing CUDA graphs."""
        for name, function in _LAYER_FUNCTIONS.items():
            setattr(self, name, torch.compile(function, dynamic=True, fullgraph=True))

    def uncompile_layers(self) -> None:
        for name, function in _LAYER_FUNCTIONS.items():
            setattr(self, name, function)

    # -- forward ------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    @torch.inference_mode()
    def prefill(self, inputs_embeds: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """inputs_embeds (1, N, C): prompt chunks of several sequences packed one after another,
        segments [(row, start, length)] with lengths summing to N: positions start..start+length-1
        of the sequence whose block table is in row `row` → logits of each segment's last token
        (S, V), float32."""
        device = inputs_embeds.device
        if sum(length for _, _, length in segments) != inputs_embeds.shape[1]:
            raise ValueError(f"segments of {[n for _, _, n in segments]} tokens do not pack {inputs_embeds.shape[1]}")
        prefixes = []
        for row, start, length in segments:
            if start + length > self.max_seq_len:
                raise ValueError(f"sequence of {start + length} tokens exceeds the cache's {self.max_seq_len}")
            end = start + length
            # A later chunk: row i (position start+i) attends to cache positions 0..start+i.
            prefixes.append(None if start == 0 else (
                self.block_tables[row, : blocks_needed(end, self.block_size)],
                torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]))
        lengths = [length for _, _, length in segments]
        positions = torch.cat([torch.arange(start, start + length) for _, start, length in segments])
        rows = torch.repeat_interleave(torch.tensor([row for row, _, _ in segments]), torch.tensor(lengths))
        positions, rows = upload(torch.stack([positions, rows]), device)  # one copy, queued (host_tensors)
        # Where each token's key and value go: its position's block and offset in its sequence's table.
        writes = self.block_tables[rows, positions // self.block_size], positions % self.block_size
        cos = self.rope_cos[positions][None, None]  # (1, 1, N, hs)
        sin = self.rope_sin[positions][None, None]
        # An inference tensor like every later layer's input: the compiled layers would compile
        # again for a normal tensor (torch.compile guards on the dispatch keys).
        h = inputs_embeds.clone()
        for layer in self.model.layers:
            qkv = self.prefill_qkv(layer, h, cos, sin)  # q, k, v, and k, v in the cache's dtype
            h = self.prefill_out(layer, h, layer.self_attn.attend(*qkv, writes, lengths, prefixes))
        last = upload(torch.tensor([length for _, _, length in segments]).cumsum(0) - 1, device)
        # The norm is per token: normalising only the last tokens gives the same logits.
        return self.lm_head(self.model.norm(h[0, last])).float()

    @torch.inference_mode()
    def prefill_first_chunk(self, inputs_embeds: torch.Tensor, row: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """`prefill` of one sequence's first chunk with no host values, for cuda_graphs.PrefillGraphs:
        inputs_embeds (1, T, C) at positions 0..T-1 of the sequence whose block table is in row
        `row` (1,) → logits (1, V), float32, of the token at index `last` (1,). Tokens after `last`
        may be padding: attention is causal, so they change nothing before them, and the cache
        positions they write are the null block's (past the sequence's blocks) or written again
        (prefill or decode) before any query reads them."""
        T = inputs_embeds.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"chunk of {T} tokens exceeds the cache's {self.max_seq_len}")
        positions = torch.arange(T, device=inputs_embeds.device)
        table = self.block_tables.index_select(0, row)[0]  # (width,), no host value read
        writes = table[positions // self.block_size], positions % self.block_size
        cos = self.rope_cos[:T][None, None]  # (1, 1, T, hs)
        sin = self.rope_sin[:T][None, None]
        h = inputs_embeds.clone()  # an inference tensor (see prefill)
        for layer in self.model.layers:
            q, k, v, k_cached, v_cached = self.prefill_qkv(layer, h, cos, sin)
            h = self.prefill_out(layer, h, layer.self_attn.attend_first_chunk(q, k, v, k_cached, v_cached, writes))
        return self.lm_head(self.model.norm(h[0].index_select(0, last))).float()

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
        """input_ids (B,) at positions (B,) of the sequences whose block tables are in rows (B,)
        → logits (B, V), float32.

        Attention reads cache positions 0..length-1 at most, rounded up to whole blocks (a row
        attends to those up to its position): every position must be below `length`.
        """
        positions = positions.clone()  # an inference tensor, whatever the caller's (see prefill)
        num_blocks = blocks_needed(length, self.block_size)
        tables = self.block_tables[rows, :num_blocks]  # (B, nb)
        writes = self.block_tables[rows, positions // self.block_size], positions % self.block_size
        cos = self.rope_cos[positions][:, None, None]  # (B, 1, 1, hs)
        sin = self.rope_sin[positions][:, None, None]
        span = num_blocks * self.block_size
        mask = (torch.arange(span, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]
        h = self.embed(input_ids)[:, None]  # (B, 1, C)
        for layer in self.model.layers:
            h = self.decode_layer(layer, h, cos, sin, positions, tables, writes, mask)  # mask (B, 1, 1, L)
        return self.lm_head(self.model.norm(h[:, 0])).float()

    # -- weights ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
        """Load `config.json` + `model.safetensors` in Hugging Face Llama naming (safetensors only)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = LlamaConfig.from_hf(json.loads((directory / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(config)
        state = load_file(directory / "model.safetensors", device=str(device))
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
        unexpected = set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ValueError(f"{directory}: weights do not fit the config (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
        state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True, strict=False)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

