"""What the OpenAI-compatible endpoint costs: W1 through it and through Triton's gRPC directly, in one run.

    python -m bench.openai_overhead                      # the tiny preset on the CPU (about two minutes)
    python -m bench.openai_overhead --checkpoint build/llava-1.5-7b-llava --export-arg=--device=cuda \\
        --export-arg=--dtype=bfloat16 --requests 256      # a GPU run

One tritonserver and one frontend (llava_triton.frontend_process, as the launcher runs it). After a
warm-up through both, each concurrency level runs through gRPC (bench.loadgen's asyncio generator) and
then through the endpoint (the same closed loop over HTTP, `run_level_openai`), alternating, so both see
the same server state. Reported per level and path: TTFT p50 and p90, ITL p50, output tokens/s; and the
endpoint's cost: TTFT p50 added (ms) and tokens/s lost (%). Writes <out>/openai_overhead.json and .md;
exits 1 when a request failed or a token count is off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from bench.__main__ import ROOT, Clock, cpu_model, export_repository, git_commit, gpu_name, print_report, serving_with

DEFAULT_CONCURRENCY = (1, 32)
FRONTENDS = ("grpc", "openai")
# The targets: the endpoint adds at most 1 ms to TTFT p50 at c=1, costs at most 3 % of tokens/s at c=32.
TARGET_TTFT_ADDED_MS = 1.0
TARGET_THROUGHPUT_LOST_PERCENT = 3.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.openai_overhead", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Hugging Face LLaVA checkpoint; default: build --preset into build/<preset>-llava")
    parser.add_argument("--preset", default="tiny", help="preset built when --checkpoint is not given")
    parser.add_argument("--repository", type=Path, default=ROOT / "build" / "bench-openai" / "model_repository")
    parser.add_argument("--no-export", action="store_true", help="serve --repository as it is")
    parser.add_argument("--export-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `python -m export`, repeatable (--export-arg=--device=cuda)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY))
    parser.add_argument("--requests", type=int, default=None, help="requests per level and path; default 2 x c, "
                        "at least 8")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=8, help="warm-up requests through each path")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--server-timeout-s", type=float, default=900.0)
    parser.add_argument("--server-pythonpath", default=os.environ.get("STUB_PYTHONPATH"),
                        help="PYTHONPATH of the server alone (as python -m bench)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench-openai")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or (args.requests is not None and args.requests < 1):
        parser.error("--concurrency and --requests must be positive")
    return args


def overhead(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency: the endpoint's TTFT p50 minus gRPC's, and the share of gRPC's tokens/s it loses."""
    rows = []
    for concurrency in dict.fromkeys(level["concurrency"] for level in levels):
        by_path = {level["frontend"]: level for level in levels if level["concurrency"] == concurrency}
        if set(by_path) != set(FRONTENDS):
            continue
        grpc, http = by_path["grpc"], by_path["openai"]
        lost = 100.0 * (1 - http["output_tokens_per_s"] / grpc["output_tokens_per_s"]) \
            if grpc["output_tokens_per_s"] else None
        rows.append({"concurrency": concurrency,
                     "ttft_p50_added_ms": round(http["ttft_ms"]["p50"] - grpc["ttft_ms"]["p50"], 3),
                     "tokens_per_s_lost_percent": None if lost is None else round(lost, 2)})
    return rows


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [f"# W1 through the OpenAI endpoint and through gRPC ({results['created']})", "",
             f"Machine: {machine['gpu'] or 'no GPU'}, {machine['cpu']} ({machine['cpu_count']} cores); "
             f"commit {machine['git_commit']}. Command: `{results['command']}`.", "",
             f"Workload: {results['workload']}.", "",
             "| path | concurrency | requests | TTFT p50 (ms) | TTFT p90 (ms) | ITL p50 (ms) | output tokens/s | "
             "generator CPU % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for level in results["levels"]:
        lines.append(f"| {level['frontend']} | {level['concurrency']} | {level['completed']}/{level['requests']} | "
                     f"{level['ttft_ms']['p50']:.2f} | {level['ttft_ms']['p90']:.2f} | {level['itl_ms']['p50']:.2f} | "
                     f"{level['output_tokens_per_s']:.1f} | {level['generator_cpu_percent']:.0f} |")
    lines += ["", "| concurrency | TTFT p50 added by the endpoint (ms) | tokens/s lost (%) |", "|---:|---:|---:|"]
    for row in results["overhead"]:
        lines.append(f"| {row['concurrency']} | {row['ttft_p50_added_ms']:.2f} | {row['tokens_per_s_lost_percent']} |")
    lines += ["", f"Targets (GPU): at most {TARGET_TTFT_ADDED_MS:g} ms added to TTFT p50 at c=1, at most "
              f"{TARGET_THROUGHPUT_LOST_PERCENT:g} % of tokens/s lost at c=32."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    clock = Clock(None)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from bench.loadgen import run_level, run_level_openai, summarize
    from bench.workload import w1
    from llava_triton.frontend_process import FrontendProcess
    from llava_triton.server import TritonServer, free_port

    if args.checkpoint is None:
        from llava_triton.checkpoint import build_checkpoint

        checkpoint = build_checkpoint(args.preset, ROOT / "build" / f"{args.preset}-llava", log=clock.log)
    else:
        checkpoint = args.checkpoint.resolve()
    repository = args.repository.resolve()
    if not args.no_export:
        export_repository(checkpoint, repository, ["--no-onnx", *args.export_arg], out / "export.log", clock)
    workload = w1(checkpoint, args.output_tokens)
    clock.log(workload.describe())

    levels: list[dict[str, Any]] = []
    server = TritonServer(repository, log_path=out / "tritonserver.log", ready_timeout_s=args.server_timeout_s)
    with serving_with(server, args.server_pythonpath):
        with FrontendProcess(server.url_grpc, port=free_port(), host="127.0.0.1", model_repository=repository,
                             log_path=out / "frontend.log") as api:
            clock.log(f"server ready: gRPC {server.url_grpc}, OpenAI {api.url}")

            def level(frontend: str, concurrency: int, requests: int) -> dict[str, Any]:
                if frontend == "grpc":
                    result = run_level(server.url_grpc, workload, concurrency, requests,
                                       timeout_s=args.request_timeout_s)
                else:
                    result = run_level_openai(api.url, workload, concurrency, requests,
                                              timeout_s=args.request_timeout_s)
                return {"frontend": frontend, **summarize(result)}

            if args.warmup:
                for frontend in FRONTENDS:
                    warm = level(frontend, min(args.warmup, max(args.concurrency)), args.warmup)
                    if warm["errors"]:
                        raise SystemExit(f"{frontend} warm-up failed: {warm['error_messages']}")
                clock.log(f"warm-up: {args.warmup} requests through each path")
            for concurrency in dict.fromkeys(args.concurrency):
                requests = args.requests or max(2 * concurrency, 8)
                for frontend in FRONTENDS:
                    result = level(frontend, concurrency, requests)
                    levels.append(result)
                    clock.log(f"{frontend:6s} c={concurrency}: {result['errors']} failed, TTFT p50 "
                              f"{result['ttft_ms']['p50']:.2f} ms, ITL p50 {result['itl_ms']['p50']:.2f} ms, "
                              f"{result['output_tokens_per_s']:.1f} tokens/s")
    results = {
        "benchmark": "llava-triton W1, OpenAI endpoint against gRPC",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.openai_overhead", *argv]),
        "machine": {"gpu": gpu_name(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "git_commit": git_commit()},
        "workload": workload.describe(),
        "levels": levels,
        "overhead": overhead(levels),
        "checks": {
            "no_failed_requests": all(level["errors"] == 0 for level in levels),
            "completion_tokens_equal_requests_x_output_tokens": all(
                level["completion_tokens"] == level["requests"] * workload.max_tokens for level in levels),
            "prompt_tokens_equal_w1": all(level["prompt_tokens"] == [workload.prompt_tokens] for level in levels),
        },
    }
    (out / "openai_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "openai_overhead.md").write_text(table)
    clock.log(f"wrote {out / 'openai_overhead.json'} and {out / 'openai_overhead.md'}")
    return print_report(table, results["checks"])


if __name__ == "__main__":
    sys.exit(main())
