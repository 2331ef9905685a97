"""Benchmark the served model on workload W1 (LLaVA-1.5) or W2 (LLaVA-NeXT) and compare it with transformers.

    python -m bench                                                    # the tiny preset (a few minutes on CPU)
    python -m bench --workload W2                                      # W2 on the tiny-next preset
    python -m bench --checkpoint build/llava-1.5-7b-llava --time-budget-s 300   # a GPU run (see --help)

Steps: build or take the checkpoint, export it (PyTorch engine) unless --no-export, start
tritonserver, warm up, then for each concurrency a closed-loop streaming load (bench.loadgen),
perf_analyzer on `vision_encoder` (bench.vision), stop the server, run the transformers baseline
in a subprocess (bench.baseline), and write <out>/results.json, results.md and
throughput_vs_ttft.png. Exits 1 when a request failed or a count check did not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONCURRENCY = (1, 8, 32, 128)
DEFAULT_VISION_BATCH_SIZES = (1, 8, 32)
BASELINE_MAX_BATCH = 32


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Hugging Face LLaVA checkpoint; default: build --preset into build/<preset>-llava")
    parser.add_argument("--preset", default=None,
                        help="preset built when --checkpoint is not given (default: tiny for W1, tiny-next for W2)")
    parser.add_argument("--workload", choices=("W1", "W2"), default="W1",
                        help="W1: a 336x336 JPEG (LLaVA-1.5); W2: a 1024x768 JPEG (LLaVA-NeXT tiles)")
    parser.add_argument("--repository", type=Path, default=ROOT / "build" / "bench" / "model_repository",
                        help="model repository to serve (exported there unless --no-export)")
    parser.add_argument("--no-export", action="store_true", help="serve --repository as it is (it must exist)")
    parser.add_argument("--export-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `python -m export`, repeatable; write it with '=', e.g. "
                             "--export-arg=--set=max_num_seqs=64")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY),
                        help="closed-loop concurrency levels")
    parser.add_argument("--requests", type=int, default=None, help="requests per level; default max(2 x c, 8)")
    parser.add_argument("--output-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--warmup", type=int, default=8,
                        help="warm-up requests before the levels, min(warmup, largest level) at a time (not reported)")
    parser.add_argument("--loadgen", choices=("aio", "threads"), default="aio",
                        help="load generator: asyncio gRPC, or a thread per stream with client.LlavaClient")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--server-timeout-s", type=float, default=900.0, help="wait this long for the server to load")
    parser.add_argument("--server-pythonpath", default=os.environ.get("STUB_PYTHONPATH"),
                        help="PYTHONPATH given to the server alone (default: $STUB_PYTHONPATH, which the GPU "
                             "machine's .device/stub-env.sh sets to a numpy<2 for Triton 2.51's Python backend)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench", help="output directory")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="launch no new concurrency level once this much time has passed since the start "
                             "(the report lists the levels skipped); perf_analyzer and the baseline still run")
    parser.add_argument("--skip-vision", action="store_true", help="no perf_analyzer run")
    parser.add_argument("--skip-projector", action="store_true",
                        help="perf_analyzer on vision_encoder only, not on the projector")
    parser.add_argument("--vision-batch-sizes", type=int, nargs="+", default=list(DEFAULT_VISION_BATCH_SIZES))
    parser.add_argument("--vision-requests", type=int, default=50,
                        help="perf_analyzer --measurement-request-count (requests per window)")
    parser.add_argument("--vision-shared-memory", choices=("system", "none"), default="system",
                        help="perf_analyzer tensors through system shared memory (falls back to none if refused)")
    parser.add_argument("--vision-concurrency", type=int, default=None,
                        help="perf_analyzer requests in flight: above 1, one request's tensor copies overlap "
                             "another's compute (with vision_instances > 1, on another instance); default: one "
                             "per instance of the model measured")
    parser.add_argument("--skip-baseline", action="store_true", help="no transformers baseline")
    parser.add_argument("--baseline-batch-sizes", type=int, nargs="+", default=None,
                        help=f"default: the concurrency levels up to {BASELINE_MAX_BATCH}")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="timed generate() calls per batch size")
    parser.add_argument("--gpu-bandwidth-gbs", type=float, default=None,
                        help="GPU memory bandwidth; default from the GPU's name (H100 SXM 3350, H100 PCIe 2000, "
                             "H200 4800)")
    parser.add_argument("--gpu-peak-tflops", type=float, default=None,
                        help="dense bf16 peak; default from the GPU's name (H100 SXM 989, H100 PCIe 756, H200 989)")
    args = parser.parse_args(argv)
    for name in ("concurrency", "vision_batch_sizes"):
        if any(value < 1 for value in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} values must be positive")
    if args.vision_concurrency is not None and args.vision_concurrency < 1:
        parser.error("--vision-concurrency must be positive")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be positive")
    if args.output_tokens < 1:
        parser.error("--output-tokens must be positive")
    if args.preset is None:
        args.preset = "tiny" if args.workload == "W1" else "tiny-next"
    return args


class Clock:
    """Elapsed time since the start, for progress lines and the time budget."""

    def __init__(self, budget_s: float | None):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.budget_s is not None and self.elapsed > self.budget_s

    def log(self, message: str) -> None:
        print(f"[bench {self.elapsed:6.1f}s] {message}", flush=True)


@contextlib.contextmanager
def server_pythonpath(pythonpath: str | None):
    """PYTHONPATH set to `pythonpath` while the server process is created, then restored, so that
    only the server's Python-backend stubs see it (none of this process's other children)."""
    if pythonpath is None:
        yield
        return
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = pythonpath
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@contextlib.contextmanager
def serving_with(server, pythonpath: str | None):
    """Start `server` (its environment taken with `pythonpath`), wait until ready, stop at the end."""
    with server_pythonpath(pythonpath):
        server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA context in this process, so none competes
    with the server's); None without a GPU."""
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in run.stdout.splitlines() if line.strip()]
    return names[0] if run.returncode == 0 and names else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() or None


