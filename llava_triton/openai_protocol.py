"""OpenAI's chat-completions protocol as the frontend speaks it: requests checked and turned into the `llava`
ensemble's inputs, responses and chunks built, errors in OpenAI's error format.

Plain code without a server or an event loop (llava_triton.openai_frontend is the HTTP adapter):

- `load_json` parses a request body within the JSON limits of `FrontendConfig`;
- `parse_chat_request` checks every field of a `POST /v1/chat/completions` body, naming the field
  (`messages[1].content[0].image_url.url`), and gives a `ChatCall`: the ensemble's `messages` input (the
  turns with each image part replaced by `{"type": "image"}`), the image sources in order, the sampling
  inputs, and how to answer (streamed, usage);
- `decode_data_url` turns a `data:image/...;base64,` URL into image bytes within `max_image_bytes`;
- `triton_error` maps a message from the ensemble to the HTTP status it deserves.

The ensemble's `messages` input keeps the request's turn and part indices, so a message that preprocess
sends back (`messages[1].role ...`) names the same place in the caller's request.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llava_triton import spec
from llava_triton.spec import FrontendConfig, ServingConfig

# OpenAI's error types (the `type` of an error body) by HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 500: "server_error", 503: "server_error"}

# Roles a request may use: OpenAI's `developer` is the newer name of `system`.
ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
INT64 = (-(2**63), 2**63 - 1)


class OpenAIError(Exception):
    """A refused or failed request: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, code)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- the body ------------------------------------------------------------------------------------------

# A JSON string (escapes included) or one bracket outside of strings.
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _containers_and_depth(body: bytes) -> tuple[int, int]:
    """Arrays and objects in a JSON text, and its deepest nesting, without parsing it (brackets inside
    strings do not count)."""
    containers = depth = deepest = 0
    for match in _STRUCTURE.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            containers += 1
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return containers, deepest


