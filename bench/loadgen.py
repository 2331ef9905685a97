"""Closed-loop streaming load generator for the `llava` ensemble.

`run_level` keeps `concurrency` requests in flight until `num_requests` have been sent: each of
`concurrency` workers sends a request, reads its stream to the end, then sends the next. Per
request it records the send time, the arrival time of every response that carries token ids,
and the end of the stream; `summarize` turns that into the reported figures.

Two implementations of the same loop:

* "aio" (default): one asyncio event loop, `tritonclient.grpc.aio`, one gRPC channel per worker.
  A response is timestamped by the loop as soon as gRPC hands it over.
* "threads": one thread per worker, each with its own `client.LlavaClient` (the project's client).
  Each stream then has two Python threads (tritonclient's reader and ours), which at high
  concurrency compete for the GIL and delay the timestamps; `python -m bench.fake_server --check`
  measures both against a fake server whose timings are known.

A workload with videos (W4, bench.w4) sends them and its num_frames with each request.

`run_conversations` (W3, bench.w3) runs multi-turn chats instead, in the "aio" way: each chat sends
its next turn, the whole history with the answer just streamed, when that answer ends.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.workload import Conversation, Workload
from llava_triton import spec
from llava_triton.client import first_int, first_str

MODES = ("aio", "threads")
SERVER_TIME_PARAMETER = "bench_server_time"  # set by bench.fake_server only: its send time (time.monotonic)


@dataclass
class RequestRecord:
    """Timestamps (time.perf_counter, seconds) and counts of one streamed request."""

    start: float
    end: float = math.nan
    token_times: list[float] = field(default_factory=list)  # arrival of each response carrying token ids
    token_counts: list[int] = field(default_factory=list)  # how many ids each of those responses carried
    server_times: list[float] = field(default_factory=list)  # fake server only: send time of each response
    receive_times: list[float] = field(default_factory=list)  # fake server only: time.monotonic at arrival
    prompt_tokens: int = 0
    reported_completion_tokens: int = 0  # the server's count in its last response
    finish_reason: str = ""
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def ttft(self) -> float:
        """Send to the first response with a non-empty `token_ids`."""
        return self.token_times[0] - self.start if self.token_times else math.nan

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def itls(self) -> list[float]:
        """Inter-token latencies: the gap between consecutive token-carrying responses, split evenly
        over the tokens the later one carries (streaming sends one token per response)."""
        gaps = []
        for previous, now, count in zip(self.token_times, self.token_times[1:], self.token_counts[1:]):
            gaps.extend([(now - previous) / count] * count)
        return gaps

    def add_response(self, now: float, token_ids: Any, prompt_tokens: int, completion_tokens: int,
                     finish_reason: str) -> None:
        count = 0 if token_ids is None else int(np.size(token_ids))
        if count:
            self.token_times.append(now)
            self.token_counts.append(count)
            self.prompt_tokens = prompt_tokens
            self.reported_completion_tokens = completion_tokens
        self.finish_reason = finish_reason or self.finish_reason


@dataclass
class LevelResult:
    """One concurrency level: every request's record and the level's wall and CPU time."""

    concurrency: int
    mode: str
    records: list[RequestRecord]
    started: float
    ended: float
    cpu_s: float  # this process's CPU time during the level (the generator's own cost)

    @property
    def wall_s(self) -> float:
        return self.ended - self.started


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def _ms(value: float) -> float:
    return round(value * 1e3, 3) if math.isfinite(value) else math.nan


def summarize(level: LevelResult) -> dict[str, Any]:
    """The reported figures of a level (times in milliseconds).

    ttft: send -> first token; itl: between consecutive tokens of a request; tpot: a request's
    (last token - first token) / (tokens - 1); e2e: send -> end of stream. output_tokens_per_s is
    every completion token of the level over the level's wall time (first send to last end),
    requests_per_s likewise with the completed requests.
    """
    done = [r for r in level.records if r.error is None]
    ttfts = [r.ttft for r in done if r.token_times]
    itls = [gap for r in done for gap in r.itls()]
    tpots = [(r.token_times[-1] - r.token_times[0]) / (r.completion_tokens - r.token_counts[0])
             for r in done if r.completion_tokens > r.token_counts[0]]
    e2es = [r.e2e for r in done]
    completion_tokens = sum(r.completion_tokens for r in done)
    wall = level.wall_s
    summary = {
        "concurrency": level.concurrency,
        "loadgen": level.mode,
        "requests": len(level.records),
        "completed": len(done),
        "errors": len(level.records) - len(done),
        "error_messages": sorted({r.error for r in level.records if r.error})[:5],
        "completion_tokens": completion_tokens,
        "reported_completion_tokens": sum(r.reported_completion_tokens for r in done),
        "prompt_tokens": sorted({r.prompt_tokens for r in done}),
        "finish_reasons": sorted({r.finish_reason for r in done}),
        "wall_s": round(wall, 4),
        "ttft_ms": {"p50": _ms(_percentile(ttfts, 50)), "p90": _ms(_percentile(ttfts, 90)),
                    "p99": _ms(_percentile(ttfts, 99)), "mean": _ms(float(np.mean(ttfts)) if ttfts else math.nan)},
        "itl_ms": {"p50": _ms(_percentile(itls, 50)), "p90": _ms(_percentile(itls, 90)),
                   "p99": _ms(_percentile(itls, 99)), "mean": _ms(float(np.mean(itls)) if itls else math.nan)},
        "tpot_ms_mean": _ms(float(np.mean(tpots)) if tpots else math.nan),
        "e2e_ms": {"p50": _ms(_percentile(e2es, 50)), "p99": _ms(_percentile(e2es, 99))},
        "output_tokens_per_s": round(completion_tokens / wall, 3) if wall > 0 else math.nan,
        "requests_per_s": round(len(done) / wall, 4) if wall > 0 else math.nan,
        "generator_cpu_percent": round(100 * level.cpu_s / wall, 1) if wall > 0 else math.nan,
    }
    delays = [receive - sent for r in done for sent, receive in zip(r.server_times, r.receive_times)]
    if delays:  # only against bench.fake_server, which stamps its send time on each response
        summary["delivery_delay_ms"] = {"p50": _ms(_percentile(delays, 50)), "p99": _ms(_percentile(delays, 99)),
                                        "max": _ms(max(delays))}
    return summary


def run_level(url: str, workload: Workload, concurrency: int, num_requests: int, *, mode: str = "aio",
              model: str = spec.ENSEMBLE, timeout_s: float = 600.0) -> LevelResult:
    """Send `num_requests` of the workload's request with `concurrency` in flight (closed loop) and record them."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if concurrency < 1 or num_requests < 1:
        raise ValueError(f"concurrency and num_requests must be positive, got {concurrency}, {num_requests}")
    if mode == "aio":
        return asyncio.run(_run_aio(url, workload, concurrency, num_requests, model, timeout_s))
    return _run_threads(url, workload, concurrency, num_requests, model, timeout_s)


