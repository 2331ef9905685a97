"""Roofline numbers beside the measured figures, all sizes from the checkpoint's config.

* Language-model bytes: parameters counted from `text_config` (embedding, decoder layers, final
  norm, lm_head) times the serving dtype's size.
* Single-stream decode limit: a decode step at batch 1 reads every weight except the embedding
  table (one row of it) plus the KV cache of the context so far, so
      tokens/s <= memory bandwidth / (weight bytes read per step + KV bytes at the context).
* Vision FLOPs per image from `vision_config` (formula in `vision_flops`), against the GPU's
  dense bf16/fp16 peak.
* A GPU-time ceiling for each concurrency c (`throughput_ceiling`): c requests need c times their
  vision tiles and prefill (FLOPs at the GEMM rate measured on the same GPU) plus the decode steps
  they share (bytes at the memory bandwidth), so
      tokens/s <= c * out / (c * (vision + prefill FLOPs) / GEMM rate + out * step bytes(c) / bandwidth).

GPU figures are datasheet values keyed by the name torch / nvidia-smi report; an unknown GPU (or
the CPU) gets None, shown as "n/a", unless given on the command line.
"""

from __future__ import annotations

from typing import Any

from llava_triton.vision import num_layers_needed

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8_e4m3": 1}

# (substrings that must all be in the device name, value). First match wins: H200 before H100,
# PCIe before the SXM form (reported as "NVIDIA H100 80GB HBM3").
GPU_BANDWIDTH_GBS = (
    (("H200",), 4800.0),
    (("H100", "PCIe"), 2000.0),
    (("H100", "SXM"), 3350.0),
    (("H100", "HBM3"), 3350.0),
)
# Dense (no sparsity) bf16/fp16 tensor-core peak, TFLOP/s.
GPU_PEAK_TFLOPS_BF16 = (
    (("H200",), 989.0),
    (("H100", "PCIe"), 756.0),
    (("H100", "SXM"), 989.0),
    (("H100", "HBM3"), 989.0),
)


def lookup(table: tuple, device_name: str | None) -> float | None:
    if not device_name:
        return None
    for needles, value in table:
        if all(needle.lower() in device_name.lower() for needle in needles):
            return value
    return None


