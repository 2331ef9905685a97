"""A gRPC client for the `llava` ensemble: `LlavaClient`, its tensors and its command line.

The ensemble streams (its language model is decoupled), so every call goes through Triton's
gRPC streaming API, one stream per call. Tensors and flags are built from the contract in
`llava_triton.spec` (INPUTS): only the inputs the caller sets are sent, and the server fills in
the others with its defaults, so that client and server never disagree on one. The one choice
made here: `LlavaClient.stream` asks for streaming (STREAMING) unless told otherwise, since
that is what it is for; `generate` and `build_inputs` leave `stream` to the server (false).

    client = LlavaClient("localhost:8001")
    for chunk in client.stream("<image>\\nWhat is in the picture?", ["cat.jpg"]):
        print(chunk.text, end="", flush=True)

A whole conversation goes as `messages` instead of a prompt (the turns as the `messages` input takes
them, a list that is sent as JSON; each `{"type": "image"}` part is the next of `images`):

    question = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    client.generate(messages=[{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": question}], images=["cat.jpg"])

`python -m client` is the command line (`main` here); `client/` re-exports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from llava_triton import deploy, spec

DEFAULT_URL = f"localhost:{deploy.GRPC_PORT}"
# What LlavaClient.stream (and so `python -m client`) sends unless the caller says otherwise.
STREAMING = {spec.IN_STREAM: True}
# How long to wait for the next response when the caller gave no timeout. Generous: a cold
# server compiles and warms up on the first request.
_DEFAULT_RESPONSE_WAIT_S = 600.0
# The inputs given as keyword options (prompt and images have parameters of their own): messages and
# the sampling inputs.
OPTIONS = tuple(t.name for t in spec.INPUTS if t.name not in (spec.IN_PROMPT, spec.IN_IMAGES))

ImageLike = bytes | bytearray | memoryview | str | os.PathLike
_ONE_VALUE = (bytes, bytearray, memoryview, str, os.PathLike)  # one image or stop string, not a sequence of them


class LlavaError(RuntimeError):
    """The server refused or failed the request; `message` is the server's message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class Chunk:
    """One streamed response: the text delta and the ids it carries."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # generated so far
    finish_reason: str  # "" until the last response, then "stop" or "length"


@dataclass
class Completion:
    """A whole answer (the chunks joined)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""


