"""Where the language model's host time goes, step by step: the engine in-process, without Triton.

    python -m bench.host_profile --repository REPO --concurrency 1 128 --out DIR

Loads the exported language model (REPO/language_model/1) as its Triton adapter does (the same
`prepare_language_model`, the same `ThreadedOutbox` on its own thread, the engine loop on another)
and runs closed loops of text prompts of --prompt-tokens random ids (each its own, so the prefix
cache finds nothing; as many tokens as W1's image prompt), greedy, --max-tokens out, ignore_eos.
Each level runs twice, with overlap_decode off (the step as it was: decode, wait, hand out) and on.

Per level: output tokens/s, the engine's time to first token, each request's mean time per token after its
first (ITL; p50 over requests), and per
decode step the host's milliseconds in each phase of the engine (llava_triton.step_profile) beside
the GPU's own time per decode step (CUDA events) and the HBM roofline's time per step
(bench.limits). What this leaves out is Triton: the IPC of each response and metric update (the
outbox's thread makes them; here it hands them to a list), and the steps before the language model
(python -m bench reports those per model).

--kernels traces the overlapped runs with torch.profiler and lists the kernels that take most GPU
time per decode step (the GEMMs against the rest); tracing slows the host, so the traced levels'
speed is not the untraced one. Text prompts only: a LLaVA-NeXT-Video export, whose language model
needs its projector, is not supported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.host_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="an exported model repository")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--requests", type=int, default=0, help="requests per level (0: max(2c, 4))")
    parser.add_argument("--prompt-tokens", type=int, default=640)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="requests before each level (not reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", action="store_true",
                        help="also trace the overlapped runs with torch.profiler: GPU time per decode step of "
                             "the kernels that take most (CUDA only)")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="a serving option over the exported one (e.g. max_num_seqs=128)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.prompt_tokens < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --prompt-tokens and --max-tokens must be positive")
    return args


class _Stream:
    """A sink: token arrival times; when its request ends, the loop's next request goes in."""

    def __init__(self, on_final):
        self.times: list[float] = [time.monotonic()]
        self.tokens = 0
        self.failure: str | None = None
        self._on_final = on_final

    def send(self, output) -> None:
        self.times.append(time.monotonic())
        self.tokens += len(output.token_ids)
        if output.final:
            self._on_final(self)

    def error(self, message: str) -> None:
        self.failure = message
        self._on_final(self)

    def cancelled(self) -> bool:
        return False