def _inputs(workload: Workload):
    from llava_triton.client import build_inputs

    return build_inputs(workload.prompt, list(workload.images), max_tokens=workload.max_tokens,
                        temperature=workload.temperature, stream=True, ignore_eos=workload.ignore_eos,
                        **_video_options(workload), **_salt(workload))


def _video_options(workload: Workload) -> dict:
    """The workload's videos and num_frames (W4), each left out where unset (the server's defaults apply)."""
    options = {}
    if workload.videos:
        options[spec.IN_VIDEOS] = list(workload.videos)
    if workload.num_frames is not None:
        options[spec.IN_NUM_FRAMES] = workload.num_frames
    return options


def _salt(workload: Workload) -> dict[str, str]:
    """A fresh workload's cache_salt for one request (Workload.fresh), else nothing."""
    return {spec.IN_CACHE_SALT: uuid.uuid4().hex} if workload.fresh else {}


# --- asyncio ---------------------------------------------------------------------------------------

async def _request_aio(connection, workload: Workload, model: str, timeout_s: float) -> RequestRecord:
    import grpc
    from tritonclient.utils import InferenceServerException

    request = {"model_name": model, "inputs": _inputs(workload), "request_id": uuid.uuid4().hex,
               # As LlavaClient: the ensemble ends a decoupled stream with an empty response flagged final.
               "parameters": {"triton_enable_empty_final_response": True}}

    async def one_request():
        yield request

    record = RequestRecord(start=time.perf_counter())
    try:
        responses = connection.stream_infer(one_request(), stream_timeout=timeout_s)
        # Read to the end of the call (the server closes it after the final response) rather than
        # break early, which would cancel the RPC.
        async for result, error in responses:
            now = time.perf_counter()
            if error is not None:
                record.error = error.message() if hasattr(error, "message") else str(error)
                continue
            response = result.get_response()
            record.add_response(now, result.as_numpy(spec.OUT_TOKEN_IDS),
                                first_int(result.as_numpy(spec.OUT_PROMPT_TOKENS)),
                                first_int(result.as_numpy(spec.OUT_COMPLETION_TOKENS)),
                                first_str(result.as_numpy(spec.OUT_FINISH_REASON)))
            sent = response.parameters.get(SERVER_TIME_PARAMETER)
            if sent is not None:
                record.server_times.append(sent.double_param)
                record.receive_times.append(time.monotonic())
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                record.end = now
    except InferenceServerException as error:
        record.error = error.message() if hasattr(error, "message") else str(error)
    except grpc.RpcError as error:  # e.g. the stream's deadline (timeout_s) passed
        record.error = f"{error.code().name}: {error.details()}" if hasattr(error, "code") else str(error)
    if math.isnan(record.end):
        record.end = time.perf_counter()
        record.error = record.error or "the stream ended without a final response"
    return record


