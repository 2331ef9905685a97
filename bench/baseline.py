"""Baseline: W1 (or W2) through transformers' `LlavaForConditionalGeneration` (or
`LlavaNextForConditionalGeneration`) `.generate`, batched; W4 (a video) through
`LlavaNextVideoForConditionalGeneration`; and the GPU's measured bf16 GEMM rate.

Run by `python -m bench` in a subprocess after the Triton server has stopped, so the two never
share the GPU and all of the baseline's GPU memory is returned when it exits. bf16 with SDPA on
CUDA, float32 on CPU; a batch is B copies of the W1 request (processor inputs as in
llava_triton/testing/reference.py, left padding), greedy, exactly `max_new_tokens` new tokens
(`min_new_tokens` too, so EOS cannot shorten it). Every step is timestamped (after a device
synchronize) by a stopping criterion that never stops, which gives the time to the first token.

W4 (`run_video`): the clip's frames as transformers reads them (its PyAV reader at its video processor's
indices, llava_triton/testing/reference.py `hf_video_frames`) and its video processor's pixel values,
made once and copied B times; `<video>` expanded as LlavaNextVideoProcessor does. generate() is timed on
those tensors, as for the images; what reading and processing one clip costs is timed on its own
(`preprocess_ms_per_clip`), since a server does it for every request.

    python -m bench.baseline --checkpoint build/tiny-llava --batch-sizes 1 8 --json baseline.json
    python -m bench.baseline --checkpoint build/tiny-next-video-llava --workload W4 --video w4.mp4 \\
        --num-frames 16 --json baseline.json
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


def video_frames_and_pixels(checkpoint: Path, video: bytes, num_frames: int):
    """(frames (F, H, W, 3) uint8, pixel_values_videos (F, 3, S, S) float32) of one clip, as transformers
    reads and processes it (llava_triton.testing.reference)."""
    from llava_triton.testing.reference import hf_video_frames, video_pixel_values

    frames = hf_video_frames(video, num_frames=num_frames)
    return frames, video_pixel_values(checkpoint, frames)


def video_batch_inputs(checkpoint: Path, video: bytes, question: str, num_frames: int,
                       batch_size: int) -> dict[str, Any]:
    """B copies of the W4 request for LlavaNextVideoForConditionalGeneration: the question after the video
    (the chat template's order without tags), `<video>` expanded to the frames' pooled tokens."""
    import numpy as np
    import torch

    from llava_triton.testing.reference import hf_video_inputs

    frames, _ = video_frames_and_pixels(checkpoint, video, num_frames)
    input_ids, pixel_values_videos, _ = hf_video_inputs(checkpoint, [], frames, question)
    ids = torch.from_numpy(input_ids)[None].repeat(batch_size, 1)  # (B, T): the same length, no padding
    pixels = torch.from_numpy(np.ascontiguousarray(pixel_values_videos, dtype=np.float32))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": pixels[None].repeat(batch_size, 1, 1, 1, 1)}  # (B, F, 3, S, S)


def video_preprocess_ms(checkpoint: Path, video: bytes, num_frames: int, repeats: int) -> dict[str, Any]:
    """Reading one clip's frames and processing them (`video_frames_and_pixels`), median of `repeats` after
    one untimed call (imports, the reader's first open)."""
    video_frames_and_pixels(checkpoint, video, num_frames)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        video_frames_and_pixels(checkpoint, video, num_frames)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": round(statistics.median(times), 3), "all": [round(t, 3) for t in times]}


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
        warmup_tokens: int = 8, log=print, workload: str = "W1", video: bytes | None = None,
        num_frames: int = 16) -> dict[str, Any]:
    """W1, W2 or (with `video`) W4 at each batch size; see the module docstring."""
    import torch
    import transformers
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaNextVideoForConditionalGeneration,
        StoppingCriteriaList,
    )
    from transformers.utils import logging as transformers_logging

    from bench.workload import QUESTION, W2_IMAGE_SIZE, W4_QUESTION, w1_image
    from llava_triton.spec import ModelSpec

    if (workload == "W4") != (video is not None):
        raise ValueError("W4 needs its video, and only W4 takes one")
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
    model_spec = ModelSpec.from_pretrained(checkpoint)
    model_class = LlavaNextVideoForConditionalGeneration if model_spec.videos \
        else LlavaNextForConditionalGeneration if model_spec.anyres else LlavaForConditionalGeneration
    model = model_class.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa", **placement)
    model = model.to(device).eval()
    synchronize()
    load_s = time.perf_counter() - started
    language_model_params = (sum(p.numel() for p in model.model.language_model.parameters())
                             + (0 if model.config.tie_word_embeddings else model.lm_head.weight.numel()))
    log(f"[baseline] loaded {checkpoint} on {device} ({str(dtype).removeprefix('torch.')}) in {load_s:.1f} s")
    processor = _processor(checkpoint)
    image = w1_image() if workload == "W1" else w1_image(*W2_IMAGE_SIZE) if workload == "W2" else None
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
        made = (video_batch_inputs(checkpoint, video, W4_QUESTION, num_frames, batch_size) if video is not None
                else batch_inputs(processor, image, QUESTION, batch_size))
        inputs = {k: v.to(device) for k, v in made.items()}
        del made
        for name in ("pixel_values", "pixel_values_videos"):
            if name in inputs:
                inputs[name] = inputs[name].to(dtype)
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
    if video is not None:
        result["num_frames"] = num_frames
        result["preprocess_ms_per_clip"] = video_preprocess_ms(checkpoint, video, num_frames, max(repeats, 3))
        log(f"[baseline] reading and processing one clip: {result['preprocess_ms_per_clip']['median']:.1f} ms")
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_video(checkpoint: Path, video: bytes, batch_sizes: list[int], output_tokens: int, repeats: int = 1,
              num_frames: int = 16, log=print) -> dict[str, Any]:
    """W4: `video` (encoded) and W4's question through LlavaNextVideoForConditionalGeneration.generate."""
    return run(checkpoint, batch_sizes, output_tokens, repeats, log=log, workload="W4", video=video,
               num_frames=num_frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed generate() calls per batch size (median)")
    parser.add_argument("--workload", choices=("W1", "W2", "W4"), default="W1")
    parser.add_argument("--video", type=Path, default=None, help="W4: the encoded clip")
    parser.add_argument("--num-frames", type=int, default=16, help="W4: frames sampled from the clip")
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    args = parser.parse_args(argv)
    if (args.workload == "W4") != (args.video is not None):
        parser.error("--video is W4's, and W4 needs it")
    def log(message: str) -> None:
        print(message, flush=True)

    if args.video is not None:
        result = run_video(args.checkpoint, args.video.read_bytes(), args.batch_sizes, args.output_tokens,
                           args.repeats, args.num_frames, log=log)
    else:
        result = run(args.checkpoint, args.batch_sizes, args.output_tokens, args.repeats, log=log,
                     workload=args.workload)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