def take_checkpoint(checkpoint: Path | None, preset: str, clock: Clock) -> tuple[Path, str]:
    """(the checkpoint, resolved; what it is): `checkpoint` as given, or the preset built into build/."""
    if checkpoint is None:
        from llava_triton.checkpoint import build_checkpoint

        built = build_checkpoint(preset, ROOT / "build" / f"{preset}-llava", log=clock.log)
        return Path(built).resolve(), f"preset {preset}, seeded random weights"
    stamp = checkpoint / "llava_triton_build.json"
    description = (f"preset {json.loads(stamp.read_text()).get('preset')}, seeded random weights"
                   if stamp.is_file() else "Hugging Face checkpoint")
    return Path(checkpoint).resolve(), description


def export_repository(checkpoint: Path, repository: Path, extra: list[str], log_path: Path, clock: Clock) -> None:
    command = [sys.executable, "-m", "export", "--model", str(checkpoint), "--output", str(repository),
               "--engine", "pytorch", *extra]
    clock.log(f"exporting: {shlex.join(command)} (log: {log_path})")
    with open(log_path, "w") as log:
        run = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if run.returncode != 0:
        raise SystemExit(f"export failed (exit {run.returncode}); last lines of {log_path}:\n"
                         + "".join(log_path.read_text().splitlines(keepends=True)[-20:]))


def take_repository(checkpoint: Path, repository: Path, no_export: bool, extra: list[str], log_path: Path,
                    clock: Clock) -> None:
    """The model repository to serve: `repository` as it is (`no_export`, it must be an export), or the
    checkpoint exported into it with the `extra` export arguments."""
    from llava_triton import spec

    if no_export:
        if not (repository / spec.ENSEMBLE / "config.pbtxt").is_file():
            raise SystemExit(f"--no-export: {repository} is not an exported model repository")
        clock.log(f"serving the existing repository {repository}")
    else:
        export_repository(checkpoint, repository, extra, log_path, clock)