def run_level(engine, prompts, params, concurrency: int, num_requests: int) -> dict[str, Any]:
    """A closed loop of `concurrency` streams over the running engine: timings of every request."""
    lock, done = threading.Lock(), threading.Event()
    queue, finished = list(prompts[:num_requests]), []

    def submit_next() -> None:
        with lock:
            prompt = queue.pop() if queue else None
        if prompt is not None:
            engine.submit(prompt, None, params, _Stream(on_final))

    def on_final(stream: _Stream) -> None:
        with lock:
            finished.append(stream)
            last = len(finished) == num_requests
        if last:
            done.set()
        else:
            submit_next()

    start = time.monotonic()
    for _ in range(min(concurrency, num_requests)):
        submit_next()
    if not done.wait(timeout=1800):
        raise SystemExit(f"c={concurrency}: {len(finished)} of {num_requests} requests finished in 30 min")
    wall = time.monotonic() - start
    errors = [s.failure for s in finished if s.failure is not None]
    if errors:
        raise SystemExit(f"c={concurrency}: {len(errors)} requests failed: {errors[0]}")
    ttft = [(s.times[1] - s.times[0]) * 1e3 for s in finished]
    # Per request, its decode time per token: the outbox joins a request's queued outputs into one
    # response when its thread lags, so the gaps between responses are not inter-token latencies.
    itl = [(s.times[-1] - s.times[1]) / (s.tokens - 1) * 1e3 for s in finished if s.tokens > 1] or [0.0]
    tokens = sum(s.tokens for s in finished)
    return {"requests": num_requests, "wall_s": round(wall, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_ms": {"p50": round(statistics.median(ttft), 3), "mean": round(statistics.fmean(ttft), 3)},
            "itl_ms": {"p50": round(statistics.median(itl), 3), "mean": round(statistics.fmean(itl), 3)}}


@contextlib.contextmanager
def kernel_trace(enabled: bool):
    """torch.profiler over the block's CUDA kernels (those replayed from CUDA graphs included), or nothing."""
    if not enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as tracer:
        yield tracer


def top_kernels(tracer, decode_steps: int, count: int = 15) -> dict[str, float]:
    """The kernels that took most GPU time, in µs per decode step (prefill's kernels included, so a
    level with many prompts shows them too), and the total of all of them."""
    totals: dict[str, float] = {}
    for event in tracer.key_averages():
        us = event.self_device_time_total
        if us > 0:
            totals[event.key[:90]] = totals.get(event.key[:90], 0.0) + us
    steps = max(decode_steps, 1)
    top = sorted(totals.items(), key=lambda item: -item[1])[:count]
    return {"all kernels": round(sum(totals.values()) / steps, 1)} | {name: round(us / steps, 1) for name, us in top}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from bench import limits as bench_limits
    from export.__main__ import parse_set
    from llava_triton import spec
    from llava_triton.dtypes import resolve_dtype
    from llava_triton.engine import Engine
    from llava_triton.llama import LlamaForCausalLM
    from llava_triton.lm_runtime import prepare_language_model
    from llava_triton.outbox import ThreadedOutbox
    from llava_triton.processor import load_processor
    from llava_triton.sampling import SamplingParams
    from llava_triton.spec import ServingConfig, read_spec
    from llava_triton.step_profile import StepProfile

    directory = args.repository / spec.LANGUAGE_MODEL / "1"
    model_spec, serving = read_spec(directory)
    serving = ServingConfig.from_dict({**dataclasses.asdict(serving), **parse_set(args.set)})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(directory, device=device, dtype=resolve_dtype(serving.dtype))
    tokenizer = load_processor(directory / spec.PROCESSOR_DIR).tokenizer
    started = time.monotonic()
    runtime = prepare_language_model(model, model_spec, serving)
    print(f"[host_profile] language model prepared in {time.monotonic() - started:.1f} s", flush=True)

    vocab = int(model.lm_head.weight.shape[0])
    generator = torch.Generator().manual_seed(args.seed)
    total = sum(max(args.requests or max(2 * c, 4), 1) + args.warmup for c in args.concurrency) * 2
    # Ids past the first thousand and no image or video token: no special token, and none repeats a
    # prompt (nothing cached).
    prompts = [torch.randint(1000, vocab, (args.prompt_tokens,), generator=generator) for _ in range(total)]
    reserved = torch.tensor([model_spec.image_token_index, model_spec.video_token_index])
    plain = int(next(i for i in range(1000, vocab) if i not in reserved.tolist()))
    for prompt in prompts:
        prompt[torch.isin(prompt, reserved)] = plain
    params = SamplingParams.from_inputs({spec.IN_MAX_TOKENS: np.array([args.max_tokens]),
                                         spec.IN_IGNORE_EOS: np.array([True]), spec.IN_STREAM: np.array([True])},
                                        serving)
    device_name = torch.cuda.get_device_name() if device == "cuda" else None
    text_config = json.loads((directory / "config.json").read_text())
    text_config = text_config.get("text_config", text_config)
    step_bytes = bench_limits.decode_bytes_per_step(text_config, serving.dtype,
                                                    args.prompt_tokens + args.max_tokens // 2,
                                                    serving.lm_weight_dtype, serving.kv_cache_dtype)
    bandwidth = bench_limits.lookup(bench_limits.GPU_BANDWIDTH_GBS, device_name)

    levels = []
    for concurrency in args.concurrency:
        num_requests = args.requests or max(2 * concurrency, 4)
        for overlap in (False, True):
            # Text prompts: no projector is ever run, so the engine is built as for a separate projector model.
            level_serving = dataclasses.replace(serving, overlap_decode=overlap, projector_placement="model")
            outbox = ThreadedOutbox()
            engine = Engine(runtime, tokenizer, model_spec, level_serving, outbox=outbox)
            stop = threading.Event()
            loop = threading.Thread(target=engine.run, args=(stop,), name="llava-engine", daemon=True)
            loop.start()
            try:
                if args.warmup:
                    run_level(engine, prompts, params, min(concurrency, args.warmup), args.warmup)
                    del prompts[: args.warmup]
                engine.profile = profile = StepProfile(device)
                trace = args.kernels and overlap and device == "cuda"
                with kernel_trace(trace) as tracer:
                    level = run_level(engine, prompts, params, concurrency, num_requests)
                del prompts[:num_requests]
            finally:
                stop.set()
                loop.join(timeout=30)
                outbox.close()
            summary = profile.summary()
            per_step = summary["host_ms_per_decode_step"]
            batch = summary["mean_decode_batch"] or 1
            roofline_ms = None
            if bandwidth:
                roofline_ms = (step_bytes["weights"] + batch * step_bytes["kv_cache"]) / (bandwidth * 1e9) * 1e3
            if trace:
                level["kernels_us_per_decode_step"] = top_kernels(tracer, summary["decode_steps"])
            level.update(concurrency=concurrency, overlap_decode=overlap, profile=summary,
                         roofline_decode_step_ms=None if roofline_ms is None else round(roofline_ms, 3))
            levels.append(level)
            print(f"[host_profile] c={concurrency} overlap={overlap}: {level['output_tokens_per_s']} tokens/s, "
                  f"ITL p50 {level['itl_ms']['p50']} ms, TTFT p50 {level['ttft_ms']['p50']} ms; per decode step: "
                  f"GPU {summary['gpu_decode_ms_per_step']} ms, host {per_step}", flush=True)

    results = {
        "command": "python -m bench.host_profile " + " ".join(sys.argv[1:] if argv is None else argv),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"gpu": device_name, "torch": torch.__version__},
        "serving": {name: getattr(serving, name) for name in ("dtype", "lm_weight_dtype", "kv_cache_dtype",
                                                                "max_num_seqs", "prefill_chunk_tokens",
                                                                "cuda_graphs", "decode_attention")},
        "workload": {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens},
        "decode_bytes_per_step": step_bytes, "gpu_bandwidth_gbs": bandwidth,
        "levels": levels,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_profile.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "host_profile.md").write_text(render(results))
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    from llava_triton.step_profile import PHASES

    lines = [f"Command: `{results['command']}` ({results['created']}, {results['machine']['gpu'] or 'CPU'}).", "",
             "| c | overlap | tokens/s | ITL p50 ms | TTFT p50 ms | GPU ms/step | roofline ms/step | "
             + " | ".join(PHASES) + " | host ms/step |",
             "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * (len(PHASES) + 1)]
    for level in results["levels"]:
        profile = level["profile"]
        per_step = profile["host_ms_per_decode_step"]
        host = sum(value for value in per_step.values() if value is not None)

        def cell(value):
            return "" if value is None else f"{value:.3f}"

        lines.append(f"| {level['concurrency']} | {'on' if level['overlap_decode'] else 'off'} | "
                     f"{level['output_tokens_per_s']:,.1f} | {level['itl_ms']['p50']:.2f} | "
                     f"{level['ttft_ms']['p50']:.1f} | {cell(profile['gpu_decode_ms_per_step'])} | "
                     f"{cell(level['roofline_decode_step_ms'])} | "
                     + " | ".join(cell(per_step[name]) for name in PHASES) + f" | {host:.3f} |")
    for level in results["levels"]:
        kernels = level.get("kernels_us_per_decode_step")
        if kernels:
            lines += ["", f"GPU kernels at c={level['concurrency']} (overlap on, traced), µs per decode step:", "",
                      "| kernel | µs |", "|---|---:|"]
            lines += [f"| `{name}` | {us:,.1f} |" for name, us in kernels.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
