"""Workload W4 (a question about a video, LLaVA-NeXT-Video) against its limits and transformers: `python -m bench.w4`.

    python -m bench.w4                                   # the tiny-next-video preset on the CPU
    python -m bench.w4 --checkpoint build/llava-next-video-7b-llava --export-arg=--device=cuda \\
        --export-arg=--dtype=bfloat16                    # the H200 run: c = 1, 8, 32 and the baseline

W4 (bench.workload.w4): one --seconds (10) long --width x --height (640x360) H.264 MP4 clip at --fps (30),
made in code, --num-frames (16) sampled from it, a question of about 33 tokens, --max-tokens (128) out,
every request streamed with ignore_eos and a cache_salt of its own.

Steps: build or take the checkpoint; export it (PyTorch engine, no ONNX); time the clip's decoding here
(`llava_triton.video`: probe, sample, decode and transform each sampled frame, what the server's
preprocess does for every request, with the same code and settings), before the server starts so that
nothing competes for the cores; start tritonserver, warm up, run each --concurrency closed loop (bench.loadgen)
with Triton's per-model times around it; perf_analyzer on `vision_encoder` at --vision-batch-sizes (16, 32)
frames with a real frame of the clip; stop the server; run the transformers baseline
(`LlavaNextVideoForConditionalGeneration.generate`, batches matching the concurrency levels up to 32) in a
subprocess, which also measures the GPU's bf16 GEMM rate. Beside each figure, its limit from the
checkpoint's config (bench.limits): the single-stream decode roofline, the vision encoder's frames/s at the
measured GEMM rate, the prefill of the video tokens and the question, the GPU-time ceiling of each
concurrency, the TTFT a request cannot beat (its decoding plus its GPU work).

Targets (the issue's): TTFT p50 at c=1 at most 250 ms, decoding included; output tokens/s at c=32 at least
5x transformers' at batch 32. Writes <out>/results.json and results.md (and w4.mp4, the clip).

Exit status: 0 when every check holds and every target evaluated is met; 1 when a request failed, a count
is off or the baseline failed; 3 when only a target was missed (expected on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.__main__ import (
    BASELINE_MAX_BATCH,
    ROOT,
    Clock,
    cpu_model,
    git_commit,
    gpu_name,
    print_report,
    repository_engine,
    serving_with,
    take_checkpoint,
    take_repository,
)
from bench.report import NA, _fmt
from bench.workload import W4_NUM_FRAMES, W4Clip

DEFAULT_CONCURRENCY = (1, 8, 32)
DEFAULT_VISION_BATCH_SIZES = (16, 32)  # one request's frames, and two requests' batched together
# The targets.
TARGET_TTFT_P50_MS, TARGET_TTFT_CONCURRENCY = 250.0, 1
TARGET_SPEEDUP, TARGET_SPEEDUP_CONCURRENCY = 5.0, 32
TARGET_TTFT = f"ttft_p50_at_most_{TARGET_TTFT_P50_MS:g}_ms_c{TARGET_TTFT_CONCURRENCY}"
TARGET_THROUGHPUT = f"tokens_per_s_at_least_{TARGET_SPEEDUP:g}x_transformers_c{TARGET_SPEEDUP_CONCURRENCY}"
TARGET_MISSED = 3  # the exit status when targets alone were missed


def default_server_pythonpath(environ: dict[str, str]) -> str | None:
    """The server's PYTHONPATH: $STUB_PYTHONPATH (numpy 1.26 for Triton 2.51's stub) first, then this
    process's PYTHONPATH, which holds PyAV where it is installed in a directory of its own (the server's
    preprocess decodes the videos); None without STUB_PYTHONPATH: the server inherits the environment."""
    stub = environ.get("STUB_PYTHONPATH")
    if not stub:
        return None
    paths = [stub, *environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(path for path in paths if path))


def parse_args(argv: list[str]) -> argparse.Namespace:
    clip = W4Clip()
    parser = argparse.ArgumentParser(prog="python -m bench.w4", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Hugging Face LLaVA-NeXT-Video checkpoint; default: build --preset into "
                             "build/<preset>-llava")
    parser.add_argument("--preset", default="tiny-next-video",
                        help="preset built when --checkpoint is not given (llava-next-video-7b: build it on the GPU "
                             "first, `python3 -m llava_triton.checkpoint --preset llava-next-video-7b --device cuda`)")
    parser.add_argument("--repository", type=Path, default=None,
                        help="model repository to serve (default: <out>/model_repository), exported there unless "
                             "--no-export")
    parser.add_argument("--no-export", action="store_true", help="serve --repository as it is (it must exist)")
    parser.add_argument("--export-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `python -m export`, repeatable; write it with '=', e.g. "
                             "--export-arg=--device=cuda --export-arg=--dtype=bfloat16")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY),
                        help="closed-loop concurrency levels")
    parser.add_argument("--requests", type=int, default=None, help="requests per level; default max(2 x c, 16)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (ignore_eos)")
    parser.add_argument("--num-frames", type=int, default=W4_NUM_FRAMES, help="frames sampled from the clip")
    parser.add_argument("--width", type=int, default=clip.width, help="the clip's width")
    parser.add_argument("--height", type=int, default=clip.height, help="the clip's height")
    parser.add_argument("--fps", type=float, default=clip.fps, help="the clip's frame rate")
    parser.add_argument("--seconds", type=float, default=clip.seconds, help="the clip's length")
    parser.add_argument("--warmup", type=int, default=8,
                        help="warm-up requests before the levels, min(warmup, largest level) at a time (not reported)")
    parser.add_argument("--decode-repeats", type=int, default=10,
                        help="timed decodings of the clip in this process (median), after one untimed")
    parser.add_argument("--skip-vision", action="store_true", help="no perf_analyzer run")
    parser.add_argument("--vision-batch-sizes", type=int, nargs="+", default=list(DEFAULT_VISION_BATCH_SIZES),
                        help="frames per vision_encoder request for perf_analyzer")
    parser.add_argument("--vision-requests", type=int, default=50,
                        help="perf_analyzer --measurement-request-count (requests per window)")
    parser.add_argument("--vision-shared-memory", choices=("system", "none"), default="system")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="run transformers' generate on the same request (a subprocess, after the server)")
    parser.add_argument("--baseline-batch-sizes", type=int, nargs="+", default=None,
                        help=f"default: the concurrency levels up to {BASELINE_MAX_BATCH}")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="timed generate() calls per batch size")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--server-timeout-s", type=float, default=900.0, help="wait this long for the server to load")
    parser.add_argument("--server-pythonpath", default=default_server_pythonpath(dict(os.environ)),
                        help="PYTHONPATH of the server alone (default: $STUB_PYTHONPATH then $PYTHONPATH, where "
                             "PyAV is; without STUB_PYTHONPATH the server inherits this environment)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no new concurrency level once this much time has passed since the start; "
                             "perf_analyzer and the baseline still run")
    parser.add_argument("--gpu-bandwidth-gbs", type=float, default=None,
                        help="GPU memory bandwidth; default from the GPU's name (H200 4800)")
    parser.add_argument("--gpu-peak-tflops", type=float, default=None,
                        help="dense bf16 peak; default from the GPU's name (H200 989)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench-w4", help="output directory")
    args = parser.parse_args(argv)
    for name in ("concurrency", "vision_batch_sizes", "baseline_batch_sizes"):
        if any(value < 1 for value in getattr(args, name) or ()):
            parser.error(f"--{name.replace('_', '-')} values must be positive")
    args.concurrency = list(dict.fromkeys(args.concurrency))
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be positive")
    if args.max_tokens < 1 or args.num_frames < 1 or args.decode_repeats < 1 or args.baseline_repeats < 1:
        parser.error("--max-tokens, --num-frames, --decode-repeats and --baseline-repeats must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    try:
        args.clip = W4Clip(args.width, args.height, args.fps, args.seconds)
    except ValueError as error:
        parser.error(str(error))
    if args.no_export and args.repository is None:
        parser.error("--no-export needs --repository")
    return args


# --- decoding the clip here ------------------------------------------------------------------------------

def _median_ms(seconds: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(seconds) * 1e3, 3), "min": round(min(seconds) * 1e3, 3),
            "max": round(max(seconds) * 1e3, 3), "repeats": len(seconds)}


def time_decode(checkpoint: Path, preprocessor, video: bytes, question: str, num_frames: int,
                repeats: int) -> dict[str, Any]:
    """The clip decoded in this process as the server's preprocess decodes it, `repeats` times after one untimed:
    `decode_ms`, llava_triton.video's probe_video + sample_frame_indices + decode_frames with the checkpoint's
    FrameTransform (wall time, and `decode_cpu_ms`, the CPU time of all the decoder's threads); `preprocess_ms`,
    the whole of what the preprocess model does for a W4 request (Preprocessor.prepare: the text too, and the
    frames normalized into the wire dtype)."""
    import torch

    from llava_triton.processor import video_processor_config
    from llava_triton.video import FrameTransform, decode_frames, probe_video, sample_frame_indices, transform_threads

    transform = FrameTransform(video_processor_config(checkpoint))
    serving = preprocessor.serving
    # With the torch threads of one of the server's preprocess processes (its preprocess model sets them so).
    torch.set_num_threads(transform_threads(serving.preprocess_instances))

    def decode() -> tuple[Any, Any, Any]:  # (VideoInfo, the sampled indices, the transformed frames)
        info = probe_video(video, serving, 0)
        indices = sample_frame_indices(info.total_frames, info.fps, num_frames)
        return info, indices, decode_frames(video, info, indices, transform, 0)

    info, indices, frames = decode()  # untimed: imports, first allocations
    walls, cpus, prepares = [], [], []
    for _ in range(repeats):
        cpu, start = time.process_time(), time.perf_counter()
        decode()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    preprocessor.prepare([], question, videos=[video], num_frames=num_frames)
    for _ in range(repeats):
        start = time.perf_counter()
        preprocessor.prepare([], question, videos=[video], num_frames=num_frames)
        prepares.append(time.perf_counter() - start)
    return {"container": info.container, "codec": info.codec, "width": info.width, "height": info.height,
            "total_frames": info.total_frames, "fps": info.fps, "duration_s": info.duration_s,
            "frame_indices": [int(i) for i in indices], "frames_decoded": int(indices[-1]) + 1,
            "frame_shape": list(frames.shape[1:]), "cpu_count": os.cpu_count(),
            "decode_ms": _median_ms(walls), "decode_cpu_ms": _median_ms(cpus), "preprocess_ms": _median_ms(prepares)}


# --- limits -----------------------------------------------------------------------------------------------

def frame_flops(config: dict[str, Any], frame_tokens: int, image_tokens: int) -> dict[str, int]:
    """FLOPs of one video frame: the vision encoder on the whole tile, then the projector on its pooled tokens
    (`frame_tokens` of the tile's `image_tokens`; the projector's FLOPs are linear in its tokens; the 2x2
    pooling itself is O(tokens x width), left out as bench.limits leaves out norms)."""
    from bench.limits import vision_flops

    flops = vision_flops(config)
    projector = flops["projector"] * frame_tokens // image_tokens
    return {"vision_encoder": flops["vision_encoder"], "projector": projector,
            "total": flops["vision_encoder"] + projector}


def video_ceiling(config: dict[str, Any], serving_dtype: str, concurrency: int, prompt_tokens: int,
                  output_tokens: int, frames: int, flops_per_frame: int, gemm_tflops: float | None,
                  bandwidth_gbs: float | None, lm_weight_dtype: str = "auto",
                  kv_cache_dtype: str = "auto") -> dict[str, Any] | None:
    """bench.limits.throughput_ceiling for a request of `frames` video frames: its prefill and shared decode
    steps as there, each frame's FLOPs (`frame_flops`) at the GEMM rate in place of the image tiles'."""
    from bench.limits import throughput_ceiling

    text = throughput_ceiling(config, serving_dtype, concurrency, prompt_tokens, output_tokens, 0, gemm_tflops,
                              bandwidth_gbs, lm_weight_dtype, kv_cache_dtype)
    if text is None:
        return None
    vision_s = frames * flops_per_frame / (gemm_tflops * 1e12)
    compute_s = text["prefill_and_vision_ms_per_request"] / 1e3 + vision_s
    step_s = text["decode_step_ms"] / 1e3
    total_s = concurrency * compute_s + output_tokens * step_s
    return {"concurrency": concurrency, "tokens_per_s": round(concurrency * output_tokens / total_s, 1),
            "vision_ms_per_request": round(vision_s * 1e3, 3),
            "prefill_ms_per_request": text["prefill_and_vision_ms_per_request"],
            "decode_step_ms": text["decode_step_ms"], "ttft_ms_at_least": round((compute_s + step_s) * 1e3, 3)}


def video_limits(config: dict[str, Any], model_spec, serving, workload, base: dict[str, Any],
                 decode: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    """W4's limits beside bench.limits.limits' (`base`): per frame FLOPs, the vision encoder's frames/s at the
    measured GEMM rate and at the datasheet peak, the prefill's FLOPs and time, the GPU-time ceiling of each
    concurrency, the TTFT a request cannot beat at c=1 (its decoding here plus its GPU work), and the output
    tokens/s this machine's cores can feed (one clip decoded per request: cores / CPU seconds a clip)."""
    from bench.limits import prefill_flops

    gemm, peak = base["measured_gemm_tflops"], base["gpu_peak_tflops"]
    per_frame = frame_flops(config, workload.frame_tokens, model_spec.num_image_tokens)
    prefill = prefill_flops(config["text_config"], workload.prompt_tokens)
    ceilings = [ceiling for c in concurrency if (ceiling := video_ceiling(
        config, serving.dtype, c, workload.prompt_tokens, workload.max_tokens, workload.frames_sampled,
        per_frame["total"], gemm, base["gpu_bandwidth_gbs"], serving.lm_weight_dtype,
        serving.kv_cache_dtype)) is not None]
    one = video_ceiling(config, serving.dtype, 1, workload.prompt_tokens, workload.max_tokens,
                        workload.frames_sampled, per_frame["total"], gemm, base["gpu_bandwidth_gbs"],
                        serving.lm_weight_dtype, serving.kv_cache_dtype)
    cpu_s = decode["decode_cpu_ms"]["median"] / 1e3
    return {
        "frame_flops": per_frame,
        "frames_per_request": workload.frames_sampled,
        "video_tokens_per_request": workload.frames_sampled * workload.frame_tokens,
        "vision_flops_per_request": workload.frames_sampled * per_frame["total"],
        "vision_encoder_frames_per_s_at_gemm_rate": round(gemm * 1e12 / per_frame["vision_encoder"], 1)
        if gemm else None,
        "vision_encoder_frames_per_s_at_peak": round(peak * 1e12 / per_frame["vision_encoder"], 1) if peak else None,
        "prefill_tokens": workload.prompt_tokens,
        "prefill_flops": prefill,
        "prefill_ms_at_gemm_rate": round(prefill / (gemm * 1e12) * 1e3, 3) if gemm else None,
        "ceilings": ceilings,
        "ttft_ms_at_least_c1": round(decode["decode_ms"]["median"] + one["ttft_ms_at_least"], 3) if one else None,
        "decode_cpu_bound_tokens_per_s": round(os.cpu_count() / cpu_s * workload.max_tokens, 1) if cpu_s > 0
        else None,
    }


# --- the baseline --------------------------------------------------------------------------------------

def run_baseline(checkpoint: Path, video_path: Path, num_frames: int, batch_sizes: list[int], max_tokens: int,
                 repeats: int, out: Path, clock: Clock) -> dict[str, Any]:
    """`python -m bench.baseline --workload W4` in a subprocess (the server stopped: the GPU is all its)."""
    json_path, log_path = out / "baseline.json", out / "baseline.log"
    json_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.baseline", "--checkpoint", str(checkpoint), "--workload", "W4",
               "--video", str(video_path), "--num-frames", str(num_frames), "--batch-sizes", *map(str, batch_sizes),
               "--output-tokens", str(max_tokens), "--repeats", str(repeats), "--json", str(json_path)]
    clock.log(f"baseline: {shlex.join(command)}")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        for line in process.stdout:
            log.write(line)
            clock.log(line.rstrip())
        code = process.wait()
    if code != 0 or not json_path.is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-10:])
        return {"error": f"exit {code}: {tail.strip()[-600:]}", "command": command}
    return {**json.loads(json_path.read_text()), "command": command}