def repository_engine(repository: Path) -> str:
    from export.repository import read_config
    from llava_triton import spec

    config = read_config(repository / spec.VISION_ENCODER / "config.pbtxt")
    return "tensorrt" if config.platform == "tensorrt_plan" else "pytorch"


def run_baseline(checkpoint: Path, batch_sizes: list[int], output_tokens: int, repeats: int, out: Path,
                 clock: Clock, workload: str = "W1") -> dict[str, Any]:
    json_path, log_path = out / "baseline.json", out / "baseline.log"
    json_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.baseline", "--checkpoint", str(checkpoint), "--batch-sizes",
               *map(str, batch_sizes), "--output-tokens", str(output_tokens), "--repeats", str(repeats),
               "--workload", workload, "--json", str(json_path)]
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
    result = json.loads(json_path.read_text())
    result["command"] = command
    return result


def roofline(levels: list[dict], vision: list[dict], limits: dict[str, Any],
             projector: list[dict] | None = None) -> dict[str, Any]:
    from bench.limits import percent

    limit = limits["single_stream_decode_limit_tokens_per_s"]
    step_bytes = limits["decode_bytes_per_step"]["total"]
    result: dict[str, Any] = {}
    c1 = next((level for level in levels if level["concurrency"] == 1 and level["completed"]), None)
    if c1 is not None:
        decode = 1e3 / c1["itl_ms"]["p50"] if c1["itl_ms"]["p50"] else None
        result.update({
            "c1_output_tokens_per_s": c1["output_tokens_per_s"],  # prefill and queueing included
            "c1_percent_of_limit": percent(c1["output_tokens_per_s"], limit),
            "c1_decode_tokens_per_s": round(decode, 2) if decode else None,  # 1 / ITL p50
            "c1_decode_percent_of_limit": percent(decode, limit),
            "c1_decode_achieved_gbs": round(decode * step_bytes / 1e9, 1) if decode else None,
        })
    peak = limits["gpu_peak_tflops"]
    encoder_flops = limits["vision_flops_per_image"]["vision_encoder"]
    for entry in vision:
        if "images_per_s" in entry:
            entry["achieved_tflops"] = round(entry["images_per_s"] * encoder_flops / 1e12, 3)
            entry["percent_of_peak"] = percent(entry["achieved_tflops"], peak)
    measured = [entry for entry in vision if "images_per_s" in entry]
    if measured:
        best = max(measured, key=lambda entry: entry["images_per_s"])
        result.update({"vision_best_batch_size": best["batch_size"], "vision_best_images_per_s": best["images_per_s"],
                       "vision_percent_of_peak": best["percent_of_peak"]})
    # Each image through the encoder and then the projector, estimated from their separate runs: at
    # least the rate with their times per image added (nothing overlapping), at most the slower one's
    # (the ensemble runs them in separate processes, whose copies and GPU work may overlap).
    projected = {entry["batch_size"]: entry["images_per_s"] for entry in projector or [] if "images_per_s" in entry}
    both = {entry["batch_size"]: round(1.0 / (1.0 / entry["images_per_s"] + 1.0 / projected[entry["batch_size"]]), 1)
            for entry in measured if entry["batch_size"] in projected}
    if both:
        batch = max(both, key=both.get)
        upper = min(projected[batch], next(e["images_per_s"] for e in measured if e["batch_size"] == batch))
        result.update({"vision_and_projector_batch_size": batch, "vision_and_projector_images_per_s": both[batch],
                       "vision_and_projector_at_most_images_per_s": upper})
    return result


def perf_concurrency(requested: int | None, serving, model: str) -> int:
    """perf_analyzer's requests in flight on `model`: --vision-concurrency, else one per instance of the
    model, so that every instance has a request to run while another's tensors are copied."""
    return requested or serving.instances_of(model)


