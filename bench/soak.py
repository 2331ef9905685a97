"""Soak: a real tritonserver under steady load for a while, every answer checked.

    python -m bench.soak --duration-s 60 --concurrency 64 --out build/soak        # CI's short run
    python -m bench.soak --duration-s 1800 --concurrency 64 --out build/soak-30m  # the figures in docs/operations.md

Steps: build the embedded tiny checkpoint (or take --checkpoint), export it (PyTorch engine),
compute transformers' greedy answers for a few valid requests, start tritonserver, then keep
`concurrency` streams busy for --duration-s with a mix of

* valid requests (images or none, streamed or not), each answer compared token for token with
  transformers', and a seeded sampled request that must give the same tokens every time, whatever
  it is batched with;
* hostile requests from llava_triton/testing/corpus.py (a few bad requests of our own when it is
  absent), each to be refused with its message, or answered exactly where the corpus says it is valid;
* abandoned streams: the client cancels after the first chunk.

Server memory (RSS of tritonserver and its backend stubs, and their shared-memory regions) is
measured idle after a warm-up (which sends every case twice first, so that buffers and pools have
grown to the largest requests) and idle after the load, and the KV cache must be empty once the
load is over. Writes <out>/report.json and <out>/report.md; exits 1 on any wrong answer, any
unexpected error, memory growth above --max-memory-growth, or KV-cache space not returned.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import platform
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import server_stats
from bench.report import json_safe
from llava_triton import spec
from llava_triton.processes import backend_stubs, cmdline, process_tree
from llava_triton.server import TritonServer

ROOT = Path(__file__).resolve().parent.parent
FINAL = "triton_final_response"


# --- the server's processes, memory and metrics ------------------------------------------------

def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts from /proc/<pid>/status; empty when the process is gone.

    Not psutil: its memory_info has statm's `shared` (RssFile and RssShmem together), and
    server_memory needs RssAnon and RssFile without RssShmem (it counts the regions once, from /dev/shm).
    """
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


def server_memory(server_pid: int) -> dict[str, Any]:
    """Memory of tritonserver and every descendant (its backend stubs).

    `rss_bytes` sums their VmRSS. That counts a shared-memory region (one per stub, shared with the
    server) in both processes, and again as either touches more of its pages, which it does for a
    while under load without any new memory being allocated. So `memory_bytes`, the figure the
    soak judges, is each process's private and file-backed RSS (RssAnon + RssFile) plus the
    regions' allocated size (`shm_bytes`, from /dev/shm) once.
    """
    stubs = backend_stubs(server_pid)
    processes, regions = [], set()
    for pid in process_tree(server_pid):
        status = _status_kib(pid)
        if "VmRSS" not in status:
            continue  # gone, or a zombie
        processes.append({"pid": pid, "name": "tritonserver" if pid == server_pid else stubs.get(pid, "other"),
                          "rss_bytes": status["VmRSS"] * 1024,
                          **{k.lower() + "_bytes": status.get(k, 0) * 1024
                             for k in ("RssAnon", "RssFile", "RssShmem")}})
        if pid in stubs:  # argv: stub <model.py> <shm region name> <size> <growth> <parent pid> ...
            regions.update(cmdline(pid)[2:3])
    shm_bytes = 0
    for region in regions:
        try:
            shm_bytes += os.stat(f"/dev/shm/{region}").st_blocks * 512  # allocated, not the sparse size
        except OSError:
            pass
    return {"memory_bytes": sum(p["rssanon_bytes"] + p["rssfile_bytes"] for p in processes) + shm_bytes,
            "rss_bytes": sum(p["rss_bytes"] for p in processes), "shm_bytes": shm_bytes, "processes": processes}


def scrape_metrics(url: str) -> dict[str, float]:
    """Prometheus text from Triton's metrics endpoint -> {'name{labels}': value} for the llava_* series."""
    return server_stats.series(urllib.request.urlopen(url, timeout=5).read().decode(), "llava_")


def kv_cache_state(metrics_url: str) -> dict[str, float]:
    values = scrape_metrics(metrics_url)
    return {"running": values.get(spec.METRIC_REQUESTS_RUNNING.name, math.nan),
            "waiting": values.get(spec.METRIC_REQUESTS_WAITING.name, math.nan),
            "kv_cache_usage_ratio": values.get(spec.METRIC_KV_CACHE_USAGE.name, math.nan)}


