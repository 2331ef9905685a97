"""The language model made ready to serve: a loaded LlamaForCausalLM turned into the decode and prefill
steps the engine calls (weights fused and maybe FP8, the KV cache's block pool sized and allocated, layers
compiled, steps captured as CUDA graphs), all before the engine schedules anything."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import decode_attention, gemv
from .cuda_graphs import DecodeGraphs, PrefillGraphs
from .kv_blocks import blocks_needed
from .llama import LlamaForCausalLM
from .spec import ModelSpec, ServingConfig
from .torch_compile import compile_model

log = logging.getLogger(__name__)

# KV-cache dtypes besides the model's own (ServingConfig.kv_cache_dtype).
KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}

# (input_ids (B,), positions (B,), block-table rows (B,), length) -> logits (B, V): LlamaForCausalLM.decode,
# or DecodeGraphs.
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
# (inputs_embeds (1, N, C), [(block-table row, start, length)]) -> logits (S, V): LlamaForCausalLM.prefill,
# or PrefillGraphs.
PrefillStep = Callable[[torch.Tensor, list[tuple[int, int, int]]], torch.Tensor]


@dataclass
class LanguageModelRuntime:
    """What the engine runs: the prepared model (for its embeddings and block tables) and its two steps
    over a KV cache of `num_blocks` blocks of `block_size` positions (block 0 the null block), shared by
    up to `max_seqs` sequences (block-table rows) of up to `max_seq_len` tokens each."""

    model: LlamaForCausalLM
    num_blocks: int
    block_size: int
    max_seqs: int
    max_seq_len: int
    decode_step: DecodeStep
    prefill_step: PrefillStep

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype


def kv_cache_dtype(model: LlamaForCausalLM, serving: ServingConfig) -> torch.dtype:
    return KV_CACHE_DTYPES.get(serving.kv_cache_dtype, model.lm_head.weight.dtype)


def use_decode_kernel(serving: ServingConfig, device: torch.device) -> bool:
    """Whether decode attention runs as llava_triton.decode_attention's Triton kernel (see
    ServingConfig.decode_attention).

    "auto" picks it on a GPU, for a bfloat16 cache as for an FP8 one. Over the former contiguous
    slot cache, in whole 7B decode steps on the H100, it was within 4 % of SDPA (cuDNN) either way
    with bfloat16 at batch 1 to 128, and took 40 % less time with FP8 at batch 128 (13.8 against
    23.1 ms: SDPA read a bfloat16 copy). Over the block pool SDPA must first gather every row's
    blocks into a dense copy, reading and writing the batch's keys and values once more before it
    reads them, in either dtype; the kernel reads through the block tables in place, one int32 block
    id per position besides the keys and values. (Not yet measured over the block pool.)"""
    if serving.decode_attention == "sdpa":
        return False
    if serving.decode_attention == "triton":
        if not decode_attention.available():
            raise RuntimeError("decode_attention is 'triton' but the triton package is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("decode_attention is 'triton' but the language model runs on the CPU: Triton "
                               "kernels need a GPU (or TRITON_INTERPRET=1, Triton's slow interpreter)")
        return True
    return device.type == "cuda" and decode_attention.available()


def use_gemv(serving: ServingConfig, device: torch.device) -> bool:
    """Whether one-row products of weights in the model's dtype run as llava_triton.gemv's Triton
    kernel (ServingConfig.decode_gemv): "auto" picks it on a GPU where Triton is importable. On the
    CPU every product is F.linear's, whatever the setting (GemvLinear runs the kernel on a GPU only)."""
    if serving.decode_gemv == "cublas":
        return False
    if serving.decode_gemv == "triton" and not gemv.available():
        raise RuntimeError("decode_gemv is 'triton' but the triton package is not installed")
    return device.type == "cuda" and gemv.available()


def kv_cache_bytes_per_block(model: LlamaForCausalLM, serving: ServingConfig) -> int:
    """Bytes of one KV-cache block: keys and values of kv_block_size positions in every layer."""
    c = model.config
    element_size = kv_cache_dtype(model, serving).itemsize
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * serving.kv_block_size * element_size