def measure_gemm(clock: Clock) -> float | None:
    """The GPU's bf16 GEMM rate (bench.baseline.measure_gemm_tflops) in a subprocess, for a run without the
    baseline (which measures it); None without a GPU or when it fails."""
    code = ("import torch; from bench.baseline import measure_gemm_tflops; "
            "print(measure_gemm_tflops(torch.device('cuda'), torch.bfloat16) if torch.cuda.is_available() else None)")
    try:
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             check=False)
        value = float(run.stdout.split()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    clock.log(f"bf16 GEMM 8192^3: {value} TFLOP/s")
    return value


# --- comparison, checks, targets ----------------------------------------------------------------------------

def _ratio(value: float | None, other: float | None) -> float | None:
    if value is None or other is None or not other > 0 or value != value:
        return None
    return round(value / other, 3)


def compare(levels: list[dict[str, Any]], baseline: dict[str, Any] | None, limits: dict[str, Any],
            video: dict[str, Any]) -> list[dict[str, Any]]:
    """A row per level: the measured figures, the transformers run at the same batch size and their ratio,
    the level's GPU-time ceiling; at c=1 also the decode roofline against 1000 / ITL p50 and the TTFT bound."""
    runs = {run["batch_size"]: run for run in (baseline or {}).get("runs") or []}
    ceilings = {ceiling["concurrency"]: ceiling for ceiling in video["ceilings"]}
    rows = []
    for level in levels:
        c = level["concurrency"]
        run, ceiling = runs.get(c), ceilings.get(c, {})
        row = {"concurrency": c, "requests": level["requests"], "errors": level["errors"],
               "ttft_ms": level["ttft_ms"], "itl_ms": level["itl_ms"],
               "output_tokens_per_s": level["output_tokens_per_s"],
               "ceiling_tokens_per_s": ceiling.get("tokens_per_s"),
               "percent_of_ceiling": _percent(level["output_tokens_per_s"], ceiling.get("tokens_per_s")),
               "transformers_tokens_per_s": run["output_tokens_per_s"] if run else None,
               "transformers_ttft_ms": run["ttft_ms"] if run else None,
               "speedup_over_transformers": _ratio(level["output_tokens_per_s"], run and run["output_tokens_per_s"]),
               "server_preprocess_ms": level.get("server", {}).get("models", {}).get("preprocess", {}).get(
                   "compute_ms"),
               "server_vision_encoder_ms": level.get("server", {}).get("models", {}).get("vision_encoder", {}).get(
                   "compute_ms")}
        if c == 1:
            itl = level["itl_ms"]["p50"]
            decode = round(1e3 / itl, 2) if itl and itl == itl else None
            limit = limits["single_stream_decode_limit_tokens_per_s"]
            row.update({"decode_tokens_per_s": decode, "decode_limit_tokens_per_s": limit,
                        "decode_percent_of_limit": _percent(decode, limit),
                        "ttft_ms_at_least": video["ttft_ms_at_least_c1"]})
        rows.append(row)
    return rows


def _percent(value: float | None, limit: float | None) -> float | None:
    from bench.limits import percent

    return percent(value, limit)


def checks(levels: list[dict[str, Any]], workload, baseline: dict[str, Any] | None,
           baseline_wanted: bool) -> dict[str, bool]:
    """Counts that must hold (ignore_eos: every request gives exactly max_tokens tokens; the server's prompt is
    the workload's, video tokens included), and the baseline ran where asked for."""
    result = {
        "no_failed_requests": all(level["errors"] == 0 for level in levels),
        "completion_tokens_equal_requests_x_max_tokens": all(
            level["completion_tokens"] == level["requests"] * workload.max_tokens == level["reported_completion_tokens"]
            for level in levels),
        "server_prompt_tokens_equal_workload": all(level["prompt_tokens"] == [workload.prompt_tokens]
                                                   for level in levels if level["completed"]),
    }
    if baseline_wanted:
        result["baseline_ran"] = bool(baseline and baseline.get("runs"))
        if result["baseline_ran"]:
            result["baseline_prompt_tokens_equal_workload"] = all(
                run["prompt_tokens"] == workload.prompt_tokens for run in baseline["runs"])
    return result


def targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's two targets: each its measured value, its bound, whether it is met (None: not evaluated, the
    level or the baseline's batch was not run) and the limit that says whether it can be met on this machine
    (the TTFT a request cannot beat; the GPU-time ceiling against the tokens/s the speedup asks for)."""
    by_c = {row["concurrency"]: row for row in rows}
    first, busy = by_c.get(TARGET_TTFT_CONCURRENCY) or {}, by_c.get(TARGET_SPEEDUP_CONCURRENCY) or {}
    ttft = first.get("ttft_ms", {}).get("p50")
    ttft = ttft if ttft is not None and ttft == ttft else None
    speedup, baseline = busy.get("speedup_over_transformers"), busy.get("transformers_tokens_per_s")
    return {
        TARGET_TTFT: {"what": f"TTFT p50 at c={TARGET_TTFT_CONCURRENCY}, decoding included (ms)", "value": ttft,
                      "at_most": TARGET_TTFT_P50_MS, "met": None if ttft is None else ttft <= TARGET_TTFT_P50_MS,
                      "limit_ttft_ms_at_least": first.get("ttft_ms_at_least")},
        TARGET_THROUGHPUT: {"what": f"output tokens/s at c={TARGET_SPEEDUP_CONCURRENCY} over transformers' at "
                                    f"batch {TARGET_SPEEDUP_CONCURRENCY}", "value": speedup,
                            "at_least": TARGET_SPEEDUP, "met": None if speedup is None else speedup >= TARGET_SPEEDUP,
                            "tokens_per_s_needed": round(TARGET_SPEEDUP * baseline, 1) if baseline else None,
                            "limit_ceiling_tokens_per_s": busy.get("ceiling_tokens_per_s")},
    }


def exit_status(check_results: dict[str, bool], target_results: dict[str, dict[str, Any]]) -> int:
    """0: every check holds and no target evaluated was missed; 1: a check failed; TARGET_MISSED: only targets."""
    if not all(check_results.values()):
        return 1
    return TARGET_MISSED if any(target["met"] is False for target in target_results.values()) else 0


# --- the report ------------------------------------------------------------------------------------------

def _met(target: dict[str, Any]) -> str:
    return "not evaluated" if target["met"] is None else "met" if target["met"] else "missed"


def markdown(results: dict[str, Any]) -> str:
    from bench.report import perf_rows, server_table

    machine, workload, limits = results["machine"], results["workload"], results["limits"]
    video = results["video_limits"]
    serving, decode, baseline = results["repository"]["serving"], results["decode"], results.get("baseline")
    device = machine["gpu"] or f"CPU ({machine['cpu']})"
    lines = [
        f"# {workload['name']} on {device} ({results['created']})", "",
        f"Machine: {machine['gpu'] or 'no GPU'}, {machine['cpu']} ({machine['cpu_count']} cores); Triton "
        f"{machine['triton_server'] or NA}, torch {machine['torch']}, transformers {machine['transformers']}, PyAV "
        f"{machine['av']}; commit {machine['git_commit'] or NA}. Command: `{results['command']}`.", "",
        f"Checkpoint `{results['checkpoint']['path']}` ({results['checkpoint']['description']}), served with the "
        f"{results['repository']['engine']} engine, {serving['dtype']} on {serving['device']}, language-model weights "
        f"{serving.get('lm_weight_dtype')}, KV cache {serving.get('kv_cache_dtype')}, "
        f"{serving.get('preprocess_instances')} preprocess instance(s).", "",
        f"{workload['description']}. The question: \"{workload['question']}\" ({workload['question_tokens']} tokens "
        "with this checkpoint's tokenizer). Closed loop: c streams, each sends its next request when the last one "
        f"ends; {results['settings']['warmup']} warm-up request(s) excluded. TTFT runs from sending the request "
        "(the clip in it) to its first token: the server's decoding of the clip is in it.", "",
        "| c | requests | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | tokens/s | GPU-time ceiling (tokens/s) | "
        "% of ceiling | transformers tokens/s (batch c) | Triton / transformers | preprocess, server (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["comparison"]:
        errors = f" ({row['errors']} failed)" if row["errors"] else ""
        speedup = f"{row['speedup_over_transformers']:.2f}x" if row["speedup_over_transformers"] else NA
        lines.append(f"| {row['concurrency']} | {row['requests']}{errors} | {_fmt(row['ttft_ms']['p50'])} | "
                     f"{_fmt(row['ttft_ms']['p99'])} | {_fmt(row['itl_ms']['p50'], 2)} | "
                     f"{_fmt(row['output_tokens_per_s'])} | {_fmt(row['ceiling_tokens_per_s'])} | "
                     f"{_fmt(row['percent_of_ceiling'])} | {_fmt(row['transformers_tokens_per_s'])} | {speedup} | "
                     f"{_fmt(row['server_preprocess_ms'])} |")
    for skipped in results["skipped_levels"]:
        lines.append(f"| {skipped} | not run: time budget of {results['settings']['time_budget_s']} s spent"
                     + " |" * 10)

    lines += ["", "Targets:", ""]
    for name, target in results["targets"].items():
        bound = f"at most {target['at_most']:g}" if "at_most" in target else f"at least {target['at_least']:g}"
        if "limit_ttft_ms_at_least" in target:
            limit = f"no request can start sooner than {_fmt(target['limit_ttft_ms_at_least'])} ms on this machine"
        else:
            limit = (f"{_fmt(target['tokens_per_s_needed'])} tokens/s needed, against a GPU-time ceiling of "
                     f"{_fmt(target['limit_ceiling_tokens_per_s'])}")
        lines.append(f"- {target['what']}: {_fmt(target['value'], 2)}, {bound}: **{_met(target)}** ({limit}; "
                     f"`{name}`)")

    c1 = next((row for row in results["comparison"] if row["concurrency"] == 1), None)
    vision = {entry["batch_size"]: entry for entry in results["vision"] if "error" not in entry}
    gemm = limits["measured_gemm_tflops"]
    lines += [
        "", "Each figure beside its limit (the limits from the checkpoint's config, bench/limits.py; GPU rates "
        f"measured on this GPU: bf16 GEMM {_fmt(gemm)} TFLOP/s; memory bandwidth "
        f"{_fmt(limits['gpu_bandwidth_gbs'], 0)} GB/s and dense bf16 peak {_fmt(limits['gpu_peak_tflops'], 0)} "
        "TFLOP/s from the datasheet):", "",
        "| figure | measured | limit | how the limit is reached |", "|---|---:|---:|---|",
        f"| decoding the clip, this process (ms, median of {decode['decode_ms']['repeats']}) | "
        f"{_fmt(decode['decode_ms']['median'])} | | probe, sample {len(decode['frame_indices'])} frames, decode "
        f"{decode['frames_decoded']} of {decode['total_frames']} frames and resize and crop the sampled ones "
        f"(llava_triton.video, as the server's preprocess); {_fmt(decode['decode_cpu_ms']['median'])} ms of CPU |",
        f"| the preprocess model's work for one request, this process (ms) | {_fmt(decode['preprocess_ms']['median'])} "
        f"| | Preprocessor.prepare: the decoding, the text, the frames normalized to the wire dtype; the server's own "
        f"at c=1: {_fmt(c1 and c1['server_preprocess_ms'])} ms (Triton's compute time) |",
    ]
    if c1:
        lines += [
            f"| TTFT p50 at c=1 (ms) | {_fmt(c1['ttft_ms']['p50'])} | {_fmt(c1['ttft_ms_at_least'])} | the decoding "
            "above, then the GPU work at its rates: the frames through the vision encoder and projector, the prefill, "
            "one decode step |",
            f"| decode at c=1 (tokens/s, 1000 / ITL p50) | {_fmt(c1['decode_tokens_per_s'])} | "
            f"{_fmt(c1['decode_limit_tokens_per_s'])} | every weight and the KV cache of "
            f"{limits['decode_context_tokens']} tokens read once a token at the memory bandwidth "
            f"({_fmt(c1['decode_percent_of_limit'])} % of it) |",
        ]
    for batch in results["settings"]["vision_batch_sizes"]:
        entry = vision.get(batch)
        lines.append(f"| vision encoder at batch {batch} (frames/s, perf_analyzer) | "
                     f"{_fmt(entry['images_per_s']) if entry else NA} | "
                     f"{_fmt(video['vision_encoder_frames_per_s_at_gemm_rate'])} | "
                     f"{video['frame_flops']['vision_encoder'] / 1e9:.3g} GFLOP a frame at the GEMM rate (at the "
                     f"datasheet peak: {_fmt(video['vision_encoder_frames_per_s_at_peak'])}) |")
    lines += [
        f"| prefill of {video['prefill_tokens']} tokens ({video['frames_per_request']} frames x "
        f"{workload['frame_tokens']} video tokens + the question and template) (ms) | | "
        f"{_fmt(video['prefill_ms_at_gemm_rate'], 2)} | {video['prefill_flops'] / 1e12:.3g} TFLOP at the GEMM rate |",
    ]
    for ceiling in video["ceilings"]:
        row = next((r for r in results["comparison"] if r["concurrency"] == ceiling["concurrency"]), None)
        lines.append(f"| c={ceiling['concurrency']} (tokens/s) | {_fmt(row and row['output_tokens_per_s'])} | "
                     f"{_fmt(ceiling['tokens_per_s'])} | c x ({_fmt(ceiling['vision_ms_per_request'], 2)} ms vision + "
                     f"{_fmt(ceiling['prefill_ms_per_request'], 2)} ms prefill) + {workload['max_tokens']} shared "
                     f"decode steps of {_fmt(ceiling['decode_step_ms'], 3)} ms |")
    lines.append(f"| the cores' decoding (tokens/s) | | {_fmt(video['decode_cpu_bound_tokens_per_s'])} | "
                 f"{decode['cpu_count']} cores / {_fmt(decode['decode_cpu_ms']['median'])} ms of CPU a clip x "
                 f"{workload['max_tokens']} tokens a request |")

    if baseline and baseline.get("runs"):
        clip_ms = (baseline.get("preprocess_ms_per_clip") or {}).get("median")
        lines += ["", f"transformers `LlavaNextVideoForConditionalGeneration.generate` on the same request "
                      f"({baseline['dtype']}, SDPA, {baseline['device']}; a batch of B copies, greedy, exactly "
                      f"{workload['max_tokens']} new tokens; the clip read by transformers' PyAV reader and processed "
                      f"once, {_fmt(clip_ms)} ms, outside the timing, which the last column adds B times):", "",
                  "| batch | prompt tokens | latency (s) | TTFT (ms) | ITL (ms) | tokens/s | tokens/s, reading the "
                  "clips included |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for run in baseline["runs"]:
            with_clips = (run["batch_size"] * workload["max_tokens"] / (run["latency_s"] + run["batch_size"] * clip_ms
                                                                         / 1e3) if clip_ms is not None else None)
            lines.append(f"| {run['batch_size']} | {run['prompt_tokens']} | {_fmt(run['latency_s'], 2)} | "
                         f"{_fmt(run['ttft_ms'])} | {_fmt(run['itl_ms'], 2)} | {_fmt(run['output_tokens_per_s'])} | "
                         f"{_fmt(with_clips)} |")
    elif baseline and baseline.get("error"):
        lines += ["", f"transformers baseline failed: {baseline['error']}"]

    if results["vision"]:
        lines += ["", "`vision_encoder` alone (perf_analyzer, a real frame of the clip in every batch slot):", "",
                  "| batch | frames/s | latency p50 (ms) | model execute (ms) | % of peak |",
                  "|---:|---:|---:|---:|---:|"]
        lines += perf_rows(results["vision"], with_peak=True)
    lines += server_table(results["levels"])
    if results["notes"]:
        lines += ["", *[f"Note: {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"


# --- the run ------------------------------------------------------------------------------------------------

def measure_vision(url: str, repository: Path, frame, batch_sizes: list[int], args, out: Path,
                   clock: Clock) -> list[dict[str, Any]]:
    """perf_analyzer on the served vision encoder at each batch size, every slot a real frame of the clip
    (`frame`: one (3, S, S) tile in the wire dtype, as preprocess sends it)."""
    from bench import vision
    from llava_triton import spec
    from llava_triton.spec import read_spec

    encoder_spec, encoder_serving = read_spec(repository / spec.VISION_ENCODER / "1")
    data = vision.write_item(out / "vision_input.json", spec.PIXEL_VALUES, frame)
    results = []
    for batch_size in batch_sizes:
        entry = vision.measure(url, batch_size, data, out, model=spec.VISION_ENCODER,
                               output_item_bytes=vision.output_item_bytes(encoder_spec, encoder_serving),
                               measurement_requests=args.vision_requests, shared_memory=args.vision_shared_memory)
        results.append(entry)
        if "error" in entry:
            clock.log(f"vision_encoder batch {batch_size}: perf_analyzer failed: {entry['error'][-300:]}")
        else:
            clock.log(f"vision_encoder batch {batch_size}: {entry['images_per_s']:.1f} frames/s, p50 "
                      f"{entry['latency_p50_ms']:.1f} ms ({entry['shared_memory']} shared memory)")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    clock = Clock(args.time_budget_s)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import av
    import torch
    import transformers

    from bench import limits as bench_limits
    from bench import report, server_stats
    from bench.loadgen import run_level, summarize
    from bench.workload import w4
    from llava_triton import spec
    from llava_triton.preprocess import Preprocessor
    from llava_triton.server import TritonServer
    from llava_triton.spec import ModelSpec, full_hf_config, read_spec

    checkpoint, description = take_checkpoint(args.checkpoint, args.preset, clock)
    model_spec = ModelSpec.from_pretrained(checkpoint)
    if not model_spec.videos:
        raise SystemExit(f"W4 needs a LLaVA-NeXT-Video checkpoint; {checkpoint} is {model_spec.model_type}")
    repository = (args.repository or out / "model_repository").resolve()
    take_repository(checkpoint, repository, args.no_export, ["--no-onnx", *args.export_arg], out / "export.log", clock)
    served_spec, serving = read_spec(repository / spec.LANGUAGE_MODEL / "1")
    if served_spec != model_spec:
        raise SystemExit(f"{repository} was exported from another checkpoint than {checkpoint} (sizes differ)")
    hf_config = full_hf_config(checkpoint)

    workload = w4(checkpoint, args.max_tokens, args.num_frames, args.clip)
    video_path = out / "w4.mp4"
    video_path.write_bytes(workload.videos[0])
    clock.log(workload.describe())

    # Decoding here, before the server starts: the same code and settings as its preprocess, on idle cores.
    preprocessor = Preprocessor.from_pretrained(checkpoint, model_spec, serving)
    decode = time_decode(checkpoint, preprocessor, workload.videos[0], workload.prompt, args.num_frames,
                         args.decode_repeats)
    clock.log(f"decoding the clip here: {decode['decode_ms']['median']:.1f} ms (median of {args.decode_repeats}; "
              f"{decode['decode_cpu_ms']['median']:.1f} ms of CPU), the whole preprocess "
              f"{decode['preprocess_ms']['median']:.1f} ms")
    frame = preprocessor.prepare([], workload.prompt, videos=[workload.videos[0]],
                                 num_frames=args.num_frames).pixel_values[0]

    levels: list[dict[str, Any]] = []
    skipped_levels: list[int] = []
    vision_results: list[dict[str, Any]] = []
    notes: list[str] = []
    vision_batch_sizes = [b for b in dict.fromkeys(args.vision_batch_sizes) if b <= serving.vision_max_batch_size]
    if len(vision_batch_sizes) < len(set(args.vision_batch_sizes)):
        notes.append(f"vision batch sizes above the export's vision_max_batch_size ({serving.vision_max_batch_size}) "
                     "not measured")
    server = TritonServer(repository, log_path=out / "tritonserver.log", ready_timeout_s=args.server_timeout_s)
    with serving_with(server, args.server_pythonpath):
        clock.log(f"server ready: gRPC {server.url_grpc} (log: {out / 'tritonserver.log'})")
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(server.url_grpc) as metadata_client:
            triton_version = metadata_client.get_server_metadata().version
        sent = 0  # requests sent to the ensemble so far: each level's scrapes wait for Triton to count them
        if args.warmup:
            warm = summarize(run_level(server.url_grpc, workload, min(args.warmup, max(args.concurrency)),
                                       args.warmup, timeout_s=args.request_timeout_s))
            sent += warm["requests"]
            clock.log(f"warm-up: {args.warmup} requests, {warm['errors']} failed")
            if warm["errors"]:
                raise SystemExit(f"warm-up requests failed: {warm['error_messages']}; see {out / 'tritonserver.log'}")
        for concurrency in args.concurrency:
            if clock.over_budget():
                skipped_levels.append(concurrency)
                continue
            before = server_stats.scrape_settled(server.url_metrics, spec.ENSEMBLE, sent)
            level = summarize(run_level(server.url_grpc, workload, concurrency,
                                        args.requests or max(2 * concurrency, 16), timeout_s=args.request_timeout_s))
            sent += level["requests"]
            level["server"] = server_stats.breakdown(
                before, server_stats.scrape_settled(server.url_metrics, spec.ENSEMBLE, sent))
            levels.append(level)
            clock.log(f"c={concurrency}: {level['requests']} requests ({level['errors']} failed) in "
                      f"{level['wall_s']:.1f} s: TTFT p50 {level['ttft_ms']['p50']:.1f} ms, p99 "
                      f"{level['ttft_ms']['p99']:.1f} ms, ITL p50 {level['itl_ms']['p50']:.2f} ms, "
                      f"{level['output_tokens_per_s']:.1f} tokens/s")
        if skipped_levels:
            notes.append(f"time budget of {args.time_budget_s:.0f} s spent: concurrency "
                         f"{', '.join(map(str, skipped_levels))} not run")
        if not args.skip_vision:
            vision_results = measure_vision(server.url_grpc, repository, frame, vision_batch_sizes, args, out, clock)
    clock.log("server stopped")

    baseline = None
    if args.baseline:
        batch_sizes = args.baseline_batch_sizes or [c for c in args.concurrency if c <= BASELINE_MAX_BATCH]
        if not batch_sizes:
            notes.append(f"no baseline batch size (no concurrency level up to {BASELINE_MAX_BATCH}; see "
                         "--baseline-batch-sizes)")
        else:
            baseline = run_baseline(checkpoint, video_path, args.num_frames, batch_sizes, args.max_tokens,
                                    args.baseline_repeats, out, clock)
            if "error" in baseline:
                clock.log(f"baseline failed: {baseline['error']}")
    device_name = gpu_name() or (baseline or {}).get("device_name")
    gemm_tflops = (baseline or {}).get("gemm_tflops")
    if gemm_tflops is None and device_name is not None:
        gemm_tflops = measure_gemm(clock)

    limits = bench_limits.limits(hf_config, serving.dtype, serving.device, device_name,
                                 workload.prompt_tokens + args.max_tokens // 2, args.gpu_bandwidth_gbs,
                                 args.gpu_peak_tflops, serving.lm_weight_dtype, serving.kv_cache_dtype,
                                 gemm_tflops=gemm_tflops, prompt_tokens=workload.prompt_tokens,
                                 output_tokens=args.max_tokens)
    video = video_limits(hf_config, model_spec, serving, workload, limits, decode,
                         [level["concurrency"] for level in levels])
    for entry in vision_results:
        if "images_per_s" in entry:
            entry["achieved_tflops"] = round(entry["images_per_s"] * video["frame_flops"]["vision_encoder"] / 1e12, 3)
            entry["percent_of_peak"] = bench_limits.percent(entry["achieved_tflops"], limits["gpu_peak_tflops"])
            entry["percent_of_gemm_rate"] = bench_limits.percent(entry["achieved_tflops"],
                                                                 limits["measured_gemm_tflops"])
    if limits["measured_gemm_tflops"] is None:
        notes.append("no measured GEMM rate (measured on a GPU only): the vision, prefill and ceiling limits "
                     "are n/a")
    comparison = compare(levels, baseline, limits, video)
    results: dict[str, Any] = {
        "benchmark": f"llava-triton {workload.name}",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.w4", *argv]),
        "machine": {"gpu": device_name, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "av": av.__version__, "triton_server": triton_version,
                    "git_commit": git_commit()},
        "checkpoint": {"path": str(checkpoint), "description": description},
        "repository": {"path": str(repository), "engine": repository_engine(repository), "serving": serving.to_dict()},
        "workload": {"name": workload.name, "description": workload.describe(), "question": workload.prompt,
                     "question_tokens": workload.question_tokens, "prompt_tokens": workload.prompt_tokens,
                     "clip": {"width": args.clip.width, "height": args.clip.height, "fps": args.clip.fps,
                              "seconds": args.clip.seconds, "frames": args.clip.frames, "codec": args.clip.codec,
                              "container": args.clip.container, "bytes": len(workload.videos[0]),
                              "file": video_path.name},
                     "num_frames": args.num_frames, "frames_sampled": workload.frames_sampled,
                     "frame_tokens": workload.frame_tokens,
                     "video_tokens": workload.frames_sampled * workload.frame_tokens,
                     "max_tokens": workload.max_tokens, "ignore_eos": workload.ignore_eos,
                     "temperature": workload.temperature, "stream": True, "fresh": workload.fresh},
        "settings": {"concurrency": args.concurrency, "requests": args.requests, "warmup": args.warmup,
                     "decode_repeats": args.decode_repeats, "vision_batch_sizes": vision_batch_sizes,
                     "vision_requests": args.vision_requests, "baseline": args.baseline,
                     "baseline_repeats": args.baseline_repeats, "time_budget_s": args.time_budget_s,
                     "server_pythonpath": args.server_pythonpath, "export_args": args.export_arg},
        "decode": decode,
        "levels": levels,
        "skipped_levels": skipped_levels,
        "vision": vision_results,
        "baseline": baseline,
        "limits": limits,
        "video_limits": video,
        "comparison": comparison,
        "notes": notes,
    }
    results["checks"] = checks(levels, workload, baseline, args.baseline and baseline is not None)
    results["targets"] = targets(comparison)
    results["elapsed_s"] = round(clock.elapsed, 1)

    report.write_json(out / "results.json", results)
    table = markdown(results)
    (out / "results.md").write_text(table)
    clock.log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    status = print_report(table, results["checks"])
    if status == 0 and exit_status(results["checks"], results["targets"]) == TARGET_MISSED:
        missed = [name for name, target in results["targets"].items() if target["met"] is False]
        print(f"target missed (exit {TARGET_MISSED}): {', '.join(missed)}", file=sys.stderr)
        return TARGET_MISSED
    return status


if __name__ == "__main__":
    sys.exit(main())