def _read_file(item: ImageLike) -> bytes:
    """An image's or a video's encoded bytes, given as bytes or as a path to the file."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    return Path(item).read_bytes()


def _element(name: str, value: Any) -> Any:
    if name in (spec.IN_IMAGES, spec.IN_VIDEOS):
        return _read_file(value)
    if name == spec.IN_MESSAGES and not isinstance(value, (str, bytes)):
        value = json.dumps(value, ensure_ascii=False)  # the turns as a list: sent as their JSON
    return value.encode("utf-8") if isinstance(value, str) else value


def input_arrays(prompt: str | None, images: Sequence[ImageLike] | ImageLike = (),
                 **options: Any) -> dict[str, np.ndarray]:
    """The request's tensors by input name, in the datatypes and shapes of spec.INPUTS.

    `images` are encoded image bytes or paths to image files; `options` are the other inputs by
    name (max_tokens=64, stop=["###"], ...; messages=[...] in place of a prompt, a list of turns or
    their JSON; videos=[...], encoded video bytes or paths, with num_frames= or fps=). Unset ones (None,
    or an empty list) are left out, so the server's defaults apply.
    """
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; expected {sorted(OPTIONS)}")
    if (prompt is None) == (options.get(spec.IN_MESSAGES) is None):
        raise ValueError(f"give either a prompt or {spec.IN_MESSAGES}=, exactly one of them")
    values = {spec.IN_PROMPT: prompt, spec.IN_IMAGES: images, **options}
    arrays = {}
    for tensor in spec.INPUTS:
        value = values.get(tensor.name)
        if value is None:
            continue
        if tensor.repeated:
            value = [value] if isinstance(value, _ONE_VALUE) else list(value)
            if not value:
                continue
        else:
            value = [value]
        dtype = spec.NUMPY_DTYPES[tensor.datatype]
        arrays[tensor.name] = np.array([_element(tensor.name, v) for v in value], dtype=dtype)
    return arrays


def build_inputs(prompt: str | None, images: Sequence[ImageLike] | ImageLike = (),
                 **options: Any) -> list[grpcclient.InferInput]:
    """The ensemble's input tensors for tritonclient (see `input_arrays`); unset ones left out."""
    inputs = []
    for name, array in input_arrays(prompt, images, **options).items():
        tensor = grpcclient.InferInput(name, list(array.shape), spec.INPUTS_BY_NAME[name].datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


# --- command-line flags, one per input ---------------------------------------------------------------

def _flag(tensor: spec.Tensor) -> str:
    # A repeated input takes one value per flag, named in the singular: --image for images.
    name = tensor.name[:-1] if tensor.repeated and tensor.name.endswith("s") else tensor.name
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _default_help(tensor: spec.Tensor, defaults: Mapping[str, Any]) -> str:
    if tensor.name in defaults:
        return f"default {_shown(defaults[tensor.name])}"
    if tensor.serving_default:
        default = getattr(spec.ServingConfig(), tensor.serving_default)
        return f"left out: the server's {tensor.serving_default}, {_shown(default)} by default"
    if tensor.default in (None, ()):
        return ""
    return f"left out: {_shown(tensor.default)}"


def add_input_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] = {}) -> None:
    """A flag for each input of spec.INPUTS (--prompt, --image, --max-tokens, ..., --stream/--no-stream),
    its help from the input's meaning. A flag left out leaves its input to the server's default, or to
    `defaults`, which names what the caller sends instead (the help text says it). --prompt and
    --messages (inputs sent instead of each other) are a required pair: exactly one is given."""
    pairs: dict[frozenset[str], argparse._MutuallyExclusiveGroup] = {}
    for tensor in spec.INPUTS:
        notes = [note for note in ("repeatable" if tensor.repeated else "", _default_help(tensor, defaults)) if note]
        help_text = tensor.meaning.replace("`", "") + (f" ({'; '.join(notes)})" if notes else "")
        options: dict[str, Any] = {"dest": tensor.name, "help": help_text.replace("%", "%%")}
        if tensor.name in (spec.IN_IMAGES, spec.IN_VIDEOS):
            options.update(action="append", default=[], type=Path, metavar="FILE")
        elif tensor.repeated:
            options.update(action="append", default=[])
        elif tensor.datatype == "BOOL":
            options.update(action=argparse.BooleanOptionalAction, default=None)
        elif tensor.datatype != "BYTES":
            options.update(type=float if tensor.datatype == "FP32" else int)
        if tensor.instead_of:
            pair = frozenset((tensor.name, tensor.instead_of))
            if pair not in pairs:
                pairs[pair] = parser.add_mutually_exclusive_group(required=True)
            pairs[pair].add_argument(_flag(tensor), **options)
        else:
            parser.add_argument(_flag(tensor), required=tensor.required, **options)


def request_from_args(parser: argparse.ArgumentParser,
                      args: argparse.Namespace) -> tuple[str | None, list[Path], dict]:
    """The prompt (None with --messages), the image files and the options set on the command line
    (add_input_arguments' flags); a missing image file is a usage error (exit status 2)."""
    for image in getattr(args, spec.IN_IMAGES):
        if not image.is_file():
            parser.error(f"image file not found: {image}")
    for video in getattr(args, spec.IN_VIDEOS):
        if not video.is_file():
            parser.error(f"video file not found: {video}")
    options = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) not in (None, [])}
    return getattr(args, spec.IN_PROMPT), getattr(args, spec.IN_IMAGES), options


# --- the client --------------------------------------------------------------------------------------

