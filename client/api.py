"""A small gRPC client for the `llava` ensemble.

The ensemble streams (its language model is decoupled), so every call goes through Triton's
gRPC streaming API, one stream per call. Only the inputs the caller sets are sent; the server
fills in the others from its ServingConfig defaults.

    client = LlavaClient("localhost:8001")
    for chunk in client.stream("<image>\\nWhat is in the picture?", ["cat.jpg"]):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from llava_triton import spec
from llava_triton.server import DEFAULT_GRPC_PORT

DEFAULT_URL = f"localhost:{DEFAULT_GRPC_PORT}"
OUTPUTS = (spec.OUT_TEXT, spec.OUT_TOKEN_IDS, spec.OUT_PROMPT_TOKENS, spec.OUT_COMPLETION_TOKENS,
           spec.OUT_FINISH_REASON)
# How long to wait for the next response when the caller gave no timeout. Generous: a cold
# server compiles and warms up on the first request.
_DEFAULT_RESPONSE_WAIT_S = 600.0

ImageLike = bytes | bytearray | memoryview | str | os.PathLike


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


def _read_image(image: ImageLike) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


def _tensor(name: str, value: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


# Datatypes of the optional scalar inputs, as in llava_triton.spec (each is shape [1]).
SCALAR_DATATYPES = {spec.IN_MAX_TOKENS: "INT32", spec.IN_TEMPERATURE: "FP32", spec.IN_TOP_P: "FP32",
                    spec.IN_TOP_K: "INT32", spec.IN_SEED: "INT64", spec.IN_STREAM: "BOOL",
                    spec.IN_IGNORE_EOS: "BOOL"}
_NUMPY_DTYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


def build_inputs(prompt: str, images: Sequence[ImageLike] = (), *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: Sequence[str] | str = (), stream: bool = True,
                 ignore_eos: bool | None = None) -> list[grpcclient.InferInput]:
    """The ensemble's input tensors (shapes and dtypes as in llava_triton.spec); unset ones left out."""
    if isinstance(stop, str):  # one stop string, not its characters
        stop = [stop]
    if isinstance(images, (bytes, bytearray, memoryview, str, os.PathLike)):  # one image, not its bytes
        images = [images]
    inputs = [_tensor(spec.IN_PROMPT, np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES")]
    if images:
        inputs.append(_tensor(spec.IN_IMAGES, np.array([_read_image(i) for i in images], dtype=np.object_),
                              "BYTES"))
    scalars = {spec.IN_MAX_TOKENS: max_tokens, spec.IN_TEMPERATURE: temperature, spec.IN_TOP_P: top_p,
               spec.IN_TOP_K: top_k, spec.IN_SEED: seed, spec.IN_STREAM: stream, spec.IN_IGNORE_EOS: ignore_eos}
    for name, value in scalars.items():
        if value is not None:
            datatype = SCALAR_DATATYPES[name]
            inputs.append(_tensor(name, np.array([value], dtype=_NUMPY_DTYPES[datatype]), datatype))
    if stop:
        inputs.append(_tensor(spec.IN_STOP, np.array([s.encode("utf-8") for s in stop], dtype=np.object_),
                              "BYTES"))
    return inputs


def _first_str(array: np.ndarray | None) -> str:
    if array is None or array.size == 0:
        return ""
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _first_int(array: np.ndarray | None) -> int:
    return 0 if array is None or array.size == 0 else int(array.reshape(-1)[0])


def _chunk(result: grpcclient.InferResult) -> Chunk | None:
    """The chunk a response carries, None for the empty final response."""
    text = result.as_numpy(spec.OUT_TEXT)
    if text is None:
        return None
    token_ids = result.as_numpy(spec.OUT_TOKEN_IDS)
    return Chunk(text=_first_str(text),
                 token_ids=[] if token_ids is None else [int(t) for t in token_ids.reshape(-1)],
                 prompt_tokens=_first_int(result.as_numpy(spec.OUT_PROMPT_TOKENS)),
                 completion_tokens=_first_int(result.as_numpy(spec.OUT_COMPLETION_TOKENS)),
                 finish_reason=_first_str(result.as_numpy(spec.OUT_FINISH_REASON)))


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

    def stream(self, prompt: str, images: Sequence[ImageLike] = (), *, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               seed: int | None = None, stop: Sequence[str] | str = (), stream: bool = True,
               ignore_eos: bool | None = None, timeout: float | None = None) -> Iterator[Chunk]:
        """Yield the answer chunk by chunk. Closing the iterator early cancels the request.

        `images` are encoded image bytes or paths to image files. `timeout` (seconds) bounds the
        whole call. Raises LlavaError with the server's message when the request fails.
        """
        inputs = build_inputs(prompt, images, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, stop=stop, stream=stream, ignore_eos=ignore_eos)
        return self._stream(inputs, timeout)

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
                    # Triton 2.51's gRPC frontend (README, "Soak").
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

    def generate(self, prompt: str, images: Sequence[ImageLike] = (), *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: Sequence[str] | str = (), stream: bool = True,
                 ignore_eos: bool | None = None, timeout: float | None = None) -> Completion:
        """The whole answer, the streamed chunks joined."""
        completion = Completion(text="")
        texts: list[str] = []
        received = False
        for chunk in self.stream(prompt, images, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, seed=seed, stop=stop, stream=stream, ignore_eos=ignore_eos,
                                 timeout=timeout):
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

    def __enter__(self) -> "LlavaClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