async def _run_aio(url: str, workload: Workload, concurrency: int, num_requests: int, model: str,
                   timeout_s: float) -> LevelResult:
    from tritonclient.grpc import aio as grpcaio

    connections = [grpcaio.InferenceServerClient(url) for _ in range(concurrency)]
    try:
        # Connect every channel before the clock starts: the level measures requests, not handshakes.
        await asyncio.gather(*(connection.is_server_live() for connection in connections))
        return await _closed_loop(connections, lambda connection: _request_aio(connection, workload, model, timeout_s),
                                  num_requests, "aio")
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))


async def _closed_loop(clients: list, request, num_requests: int, mode: str) -> LevelResult:
    """One worker per client (a stream each), each sending its next request (`await request(client)`,
    a RequestRecord) when the last one ends, until num_requests have been sent; timed from the start."""
    counter = itertools.count()
    records: list[RequestRecord] = []

    async def worker(client) -> None:
        while next(counter) < num_requests:
            records.append(await request(client))

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(client) for client in clients))
    ended, cpu = time.perf_counter(), time.process_time() - cpu
    return LevelResult(len(clients), mode, records, started, ended, cpu)


# --- threads ---------------------------------------------------------------------------------------

def _run_threads(url: str, workload: Workload, concurrency: int, num_requests: int, model: str,
                 timeout_s: float) -> LevelResult:
    from llava_triton.client import LlavaClient, LlavaError

    clients = [LlavaClient(url, model) for _ in range(concurrency)]
    counter = itertools.count()
    records: list[RequestRecord] = []
    lock = threading.Lock()

    def worker(client: LlavaClient) -> None:
        while next(counter) < num_requests:
            record = RequestRecord(start=time.perf_counter())
            try:
                for chunk in client.stream(workload.prompt, list(workload.images), max_tokens=workload.max_tokens,
                                           temperature=workload.temperature, ignore_eos=workload.ignore_eos,
                                           timeout=timeout_s, **_video_options(workload), **_salt(workload)):
                    record.add_response(time.perf_counter(), chunk.token_ids, chunk.prompt_tokens,
                                        chunk.completion_tokens, chunk.finish_reason)
            except LlavaError as error:
                record.error = error.message
            record.end = time.perf_counter()
            with lock:
                records.append(record)

    try:
        for client in clients:  # connect before the clock starts
            client.is_ready()
        threads = [threading.Thread(target=worker, args=(client,), daemon=True) for client in clients]
        cpu, started = time.process_time(), time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ended, cpu = time.perf_counter(), time.process_time() - cpu
    finally:
        for client in clients:
            client.close()
    return LevelResult(concurrency, "threads", records, started, ended, cpu)


# --- the OpenAI-compatible endpoint ----------------------------------------------------------------------

SALT_PLACEHOLDER = "0" * 32  # replaced in each request's body by its own salt (as long: uuid4().hex)