def kv_cache_blocks(model: LlamaForCausalLM, serving: ServingConfig, max_seq_len: int) -> int:
    """How many blocks the KV cache's pool holds, the null block included.

    At most what max_num_seqs sequences of max_seq_len tokens can use (no more can be admitted at
    once): on the CPU that is the size, the memory the former per-slot cache took. On a GPU the
    pool is bounded by the memory left after the weights (kv_cache_memory_fraction of it, so the
    vision models, the embedding cache and activations sharing the GPU still fit), and with prefix
    caching it takes all of that: blocks beyond what running requests hold keep earlier prompts
    for reuse. Requests wait for free blocks.
    """
    weight = model.lm_head.weight
    bytes_per_block = kv_cache_bytes_per_block(model, serving)
    usable = serving.max_num_seqs * blocks_needed(max_seq_len, serving.kv_block_size)
    if weight.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(weight.device)
        fit = int(free * serving.kv_cache_memory_fraction) // bytes_per_block - 1  # less the null block
        if fit < 1:
            raise RuntimeError(f"no GPU memory left for even one KV-cache block of {serving.kv_block_size} tokens "
                               f"({bytes_per_block / 2**20:.2f} MiB); lower kv_block_size or raise "
                               "kv_cache_memory_fraction")
        if fit < blocks_needed(max_seq_len, serving.kv_block_size):
            log.warning("KV cache: %d blocks of %d tokens fit in %.1f GiB free, fewer than one request of max_seq_len "
                        "%d tokens needs; longer requests are refused", fit, serving.kv_block_size, free / 2**30,
                        max_seq_len)
        usable = fit if serving.prefix_caching else min(usable, fit)
    log.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)", usable, serving.kv_block_size,
             usable * serving.kv_block_size, (usable + 1) * bytes_per_block / 2**30)
    return usable + 1


def prepare_language_model(model: LlamaForCausalLM, spec: ModelSpec, serving: ServingConfig) -> LanguageModelRuntime:
    """Make `model` (loaded, on its device, in its dtype) ready to serve under `serving`; changes it in place.

    In this order: weights in their final form (fused, FP8 copies made, one-row products by
    llava_triton.gemv where decode_gemv says), so the KV cache is sized from
    the memory they leave free; the cache's block pool and block tables; on a GPU, compiled layers
    (torch_compile), then decode and prefill captured as CUDA graphs (those captures write the null
    block only: no block table holds another yet).
    """
    device = model.lm_head.weight.device
    max_seq_len = serving.token_limit(spec)
    model.fuse()
    if serving.lm_weight_dtype != "auto":  # FP8, the one other value
        model.quantize_fp8()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # return quantize_fp8's float32 temporaries before measuring
    if use_gemv(serving, device):
        model.use_gemv()
    num_blocks = kv_cache_blocks(model, serving, max_seq_len)
    model.setup_caches(num_blocks, serving.kv_block_size, serving.max_num_seqs, max_seq_len,
                       kv_cache_dtype(model, serving), decode_kernel=use_decode_kernel(serving, device))
    runtime = LanguageModelRuntime(model, num_blocks, serving.kv_block_size, serving.max_num_seqs, max_seq_len,
                                   model.decode, model.prefill)
    if serving.torch_compile and device.type == "cuda":
        compile_model(model)
    if serving.cuda_graphs and device.type == "cuda":
        decode_graphs = DecodeGraphs(model, serving.max_num_seqs)
        decode_graphs.capture_all()
        runtime.decode_step = decode_graphs
        prefill_graphs = PrefillGraphs(model, serving.prefill_chunk_tokens)
        prefill_graphs.capture_all()
        runtime.prefill_step = prefill_graphs
        log.info("captured %d decode and %d prefill CUDA graphs", len(decode_graphs.graphs),
                 len(prefill_graphs.graphs))
    return runtime