def first_str(array: np.ndarray | None) -> str:
    """The first string of a response's BYTES output ("" when absent)."""
    if array is None or array.size == 0:
        return ""
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def first_int(array: np.ndarray | None) -> int:
    """The first value of a response's integer output (0 when absent)."""
    return 0 if array is None or array.size == 0 else int(array.reshape(-1)[0])


def _chunk(result: grpcclient.InferResult) -> Chunk | None:
    """The chunk a response carries, None for the empty final response."""
    text = result.as_numpy(spec.OUT_TEXT)
    if text is None:
        return None
    token_ids = result.as_numpy(spec.OUT_TOKEN_IDS)
    return Chunk(text=first_str(text),
                 token_ids=[] if token_ids is None else [int(t) for t in token_ids.reshape(-1)],
                 prompt_tokens=first_int(result.as_numpy(spec.OUT_PROMPT_TOKENS)),
                 completion_tokens=first_int(result.as_numpy(spec.OUT_COMPLETION_TOKENS)),
                 finish_reason=first_str(result.as_numpy(spec.OUT_FINISH_REASON)))


def _is_final(result: grpcclient.InferResult) -> bool:
    parameter = result.get_response().parameters.get("triton_final_response")
    return parameter is not None and parameter.bool_param


def _error_message(error: InferenceServerException) -> str:
    return error.message() if hasattr(error, "message") else str(error)


class LlavaClient:
    """Thread-safe: each call streams on a connection of its own, taken from a pool."""

    def __init__(self, url: str = DEFAULT_URL, model: str = spec.ENSEMBLE, *, verbose: bool = False):
        self.url = url
        self.model = model
        self.verbose = verbose
        # A tritonclient InferenceServerClient holds at most one stream, so concurrent calls
        # each take an idle one (its channel stays connected) or make a new one.
        self._idle: queue.SimpleQueue[grpcclient.InferenceServerClient] = queue.SimpleQueue()
        self._all: list[grpcclient.InferenceServerClient] = []
        self._lock = threading.Lock()
        self._closed = False

    def _acquire(self) -> grpcclient.InferenceServerClient:
        if self._closed:
            raise RuntimeError("LlavaClient is closed")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            connection = grpcclient.InferenceServerClient(self.url, verbose=self.verbose)
            with self._lock:
                self._all.append(connection)
            return connection

    def stream(self, prompt: str | None = None, images: Sequence[ImageLike] | ImageLike = (), *,
               timeout: float | None = None, **options: Any) -> Iterator[Chunk]:
        """Yield the answer chunk by chunk, as the server generates it (`stream` is true unless the
        caller says otherwise). Closing the iterator early cancels the request.

        `images` are encoded image bytes or paths to image files; `options` are the other inputs by
        name (spec.INPUTS: messages in place of the prompt, max_tokens, temperature, top_p, top_k, seed,
        stop, stream, ignore_eos), and unset ones get the server's defaults. `timeout` (seconds) bounds
        the whole call. Raises LlavaError with the server's message when the request fails.
        """
        return self._stream(build_inputs(prompt, images, **{**STREAMING, **options}), timeout)

    def _stream(self, inputs: list[grpcclient.InferInput], timeout: float | None) -> Iterator[Chunk]:
        responses: queue.Queue = queue.Queue()
        connection = self._acquire()
        finished = False
        try:
            connection.start_stream(callback=lambda result, error: responses.put((result, error)),
                                    stream_timeout=timeout)
            connection.async_stream_infer(self.model, inputs, request_id=uuid.uuid4().hex,
                                          enable_empty_final_response=True)
            wait = _DEFAULT_RESPONSE_WAIT_S if timeout is None else timeout + 5.0
            while not finished:
                try:
                    result, error = responses.get(timeout=wait)
                except queue.Empty:
                    raise LlavaError(f"no response from {self.url} within {wait:.0f} s") from None
                if error is not None:
                    # An error response (no gRPC status: the call itself is fine) ends the request (our
                    # models send an error as its final response): let the server end the call too.
                    # Cancelling it now would leak the call's state, with the request's bytes, in
                    # Triton 2.51's gRPC frontend (docs/operations.md, "Soak").
                    finished = error.status() is None
                    raise LlavaError(_error_message(error))
                finished = _is_final(result)
                chunk = _chunk(result)
                if chunk is not None:
                    yield chunk
        except InferenceServerException as error:
            raise LlavaError(_error_message(error)) from error
        finally:
            # Unfinished (closed early, timeout, no answer): cancel the request on the server too.
            connection.stop_stream(cancel_requests=not finished)
            self._idle.put(connection)

    def generate(self, prompt: str | None = None, images: Sequence[ImageLike] | ImageLike = (), *,
                 timeout: float | None = None, **options: Any) -> Completion:
        """The whole answer. Options as for `stream`, but all left to the server when unset, `stream`
        too (false: one response); with stream=True the streamed chunks are joined."""
        completion = Completion(text="")
        texts: list[str] = []
        received = False
        for chunk in self._stream(build_inputs(prompt, images, **options), timeout):
            received = True
            texts.append(chunk.text)
            completion.token_ids.extend(chunk.token_ids)
            completion.prompt_tokens = chunk.prompt_tokens
            completion.completion_tokens = chunk.completion_tokens
            completion.finish_reason = chunk.finish_reason or completion.finish_reason
        if not received:
            raise LlavaError(f"{self.model} finished without sending any output")
        completion.text = "".join(texts)
        return completion

    def is_ready(self) -> bool:
        """Whether the server is up and the model ready."""
        connection = self._acquire()
        try:
            return connection.is_server_ready() and connection.is_model_ready(self.model)
        except InferenceServerException:
            return False
        finally:
            self._idle.put(connection)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connections, self._all = self._all, []
        for connection in connections:
            connection.close()

    def __enter__(self) -> LlavaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- python -m client ----------------------------------------------------------------------------------