def openai_body(workload: Workload) -> bytes:
    """W1 as a chat request: the images as data URLs before the question (the turn the gRPC path's prompt
    renders to), streamed, with the token counts in every chunk (continuous_usage_stats) so that each
    chunk's new tokens are known exactly."""
    import base64
    import json

    if workload.videos:
        raise ValueError(f"{workload.name} sends videos: the OpenAI-compatible endpoint is measured with images only")

    images = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(image).decode()}}
              for image in workload.images]
    return json.dumps({"model": spec.ENSEMBLE, "max_tokens": workload.max_tokens,
                       "temperature": workload.temperature, "ignore_eos": workload.ignore_eos, "stream": True,
                       **({spec.IN_CACHE_SALT: SALT_PLACEHOLDER} if workload.fresh else {}),
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                       "messages": [{"role": "user",
                                     "content": [*images, {"type": "text", "text": workload.prompt}]}]}).encode()


async def _request_openai(client, url: str, body: bytes, timeout_s: float) -> RequestRecord:
    import json

    import httpx

    record = RequestRecord(start=time.perf_counter())
    generated = 0
    try:
        # A fresh workload's body holds the salt placeholder once: each request gets its own salt.
        content = body.replace(SALT_PLACEHOLDER.encode(), uuid.uuid4().hex.encode(), 1)
        async with client.stream("POST", url, content=content, headers={"content-type": "application/json"},
                                 timeout=timeout_s) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        record.error = chunk["error"].get("message", str(chunk["error"]))
                        continue
                    usage = chunk.get("usage") or {}
                    new = usage.get("completion_tokens", generated) - generated
                    generated += new
                    finish = chunk["choices"][0]["finish_reason"] if chunk["choices"] else ""
                    record.add_response(now, [0] * new, usage.get("prompt_tokens", 0), generated, finish or "")
                record.end = time.perf_counter()
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    if math.isnan(record.end):
        record.end = time.perf_counter()
        record.error = record.error or "the stream ended early"
    return record


async def _run_openai(base_url: str, workload: Workload, concurrency: int, num_requests: int,
                      timeout_s: float) -> LevelResult:
    import httpx

    url = f"{base_url.rstrip('/')}/chat/completions"
    body = openai_body(workload)
    # A connection per worker, kept alive across its requests, as the gRPC generator keeps a channel each.
    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(client.get(f"{base_url.rstrip('/')}/models") for client in clients))  # connect first
        return await _closed_loop(clients, lambda client: _request_openai(client, url, body, timeout_s),
                                  num_requests, "openai")
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def run_level_openai(base_url: str, workload: Workload, concurrency: int, num_requests: int, *,
                     timeout_s: float = 600.0) -> LevelResult:
    """As `run_level`, through the OpenAI-compatible endpoint at `base_url` (http://host:port/v1): the same
    closed loop in one asyncio loop, with httpx and a keep-alive connection per worker. A token's time is
    the arrival of the server-sent event that carries it."""
    if concurrency < 1 or num_requests < 1:
        raise ValueError(f"concurrency and num_requests must be positive, got {concurrency}, {num_requests}")
    return asyncio.run(_run_openai(base_url, workload, concurrency, num_requests, timeout_s))


# --- conversations, turn after turn (W3) -------------------------------------------------------------

@dataclass
class ConversationRecord:
    """One conversation's turns: each turn's RequestRecord and its answer's text."""

    turns: list[RequestRecord] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


@dataclass
class ConversationsResult:
    """Conversations run side by side: every turn's record, and the run's wall and CPU time."""

    conversations: list[ConversationRecord]
    started: float
    ended: float
    cpu_s: float

    @property
    def wall_s(self) -> float:
        return self.ended - self.started

    def level(self, turn: int | None = None) -> LevelResult:
        """As a LevelResult for `summarize`: turn `turn` (1 = the first) of every conversation, timed from
        the first of them sent to the last one ended; with None, every turn, timed as the whole run."""
        if turn is None:
            records = [record for conversation in self.conversations for record in conversation.turns]
            return LevelResult(len(self.conversations), "aio", records, self.started, self.ended, self.cpu_s)
        records = [conversation.turns[turn - 1] for conversation in self.conversations
                   if len(conversation.turns) >= turn]
        started = min((record.start for record in records), default=self.started)
        ended = max((record.end for record in records), default=self.ended)
        return LevelResult(len(self.conversations), "aio", records, started, ended, self.cpu_s)


