"""Baseline: W1 (or W2) through transformers' `LlavaForConditionalGeneration` (or
`LlavaNextForConditionalGeneration`) `.generate`, batched; and the GPU's measured bf16 GEMM rate.

Run by `python -m bench` in a subprocess after the Triton server has stopped, so the two never
share the GPU and all of the baseline's GPU memory is returned when it exits. bf16 with SDPA on
CUDA, float32 on CPU; a batch is B copies of the W1 request (processor inputs as in
llava_triton/testing/reference.py, left padding), greedy, exactly `max_new_tokens` new tokens
(`min_new_tokens` too, so EOS cannot shorten it). Every step is timestamped (after a device
synchronize) by a stopping criterion that never stops, which gives the time to the first token.

    python -m bench.baseline --checkpoint build/tiny-llava --batch-sizes 1 8 --json baseline.json
"""

from __future__ import annotations

import argparse
import base64
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_BATCH_SIZES = (1, 8, 32)


def _processor(checkpoint: Path):
    from llava_triton.testing.reference import hf_processor

    processor = hf_processor(checkpoint)  # the checkpoint's processor with the PIL image processor
    processor.tokenizer.padding_side = "left"
    return processor


def measure_gemm_tflops(device, dtype, size: int = 8192, seconds: float = 1.0) -> float | None:
    """The rate of a large square matmul in `dtype` on `device` (TFLOP/s): what prefill and vision GEMMs
    can reach on this GPU, measured rather than taken from the datasheet. None on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        count += 10
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del a, b
    return round(2 * size**3 * count / elapsed / 1e12, 1)


def batch_inputs(processor, image: bytes, question: str, batch_size: int) -> dict[str, Any]:
    """B copies of the W1 request as transformers' processor builds them (images as base64 strings,
    decoded by transformers.image_utils.load_image, as llava_triton/testing/reference.py does)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.strip()}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    encoded = base64.b64encode(image).decode("ascii")
    return processor(images=[encoded] * batch_size, text=[text] * batch_size, padding=True, return_tensors="pt")


class _StepTimes:
    """A StoppingCriteria that records when each new token exists (and never stops)."""

    def __init__(self, synchronize):
        self.synchronize = synchronize
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run(checkpoint: Path, batch_sizes: list[int], output_tokens: int, repeats: int = 1,
        warmup_tokens: int = 8, log=print, workload: str = "W1") -> dict[str, Any]:
    import torch
    import transformers
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, StoppingCriteriaList
    from transformers.utils import logging as transformers_logging

    from bench.workload import QUESTION, W2_IMAGE_SIZE, w1_image
    from llava_triton.spec import ModelSpec

    transformers_logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    # Straight onto the GPU where accelerate is installed (no host copy of a 7B model), else via the host.
    placement = {"device_map": str(device)} if importlib.util.find_spec("accelerate") else {}
    model_class = LlavaNextForConditionalGeneration if ModelSpec.from_pretrained(checkpoint).anyres \
        else LlavaForConditionalGeneration
    model = model_class.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa", **placement)
    model = model.to(device).eval()
    synchronize()
    load_s = time.perf_counter() - started
    language_model_params = (sum(p.numel() for p in model.model.language_model.parameters())
                             + (0 if model.config.tie_word_embeddings else model.lm_head.weight.numel()))
    log(f"[baseline] loaded {checkpoint} on {device} ({str(dtype).removeprefix('torch.')}) in {load_s:.1f} s")
    processor = _processor(checkpoint)
    image = w1_image() if workload == "W1" else w1_image(*W2_IMAGE_SIZE)
    pad_token_id = processor.tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = processor.tokenizer.eos_token_id

    # The model is an argument, not a closure variable, so that `del model` below drops the last reference.
    def generate(model, inputs: dict[str, Any], new_tokens: int) -> tuple[float, list[float], int]:
        timer = _StepTimes(synchronize)
        synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    temperature=None, top_p=None, top_k=None, pad_token_id=pad_token_id,
                                    stopping_criteria=StoppingCriteriaList([timer]))
        synchronize()
        end = time.perf_counter()
        generated = output.shape[1] - inputs["input_ids"].shape[1]
        return end - start, [t - start for t in timer.times], generated

    runs = []
    for batch_size in batch_sizes:
        inputs = {k: v.to(device) for k, v in batch_inputs(processor, image, QUESTION, batch_size).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        generate(model, inputs, warmup_tokens)  # warm-up: kernels chosen, caches allocated (not reported)
        latencies, ttfts = [], []
        for _ in range(repeats):
            latency, step_times, generated = generate(model, inputs, output_tokens)
            if generated != output_tokens:
                raise RuntimeError(f"generate gave {generated} new tokens, expected {output_tokens}")
            latencies.append(latency)
            ttfts.append(step_times[0] if step_times else float("nan"))
        latency, ttft = statistics.median(latencies), statistics.median(ttfts)
        entry = {
            "batch_size": batch_size,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "output_tokens_per_sequence": output_tokens,
            "latency_s": round(latency, 4),  # one generate() call for the whole batch
            "latencies_s": [round(x, 4) for x in latencies],
            "ttft_ms": round(ttft * 1e3, 3),  # vision tower + prefill + first token, whole batch
            "itl_ms": round((latency - ttft) / max(output_tokens - 1, 1) * 1e3, 3),
            "output_tokens_per_s": round(batch_size * output_tokens / latency, 3),
        }
        runs.append(entry)
        log(f"[baseline] batch {batch_size}: {entry['latency_s']:.2f} s, {entry['output_tokens_per_s']:.1f} "
            f"tokens/s, first token after {entry['ttft_ms']:.0f} ms")
        del inputs
    del model
    gc.collect()
    gemm_tflops = measure_gemm_tflops(device, dtype)
    if gemm_tflops:
        log(f"[baseline] {str(dtype).removeprefix('torch.')} GEMM 8192^3: {gemm_tflops} TFLOP/s")
    result = {
        "device": str(device),
        "workload": workload,
        "gemm_tflops": gemm_tflops,
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": "sdpa",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_s": round(load_s, 2),
        "repeats": repeats,
        "language_model_params": language_model_params,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "runs": runs,
    }
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed generate() calls per batch size (median)")
    parser.add_argument("--workload", choices=("W1", "W2"), default="W1")
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    args = parser.parse_args(argv)
    result = run(args.checkpoint, args.batch_sizes, args.output_tokens, args.repeats,
                 log=lambda message: print(message, flush=True), workload=args.workload)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