CLI_DOC = """Ask the served model about images from the command line; tokens print as they arrive.

    python -m client --image cat.jpg --prompt "<image>\\nWhat is in the picture?" --url localhost:8001

Every input of the `llava` ensemble has a flag; those left out get the server's defaults, except
--stream, which is on (LlavaClient.stream asks for streaming): --no-stream prints the answer at
once. Exit status: 0 on success, 1 when the server refuses or fails the request (its message on
stderr), 2 on a bad argument.
"""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str, list[Path], dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m client", description=CLI_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, defaults=STREAMING)
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's gRPC address (default %(default)s)")
    parser.add_argument("--model", default=spec.ENSEMBLE, help="the model to call (default %(default)s)")
    parser.add_argument("--timeout", type=float, help="seconds the whole request may take")
    args = parser.parse_args(argv)
    return (args, *request_from_args(parser, args))


def main(argv: list[str] | None = None) -> int:
    """`python -m client`: stream one answer to stdout, a summary to stderr; the exit status as CLI_DOC says."""
    args, prompt, images, options = parse_args(argv)
    start = time.perf_counter()
    first_token_s = None
    completion = None
    with LlavaClient(args.url, args.model) as client:
        try:
            for chunk in client.stream(prompt, images, timeout=args.timeout, **options):
                if first_token_s is None:
                    first_token_s = time.perf_counter() - start
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                completion = chunk
        except LlavaError as error:
            sys.stdout.write("\n" if completion is not None else "")
            print(f"error: {error.message}", file=sys.stderr)
            return 1
    total_s = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    if completion is None:
        print("error: the server sent no output", file=sys.stderr)
        return 1
    generated = completion.completion_tokens
    rate = f", {generated / total_s:.1f} tokens/s" if total_s > 0 else ""
    print(f"prompt_tokens={completion.prompt_tokens} completion_tokens={generated} "
          f"finish_reason={completion.finish_reason or '?'} time_to_first_token={first_token_s:.3f}s "
          f"total={total_s:.3f}s{rate}", file=sys.stderr)
    return 0