async def _request_aio_text(connection, inputs: list, model: str, timeout_s: float) -> tuple[RequestRecord, str]:
    """`_request_aio` for a request already built (`inputs`), also returning the answer's text (the
    streamed pieces joined), which the next turn of a conversation sends back."""
    import grpc
    from tritonclient.utils import InferenceServerException

    request = {"model_name": model, "inputs": inputs, "request_id": uuid.uuid4().hex,
               "parameters": {"triton_enable_empty_final_response": True}}

    async def one_request():
        yield request

    pieces: list[str] = []
    record = RequestRecord(start=time.perf_counter())
    try:
        async for result, error in connection.stream_infer(one_request(), stream_timeout=timeout_s):
            now = time.perf_counter()
            if error is not None:
                record.error = error.message() if hasattr(error, "message") else str(error)
                continue
            record.add_response(now, result.as_numpy(spec.OUT_TOKEN_IDS),
                                first_int(result.as_numpy(spec.OUT_PROMPT_TOKENS)),
                                first_int(result.as_numpy(spec.OUT_COMPLETION_TOKENS)),
                                first_str(result.as_numpy(spec.OUT_FINISH_REASON)))
            pieces.append(first_str(result.as_numpy(spec.OUT_TEXT)))
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                record.end = now
    except InferenceServerException as error:
        record.error = error.message() if hasattr(error, "message") else str(error)
    except grpc.RpcError as error:
        record.error = f"{error.code().name}: {error.details()}" if hasattr(error, "code") else str(error)
    if math.isnan(record.end):
        record.end = time.perf_counter()
        record.error = record.error or "the stream ended without a final response"
    return record, "".join(pieces)


async def _run_conversations(url: str, conversations: list[Conversation], max_tokens: int, temperature: float,
                             ignore_eos: bool, model: str, timeout_s: float) -> ConversationsResult:
    from tritonclient.grpc import aio as grpcaio

    from llava_triton.client import build_inputs

    connections = [grpcaio.InferenceServerClient(url) for _ in conversations]
    records = [ConversationRecord() for _ in conversations]

    async def converse(connection, conversation, record: ConversationRecord) -> None:
        for _ in range(conversation.turns):
            inputs = build_inputs(None, [conversation.image], messages=conversation.messages(record.answers),
                                  max_tokens=max_tokens, temperature=temperature, stream=True, ignore_eos=ignore_eos)
            turn, answer = await _request_aio_text(connection, inputs, model, timeout_s)
            record.turns.append(turn)
            if turn.error is not None:
                break
            record.answers.append(answer)
        while len(record.turns) < conversation.turns:  # counted as failed: a turn needs the answer before it
            now = time.perf_counter()
            record.turns.append(RequestRecord(start=now, end=now, error="not sent: an earlier turn failed"))

    try:
        await asyncio.gather(*(connection.is_server_live() for connection in connections))  # connect first
        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(converse(*args) for args in zip(connections, conversations, records)))
        ended, cpu = time.perf_counter(), time.process_time() - cpu
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))
    return ConversationsResult(records, started, ended, cpu)


def run_conversations(url: str, conversations: list[Conversation], *, max_tokens: int, temperature: float = 0.0,
                      ignore_eos: bool = True, model: str = spec.ENSEMBLE,
                      timeout_s: float = 600.0) -> ConversationsResult:
    """Run `conversations` (bench.workload.Conversation: an image and a question a turn) side by side, all
    started together, a gRPC channel each (asyncio, as the "aio" generator): each sends its first turn,
    reads the streamed answer to the end, then sends the next turn with the whole history (the
    `messages` input, the image in the first user turn) and so on. A failed turn ends its conversation;
    the turns not sent are recorded as failed."""
    if not conversations or max_tokens < 1:
        raise ValueError(f"need conversations and a positive max_tokens, got {len(conversations)}, {max_tokens}")
    return asyncio.run(_run_conversations(url, conversations, max_tokens, temperature, ignore_eos, model, timeout_s))