def gemm_rate(baseline: dict[str, Any] | None, device: str, dtype: str, measure=None) -> float | None:
    """The GEMM rate (TFLOP/s) the ceilings use: the baseline's, or with no baseline (--skip-baseline, or
    it failed) measured here on the GPU, after the server has stopped; None on the CPU."""
    if baseline and baseline.get("gemm_tflops"):
        return baseline["gemm_tflops"]
    if not device.startswith("cuda"):
        return None
    import torch

    from bench.baseline import measure_gemm_tflops
    from llava_triton.dtypes import resolve_dtype

    return (measure or measure_gemm_tflops)(torch.device(device), resolve_dtype(dtype))


def checks(levels: list[dict], workload, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Counts that must hold (ignore_eos: every request gives exactly max_tokens tokens)."""
    result = {
        "no_failed_requests": all(level["errors"] == 0 for level in levels),
        "completion_tokens_equal_requests_x_output_tokens": all(
            level["completion_tokens"] == level["requests"] * workload.max_tokens
            and level["reported_completion_tokens"] == level["completion_tokens"] for level in levels),
        "server_prompt_tokens_equal_workload": all(level["prompt_tokens"] == [workload.prompt_tokens]
                                                   for level in levels if level["completed"]),
    }
    if baseline and baseline.get("runs"):
        result["baseline_prompt_tokens_equal_workload"] = all(run["prompt_tokens"] == workload.prompt_tokens
                                                              for run in baseline["runs"])
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    clock = Clock(args.time_budget_s)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    from bench import limits as bench_limits
    from bench import report, server_stats, vision
    from bench.loadgen import run_level, summarize
    from bench.workload import w1_pixel_values
    from bench.workload import workload as make_workload
    from llava_triton import spec
    from llava_triton.server import TritonServer
    from llava_triton.spec import ModelSpec, full_hf_config, read_spec

    # Checkpoint and model repository.
    checkpoint, description = take_checkpoint(args.checkpoint, args.preset, clock)
    repository = args.repository.resolve()
    take_repository(checkpoint, repository, args.no_export, args.export_arg, out / "export.log", clock)
    model_spec, serving = read_spec(repository / spec.LANGUAGE_MODEL / "1")
    if model_spec != ModelSpec.from_pretrained(checkpoint):
        raise SystemExit(f"{repository} was exported from another checkpoint than {checkpoint} (sizes differ)")
    hf_config = full_hf_config(checkpoint)

    workload = make_workload(args.workload, checkpoint, args.output_tokens)
    image_file = f"{args.workload.lower()}.jpg"
    (out / image_file).write_bytes(workload.images[0])
    clock.log(workload.describe())
    device_name = gpu_name()
    levels_to_run = list(dict.fromkeys(args.concurrency))
    levels: list[dict[str, Any]] = []
    skipped_levels: list[int] = []
    vision_results: list[dict[str, Any]] = []
    projector_results: list[dict[str, Any]] = []
    notes: list[str] = []
    triton_version = None

    server = TritonServer(repository, log_path=out / "tritonserver.log", ready_timeout_s=args.server_timeout_s)
    with serving_with(server, args.server_pythonpath):
        clock.log(f"server ready: gRPC {server.url_grpc} (log: {out / 'tritonserver.log'})")
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(server.url_grpc) as metadata_client:
            triton_version = metadata_client.get_server_metadata().version
        sent = 0  # requests sent to the ensemble so far: each level's scrapes wait for Triton to count them
        if args.warmup:
            warm = summarize(run_level(server.url_grpc, workload, min(args.warmup, max(levels_to_run)), args.warmup,
                                       mode=args.loadgen, timeout_s=args.request_timeout_s))
            sent += warm["requests"]
            clock.log(f"warm-up: {args.warmup} requests, {warm['errors']} failed")
            if warm["errors"]:
                raise SystemExit(f"warm-up requests failed: {warm['error_messages']}; see {out / 'tritonserver.log'}")
        for concurrency in levels_to_run:
            if clock.over_budget():
                skipped_levels.append(concurrency)
                continue
            num_requests = args.requests or max(2 * concurrency, 8)
            stats_before = server_stats.scrape_settled(server.url_metrics, spec.ENSEMBLE, sent)
            level = summarize(run_level(server.url_grpc, workload, concurrency, num_requests, mode=args.loadgen,
                                        timeout_s=args.request_timeout_s))
            sent += level["requests"]
            level["server"] = server_stats.breakdown(
                stats_before, server_stats.scrape_settled(server.url_metrics, spec.ENSEMBLE, sent))
            levels.append(level)
            clock.log(f"c={concurrency}: {level['requests']} requests ({level['errors']} failed) in "
                      f"{level['wall_s']:.1f} s: TTFT p50 {level['ttft_ms']['p50']:.1f} ms, ITL p50 "
                      f"{level['itl_ms']['p50']:.2f} ms, {level['output_tokens_per_s']:.1f} tokens/s, "
                      f"generator CPU {level['generator_cpu_percent']:.0f} %")
        if skipped_levels:
            notes.append(f"time budget of {args.time_budget_s:.0f} s spent: concurrency "
                         f"{', '.join(map(str, skipped_levels))} not run")
            clock.log(notes[-1])

        if not args.skip_vision:
            # The tensors' dtype is the served vision encoder's wire dtype (FP16 for half-precision models).
            encoder_spec, encoder_serving = read_spec(repository / spec.VISION_ENCODER / "1")
            pixel_values = w1_pixel_values(checkpoint, workload.images[0])
            inputs = {spec.VISION_ENCODER: vision.write_input_data(out / "vision_input.json", pixel_values,
                                                                   encoder_serving)}
            # No projector model with projector_placement "language_model": the language model projects.
            if not args.skip_projector and not serving.projector_in_language_model:
                inputs[spec.PROJECTOR] = vision.write_item(
                    out / "projector_input.json", spec.IMAGE_FEATURES,
                    vision.encoder_features(server.url_grpc, pixel_values, encoder_serving))
            for model, data in inputs.items():
                for batch_size in dict.fromkeys(args.vision_batch_sizes):
                    entry = vision.measure(server.url_grpc, batch_size, data, out, model=model,
                                           output_item_bytes=vision.output_item_bytes(encoder_spec, encoder_serving,
                                                                                      model),
                                           measurement_requests=args.vision_requests,
                                           concurrency=perf_concurrency(args.vision_concurrency,
                                                                        encoder_serving, model),
                                           shared_memory=args.vision_shared_memory)
                    (vision_results if model == spec.VISION_ENCODER else projector_results).append(entry)
                    if "error" in entry:
                        clock.log(f"{model} batch {batch_size}: perf_analyzer failed: {entry['error'][-300:]}")
                    else:
                        clock.log(f"{model} batch {batch_size}: {entry['images_per_s']:.1f} images/s, p50 "
                                  f"{entry['latency_p50_ms']:.1f} ms ({entry['shared_memory']} shared memory)")
    clock.log("server stopped")

    baseline = None
    if not args.skip_baseline:
        batch_sizes = args.baseline_batch_sizes or [c for c in levels_to_run if c <= BASELINE_MAX_BATCH]
        if not batch_sizes:
            notes.append("no baseline batch size (no concurrency level up to 32; see --baseline-batch-sizes)")
        else:
            baseline = run_baseline(checkpoint, batch_sizes, args.output_tokens, args.baseline_repeats, out, clock,
                                    args.workload)
            if "error" in baseline:
                clock.log(f"baseline failed: {baseline['error']}")
    if device_name is None and baseline and baseline.get("device_name"):
        device_name = baseline["device_name"]
    gemm_tflops = gemm_rate(baseline, serving.device, serving.dtype)
    if gemm_tflops and not (baseline or {}).get("gemm_tflops"):
        clock.log(f"{serving.dtype} GEMM 8192^3: {gemm_tflops} TFLOP/s (measured without the baseline)")

    context_tokens = workload.prompt_tokens + args.output_tokens // 2  # mean context over the decode
    limits = bench_limits.limits(hf_config, serving.dtype, serving.device, device_name, context_tokens,
                                 args.gpu_bandwidth_gbs, args.gpu_peak_tflops, serving.lm_weight_dtype,
                                 serving.kv_cache_dtype, gemm_tflops=gemm_tflops,
                                 prompt_tokens=workload.prompt_tokens, output_tokens=args.output_tokens,
                                 tiles_per_request=workload.tiles_per_request,
                                 concurrency=tuple(level["concurrency"] for level in levels))
    if baseline and baseline.get("language_model_params") not in (None, limits["language_model_params"]):
        notes.append(f"parameter count from the config ({limits['language_model_params']}) differs from the loaded "
                     f"model's ({baseline['language_model_params']})")
    results: dict[str, Any] = {
        "benchmark": f"llava-triton {workload.name}",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "machine": {"gpu": device_name, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "triton_server": triton_version,
                    "git_commit": git_commit()},
        "checkpoint": {"path": str(checkpoint), "description": description},
        "repository": {"path": str(repository), "engine": repository_engine(repository), "serving": serving.to_dict()},
        "workload": {"name": workload.name, "description": workload.describe(), "question": workload.prompt,
                     "question_tokens": workload.question_tokens, "prompt_tokens": workload.prompt_tokens,
                     "image": f"{workload.image_size[0]}x{workload.image_size[1]} JPEG, {len(workload.images[0])} "
                              f"bytes ({image_file})",
                     "tiles_per_request": workload.tiles_per_request,
                     "max_tokens": workload.max_tokens, "ignore_eos": workload.ignore_eos,
                     "temperature": workload.temperature, "stream": True},
        "settings": {"concurrency": levels_to_run, "requests": args.requests, "warmup": args.warmup,
                     "loadgen": args.loadgen, "time_budget_s": args.time_budget_s,
                     "server_pythonpath": args.server_pythonpath,
                     "vision_batch_sizes": args.vision_batch_sizes, "vision_requests": args.vision_requests,
                     "vision_concurrency": args.vision_concurrency,
                     "baseline_repeats": args.baseline_repeats},
        "levels": levels,
        "skipped_levels": skipped_levels,
        "vision": vision_results,
        "projector": projector_results,
        "baseline": baseline,
        "limits": limits,
        "notes": notes,
    }
    results["roofline"] = roofline(levels, vision_results, limits, projector_results)
    results["checks"] = checks(levels, workload, baseline)
    results["elapsed_s"] = round(clock.elapsed, 1)

    report.write_json(out / "results.json", results)
    table = report.markdown(results)
    (out / "results.md").write_text(table)
    series = [{"name": f"Triton ({args.loadgen} closed loop), label = concurrency", "color": (31, 119, 180),
               "points": [(level["ttft_ms"]["p50"], level["output_tokens_per_s"], f"c={level['concurrency']}")
                          for level in levels]}]
    if baseline and baseline.get("runs"):
        series.append({"name": "transformers generate, label = batch size", "color": (214, 39, 40),
                       "points": [(run["ttft_ms"], run["output_tokens_per_s"], f"b={run['batch_size']}")
                                  for run in baseline["runs"]]})
    report.plot_throughput_vs_ttft(out / "throughput_vs_ttft.png", series,
                                   f"{workload.name} on {device_name or 'CPU'}: output tokens/s vs TTFT p50")
    clock.log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'throughput_vs_ttft.png'}")
    return print_report(table, results["checks"])


def print_report(table: str, checks: dict[str, bool]) -> int:
    """Print a run's table; the exit status: 1 (the failed checks named) when a check did not hold."""
    print()
    print(table)
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print(f"checks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
