"""The OpenAI-compatible HTTP frontend: `POST /v1/chat/completions` and friends, forwarded to Triton's `llava`
ensemble over gRPC streaming.

    python -m llava_triton.openai_frontend --triton-url localhost:8001 --port 9000 \\
        --model-repository model_repository

The launcher (`python -m llava_triton.server --openai-port 9000`) starts it beside tritonserver. Routes:
`POST /v1/chat/completions` (streamed as server-sent events with `stream: true`), `GET /v1/models`,
`GET /health/live` and `GET /health/ready` (ready while Triton's ensemble is). The protocol itself (checks,
bodies, error mapping) is llava_triton.openai_protocol; this module is the HTTP and gRPC adapter:

- one gRPC channel (a `tritonclient.grpc.aio` client) for every request, one stream per request;
- the body is read with a byte count and refused (413) past `max_body_bytes` before it is parsed;
- the first response of the ensemble is awaited before the HTTP status is sent, so a request that
  preprocess refuses gets a 400, not a stream that starts and then fails;
- a client that disconnects cancels its gRPC stream (and says so in the log): Triton drops a request that
  has not reached the language model yet; one that has keeps its slot until max_tokens, because Triton
  2.51 does not pass a cancellation into a running ensemble step (docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from llava_triton import deploy, spec
from llava_triton.client import build_inputs, first_int, first_str
from llava_triton.frontend_process import add_frontend_arguments, config_from_args
from llava_triton.openai_protocol import (
    SSE_DONE,
    ChatCall,
    ImageSource,
    OpenAIError,
    chunk_body,
    completion_body,
    invalid,
    load_json,
    parse_chat_request,
    sse,
    triton_error,
    usage,
)
from llava_triton.spec import FrontendConfig, ServingConfig

READY_TIMEOUT_S = 2.0  # a readiness probe's gRPC call
log = logging.getLogger("llava_triton.openai_frontend")


# --- Triton -------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """One response of the ensemble: the new text and the counts so far."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Triton:
    """The `llava` ensemble over one gRPC channel: a stream per request, cancelled when left early."""

    def __init__(self, url: str, model: str = spec.ENSEMBLE):
        from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
        from tritonclient.grpc import aio as grpcaio

        self.url, self.model = url, model
        keepalive = KeepAliveOptions()
        self.client = grpcaio.InferenceServerClient(url, channel_args=[
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            # tritonclient's defaults above, and: reconnect within a second once Triton is back (started
            # after us, or restarted by the launcher), where gRPC's backoff grows to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])

    async def is_ready(self) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self.client.is_model_ready(self.model, client_timeout=READY_TIMEOUT_S))
        except InferenceServerException:
            return False

    async def generate(self, call: ChatCall, images: list[bytes]) -> AsyncIterator[Piece]:
        """The ensemble's responses to one request; raises OpenAIError when it fails. Leaving the iteration
        before the end (the client went away) cancels the request in Triton."""
        import grpc
        from tritonclient.utils import InferenceServerException

        request = {"model_name": self.model, "request_id": call.request_id,
                   "inputs": build_inputs(None, images, messages=json.dumps(call.messages, ensure_ascii=False),
                                          videos=[source.data for source in call.videos], **call.options),
                   "parameters": {"triton_enable_empty_final_response": True}}

        async def one_request():
            yield request

        responses = self.client.stream_infer(one_request())
        finished = False
        failure: OpenAIError | None = None
        try:
            # Read to the end of the call: the server closes it after the final response (an error is one).
            # Cancelling it after an error response would leak the call's state in Triton 2.51's gRPC
            # frontend (docs/operations.md, "Soak"), so only a caller that leaves early cancels.
            async for result, error in responses:
                if error is not None:
                    message = error.message() if hasattr(error, "message") else str(error)
                    failure = failure or triton_error(message, call.images, call.videos)
                    continue
                text = result.as_numpy(spec.OUT_TEXT)
                if text is not None:
                    yield Piece(first_str(text), first_int(result.as_numpy(spec.OUT_PROMPT_TOKENS)),
                                first_int(result.as_numpy(spec.OUT_COMPLETION_TOKENS)),
                                first_str(result.as_numpy(spec.OUT_FINISH_REASON)))
            finished = True
        except (InferenceServerException, grpc.RpcError) as error:  # the call failed: Triton down or restarting
            finished = True
            details = error.message() if isinstance(error, InferenceServerException) else \
                f"{error.code().name}: {error.details()}"
            raise OpenAIError(503, f"the inference server at {self.url} is unavailable ({details})",
                              code="triton_unavailable") from None
        finally:
            if not finished:
                # Triton drops the request if it has not reached the language model yet; a running one keeps
                # its slot until max_tokens (Triton 2.51 does not pass a cancellation into an ensemble step).
                responses.cancel()
                log.info("%s: the client went away; its gRPC stream is cancelled", call.request_id)
        if failure is not None:
            raise failure

    async def close(self) -> None:
        await self.client.close()


# --- images by URL --------------------------------------------------------------------------------------


class ImageFetcher:
    """http(s) image URLs, fetched only when the operator turned it on, within limits on bytes (the served
    max_image_bytes), time (the whole fetch, redirects included) and redirects. Without
    fetch_private_addresses, a host that resolves to a loopback, private or link-local address is
    refused (at each redirect too); the check and the connection resolve the name separately, so a name
    whose answer changes in between is not caught: keep a network policy on egress as well."""

    def __init__(self, config: FrontendConfig, serving: ServingConfig):
        self.config, self.serving = config, serving
        self.client = httpx.AsyncClient(follow_redirects=False, timeout=config.fetch_timeout_s) \
            if config.fetch_image_urls else None

    async def fetch(self, source: ImageSource) -> bytes:
        if self.client is None:
            raise invalid(f"{source.where}: this server does not fetch image URLs (send the image as a "
                          "data:image/...;base64, URL, or start the frontend with --fetch-image-urls)", "messages",
                          "image_url_fetching_disabled")
        try:
            async with asyncio.timeout(self.config.fetch_timeout_s):
                return await self._fetch(source)
        except TimeoutError:
            raise invalid(f"{source.where}: fetching the image took more than {self.config.fetch_timeout_s:g} s "
                          "(fetch_timeout_s)", "messages") from None
        except httpx.HTTPError as error:
            raise invalid(f"{source.where}: fetching the image failed ({type(error).__name__}: {error})",
                          "messages") from None

    async def _fetch(self, source: ImageSource) -> bytes:
        url = source.url
        for _ in range(self.config.fetch_max_redirects + 1):
            await self._check_host(source, url)
            async with self.client.stream("GET", url) as response:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    url = urllib.parse.urljoin(url, location)
                    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                        raise invalid(f"{source.where}: redirected to a URL that is not http(s)", "messages")
                    continue
                if response.status_code != 200:
                    raise invalid(f"{source.where}: fetching the image gave HTTP {response.status_code}",
                                  "messages")
                data = bytearray()
                async for piece in response.aiter_bytes():
                    data += piece
                    if len(data) > self.serving.max_image_bytes:
                        raise invalid(f"{source.where}: the image is more than the limit of "
                                      f"{self.serving.max_image_bytes} bytes (max_image_bytes)", "messages")
                return bytes(data)
        raise invalid(f"{source.where}: more than {self.config.fetch_max_redirects} redirects "
                      "(fetch_max_redirects)", "messages")

    async def _check_host(self, source: ImageSource, url: str) -> None:
        if self.config.fetch_private_addresses:
            return
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise invalid(f"{source.where}: cannot resolve {host!r} ({error.strerror})", "messages") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if not address.is_global:
                raise invalid(f"{source.where}: {host!r} is a non-public address ({address}); this server fetches "
                              "only from public addresses (fetch_private_addresses)", "messages")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


# --- HTTP ---------------------------------------------------------------------------------------------


def error_response(error: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is past `limit` bytes: by its Content-Length header
    when it has one, else while it is read."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise invalid(f"Content-Length {length[:20]!r} is not a number")
        if int(length) > limit:
            raise OpenAIError(413, f"the request body is {int(length)} bytes, more than the limit of {limit} bytes "
                              "(max_body_bytes)", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise OpenAIError(413, f"the request body is more than the limit of {limit} bytes (max_body_bytes)",
                              code="request_too_large")
    return bytes(body)


class Generation(Response):
    """A response that runs `produce(send)` until it ends or the client disconnects; a disconnect cancels
    it (and with it the gRPC stream). It sends its own status and headers."""

    def __init__(self, produce: Callable[[Send], Awaitable[None]]):
        self.produce = produce
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producing = asyncio.ensure_future(self.produce(send))
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((producing, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (producing, watching):
                task.cancel()
            await asyncio.gather(producing, watching, return_exceptions=True)
        if producing.done() and not producing.cancelled() and producing.exception() is not None:
            raise producing.exception()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_error(send: Send, error: OpenAIError) -> None:
    await _send_json(send, error.status, error.body(), {"Retry-After": "1"} if error.status == 503 else None)


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


async def _answer(send: Send, call: ChatCall, pieces: AsyncIterator[Piece]) -> None:
    """One whole chat.completion."""
    texts, last = [], None
    async for piece in pieces:
        texts.append(piece.text)
        last = piece
    if last is None:
        raise OpenAIError(500, "the model finished without sending any output")
    await _send_json(send, 200, completion_body(call, "".join(texts), last.finish_reason, last.prompt_tokens,
                                                 last.completion_tokens))


async def _stream(send: Send, call: ChatCall, pieces: AsyncIterator[Piece]) -> None:
    """chat.completion.chunk events; the status is sent with the first token, so an error before it is an
    HTTP error, and one after it an error event."""
    started = False
    last: Piece | None = None
    try:
        async for piece in pieces:
            so_far = usage(piece.prompt_tokens, piece.completion_tokens) if call.continuous_usage else None
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                started = True
                delta = {"role": "assistant", "content": piece.text}
            elif piece.text or piece.finish_reason:
                delta = {"content": piece.text}
            else:
                last = piece
                continue  # a token that ends inside a character: its text comes with the next
            await send({"type": "http.response.body", "body": sse(chunk_body(call, delta, piece.finish_reason,
                                                                             so_far)), "more_body": True})
            last = piece
    except OpenAIError as error:
        if not started:
            raise
        await send({"type": "http.response.body", "body": sse(error.body()), "more_body": True})
        await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})
        return
    if not started:
        raise OpenAIError(500, "the model finished without sending any output")
    tail = b""
    if call.include_usage and last is not None:
        tail += sse(chunk_body(call, None, usage_so_far=usage(last.prompt_tokens, last.completion_tokens)))
    await send({"type": "http.response.body", "body": tail + SSE_DONE, "more_body": False})


def create_app(triton_url: str, config: FrontendConfig, serving: ServingConfig) -> FastAPI:
    """The FastAPI application; its one Triton connection is made when it starts (in its event loop)."""
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["triton"], state["fetcher"] = Triton(triton_url), ImageFetcher(config, serving)
        try:
            yield
        finally:
            await state["fetcher"].close()
            await state["triton"].close()

    app = FastAPI(title="llava-triton OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    started = int(time.time())
    model_card = {"id": config.served_model_name, "object": "model", "created": started, "owned_by": "llava-triton"}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(OpenAIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}"))

    @app.get(deploy.OPENAI_LIVE_PATH)
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get(deploy.OPENAI_READY_PATH)
    async def ready() -> JSONResponse:
        triton: Triton = state["triton"]
        if await triton.is_ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": f"the {triton.model} model is not ready in the inference server at "
                                       f"{triton.url}"}, status_code=503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != config.served_model_name:
            return error_response(OpenAIError(404, f"the model {model_id!r} does not exist; this server serves "
                                                   f"{config.served_model_name!r}", "model", "model_not_found"))
        return JSONResponse(model_card)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = load_json(await read_body(request, config.max_body_bytes), config)
            call = parse_chat_request(body, serving)
            if call.model != config.served_model_name:
                raise OpenAIError(404, f"the model {call.model!r} does not exist; this server serves "
                                       f"{config.served_model_name!r}", "model", "model_not_found")
            images = [source.data if source.url is None else await state["fetcher"].fetch(source)
                      for source in call.images]
        except OpenAIError as error:
            return error_response(error)

        async def produce(send: Send) -> None:
            pieces = state["triton"].generate(call, images)
            try:
                await (_stream if call.stream else _answer)(send, call, pieces)
            except OpenAIError as error:
                await _send_error(send, error)
            finally:
                await pieces.aclose()  # cancels the gRPC stream if it has not ended

        return Generation(produce)

    return app


# --- command line -------------------------------------------------------------------------------------


def serving_config(model_repository: Path | None) -> ServingConfig:
    """The served repository's serving options (its limits), or the defaults without one (or when it has no
    exported preprocess model: the server refuses what is past its own limits anyway)."""
    directory = None if model_repository is None else Path(model_repository) / spec.PREPROCESS / "1"
    if directory is None or not (directory / spec.SPEC_FILE).is_file():
        if directory is not None:
            print(f"note: {directory / spec.SPEC_FILE} not found; checking requests against the default limits",
                  file=sys.stderr, flush=True)
        return ServingConfig()
    return spec.read_spec(directory)[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava_triton.openai_frontend", description=__doc__.split("\n")[0])
    parser.add_argument("--triton-url", default=f"localhost:{deploy.GRPC_PORT}",
                        help="Triton's gRPC address (default %(default)s)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=deploy.OPENAI_PORT, help="port to listen on (default %(default)s)")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="the served model repository, to check its image limits before sending (default: the "
                             "serving defaults; the server checks them anyway)")
    add_frontend_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    try:
        config = config_from_args(args)
        serving = serving_config(args.model_repository)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    app = create_app(args.triton_url, config, serving)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    print(f"OpenAI-compatible API on http://{args.host}:{args.port}/v1 (model {config.served_model_name!r}), "
          f"forwarding to Triton at {args.triton_url}", file=sys.stderr, flush=True)
    # uvloop (pinned, so "auto" picks it; asyncio's loop where it is missing) and httptools: the fastest
    # event loop and HTTP parser uvicorn has; no access log per request.
    uvicorn.run(app, host=args.host, port=args.port, loop="auto", http="httptools", access_log=False,
                log_level="warning", timeout_graceful_shutdown=deploy.EXIT_TIMEOUT_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())