CACHE_COUNTERS = (spec.METRIC_PREFIX_QUERY_TOKENS, spec.METRIC_PREFIX_HIT_TOKENS, spec.METRIC_EMBEDDING_CACHE_HITS,
                  spec.METRIC_EMBEDDING_CACHE_MISSES, spec.METRIC_EMBEDDING_CACHE_EVICTIONS,
                  spec.METRIC_EMBEDDING_CACHE_BYTES, spec.METRIC_KV_CACHE_CACHED_BLOCKS)


def cache_counters(metrics_url: str) -> dict[str, float]:
    """The caches' metrics since the server started ({} when it publishes none: caches off)."""
    values = scrape_metrics(metrics_url)
    return {metric.name: values[metric.name] for metric in CACHE_COUNTERS if metric.name in values}


def wait_kv_cache_empty(metrics_url: str, timeout_s: float) -> tuple[bool, dict[str, float], float]:
    """Poll until no request runs or waits and the KV cache is empty: (returned, last state, seconds)."""
    start = time.monotonic()
    while True:
        state = kv_cache_state(metrics_url)
        if state["running"] == 0 and state["waiting"] == 0 and state["kv_cache_usage_ratio"] == 0:
            return True, state, time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            return False, state, time.monotonic() - start
        time.sleep(0.1)


# --- requests ----------------------------------------------------------------------------------

@dataclass
class Case:
    """One request of the mix, its tensors built once, with what must come back."""

    kind: str  # "valid", "sampled" (answer fixed by its first run) or "corpus"
    name: str
    inputs: list  # tritonclient.grpc.InferInput
    model: str = "llava"
    parameters: dict[str, Any] | None = None
    expected_ids: list[int] | None = None  # a valid answer, token for token
    expect_error: str | None = None  # regex the error message must match (re.search)


@dataclass
class Outcome:
    case: str
    kind: str  # the case's kind, or "abandoned"
    result: str  # ok, wrong_answer, unexpected_error, refused_as_expected, not_refused
    seconds: float
    tokens: int = 0
    detail: str = ""


def valid_cases(checkpoint: Path) -> list[Case]:
    """Valid requests with transformers' greedy answers, and one seeded sampled request."""
    from llava_triton.client import build_inputs
    from llava_triton.testing.reference import hf_generate, make_test_images, varied_image

    images = make_test_images()
    requests = [
        ("one jpeg, streamed", [images["jpeg"]], "What is in the picture?", 16, True),
        ("one png at a tag", [images["png"]], "Look: <image>\nDescribe the colours.", 16, False),
        ("two images, streamed", [images["jpeg"], images["webp"]],
         "<image>\n<image>\nWhat differs between these two?", 12, True),
        ("text only, streamed", [], "Tell me a long story about the sea.", 32, True),
        ("text only", [], "Describe a busy market.", 24, False),
        *((f"varied jpeg {seed}", [varied_image(seed)], "What is in the picture?", 8, seed % 2 == 0)
          for seed in range(4)),
    ]
    cases = []
    for name, case_images, prompt, max_tokens, stream in requests:
        expected = hf_generate(checkpoint, case_images, prompt, max_tokens)
        cases.append(Case("valid", name, build_inputs(prompt, case_images, max_tokens=max_tokens, temperature=0.0,
                                                        stream=stream), expected_ids=expected))
    cases.append(Case("sampled", "one jpeg, sampled with a seed",
                      build_inputs("What is in the picture?", [images["jpeg"]], max_tokens=16, temperature=0.8,
                                   top_p=0.9, top_k=50, seed=1234, stream=True)))
    return cases


def corpus_cases(checkpoint: Path, repository: Path) -> tuple[list[Case], str]:
    """The hostile cases of llava_triton/testing/corpus.py, each with its expected error or answer."""
    from llava_triton import spec
    from llava_triton.client import build_inputs
    from llava_triton.spec import read_spec
    from llava_triton.testing import corpus
    from llava_triton.testing.reference import hf_generate

    model_spec, serving = read_spec(repository / spec.LANGUAGE_MODEL / "1")
    cases = []
    for hostile in corpus.hostile_cases(model_spec, serving):
        expected = None
        if hostile.expect is None:
            expected = hf_generate(checkpoint, list(hostile.images), hostile.prompt, corpus.MAX_TOKENS)
        cases.append(Case("corpus", hostile.name, corpus.raw_inputs(hostile, build_inputs),
                          model=hostile.model, parameters=hostile.parameters, expected_ids=expected,
                          expect_error=hostile.expect))
    return cases, "llava_triton/testing/corpus.py"


