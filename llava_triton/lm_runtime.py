"""The language model made ready to serve: a loaded LlamaForCausalLM turned into the decode and prefill
steps the engine calls (weights fused and maybe FP8, KV cache sized and allocated, layers compiled, steps
captured as CUDA graphs), all before the engine schedules anything."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import decode_attention
from .cuda_graphs import DecodeGraphs, PrefillGraphs
from .llama import LlamaForCausalLM
from .spec import ModelSpec, ServingConfig
from .torch_compile import compile_model

log = logging.getLogger(__name__)

# KV-cache dtypes besides the model's own (ServingConfig.kv_cache_dtype).
KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}

# (input_ids (B,), positions (B,), length) -> logits (B, V): LlamaForCausalLM.decode, or DecodeGraphs.
DecodeStep = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# (inputs_embeds (1, N, C), [(slot, start, length)]) -> logits (S, V): LlamaForCausalLM.prefill, or PrefillGraphs.
PrefillStep = Callable[[torch.Tensor, list[tuple[int, int, int]]], torch.Tensor]


@dataclass
class LanguageModelRuntime:
    """What the engine runs: the prepared model (for its embeddings) and its two steps over a KV cache of
    `num_slots` sequences of up to `max_seq_len` tokens."""

    model: LlamaForCausalLM
    num_slots: int
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

    "auto" picks it for an FP8 cache on a GPU. With a bfloat16 cache it is no faster than SDPA
    (cuDNN) in whole 7B decode steps on the H100 (within 4 % either way at batch 1 to 128), while
    with FP8 SDPA would read a bfloat16 copy of the cache, and the kernel's steps took 40 % less
    time at batch 128 (13.8 against 23.1 ms)."""
    if serving.decode_attention == "sdpa":
        return False
    if serving.decode_attention == "triton":
        if not decode_attention.available():
            raise RuntimeError("decode_attention is 'triton' but the triton package is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("decode_attention is 'triton' but the language model runs on the CPU: Triton "
                               "kernels need a GPU (or TRITON_INTERPRET=1, Triton's slow interpreter)")
        return True
    return device.type == "cuda" and decode_attention.available() and serving.kv_cache_dtype != "auto"


def kv_cache_slots(model: LlamaForCausalLM, serving: ServingConfig, max_seq_len: int) -> int:
    """How many sequences the KV cache holds: max_num_seqs, or fewer where device memory is short.

    On a GPU the cache is sized from the memory left after the weights (a fraction of it, so the
    vision models and activations sharing the GPU still fit); requests beyond it wait.
    """
    c = model.config
    weight = model.lm_head.weight
    element_size = kv_cache_dtype(model, serving).itemsize
    bytes_per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * max_seq_len * element_size
    slots = serving.max_num_seqs
    if weight.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(weight.device)
        fit = int(free * serving.kv_cache_memory_fraction) // bytes_per_slot
        if fit < 1:
            raise RuntimeError(f"no GPU memory left for even one KV-cache slot of {max_seq_len} tokens "
                               f"({bytes_per_slot / 2**30:.2f} GiB); lower max_seq_len")
        if fit < slots:
            log.warning("KV cache: %d slots of %d tokens fit in %.1f GiB free (max_num_seqs %d)", fit, max_seq_len,
                        free / 2**30, slots)
        slots = min(slots, fit)
    return slots


def prepare_language_model(model: LlamaForCausalLM, spec: ModelSpec, serving: ServingConfig) -> LanguageModelRuntime:
    """Make `model` (loaded, on its device, in its dtype) ready to serve under `serving`; changes it in place.

    In this order: weights in their final form (fused, FP8 copies made), so the KV cache is sized from
    the memory they leave free; the cache; on a GPU, compiled layers (torch_compile), then decode and
    prefill captured as CUDA graphs (those captures write slot 0's cache: nothing is served yet).
    """
    device = model.lm_head.weight.device
    max_seq_len = serving.token_limit(spec)
    model.fuse()
    if serving.lm_weight_dtype != "auto":  # FP8, the one other value
        model.quantize_fp8()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # return quantize_fp8's float32 temporaries before measuring
    num_slots = kv_cache_slots(model, serving, max_seq_len)
    model.setup_caches(num_slots, max_seq_len, kv_cache_dtype(model, serving),
                       decode_kernel=use_decode_kernel(serving, device))
    runtime = LanguageModelRuntime(model, num_slots, max_seq_len, model.decode, model.prefill)
    if serving.torch_compile and device.type == "cuda":
        compile_model(model)
    if serving.cuda_graphs and device.type == "cuda":
        decode_graphs = DecodeGraphs(model, num_slots)
        decode_graphs.capture_all()
        runtime.decode_step = decode_graphs
        prefill_graphs = PrefillGraphs(model, serving.prefill_chunk_tokens)
        prefill_graphs.capture_all()
        runtime.prefill_step = prefill_graphs
        log.info("captured %d decode and %d prefill CUDA graphs", len(decode_graphs.graphs),
                 len(prefill_graphs.graphs))
    return runtime
