"""A fake streaming Triton endpoint with known timings, to check the load generator itself.

The fake answers `ModelStreamInfer` like the `llava` ensemble does (the same output tensors, one
token per response, an empty final response) but computes nothing: after `--ttft-ms` it sends one
token to every running stream at each tick of a global `--step-ms` clock, as an in-flight batching
engine does, and stamps each response with its send time (`time.monotonic`, system-wide on Linux).
So the ideal figures are known: ITL = step, TTFT between ttft and ttft + step. What the generator
measures beyond them, and the delivery delay (arrival minus send time), is its own distortion.

    python -m bench.fake_server --check --concurrency 128    # both generators at c=128
    python -m bench.fake_server --port 8001 --step-ms 25     # serve only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llava_triton import spec

ROOT = Path(__file__).resolve().parent.parent


def _bytes_tensor(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def _scalar(request, name: str, dtype, default):
    for index, tensor in enumerate(request.inputs):
        if tensor.name == name and index < len(request.raw_input_contents):
            return np.frombuffer(request.raw_input_contents[index], dtype=dtype)[0].item()
    return default


def make_servicer(step_s: float, ttft_s: float, prompt_tokens: int):
    """A GRPCInferenceService servicer (grpc.aio) that streams fake tokens on a step clock."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from bench.loadgen import SERVER_TIME_PARAMETER

    def response(request, token: int | None, completion_tokens: int, finish_reason: str, final: bool):
        infer = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        if token is not None:
            outputs = ((spec.OUT_TEXT, "BYTES", _bytes_tensor(b" tok")),
                       (spec.OUT_TOKEN_IDS, "INT64", struct.pack("<q", token)),
                       (spec.OUT_PROMPT_TOKENS, "INT32", struct.pack("<i", prompt_tokens)),
                       (spec.OUT_COMPLETION_TOKENS, "INT32", struct.pack("<i", completion_tokens)),
                       (spec.OUT_FINISH_REASON, "BYTES", _bytes_tensor(finish_reason.encode())))
            for name, datatype, raw in outputs:
                infer.outputs.add(name=name, datatype=datatype, shape=[1])
                infer.raw_output_contents.append(raw)
        infer.parameters["triton_final_response"].bool_param = final
        infer.parameters[SERVER_TIME_PARAMETER].double_param = time.monotonic()
        return service_pb2.ModelStreamInferResponse(infer_response=infer)

    class FakeLlava(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):
            return service_pb2.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=True)

        async def ModelReady(self, request, context):
            return service_pb2.ModelReadyResponse(ready=True)

        async def ModelStreamInfer(self, request_iterator, context):
            queue: asyncio.Queue = asyncio.Queue()

            async def generate(request) -> None:
                max_tokens = int(_scalar(request, spec.IN_MAX_TOKENS, np.int32, 16))
                await asyncio.sleep(ttft_s)
                for index in range(max_tokens):
                    if index:  # the next tick of the global step clock
                        now = time.monotonic()
                        await asyncio.sleep((math.floor(now / step_s) + 1) * step_s - now)
                    last = index == max_tokens - 1
                    await queue.put(response(request, index, index + 1, "length" if last else "", False))
                await queue.put(response(request, None, max_tokens, "", True))

            async def read() -> None:
                tasks = [asyncio.ensure_future(generate(request)) async for request in request_iterator]
                await asyncio.gather(*tasks)
                await queue.put(None)

            reader = asyncio.ensure_future(read())
            while (item := await queue.get()) is not None:
                yield item
            await reader

    return FakeLlava()


async def serve(port: int, step_s: float, ttft_s: float, prompt_tokens: int) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(make_servicer(step_s, ttft_s, prompt_tokens), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"fake llava on 127.0.0.1:{port}: ttft {ttft_s * 1e3:.0f} ms, step {step_s * 1e3:.0f} ms", flush=True)
    await server.wait_for_termination()


class FakeServer:
    """The fake in a subprocess (so it does not share the generator's GIL), as a context manager."""

    def __init__(self, step_ms: float = 25.0, ttft_ms: float = 50.0, prompt_tokens: int = 640):
        from llava_triton.server import free_port

        self.port = free_port()
        self.step_ms, self.ttft_ms, self.prompt_tokens = step_ms, ttft_ms, prompt_tokens
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServer:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fake_server", "--port", str(self.port), "--step-ms", str(self.step_ms),
             "--ttft-ms", str(self.ttft_ms), "--prompt-tokens", str(self.prompt_tokens)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.process.stdout.readline()  # printed once the port is bound
        if "fake llava" not in line:
            self.__exit__()
            raise RuntimeError(f"fake server did not start: {line}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def check(concurrency: int, num_requests: int, tokens: int, step_ms: float, ttft_ms: float,
          modes: list[str]) -> list[dict]:
    """Run each generator against the fake and compare what it measures with the known timings."""
    from bench.loadgen import run_level, summarize
    from bench.workload import QUESTION, Workload, w1_image

    workload = Workload(name="fake", prompt=QUESTION, images=(w1_image(),), max_tokens=tokens)
    summaries = []
    with FakeServer(step_ms=step_ms, ttft_ms=ttft_ms) as fake:
        run_level(fake.url, workload, min(concurrency, 4), min(concurrency, 4))  # warm up the fake
        for mode in modes:
            summary = summarize(run_level(fake.url, workload, concurrency, num_requests, mode=mode))
            # Steady state: every stream gets a token per step, so c / step tokens per second at best.
            summary["ideal"] = {"itl_ms": step_ms, "ttft_ms": [ttft_ms, ttft_ms + step_ms],
                                "output_tokens_per_s_max": round(concurrency * 1e3 / step_ms, 1)}
            summaries.append(summary)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_server", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="run the generators against a fake in a subprocess")
    parser.add_argument("--port", type=int, default=8001, help="serve on this port (without --check)")
    parser.add_argument("--step-ms", type=float, default=25.0, help="one token per stream per step")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="delay before a request's first token")
    parser.add_argument("--prompt-tokens", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--requests", type=int, default=None, help="default: 2 x concurrency")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--modes", nargs="+", default=["aio", "threads"], choices=["aio", "threads"])
    args = parser.parse_args(argv)
    if not args.check:
        asyncio.run(serve(args.port, args.step_ms / 1e3, args.ttft_ms / 1e3, args.prompt_tokens))
        return 0
    summaries = check(args.concurrency, args.requests or 2 * args.concurrency, args.tokens, args.step_ms,
                      args.ttft_ms, args.modes)
    for summary in summaries:
        keys = ("loadgen", "concurrency", "requests", "errors", "completion_tokens", "ttft_ms", "itl_ms",
                "delivery_delay_ms", "output_tokens_per_s", "generator_cpu_percent", "ideal")
        print(json.dumps({key: summary[key] for key in keys if key in summary}))
    return 0 if all(s["errors"] == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