def _error_message(error: BaseException) -> str:
    if hasattr(error, "message") and callable(error.message):
        return error.message()
    if hasattr(error, "code") and callable(error.code):
        return f"{error.code().name}: {error.details()}"
    return str(error)


async def send(connection, case: Case, *, abandon: bool, timeout_s: float) -> Outcome:
    """One request over a gRPC stream, read to its final response (or to the first, when abandoning)."""
    import grpc
    from tritonclient.utils import InferenceServerException

    parameters = {"triton_enable_empty_final_response": True, **(case.parameters or {})}
    request = {"model_name": case.model, "inputs": case.inputs, "parameters": parameters}

    async def one_request():
        yield request

    token_ids: list[int] = []
    error = None
    finished = False  # the request is over: its final response came, or its error (our models send errors as final)
    trailing = ""  # what went wrong after that, while the server ended the call
    start = time.monotonic()
    responses = connection.stream_infer(one_request(), stream_timeout=timeout_s)
    try:
        async for result, response_error in responses:
            if response_error is not None:
                error = _error_message(response_error)
                finished = True
                break
            ids = result.as_numpy("token_ids")
            token_ids += [] if ids is None else ids.reshape(-1).tolist()
            if abandon and token_ids:
                break
            final = result.get_response().parameters.get(FINAL)
            if final is None or final.bool_param:  # a non-decoupled model answers once, unflagged
                finished = True
                break
        if finished:
            # Read on until the server ends the call (status OK), as a client that is done should: a
            # call cancelled after its last response leaks the server's state for it in Triton 2.51
            # (the request's protobuf with its input bytes; docs/operations.md, "Soak").
            async for result, response_error in responses:
                trailing = f"a response after the final one: {response_error or result.get_response()}"
    except (InferenceServerException, grpc.RpcError) as raised:
        if finished:
            trailing = f"the call did not end cleanly: {_error_message(raised)}"
        else:
            error = _error_message(raised)
    finally:
        if not finished:
            responses.cancel()  # abandoned, or a gRPC error: end the call (a no-op once it has ended)
    seconds = time.monotonic() - start
    if trailing:
        return Outcome(case.name, "abandoned" if abandon else case.kind, "unexpected_error", seconds, len(token_ids),
                       trailing)
    if abandon:
        result = "unexpected_error" if error else "ok"
        return Outcome(case.name, "abandoned", result, seconds, len(token_ids), error or "")
    if case.expect_error is not None:
        if error is None:
            return Outcome(case.name, case.kind, "not_refused", seconds, len(token_ids), f"answered {token_ids}")
        if re.search(case.expect_error, error):
            return Outcome(case.name, case.kind, "refused_as_expected", seconds)
        return Outcome(case.name, case.kind, "unexpected_error", seconds, 0,
                       f"{error!r} does not match {case.expect_error!r}")
    if error is not None:
        return Outcome(case.name, case.kind, "unexpected_error", seconds, len(token_ids), error)
    if case.kind == "sampled" and case.expected_ids is None:
        case.expected_ids = token_ids  # the first run fixes the answer every later run must repeat
    if token_ids != case.expected_ids:
        return Outcome(case.name, case.kind, "wrong_answer", seconds, len(token_ids),
                       f"got {token_ids}, expected {case.expected_ids}")
    return Outcome(case.name, case.kind, "ok", seconds, len(token_ids))


# --- the load ----------------------------------------------------------------------------------

@dataclass
class Mix:
    valid: list[Case]
    corpus: list[Case]
    corpus_share: float
    abandon_share: float

    def pick(self, rng: random.Random) -> tuple[Case, bool]:
        draw = rng.random()
        if draw < self.corpus_share and self.corpus:
            return rng.choice(self.corpus), False
        return rng.choice(self.valid), draw < self.corpus_share + self.abandon_share