def _depth(value: Any) -> int:
    """The nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(body: bytes, config: FrontendConfig) -> Any:
    """A request body's JSON, refused (400) when it is not JSON or past the nesting and container limits.

    The containers are counted before parsing, so a body of a million empty arrays costs a count, not a
    million Python lists: brackets are counted with `bytes.count` (fast), and only when that count, which
    includes brackets inside strings, is past the limit are they counted exactly.
    """
    if body.count(b"[") + body.count(b"{") > config.max_json_containers:
        containers, deepest = _containers_and_depth(body)
        if containers > config.max_json_containers:
            raise invalid(f"the request body has {containers} JSON arrays and objects, more than the limit of "
                          f"{config.max_json_containers} (max_json_containers)")
        if deepest > config.max_json_depth:
            raise invalid(f"the request body's JSON is nested {deepest} deep, more than the limit of "
                          f"{config.max_json_depth} (max_json_depth)")
    try:
        value = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise invalid(f"the request body's JSON is nested deeper than the limit of {config.max_json_depth} "
                      "(max_json_depth)") from None
    except UnicodeDecodeError as err:
        raise invalid(f"the request body is not UTF-8 JSON (byte {err.start}: {err.reason})") from None
    except ValueError as err:  # json.JSONDecodeError, NaN or Infinity, an integer past Python's digit limit
        raise invalid(f"the request body is not valid JSON ({err})") from None
    deepest = _depth(value)
    if deepest > config.max_json_depth:
        raise invalid(f"the request body's JSON is nested {deepest} deep, more than the limit of "
                      f"{config.max_json_depth} (max_json_depth)")
    return value


# --- the request -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """One image (or video) of a request, in order: a data URL already decoded, or an http(s) URL to fetch
    (images only)."""

    where: str  # the field that holds it, for error messages: messages[0].content[1].image_url.url
    data: bytes | None = None
    url: str | None = None


@dataclass
class ChatCall:
    """What a chat request asks the ensemble, and how to answer."""

    model: str
    messages: list[dict[str, Any]]  # the ensemble's messages input: an image part is {"type": "image"}
    images: list[ImageSource]
    options: dict[str, Any]  # the ensemble's other inputs by name (spec.INPUTS), only those the request set
    videos: list[ImageSource] = field(default_factory=list)  # data URLs, decoded (LLaVA-NeXT-Video)
    stream: bool = False
    include_usage: bool = False  # streamed: a last chunk with the usage
    continuous_usage: bool = False  # streamed: the usage so far in every chunk
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number, got {_json_type(value)}", name)
    return float(value)


def _integer(name: str, value: Any, bounds: tuple[int, int] = INT64) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {_json_type(value)}", name)
    if not bounds[0] <= value <= bounds[1]:
        raise invalid(f"{name} must be in [{bounds[0]}, {bounds[1]}], got {value}", name)
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {_json_type(value)}", name)
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string, got {_json_type(value)}", name)
    return value


def _object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{name} must be an object, got {_json_type(value)}", name)
    return value


# Accepted and ignored: they change nothing in the answer.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
# Accepted only at the value that asks for nothing this server lacks.
UNSUPPORTED_FIELDS = {
    "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (),
}
SUPPORTED_FIELDS = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                    "temperature", "top_p", "seed", "stop", "n", spec.IN_TOP_K, spec.IN_IGNORE_EOS,
                    spec.IN_CACHE_SALT, spec.IN_NUM_FRAMES, spec.IN_FPS)


def parse_chat_request(body: Any, serving: ServingConfig) -> ChatCall:
    """A chat-completions request checked field by field (400 naming the field), as a ChatCall."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_json_type(body)}")
    known = (*SUPPORTED_FIELDS, *IGNORED_FIELDS, *UNSUPPORTED_FIELDS)
    unknown = [name for name in body if name not in known]
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r}: this server takes {', '.join(SUPPORTED_FIELDS)}", unknown[0])
    fields = {name: value for name, value in body.items() if value is not None}
    for name, allowed in UNSUPPORTED_FIELDS.items():
        if name in fields and fields[name] not in allowed:
            shown = json.dumps(fields[name])[:60]
            raise invalid(f"{name} {shown} is not supported by this server" + (
                f" (only {json.dumps(allowed[0])})" if allowed else ""), name, "unsupported_parameter")
    for name in ("model", "messages"):
        if name not in fields:
            raise invalid(f"{name} is required", name, "missing_required_parameter")
    model = _string("model", fields["model"])

    options: dict[str, Any] = {}
    if "n" in fields and _integer("n", fields["n"]) != 1:
        raise invalid(f"n must be 1 (one answer per request), got {fields['n']}", "n", "unsupported_parameter")
    max_tokens = {name: _integer(name, fields[name], (1, 2**31 - 1))
                  for name in ("max_completion_tokens", "max_tokens") if name in fields}
    if len(set(max_tokens.values())) > 1:
        raise invalid(f"max_tokens {max_tokens['max_tokens']} and max_completion_tokens "
                      f"{max_tokens['max_completion_tokens']} differ: send one of them", "max_tokens")
    if max_tokens:
        options[spec.IN_MAX_TOKENS] = next(iter(max_tokens.values()))
    for name in (spec.IN_TEMPERATURE, spec.IN_TOP_P):
        if name in fields:
            options[name] = _number(name, fields[name])
    if spec.IN_TOP_K in fields:
        options[spec.IN_TOP_K] = _integer(spec.IN_TOP_K, fields[spec.IN_TOP_K], (0, 2**31 - 1))
    if "seed" in fields:
        options[spec.IN_SEED] = _integer("seed", fields["seed"])
    if spec.IN_IGNORE_EOS in fields:
        options[spec.IN_IGNORE_EOS] = _boolean(spec.IN_IGNORE_EOS, fields[spec.IN_IGNORE_EOS])
    if spec.IN_CACHE_SALT in fields:  # as vLLM's: requests share cached prefixes only within one salt
        options[spec.IN_CACHE_SALT] = _string(spec.IN_CACHE_SALT, fields[spec.IN_CACHE_SALT])
    # The videos' sampling, as the ensemble's inputs (preprocess checks the ranges).
    if spec.IN_NUM_FRAMES in fields:
        options[spec.IN_NUM_FRAMES] = _integer(spec.IN_NUM_FRAMES, fields[spec.IN_NUM_FRAMES], (-2**31, 2**31 - 1))
    if spec.IN_FPS in fields:
        options[spec.IN_FPS] = _number(spec.IN_FPS, fields[spec.IN_FPS])
    if "stop" in fields:
        stop = fields["stop"]
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(item, str) for item in stops):
            raise invalid(f"stop must be a string or an array of strings, got {_json_type(stop)}", "stop")
        if stops:
            options[spec.IN_STOP] = stops
    stream = _boolean("stream", fields.get("stream", False))
    options[spec.IN_STREAM] = stream
    include_usage = continuous_usage = False
    if "stream_options" in fields:
        if not stream:
            raise invalid("stream_options is only allowed with stream true", "stream_options")
        stream_options = _object("stream_options", fields["stream_options"])
        extra = sorted(set(stream_options) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise invalid(f"stream_options has unknown fields {extra} (include_usage, continuous_usage_stats)",
                          "stream_options")
        include_usage = _boolean("stream_options.include_usage", stream_options.get("include_usage", False))
        continuous_usage = _boolean("stream_options.continuous_usage_stats",
                                    stream_options.get("continuous_usage_stats", False))
    messages, images, videos = _parse_messages(fields["messages"], serving)
    return ChatCall(model=model, messages=messages, images=images, options=options, stream=stream,
                    include_usage=include_usage, continuous_usage=continuous_usage, videos=videos)


def _parse_messages(value: Any, serving: ServingConfig
                    ) -> tuple[list[dict[str, Any]], list[ImageSource], list[ImageSource]]:
    """The ensemble's turns, the image sources and the video sources. Only the shapes are checked here;
    the ensemble's preprocess checks the rest (roles per part, texts, counts and limits) with the same
    indices."""
    if not isinstance(value, list):
        raise invalid(f"messages must be an array of messages, got {_json_type(value)}", "messages")
    if not value:
        raise invalid("messages must hold at least one message", "messages")
    if len(value) > serving.max_messages:
        raise invalid(f"messages has {len(value)} messages, more than the limit of {serving.max_messages} "
                      "(max_messages)", "messages")
    turns: list[dict[str, Any]] = []
    images: list[ImageSource] = []
    videos: list[ImageSource] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object, got {_json_type(message)}", "messages")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise invalid(f"{where} has unsupported fields {extra} (role, content, name)", "messages")
        role = message.get("role")
        if role not in ROLE_NAMES:
            shown = json.dumps(role)[:40] if isinstance(role, str) else _json_type(role)
            raise invalid(f"{where}.role {shown} is not one of {', '.join(ROLE_NAMES)}", "messages")
        if "name" in message and not isinstance(message["name"], str):
            raise invalid(f"{where}.name must be a string, got {_json_type(message['name'])}", "messages")
        content = message.get("content")
        if isinstance(content, str):
            turns.append({"role": ROLE_NAMES[role], "content": content})
            continue
        if not isinstance(content, list):
            raise invalid(f"{where}.content must be a string or an array of content parts, got "
                          f"{_json_type(content)}", "messages")
        parts = []
        for position, part in enumerate(content):
            part_where = f"{where}.content[{position}]"
            parts.append(_parse_part(part_where, part, images, videos, serving))
        turns.append({"role": ROLE_NAMES[role], "content": parts})
    return turns, images, videos


def _parse_video_part(where: str, part: dict[str, Any], videos: list[ImageSource],
                      serving: ServingConfig) -> dict[str, Any]:
    """vLLM's `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`."""
    extra = sorted(set(part) - {"type", "video_url"})
    if extra:
        raise invalid(f"{where} has unsupported fields {extra} (type, video_url)", "messages")
    video_url = part.get("video_url")
    if not isinstance(video_url, dict) or sorted(video_url) != ["url"]:
        raise invalid(f"{where}.video_url must be an object with a url alone, got {_json_type(video_url)}",
                      "messages")
    url_where = f"{where}.video_url.url"
    url = video_url["url"]
    if not isinstance(url, str):
        raise invalid(f"{url_where} must be a string, got {_json_type(url)}", "messages")
    if len(videos) >= serving.max_videos_per_request:
        raise invalid(f"too many videos: more than the limit of {serving.max_videos_per_request} per request "
                      "(max_videos_per_request)", "messages")
    if url[:5].lower() != "data:":
        raise invalid(f"{url_where}: video URLs are not fetched; send the video as a data:video/<type>;base64, "
                      "URL", "messages")
    videos.append(ImageSource(url_where, data=decode_data_url(url, url_where, serving, "video")))
    return {"type": spec.PART_VIDEO}


def _parse_part(where: str, part: Any, images: list[ImageSource], videos: list[ImageSource],
                serving: ServingConfig) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise invalid(f"{where} must be an object (a content part), got {_json_type(part)}", "messages")
    kind = part.get("type")
    if kind == "text":
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise invalid(f"{where} has unsupported fields {extra} (type, text)", "messages")
        return {"type": spec.PART_TEXT, "text": part.get("text")}  # preprocess checks it is a string
    if kind == "video_url":
        return _parse_video_part(where, part, videos, serving)
    if kind != "image_url":
        shown = json.dumps(kind)[:40] if "type" in part else "missing"
        raise invalid(f"{where}.type {shown} is not text, image_url or video_url (the content parts this server "
                      "takes)", "messages")
    extra = sorted(set(part) - {"type", "image_url"})
    if extra:
        raise invalid(f"{where} has unsupported fields {extra} (type, image_url)", "messages")
    image_url = part.get("image_url")
    if not isinstance(image_url, dict):
        raise invalid(f"{where}.image_url must be an object with a url, got {_json_type(image_url)}", "messages")
    extra = sorted(set(image_url) - {"url", "detail"})
    if extra:
        raise invalid(f"{where}.image_url has unsupported fields {extra} (url, detail)", "messages")
    if image_url.get("detail") not in (None, "auto", "low", "high"):
        raise invalid(f"{where}.image_url.detail must be auto, low or high", "messages")
    url_where = f"{where}.image_url.url"
    url = image_url.get("url")
    if not isinstance(url, str):
        raise invalid(f"{url_where} must be a string, got {_json_type(url)}", "messages")
    if len(images) >= serving.max_images_per_request:
        raise invalid(f"too many images: more than the limit of {serving.max_images_per_request} per request "
                      "(max_images_per_request)", "messages")
    if url[:5].lower() == "data:":
        images.append(ImageSource(url_where, data=decode_data_url(url, url_where, serving)))
    elif url[:7].lower() == "http://" or url[:8].lower() == "https://":
        images.append(ImageSource(url_where, url=url))
    else:
        raise invalid(f"{url_where} must be a data:image/...;base64, URL or an http(s) URL, got "
                      f"{json.dumps(url[:30])}{'...' if len(url) > 30 else ''}", "messages")
    return {"type": spec.PART_IMAGE}


def _data_url(kind: str) -> re.Pattern:
    return re.compile(kind + r"/[A-Za-z0-9.+-]+(?:;[A-Za-z0-9_.+-]+=[A-Za-z0-9_.+-]+)*;base64,", re.ASCII)


_DATA_URLS = {"image": _data_url("data:image"), "video": _data_url("data:video")}
_DATA_LIMITS = {"image": "max_image_bytes", "video": "max_video_bytes"}


def decode_data_url(url: str, where: str, serving: ServingConfig, kind: str = "image") -> bytes:
    """The bytes of a `data:<kind>/<type>[;param=value...];base64,<data>` URL (kind image or video),
    refused before decoding when its data would be past max_image_bytes (or max_video_bytes)."""
    header = _DATA_URLS[kind].match(url)
    if header is None:
        raise invalid(f"{where} is not a data:{kind}/<type>;base64,<data> URL (starts with "
                      f"{json.dumps(url[:40])})", "messages")
    encoded = url[header.end():]
    limit = _DATA_LIMITS[kind]
    if len(encoded) // 4 * 3 > getattr(serving, limit) + 2:
        raise invalid(f"{where}: the {kind} is about {len(encoded) // 4 * 3} bytes, more than the limit of "
                      f"{getattr(serving, limit)} bytes ({limit})", "messages")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise invalid(f"{where}: the data is not valid base64 ({err})", "messages") from None
    if not data:
        raise invalid(f"{where}: the {kind} is empty", "messages")
    return data


# --- responses ---------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(call: ChatCall, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A whole chat.completion."""
    return {"id": call.request_id, "object": "chat.completion", "created": call.created, "model": call.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason or None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(call: ChatCall, delta: dict[str, Any] | None, finish_reason: str = "",
               usage_so_far: dict[str, int] | None = None) -> dict[str, Any]:
    """One chat.completion.chunk; `delta` None gives the usage chunk (no choices)."""
    body: dict[str, Any] = {"id": call.request_id, "object": "chat.completion.chunk", "created": call.created,
                            "model": call.model,
                            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                                  "finish_reason": finish_reason or None}]}
    if call.include_usage or call.continuous_usage:
        body["usage"] = usage_so_far
    return body


