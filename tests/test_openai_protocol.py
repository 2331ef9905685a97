"""The OpenAI protocol without a server: body limits, every field's check, data URLs, responses, error mapping."""

from __future__ import annotations

import base64
import json

import pytest

from llava_triton import spec
from llava_triton.openai_protocol import (
    ChatCall,
    ImageSource,
    OpenAIError,
    chunk_body,
    completion_body,
    decode_data_url,
    load_json,
    parse_chat_request,
    triton_error,
)
from llava_triton.spec import FrontendConfig, ServingConfig

CONFIG, SERVING = FrontendConfig(), ServingConfig()
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode()


def request(**fields) -> dict:
    return {"model": "llava", "messages": [{"role": "user", "content": "hi"}], **fields}


def refused(body, pattern: str, status: int = 400, param: str | None = None) -> OpenAIError:
    with pytest.raises(OpenAIError, match=pattern) as caught:
        parse_chat_request(body, SERVING)
    assert caught.value.status == status
    if param is not None:
        assert caught.value.param == param
    return caught.value


def test_load_json_within_the_limits():
    assert load_json(b'{"a": [1, {"b": "[[[{{{"}]}', CONFIG) == {"a": [1, {"b": "[[[{{{"}]}
    # Brackets inside strings are not containers: many of them pass.
    assert load_json(json.dumps({"t": "[" * 50_000}).encode(), CONFIG) == {"t": "[" * 50_000}


@pytest.mark.parametrize(("body", "pattern"), [
    (b"{bad", r"not valid JSON \(Expecting property name"),
    (b"", r"not valid JSON \(Expecting value"),
    (b'{"a": NaN}', r"not valid JSON \(NaN is not a JSON number"),
    (b'{"a": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    (b'"\xff"', r"not UTF-8 JSON \(byte 1"),
    (b"[" * 40 + b"]" * 40, r"nested 40 deep, more than the limit of 32 \(max_json_depth\)"),
    (b"[" * 30_000 + b"]" * 30_000, r"30000 JSON arrays and objects, more than the limit of 20000"),
    (b"[" + b"[]," * 25_000 + b"[]]", r"25002 JSON arrays and objects"),
    (b"[" * 5_000 + b"]" * 5_000, r"nested deeper than the limit of 32|nested 5000 deep"),
])
def test_load_json_refuses(body, pattern):
    with pytest.raises(OpenAIError, match=pattern) as caught:
        load_json(body, CONFIG)
    assert caught.value.status == 400


def test_load_json_counts_exactly_when_strings_hold_brackets():
    deep = b'{"t": "' + b"[" * 30_000 + b'", "x": ' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(OpenAIError, match="nested 41 deep"):
        load_json(deep, CONFIG)


def test_a_request_becomes_the_ensembles_inputs():
    call = parse_chat_request(request(
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "name": "ann", "content": [
                      {"type": "text", "text": "Compare"},
                      {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
                      {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}}]},
                  {"role": "assistant", "content": "Done."}],
        max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=-3, stop="END", n=1, top_k=4, ignore_eos=True,
        cache_salt="tenant-7", stream=True, stream_options={"include_usage": True}, user="u1", logprobs=False,
        tools=[]), SERVING)
    assert call.messages == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                                          {"type": "image"}]},
                             {"role": "assistant", "content": "Done."}]
    assert call.images == [ImageSource("messages[1].content[1].image_url.url", data=base64.b64decode(PNG)),
                           ImageSource("messages[1].content[2].image_url.url", url="https://example.com/b.jpg")]
    assert call.options == {spec.IN_MAX_TOKENS: 7, spec.IN_TEMPERATURE: 0.5, spec.IN_TOP_P: 0.9, spec.IN_SEED: -3,
                            spec.IN_STOP: ["END"], spec.IN_TOP_K: 4, spec.IN_IGNORE_EOS: True, spec.IN_STREAM: True,
                            spec.IN_CACHE_SALT: "tenant-7"}
    assert call.stream and call.include_usage and not call.continuous_usage
    # Nulls are left out; max_tokens and max_completion_tokens may both be sent when equal.
    plain = parse_chat_request(request(temperature=None, max_tokens=5, max_completion_tokens=5), SERVING)
    assert plain.options == {spec.IN_MAX_TOKENS: 5, spec.IN_STREAM: False}