@dataclass
class Load:
    """Closed-loop load: `concurrency` workers, each sending its next request when one ends."""

    url: str
    mix: Mix
    concurrency: int
    timeout_s: float
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    script: collections.deque = field(default_factory=collections.deque)  # cases to send first, in order
    running: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    busy: int = 0

    async def worker(self, index: int) -> None:
        from tritonclient.grpc import aio as grpcaio

        rng = random.Random(self.seed * 1000 + index)
        connection = grpcaio.InferenceServerClient(self.url)
        try:
            while True:
                await self.running.wait()
                if self.stopping:
                    return
                case, abandon = (self.script.popleft(), False) if self.script else self.mix.pick(rng)
                self.busy += 1
                try:
                    self.outcomes.append(await send(connection, case, abandon=abandon, timeout_s=self.timeout_s))
                finally:
                    self.busy -= 1
        finally:
            await connection.close()

    async def idle(self) -> None:
        """Pause the workers and wait until none has a request in flight."""
        self.running.clear()
        while self.busy:
            await asyncio.sleep(0.05)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def _count(outcomes: list[Outcome], **match: str) -> int:
    return sum(all(getattr(o, k) == v for k, v in match.items()) for o in outcomes)


def summarize(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    kinds = sorted({o.kind for o in outcomes})
    by_kind = {kind: {result: _count(outcomes, kind=kind, result=result)
                      for result in sorted({o.result for o in outcomes if o.kind == kind})} for kind in kinds}
    by_case: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        entry = by_case.setdefault(outcome.case, {})
        entry[outcome.result] = entry.get(outcome.result, 0) + 1
    answered = [o for o in outcomes if o.kind in ("valid", "sampled") and o.result == "ok"]
    latencies = [o.seconds for o in answered]
    return {
        "requests": len(outcomes),
        "requests_per_s": len(outcomes) / seconds if seconds else math.nan,
        "generated_tokens_per_s": sum(o.tokens for o in outcomes) / seconds if seconds else math.nan,
        "by_kind": by_kind,
        "by_case": by_case,
        "answer_latency_s": {"p50": _percentile(latencies, 50), "p90": _percentile(latencies, 90),
                             "p99": _percentile(latencies, 99), "max": max(latencies, default=math.nan)},
        "wrong_answers": _count(outcomes, result="wrong_answer"),
        "unexpected_errors": _count(outcomes, result="unexpected_error") + _count(outcomes, result="not_refused"),
    }


def _examples(outcomes: list[Outcome], limit: int = 10) -> list[dict[str, Any]]:
    bad = [o for o in outcomes if o.result in ("wrong_answer", "unexpected_error", "not_refused")]
    return [dataclasses.asdict(o) for o in bad[:limit]]


def _slope_mib_per_min(samples: list[dict[str, float]]) -> float:
    if len(samples) < 3:
        return math.nan
    t = np.array([s["t"] for s in samples])
    rss = np.array([s["memory_bytes"] for s in samples]) / 2**20
    return float(np.polyfit(t / 60.0, rss, 1)[0])


async def run_load(server, mix: Mix, args: argparse.Namespace, log) -> dict[str, Any]:
    """Warm-up, idle baseline, the measured load, idle again: outcomes, memory and the KV cache."""
    warmup_s = args.warmup_s if args.warmup_s is not None else min(300.0, max(15.0, 0.25 * args.duration_s))
    load = Load(server.url_grpc, mix, args.concurrency, args.request_timeout_s, args.seed)
    workers = [asyncio.create_task(load.worker(i)) for i in range(args.concurrency)]
    samples: list[dict[str, float]] = []
    started = time.monotonic()

    async def sample_until(end: float, phase: str) -> None:
        next_report = time.monotonic() + 30
        while time.monotonic() < end or (phase == "warm-up" and load.script):
            memory = await asyncio.to_thread(server_memory, server.process.pid)
            state = await asyncio.to_thread(kv_cache_state, server.url_metrics)
            samples.append({"t": time.monotonic() - started, "phase": phase, "memory_bytes": memory["memory_bytes"],
                            "rss_bytes": memory["rss_bytes"], "shm_bytes": memory["shm_bytes"], **state,
                            "requests": len(load.outcomes)})
            if time.monotonic() >= next_report:
                next_report += 30
                log(f"{phase} {time.monotonic() - started:6.0f}s: {len(load.outcomes)} requests, "
                    f"{_count(load.outcomes, result='wrong_answer')} wrong, "
                    f"{_count(load.outcomes, result='unexpected_error')} unexpected errors, "
                    f"memory {memory['memory_bytes'] / 2**20:.0f} MiB, running {state['running']:.0f}, "
                    f"waiting {state['waiting']:.0f}")
            await asyncio.sleep(min(args.sample_every_s, max(0.0, end - time.monotonic())))

    try:
        # Every case twice first: the server's buffers and shared-memory pools size themselves for
        # the largest requests (a 20 MB image, 2000 images) during the warm-up, not after it.
        cases = (mix.valid + mix.corpus) * 2
        random.Random(args.seed).shuffle(cases)
        load.script.extend(cases)
        log(f"warm-up: {warmup_s:.0f} s at concurrency {args.concurrency}, every one of the {len(cases) // 2} "
            "cases twice first")
        load.running.set()
        await sample_until(started + warmup_s, "warm-up")
        warmup_s = time.monotonic() - started  # longer than asked when the cases took longer
        await load.idle()
        warmup_outcomes = len(load.outcomes)
        returned, state, _ = await asyncio.to_thread(wait_kv_cache_empty, server.url_metrics, args.kv_timeout_s)
        baseline = await asyncio.to_thread(server_memory, server.process.pid)
        log(f"idle baseline: memory {baseline['memory_bytes'] / 2**20:.0f} MiB (VmRSS sum "
            f"{baseline['rss_bytes'] / 2**20:.0f} MiB), KV cache empty: {returned}")
        main_s = max(1.0, args.duration_s - warmup_s)
        log(f"load: {main_s:.0f} s")
        measured_start = time.monotonic()
        load.running.set()
        await sample_until(measured_start + main_s, "load")
        await load.idle()
        measured_s = time.monotonic() - measured_start
        load.stopping = True
        load.running.set()
        await asyncio.gather(*workers)
    finally:
        load.stopping = True
        load.running.set()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    returned, kv_state, kv_seconds = await asyncio.to_thread(wait_kv_cache_empty, server.url_metrics,
                                                             args.kv_timeout_s)
    final = await asyncio.to_thread(server_memory, server.process.pid)
    load_samples = [s for s in samples if s["phase"] == "load"]
    return {
        "warmup_s": warmup_s,
        "measured_s": measured_s,
        "outcomes": load.outcomes,
        "warmup_requests": warmup_outcomes,
        "memory": {
            "baseline_bytes": baseline["memory_bytes"], "final_bytes": final["memory_bytes"],
            "growth": final["memory_bytes"] / baseline["memory_bytes"] - 1.0,
            "peak_bytes": max((s["memory_bytes"] for s in samples), default=math.nan),
            "load_slope_mib_per_min": _slope_mib_per_min(load_samples),
            "baseline_rss_sum_bytes": baseline["rss_bytes"], "final_rss_sum_bytes": final["rss_bytes"],
            "rss_sum_growth": final["rss_bytes"] / baseline["rss_bytes"] - 1.0,
            "baseline_shm_bytes": baseline["shm_bytes"], "final_shm_bytes": final["shm_bytes"],
            "baseline_processes": baseline["processes"], "final_processes": final["processes"],
        },
        "kv_cache_after_load": {"returned": returned, "seconds_to_empty": kv_seconds, **kv_state},
        # The mix sends its images again and again: with the caches on they must be found.
        "caches": await asyncio.to_thread(cache_counters, server.url_metrics),
        "samples": samples,
    }


# --- report ------------------------------------------------------------------------------------

def verdict(report: dict[str, Any], max_memory_growth: float) -> list[str]:
    """Why the soak failed (empty when it passed)."""
    failures = []
    load = report["load"]
    if load["wrong_answers"]:
        failures.append(f"{load['wrong_answers']} wrong answers")
    if load["unexpected_errors"]:
        failures.append(f"{load['unexpected_errors']} unexpected errors")
    answered = sum(load["by_kind"].get(kind, {}).get("ok", 0) for kind in ("valid", "sampled"))
    if not answered:
        failures.append("no valid request was answered")
    growth = report["memory"]["growth"]
    if not growth <= max_memory_growth:
        failures.append(f"server memory grew by {growth:.1%} (limit {max_memory_growth:.0%}): "
                        "RssAnon + RssFile of tritonserver and its stubs, plus their shared memory")
    caches = report.get("caches") or {}
    hits = caches.get(spec.METRIC_PREFIX_HIT_TOKENS.name, 0) + caches.get(spec.METRIC_EMBEDDING_CACHE_HITS.name, 0)
    if caches.get(spec.METRIC_PREFIX_QUERY_TOKENS.name) and not hits:
        failures.append("the caches found nothing although the mix sends its images again and again")
    if not report["kv_cache_after_load"]["returned"]:
        failures.append(f"KV-cache space not returned after the load: {report['kv_cache_after_load']}")
    if not report["after"]["ready"]:
        failures.append("the server is not ready after the load")
    if not report["after"]["answer_correct"]:
        failures.append(f"a valid request after the load was not answered correctly: {report['after']['detail']}")
    return failures


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    load, memory, kv = report["load"], report["memory"], report["kv_cache_after_load"]
    mib = 2**20
    lines = [
        f"# Soak: {report['verdict'].upper()}",
        "",
        f"{report['config']['duration_s']:.0f} s at concurrency {report['config']['concurrency']} on "
        f"{report['machine']['cpus']} CPUs ({report['machine']['processor']}), of which {report['warmup_s']:.0f} s "
        f"warm-up; corpus: {report['corpus_source']}.",
        "",
        "| | |",
        "|---|---|",
        f"| requests after the warm-up | {load['requests']} ({load['requests_per_s']:.1f}/s, "
        f"{load['generated_tokens_per_s']:.0f} generated tokens/s) |",
    ]
    for kind, results in load["by_kind"].items():
        lines.append(f"| {kind} | {', '.join(f'{n} {r}' for r, n in results.items())} |")
    for name, value in (report.get("caches") or {}).items():
        lines.append(f"| `{name}` at the end | {value:,.0f} |")
    lines += [
        f"| wrong answers | {load['wrong_answers']} |",
        f"| unexpected errors | {load['unexpected_errors']} |",
        f"| answer latency p50 / p99 | {load['answer_latency_s']['p50']:.2f} s / "
        f"{load['answer_latency_s']['p99']:.2f} s |",
        f"| server memory idle after warm-up / after the load | {memory['baseline_bytes'] / mib:.0f} MiB / "
        f"{memory['final_bytes'] / mib:.0f} MiB ({memory['growth']:+.1%}; peak {memory['peak_bytes'] / mib:.0f} MiB) |",
        f"| its trend during the load | {memory['load_slope_mib_per_min']:+.2f} MiB/min |",
        f"| VmRSS summed over the processes (shared memory counted in each) | "
        f"{memory['baseline_rss_sum_bytes'] / mib:.0f} MiB / {memory['final_rss_sum_bytes'] / mib:.0f} MiB "
        f"({memory['rss_sum_growth']:+.1%}) |",
        f"| stub shared memory idle after warm-up / after the load | {memory['baseline_shm_bytes'] / mib:.0f} MiB / "
        f"{memory['final_shm_bytes'] / mib:.0f} MiB |",
        f"| KV cache after the load | {'empty' if kv['returned'] else 'NOT empty'} "
        f"after {kv['seconds_to_empty']:.1f} s "
        f"(running {kv['running']:.0f}, waiting {kv['waiting']:.0f}, usage {kv['kv_cache_usage_ratio']:.2f}) |",
        "",
    ]
    if report["failures"]:
        lines += ["Failures:", *(f"- {failure}" for failure in report["failures"]), ""]
    if report["examples"]:
        lines += ["First bad outcomes:", *(f"- {e['case']} ({e['kind']}): {e['result']}: {e['detail'][:300]}"
                                           for e in report["examples"]), ""]
    path.write_text("\n".join(lines))


# --- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=60.0, help="load time, warm-up included")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="load before the memory baseline; default 25%% of the duration, 15 to 300 s")
    parser.add_argument("--concurrency", type=int, default=64, help="requests kept in flight")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "soak", help="output directory")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Hugging Face LLaVA checkpoint; default: the embedded tiny one (build/tiny-llava)")
    parser.add_argument("--repository", type=Path, default=None,
                        help="model repository to serve; default <out>/model_repository, exported there")
    parser.add_argument("--no-export", action="store_true", help="serve --repository as it is")
    parser.add_argument("--export-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `python -m export`, e.g. --export-arg=--set=max_num_seqs=16")
    parser.add_argument("--corpus-share", type=float, default=0.15, help="share of hostile requests")
    parser.add_argument("--abandon-share", type=float, default=0.05,
                        help="share of valid streams the client cancels after the first chunk")
    parser.add_argument("--request-timeout-s", type=float, default=120.0,
                        help="a request not finished by then counts as an unexpected error")
    parser.add_argument("--max-memory-growth", type=float, default=0.10,
                        help="fail when the server's memory idle after the load exceeds that idle after the warm-up "
                             "by more (see server_memory)")
    parser.add_argument("--kv-timeout-s", type=float, default=60.0,
                        help="how long the KV cache may take to empty once the load stops")
    parser.add_argument("--sample-every-s", type=float, default=2.0, help="memory and metrics sampling period")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    args = parser.parse_args(argv)
    if args.concurrency <= 0 or args.duration_s <= 0:
        parser.error("--concurrency and --duration-s must be positive")
    if not 0 <= args.corpus_share + args.abandon_share <= 1:
        parser.error("--corpus-share plus --abandon-share must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[soak {time.monotonic() - started:7.1f}s] {message}", flush=True)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        from llava_triton.testing.reference import tiny_checkpoint

        checkpoint = tiny_checkpoint()
    else:
        checkpoint = args.checkpoint.resolve()
    repository = (args.repository or out / "model_repository").resolve()
    if not args.no_export:
        from export.__main__ import main as export_main

        log(f"exporting {checkpoint} into {repository}")
        code = export_main(["--model", str(checkpoint), "--output", str(repository), "--work-dir",
                            str(out / "export-work"), "--engine", "pytorch", "--no-onnx", *args.export_arg])
        if code:
            log(f"export failed with code {code}")
            return 1
    log("transformers' answers for the valid requests")
    valid = valid_cases(checkpoint)
    corpus, corpus_source = corpus_cases(checkpoint, repository)
    log(f"{len(valid)} valid cases, {len(corpus)} hostile cases from {corpus_source}")
    mix = Mix(valid, corpus, args.corpus_share, args.abandon_share)

    log_path = out / "tritonserver.log"
    log(f"starting tritonserver (log: {log_path})")
    with TritonServer(repository, log_path=log_path, ready_timeout_s=900) as server:
        log(f"server ready: gRPC {server.url_grpc}, metrics {server.url_metrics}")
        result = asyncio.run(run_load(server, mix, args, log))
        ready = server.is_ready()
        after = {"ready": ready, "answer_correct": False, "detail": ""}
        if ready:  # one more valid request, alone: the server still answers exactly
            outcome = asyncio.run(_one(server.url_grpc, valid[0], args.request_timeout_s))
            after.update(answer_correct=outcome.result == "ok", detail=outcome.detail)
        log("stopping the server")
    load_summary = summarize(result["outcomes"][result["warmup_requests"]:], result["measured_s"])
    whole = summarize(result["outcomes"], result["measured_s"] + result["warmup_s"])
    load_summary["wrong_answers"] = whole["wrong_answers"]  # the warm-up's count too: every answer is checked
    load_summary["unexpected_errors"] = whole["unexpected_errors"]
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoint": str(checkpoint),
        "repository": str(repository),
        "corpus_source": corpus_source,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "warmup_s": result["warmup_s"],
        "measured_s": result["measured_s"],
        "warmup": {"requests": result["warmup_requests"]},
        "load": load_summary,
        "memory": result["memory"],
        "kv_cache_after_load": result["kv_cache_after_load"],
        "caches": result["caches"],
        "after": after,
        "examples": _examples(result["outcomes"]),
        "samples": result["samples"],
        "server_log": str(log_path),
    }
    report["failures"] = verdict(report, args.max_memory_growth)
    report["verdict"] = "fail" if report["failures"] else "pass"
    (out / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    write_markdown(out / "report.md", report)
    print((out / "report.md").read_text(), flush=True)
    log(f"{report['verdict']}: {out / 'report.json'}")
    return 0 if report["verdict"] == "pass" else 1


async def _one(url: str, case: Case, timeout_s: float) -> Outcome:
    from tritonclient.grpc import aio as grpcaio

    connection = grpcaio.InferenceServerClient(url)
    try:
        return await send(connection, case, abandon=False, timeout_s=timeout_s)
    finally:
        await connection.close()


if __name__ == "__main__":
    sys.exit(main())