def sse(body: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON body."""
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# --- errors from the ensemble ------------------------------------------------------------------------

# What the ensemble says when a queue is full or a request waited too long (our models end such messages
# with "retry later"; Triton's own queues say the others): the request may succeed later.
BUSY_MESSAGES = ("retry later", "Exceeds maximum queue size", "Request timeout expired")
# Triton before the model is loaded, or without it.
UNAVAILABLE_MESSAGES = ("is not ready", "Request for unknown model", "is not found")
INTERNAL_PREFIX = "internal error:"  # llava_triton.triton_utils.triton_error's prefix of our own failures
# The field of the chat request an ensemble input's message is about.
_PARAMS = {"messages": "messages", "prompt": "messages", "image": "messages", "too many images": "messages",
           "video": "messages", "too many videos": "messages", "the videos": "messages",
           "request is": "messages", "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
           "top_k": "top_k", "seed": "seed", "stop": "stop", "cache_salt": "cache_salt", "num_frames": "num_frames",
           "fps": "fps", "send num_frames": "num_frames"}


def triton_error(message: str, images: list[ImageSource] = (), videos: list[ImageSource] = ()) -> OpenAIError:
    """The HTTP error for a message the ensemble ended a request with: 503 when a queue is full (retry),
    500 for a failure of ours, else 400 (the request's fault), the message passed through without
    Triton's "in ensemble 'llava', " and with "image N" ("video N") named as the request's field that held it."""
    message = re.sub(r"^in ensemble '[^']*', ", "", message)
    item = re.match(r"(image|video) (\d+): ", message)
    sources = images if item and item.group(1) == "image" else videos
    if item and int(item.group(2)) < len(sources):
        message = f"{sources[int(item.group(2))].where}: {message[item.end():]}"
    if any(text in message for text in BUSY_MESSAGES):
        return OpenAIError(503, message, code="server_busy")
    if any(text in message for text in UNAVAILABLE_MESSAGES):
        return OpenAIError(503, message, code="model_not_ready")
    if INTERNAL_PREFIX in message:
        return OpenAIError(500, message)
    param = next((param for start, param in _PARAMS.items() if message.startswith(start)), None)
    return OpenAIError(400, message, param)