@pytest.mark.parametrize(("fields", "pattern", "param"), [
    ({"n": 2}, r"n must be 1 \(one answer per request\), got 2", "n"),
    ({"temperature": "hot"}, "temperature must be a number, got a string", "temperature"),
    ({"temperature": True}, "temperature must be a number, got a boolean", "temperature"),
    ({"max_tokens": 0}, r"max_tokens must be in \[1, 2147483647\], got 0", "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens must be an integer, got a number", "max_tokens"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens 3 and max_completion_tokens 4 differ", "max_tokens"),
    ({"seed": 2**63}, r"seed must be in \[", "seed"),
    ({"stop": 3}, "stop must be a string or an array of strings, got an integer", "stop"),
    ({"stop": ["a", 1]}, "stop must be a string or an array of strings", "stop"),
    ({"stream": "yes"}, "stream must be true or false, got a string", "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed with stream true",
     "stream_options"),
    ({"stream": True, "stream_options": {"x": 1}}, r"stream_options has unknown fields \['x'\]", "stream_options"),
    ({"top_k": -1}, r"top_k must be in \[0,", "top_k"),
    ({"ignore_eos": 1}, "ignore_eos must be true or false", "ignore_eos"),
    ({"cache_salt": 7}, "cache_salt must be a string, got an integer", "cache_salt"),
    ({"frobnicate": 1}, "unknown field 'frobnicate'", "frobnicate"),
    ({"logprobs": True}, "logprobs true is not supported by this server", "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools .* is not supported", "tools"),
    ({"response_format": {"type": "json_object"}}, r"response_format .* is not supported .*only \{\"type\": \"text\"\}",
     "response_format"),
    ({"model": 3}, "model must be a string, got an integer", "model"),
    ({"messages": None}, "messages is required", "messages"),
    ({"messages": "hi"}, "messages must be an array of messages, got a string", "messages"),
    ({"messages": []}, "messages must hold at least one message", "messages"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object, got a string", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]},
     r'messages\[0\].role "tool" is not one of system, developer, user, assistant', "messages"),
    ({"messages": [{"content": "x"}]}, r"messages\[0\].role null is not one of", "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     r"messages\[0\] has unsupported fields \['tool_calls'\]", "messages"),
    ({"messages": [{"role": "user", "content": 5}]},
     r"messages\[0\].content must be a string or an array of content parts, got an integer", "messages"),
    ({"messages": [{"role": "user", "name": 1, "content": "x"}]}, r"messages\[0\].name must be a string", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     r'messages\[0\].content\[0\].type "input_audio" is not text, image_url or video_url', "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}]},
     r"messages\[0\].content\[0\].image_url must be an object with a url, got a string", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
     r"messages\[0\].content\[0\].image_url.url must be a data:image/...;base64, URL or an http\(s\) URL", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]}]},
     "detail must be auto, low or high", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}] * 5}]},
     r"too many images: more than the limit of 4 per request \(max_images_per_request\)", "messages"),
])
def test_every_field_is_checked_by_name(fields, pattern, param):
    refused(request(**fields), pattern, param=param)


def test_the_body_must_be_an_object():
    refused([1], "the request body must be a JSON object, got an array")


def test_data_urls():
    assert decode_data_url(f"data:image/png;base64,{PNG}", "u", SERVING) == base64.b64decode(PNG)
    assert decode_data_url(f"data:image/jpeg;name=a.jpg;base64,{PNG}", "u", SERVING) == base64.b64decode(PNG)
    for url, pattern in [("data:text/plain;base64,aGk=", r"u is not a data:image/<type>;base64,<data> URL"),
                         ("data:image/png,raw", "is not a data:image"),
                         ("data:image/png;base64,!!!!", r"u: the data is not valid base64"),
                         ("data:image/png;base64,aGk", r"u: the data is not valid base64"),
                         ("data:image/png;base64,", "u: the image is empty")]:
        with pytest.raises(OpenAIError, match=pattern):
            decode_data_url(url, "u", SERVING)
    # Past max_image_bytes, refused from the length alone.
    small = ServingConfig(max_image_bytes=30)
    decode_data_url("data:image/png;base64," + "A" * 40, "u", small)  # 30 bytes
    with pytest.raises(OpenAIError, match=r"u: the image is about 33 bytes, more than the limit of 30 bytes "
                                          r"\(max_image_bytes\)"):
        decode_data_url("data:image/png;base64," + "A" * 44, "u", small)


def test_responses_in_openais_shapes():
    call = ChatCall(model="llava", messages=[], images=[], options={}, request_id="chatcmpl-1", created=5)
    assert completion_body(call, "Hi", "length", 10, 2) == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "llava",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
    assert chunk_body(call, {"content": "a"})["choices"][0] == {"index": 0, "delta": {"content": "a"},
                                                                 "logprobs": None, "finish_reason": None}
    assert "usage" not in chunk_body(call, {"content": "a"})
    call.include_usage = True
    assert chunk_body(call, {"content": "a"})["usage"] is None
    assert chunk_body(call, None, usage_so_far={"total_tokens": 1}) | {"id": "x"} == {
        "id": "x", "object": "chat.completion.chunk", "created": 5, "model": "llava", "choices": [],
        "usage": {"total_tokens": 1}}