def language_model_params(text_config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of a Llama-family decoder, from its config."""
    hidden = int(text_config["hidden_size"])
    vocab = int(text_config["vocab_size"])
    layers = int(text_config["num_hidden_layers"])
    heads = int(text_config["num_attention_heads"])
    kv_heads = int(text_config.get("num_key_value_heads") or heads)
    head_dim = int(text_config.get("head_dim") or hidden // heads)
    intermediate = int(text_config["intermediate_size"])
    attention_bias = bool(text_config.get("attention_bias", False))
    mlp_bias = bool(text_config.get("mlp_bias", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden + (q + 2 * kv + hidden if attention_bias else 0)
    mlp = 3 * hidden * intermediate + (2 * intermediate + hidden if mlp_bias else 0)  # gate, up, down
    per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embed = vocab * hidden
    lm_head = 0 if text_config.get("tie_word_embeddings", False) else vocab * hidden
    projections = layers * (hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate)
    return {"embed": embed, "per_layer": per_layer, "layers": layers * per_layer, "final_norm": hidden,
            "projections": projections,
            "lm_head": lm_head, "total": embed + layers * per_layer + hidden + lm_head,
            "kv_values_per_token": 2 * layers * kv_heads * head_dim}


def decode_bytes_per_step(text_config: dict[str, Any], dtype: str, context_tokens: int,
                          lm_weight_dtype: str = "auto", kv_cache_dtype: str = "auto") -> dict[str, int]:
    """Bytes a batch-1 decode step must read: weights (embedding table excluded, one row of it
    read) and the KV cache of `context_tokens` positions, in the serving dtype, or in FP8 for the
    layers' projection matrices (lm_weight_dtype) and the KV cache (kv_cache_dtype) where set."""
    size = DTYPE_BYTES[dtype]
    params = language_model_params(text_config)
    weights = (params["layers"] + params["final_norm"] + params["lm_head"] + int(text_config["hidden_size"])) * size
    if lm_weight_dtype != "auto":
        weights -= params["projections"] * (size - DTYPE_BYTES[lm_weight_dtype])
    if params["lm_head"] == 0:  # tied: the lm_head matmul reads the whole (shared) table
        weights += params["embed"] * size
    kv_size = size if kv_cache_dtype == "auto" else DTYPE_BYTES[kv_cache_dtype]
    kv_cache = params["kv_values_per_token"] * context_tokens * kv_size
    return {"weights": weights, "kv_cache": kv_cache, "total": weights + kv_cache}


def vision_flops(config: dict[str, Any]) -> dict[str, int]:
    """FLOPs (multiply-add = 2) per image of the vision encoder as served and of the projector.

    With P = (image_size / patch_size)^2 patches, T = P + 1 tokens (CLS), D = hidden_size,
    F = intermediate_size, L = layers run (up to vision_feature_layer; -2 skips the last one),
    N = image tokens kept (P for "default"), Dt = the text model's hidden size:
        patch embedding   2 * P * (C * patch_size^2) * D
        per layer         2 * T * 4 * D^2          q, k, v, o projections
                        + 2 * T * 2 * D * F        MLP (fc1, fc2)
                        + 2 * 2 * T^2 * D          attention scores Q K^T and their product with V
        projector         2 * N * D * Dt + 2 * N * Dt^2    (linear_1, linear_2)
    LayerNorms, activations, softmax and biases (O(T * D) each) are left out: < 1 % here.
    """
    vision, text = config["vision_config"], config["text_config"]
    image_size, patch = int(vision["image_size"]), int(vision["patch_size"])
    channels = int(vision.get("num_channels", 3))
    hidden, intermediate = int(vision["hidden_size"]), int(vision["intermediate_size"])
    layers = num_layers_needed(config.get("vision_feature_layer", -2), int(vision["num_hidden_layers"]))
    patches = (image_size // patch) ** 2
    tokens = patches + 1
    kept = patches if config.get("vision_feature_select_strategy", "default") == "default" else tokens
    text_hidden = int(text["hidden_size"])
    patch_embedding = 2 * patches * channels * patch * patch * hidden
    per_layer = 2 * tokens * 4 * hidden * hidden + 2 * tokens * 2 * hidden * intermediate + 4 * tokens * tokens * hidden
    encoder = patch_embedding + layers * per_layer
    projector = 2 * kept * hidden * text_hidden + 2 * kept * text_hidden * text_hidden
    return {"vision_encoder": encoder, "projector": projector, "total": encoder + projector,
            "layers_run": layers, "tokens": tokens}


def prefill_flops(text_config: dict[str, Any], tokens: int) -> int:
    """FLOPs to prefill one prompt of `tokens`: every projection for every token, causal attention
    (QK^T and its product with V over the half of the T x T scores a causal mask keeps), and lm_head for
    the last token only (what serving computes)."""
    params = language_model_params(text_config)
    heads = int(text_config["num_attention_heads"])
    head_dim = int(text_config.get("head_dim") or int(text_config["hidden_size"]) // heads)
    layers = int(text_config["num_hidden_layers"])
    attention = 2 * layers * heads * head_dim * tokens * tokens  # 2 matmuls x 2 FLOPs x T^2/2 x heads x head_dim
    lm_head = 2 * int(text_config["hidden_size"]) * int(text_config["vocab_size"])
    return 2 * tokens * params["projections"] + attention + lm_head


def throughput_ceiling(config: dict[str, Any], serving_dtype: str, concurrency: int, prompt_tokens: int,
                       output_tokens: int, tiles_per_request: int, gemm_tflops: float | None,
                       bandwidth_gbs: float | None, lm_weight_dtype: str = "auto",
                       kv_cache_dtype: str = "auto") -> dict[str, Any] | None:
    """Output tokens/s that `concurrency` streams of this request cannot exceed on this GPU, from its
    GPU work alone (module docstring); None where the GEMM rate or the bandwidth is unknown."""
    if not gemm_tflops or not bandwidth_gbs:
        return None
    text = config["text_config"]
    compute_flops = tiles_per_request * vision_flops(config)["total"] + prefill_flops(text, prompt_tokens)
    compute_s = compute_flops / (gemm_tflops * 1e12)
    # A decode step at batch c reads the weights once and each sequence's KV cache at its mean length.
    one = decode_bytes_per_step(text, serving_dtype, prompt_tokens + output_tokens // 2, lm_weight_dtype,
                                kv_cache_dtype)
    step_s = (one["weights"] + concurrency * one["kv_cache"]) / (bandwidth_gbs * 1e9)
    total_s = concurrency * compute_s + output_tokens * step_s
    return {"concurrency": concurrency, "tokens_per_s": round(concurrency * output_tokens / total_s, 1),
            "prefill_and_vision_ms_per_request": round(compute_s * 1e3, 3),
            "decode_step_ms": round(step_s * 1e3, 3),
            "ttft_ms_at_least": round((compute_s + step_s) * 1e3, 3)}


def limits(config: dict[str, Any], serving_dtype: str, device: str, device_name: str | None, context_tokens: int,
           bandwidth_gbs: float | None = None, peak_tflops: float | None = None,
           lm_weight_dtype: str = "auto", kv_cache_dtype: str = "auto", *, gemm_tflops: float | None = None,
           prompt_tokens: int | None = None, output_tokens: int | None = None, tiles_per_request: int = 1,
           concurrency: tuple[int, ...] = ()) -> dict[str, Any]:
    """The limits of this model on this device (GPU figures None where unknown or on CPU).
    `gemm_tflops`: the bf16 GEMM rate measured on the device (bench.baseline), for the prefill and
    the ceilings per concurrency."""
    params = language_model_params(config["text_config"])
    step = decode_bytes_per_step(config["text_config"], serving_dtype, context_tokens, lm_weight_dtype,
                                 kv_cache_dtype)
    on_gpu = device.startswith("cuda")
    if bandwidth_gbs is None and on_gpu:
        bandwidth_gbs = lookup(GPU_BANDWIDTH_GBS, device_name)
    if peak_tflops is None and on_gpu and serving_dtype in ("bfloat16", "float16"):
        peak_tflops = lookup(GPU_PEAK_TFLOPS_BF16, device_name)
    flops = vision_flops(config)
    return {
        "device": device,
        "device_name": device_name,
        "serving_dtype": serving_dtype,
        "lm_weight_dtype": lm_weight_dtype,
        "kv_cache_dtype": kv_cache_dtype,
        "language_model_params": params["total"],
        "language_model_bytes": params["total"] * DTYPE_BYTES[serving_dtype],
        "language_model_param_breakdown": params,
        "decode_context_tokens": context_tokens,
        "decode_bytes_per_step": step,
        "gpu_bandwidth_gbs": bandwidth_gbs,
        "single_stream_decode_limit_tokens_per_s": (round(bandwidth_gbs * 1e9 / step["total"], 2)
                                                    if bandwidth_gbs else None),
        "vision_flops_per_image": flops,
        "gpu_peak_tflops": peak_tflops,
        "vision_encoder_limit_images_per_s": (round(peak_tflops * 1e12 / flops["vision_encoder"], 1)
                                              if peak_tflops else None),
        "measured_gemm_tflops": gemm_tflops,
        "tiles_per_request": tiles_per_request,
        "prefill_flops_per_request": prefill_flops(config["text_config"], prompt_tokens) if prompt_tokens else None,
        "vision_flops_per_request": tiles_per_request * flops["total"],
        "ceilings": [ceiling for c in concurrency if (ceiling := throughput_ceiling(
            config, serving_dtype, c, prompt_tokens or 0, output_tokens or 0, tiles_per_request, gemm_tflops,
            bandwidth_gbs, lm_weight_dtype, kv_cache_dtype)) is not None] if prompt_tokens and output_tokens else [],
    }


def percent(value: float | None, limit: float | None) -> float | None:
    if value is None or not limit:
        return None
    return round(100.0 * value / limit, 2)