@pytest.mark.parametrize(("message", "status", "param", "shown"), [
    # The language model's full queue and queue timeout (llava_triton.engine), Triton's own queues.
    ("in ensemble 'llava', the language model's queue is full (256 requests waiting); retry later", 503, None,
     "the language model's queue is full (256 requests waiting); retry later"),
    ("waited more than 30 s for a KV-cache slot (queue_timeout_us); retry later", 503, None, None),
    ("in ensemble 'llava', Exceeds maximum queue size", 503, None, "Exceeds maximum queue size"),
    ("Request for unknown model: 'llava' is not found", 503, None, None),
    ("in ensemble 'llava', internal error: RuntimeError: boom", 500, None, "internal error: RuntimeError: boom"),
    ("in ensemble 'llava', temperature must be a finite number in [0, 100], got -1.0", 400, "temperature", None),
    ("in ensemble 'llava', messages[0].content contains <image>: ...", 400, "messages", None),
    ("in ensemble 'llava', image 1: not an image (unrecognised data; send JPEG, PNG or WebP)", 400, "messages",
     "messages[0].content[3].image_url.url: not an image (unrecognised data; send JPEG, PNG or WebP)"),
    ("in ensemble 'llava', prompt is 5000 tokens (...)", 400, "messages", None),
    ("in ensemble 'llava', cache_salt is 300 bytes, more than the limit of 256 (max_cache_salt_bytes)", 400,
     "cache_salt", None),
    # A cached image evicted between preprocess and the language model (llava_triton.engine): retry.
    ("in ensemble 'llava', image 0: its embeddings left the embedding cache before the request reached the "
     "language model (evicted more than embedding_cache_grace_s before); retry later", 503, None,
     "messages[0].content[1].image_url.url: its embeddings left the embedding cache before the request reached the "
     "language model (evicted more than embedding_cache_grace_s before); retry later"),
])
def test_ensemble_errors_get_their_status(message, status, param, shown):
    images = [ImageSource("messages[0].content[1].image_url.url"), ImageSource("messages[0].content[3].image_url.url")]
    error = triton_error(message, images)
    assert (error.status, error.param) == (status, param)
    assert error.message == (shown or message.removeprefix("in ensemble 'llava', "))
    assert error.body()["error"]["type"] == ("invalid_request_error" if status == 400 else "server_error")


MP4 = base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + b"\0" * 16).decode()


def test_a_video_part_becomes_a_video_of_the_request():
    video_part = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{MP4}"}}
    call = parse_chat_request(request(messages=[{"role": "user", "content": [
        video_part, {"type": "text", "text": "What happens?"}]}], num_frames=8, fps=0), SERVING)
    assert call.messages == [{"role": "user", "content": [{"type": spec.PART_VIDEO},
                                                          {"type": "text", "text": "What happens?"}]}]
    assert [source.data for source in call.videos] == [base64.b64decode(MP4)] and call.images == []
    assert call.videos[0].where == "messages[0].content[0].video_url.url"
    assert call.options[spec.IN_NUM_FRAMES] == 8 and call.options[spec.IN_FPS] == 0.0


@pytest.mark.parametrize("part, pattern", [
    ({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}, r"video URLs are not fetched"),
    ({"type": "video_url", "video_url": {"url": f"data:image/png;base64,{PNG}"}}, r"is not a data:video/<type>"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"}}, r"the video is empty"),
    ({"type": "video_url", "video_url": "x"}, r"video_url must be an object with a url alone"),
    ({"type": "video_url", "video_url": {"url": 3}}, r"video_url.url must be a string"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}, "x": 1}, r"unsupported fields"),
], ids=["an http URL", "an image data URL", "empty", "not an object", "url not a string", "an extra field"])
def test_video_parts_are_checked_by_name(part, pattern):
    refused(request(messages=[{"role": "user", "content": [part]}]), pattern, param="messages")


def test_video_limits_from_the_url_alone():
    small = ServingConfig(max_video_bytes=30, max_videos_per_request=1)
    part = {"type": "video_url", "video_url": {"url": "data:video/webm;base64," + "A" * 44}}
    with pytest.raises(OpenAIError, match=r"the video is about 33 bytes, more than the limit of 30 bytes "
                                          r"\(max_video_bytes\)"):
        parse_chat_request(request(messages=[{"role": "user", "content": [part]}]), small)
    part = {"type": "video_url", "video_url": {"url": "data:video/webm;base64," + "A" * 8}}
    with pytest.raises(OpenAIError, match=r"too many videos.*max_videos_per_request"):
        parse_chat_request(request(messages=[{"role": "user", "content": [part, part]}]), small)
    refused(request(num_frames="8"), r"num_frames must be an integer", param="num_frames")


def test_a_video_error_names_the_field_that_held_the_video():
    videos = [ImageSource("messages[1].content[0].video_url.url")]
    error = triton_error("in ensemble 'llava', video 0: not a video (unrecognised data; send MP4)", [], videos)
    assert (error.status, error.param) == (400, "messages")
    assert error.message == "messages[1].content[0].video_url.url: not a video (unrecognised data; send MP4)"
    error = triton_error("in ensemble 'llava', num_frames 40 is not in [1, 32] (max_frames_per_request)")
    assert (error.status, error.param) == (400, "num_frames")
