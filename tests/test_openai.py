"""The OpenAI-compatible frontend against a real tritonserver, called with the official `openai` client (and
raw HTTP where a client would not send such a request), and with AIPerf.

Greedy answers equal transformers' and the gRPC path's; every bad request gets its status and a message
naming the problem, and the server goes on serving.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from bench.soak import scrape_metrics
from llava_triton import deploy, spec
from llava_triton.frontend_process import FrontendProcess
from llava_triton.server import free_port
from llava_triton.spec import FrontendConfig
from llava_triton.testing.reference import hf_generate, make_test_images

pytestmark = pytest.mark.e2e

IMAGES = make_test_images()
BUILD = Path(__file__).resolve().parent.parent / "build"
MAX_TOKENS = 10


def data_url(data: bytes, media_type: str = "image/jpeg") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def frontend(triton_server, model_repository, name: str, config: FrontendConfig | None = None,
             triton_url: str | None = None) -> FrontendProcess:
    log = BUILD / "test-logs" / f"openai-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return FrontendProcess(triton_url or triton_server.url_grpc, port=free_port(), host="127.0.0.1",
                           model_repository=model_repository, config=config or FrontendConfig(), log_path=log)


@pytest.fixture(scope="module")
def api(triton_server, model_repository):
    with frontend(triton_server, model_repository, "frontend") as process:
        yield process


@pytest.fixture(scope="module")
def client(api):
    with openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def post(api: FrontendProcess, body: bytes | dict, **kwargs) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(f"{api.url}/chat/completions", content=content, timeout=120, **kwargs)


# --- answers -----------------------------------------------------------------------------------------

CONVERSATIONS = {
    "an image as a data URL": ([IMAGES["jpeg"]], [
        {"role": "user", "content": [image_part(IMAGES["jpeg"]),
                                     {"type": "text", "text": "What is in the picture?"}]}]),
    "two images": ([IMAGES["jpeg"], IMAGES["png"]], [
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, image_part(IMAGES["jpeg"]),
                                     {"type": "text", "text": "with"}, image_part(IMAGES["png"])]}]),
    "system and multi-turn with an assistant turn": ([IMAGES["webp"]], [
        {"role": "system", "content": "You describe pictures in one sentence."},
        {"role": "user", "content": [image_part(IMAGES["webp"]), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red square and a blue ball."},
        {"role": "user", "content": "Which colour is larger?"}]),
}


def ensemble_messages(messages: list[dict]) -> list[dict]:
    """The same turns as the ensemble's messages input takes them (an image part is {"type": "image"})."""
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [
        {"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]} for m in messages]


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_greedy_answers_equal_transformers_and_the_grpc_path(client, llava_client, tokenizer, tiny_checkpoint, case):
    images, messages = CONVERSATIONS[case]
    expected = hf_generate(tiny_checkpoint, images, None, MAX_TOKENS, messages=ensemble_messages(messages))
    by_grpc = llava_client.generate(messages=ensemble_messages(messages), images=images, max_tokens=MAX_TOKENS)
    assert by_grpc.token_ids == expected
    answer = client.chat.completions.create(model="llava", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == by_grpc.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("length" if len(expected) == MAX_TOKENS else "stop")
    assert answer.usage.completion_tokens == len(expected)
    assert answer.usage.prompt_tokens == by_grpc.prompt_tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.model == "llava" and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")


def test_streamed_chunks_join_into_the_whole_answer(client):
    images, messages = CONVERSATIONS["an image as a data URL"]
    whole = client.chat.completions.create(model="llava", messages=messages, max_completion_tokens=16,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="llava", messages=messages, max_completion_tokens=16,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 16
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in content)
    # Without include_usage no chunk has a usage.
    plain = list(client.chat.completions.create(model="llava", messages=messages, max_tokens=3, stream=True))
    assert all(c.choices and c.usage is None for c in plain)


def test_stop_strings_end_the_answer_before_them(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = client.chat.completions.create(model="llava", messages=messages, max_tokens=24,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[6:10]
    assert len(stop) == 4
    for streamed in (False, True):
        answer = client.chat.completions.create(model="llava", messages=messages, max_tokens=24, stop=[stop, "\x00"],
                                                stream=streamed, extra_body={"ignore_eos": True})
        if streamed:
            chunks = [c for c in answer if c.choices]
            text, finish = "".join(c.choices[0].delta.content for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert text == full[:full.index(stop)] and finish == "stop", streamed


def test_seeded_sampling_is_reproducible(client):
    messages = [{"role": "user", "content": [image_part(IMAGES["png"]), {"type": "text", "text": "Describe it."}]}]

    def sample(seed: int) -> str:
        return client.chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=1.5,
                                              top_p=0.95, seed=seed, extra_body={"ignore_eos": True}
                                              ).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1
    # top_k 1 samples the most likely token: the greedy answer.
    greedy = client.chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].message.content
    top1 = client.chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=1.5, seed=3,
                                          extra_body={"ignore_eos": True, "top_k": 1}).choices[0].message.content
    assert top1 == greedy


def test_models_and_health(api, client):
    assert [model.id for model in client.models.list()] == ["llava"]
    assert client.models.retrieve("llava").id == "llava"
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.models.retrieve("gpt-4o")
    base = api.url.removesuffix("/v1")
    assert httpx.get(base + deploy.OPENAI_LIVE_PATH).json() == {"status": "live"}
    assert httpx.get(base + deploy.OPENAI_READY_PATH).json() == {"status": "ready"}


# --- bad requests -------------------------------------------------------------------------------------

GOOD = {"model": "llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def with_message(content) -> dict:
    return {**GOOD, "messages": [{"role": "user", "content": content}]}


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "llava", "messages": [', 400, "not valid JSON"),
    "a JSON bomb of nesting": (b"[" * 200_000 + b"]" * 200_000, 400, r"max_json_containers"),
    "deep nesting in a field": (json.dumps({**GOOD, "metadata": json.loads("[" * 50 + "]" * 50)}).encode(), 400,
                                r"nested 51 deep, more than the limit of 32 \(max_json_depth\)"),
    "a huge base64 string": (with_message([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "A" * (28 * 1024 * 1024)}}]), 400,
        r"messages\[0\].content\[0\].image_url.url: the image is about \d+ bytes, more than the limit of 20971520 "
        r"bytes \(max_image_bytes\)"),
    "a bad data URL": (with_message([{"type": "image_url", "image_url": {"url": "data:text/html;base64,PGI+"}}]), 400,
                       r"messages\[0\].content\[0\].image_url.url is not a data:image/<type>;base64,<data> URL"),
    "bad base64": (with_message([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]), 400,
                   "not valid base64"),
    "data that is not an image": (with_message([image_part(b"hello, world")]), 400,
                                  r"messages\[0\].content\[0\].image_url.url: not an image"),
    "an http URL with fetching off": (with_message([{"type": "image_url", "image_url": {
        "url": "http://example.com/cat.jpg"}}]), 400, "this server does not fetch image URLs"),
    "an unknown role": ({**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400,
                        r'messages\[0\].role "tool" is not one of'),
    "content of the wrong type": (with_message(42), 400,
                                  r"messages\[0\].content must be a string or an array of content parts"),
    "a temperature of the wrong type": ({**GOOD, "temperature": "hot"}, 400, "temperature must be a number"),
    "a temperature out of range (preprocess)": ({**GOOD, "temperature": -1}, 400,
                                                r"temperature must be a finite number in \[0, 100\]"),
    "an image tag in text (preprocess)": (with_message("look <image>"), 400,
                                          r"messages\[0\].content contains <image>"),
    "n > 1": ({**GOOD, "n": 3}, 400, "n must be 1"),
    "an unknown field": ({**GOOD, "best_of": 2}, 400, "unknown field 'best_of'"),
    "an unknown model": ({**GOOD, "model": "gpt-4o"}, 404, "the model 'gpt-4o' does not exist"),
    "a prompt past the context (preprocess)": (with_message("The red square is next to the blue circle. " * 600),
                                               400, r"prompt is \d+ tokens"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_their_status_and_the_server_goes_on(api, client, case):
    body, status, pattern = BAD_REQUESTS[case]
    response = post(api, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(pattern, error["message"]), error["message"]
    assert error["type"] == "invalid_request_error"
    answer = client.chat.completions.create(model="llava", messages=GOOD["messages"], max_tokens=2)
    assert answer.usage.completion_tokens == 2


def test_the_official_client_raises_with_the_servers_message(client):
    with pytest.raises(openai.BadRequestError, match="n must be 1") as caught:
        client.chat.completions.create(model="llava", messages=GOOD["messages"], n=2)
    assert caught.value.status_code == 400 and caught.value.param == "n"
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role"):
        client.chat.completions.create(model="llava", messages=[{"role": "function", "content": "x", "name": "f"}])


def test_a_body_past_the_limit_is_refused_while_it_is_read(triton_server, model_repository, client):
    small = FrontendConfig(max_body_bytes=100_000)
    with frontend(triton_server, model_repository, "small-body", small) as api:
        big = json.dumps(with_message("x" * 200_000)).encode()
        response = post(api, big)  # Content-Length says it
        assert response.status_code == 413, response.text
        assert response.json()["error"]["message"] == (
            f"the request body is {len(big)} bytes, more than the limit of 100000 bytes (max_body_bytes)")

        def pieces():  # no Content-Length: chunked, counted as it arrives
            for start in range(0, len(big), 10_000):
                yield big[start:start + 10_000]

        response = httpx.post(f"{api.url}/chat/completions", content=pieces(), timeout=60)
        assert response.status_code == 413
        assert "more than the limit of 100000 bytes (max_body_bytes)" in response.json()["error"]["message"]
        assert post(api, GOOD).status_code == 200


def test_an_unreachable_triton_is_503(triton_server, model_repository):
    with frontend(triton_server, model_repository, "no-triton", triton_url=f"localhost:{free_port()}") as api:
        response = post(api, GOOD)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "is unavailable" in response.json()["error"]["message"]
        assert httpx.get(api.url.removesuffix("/v1") + deploy.OPENAI_READY_PATH).status_code == 503
        assert httpx.get(api.url.removesuffix("/v1") + deploy.OPENAI_LIVE_PATH).status_code == 200


def test_a_client_that_disconnects_cancels_its_grpc_stream(api, client):
    """The frontend cancels the request's gRPC stream. (Triton 2.51 does not pass that cancellation into the
    running language-model step of the ensemble, docs/operations.md, so the language model's own
    `cancelled` counter does not move: what is checked here is the frontend's side.)"""
    body = {**GOOD, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{api.url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        request_id = json.loads(next(response.iter_lines()).removeprefix("data: "))["id"]
        # the first token arrived; then the client goes away
    expected = f"{request_id}: the client went away; its gRPC stream is cancelled"
    deadline = time.monotonic() + 30
    while expected not in Path(api.log_path).read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert expected in Path(api.log_path).read_text()
    assert client.chat.completions.create(model="llava", messages=GOOD["messages"], max_tokens=2).usage


# --- image URLs, when fetching is on ----------------------------------------------------------------------


class ImageHandler(http.server.BaseHTTPRequestHandler):
    routes = {"/cat.jpg": IMAGES["jpeg"], "/big.jpg": IMAGES["jpeg"] + b"\0" * (21 * 1024 * 1024)}

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path in self.routes:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(self.routes[self.path])
        elif self.path.startswith("/redirect/"):  # /redirect/1 -> /redirect/0 -> /cat.jpg: 2 redirects
            left = int(self.path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", "/cat.jpg" if left == 0 else f"/redirect/{left - 1}")
            self.end_headers()
        elif self.path == "/slow.jpg":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(IMAGES["jpeg"])
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_image_urls_are_fetched_within_limits_when_turned_on(triton_server, model_repository, image_server, client):
    question = {"type": "text", "text": "What is in the picture?"}
    by_data = client.chat.completions.create(model="llava", max_tokens=6, messages=[
        {"role": "user", "content": [image_part(IMAGES["jpeg"]), question]}]).choices[0].message.content
    config = FrontendConfig(fetch_image_urls=True, fetch_private_addresses=True, fetch_timeout_s=1.0,
                            fetch_max_redirects=2)

    def ask(api, path):
        return post(api, {"model": "llava", "max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_server + path}}, question]}]})

    with frontend(triton_server, model_repository, "fetch", config) as api:
        for path in ("/cat.jpg", "/redirect/1"):
            answer = ask(api, path)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == by_data
        for path, pattern in [("/redirect/2", r"more than 2 redirects \(fetch_max_redirects\)"),
                              ("/missing.jpg", "fetching the image gave HTTP 404"),
                              ("/big.jpg", r"the image is more than the limit of 20971520 bytes \(max_image_bytes\)"),
                              ("/slow.jpg", r"took more than 1 s \(fetch_timeout_s\)")]:
            answer = ask(api, path)
            assert answer.status_code == 400, (path, answer.text)
            assert re.search(pattern, answer.json()["error"]["message"]), answer.text
    # Without fetch_private_addresses, a loopback host is refused before any connection.
    with frontend(triton_server, model_repository, "fetch-public", FrontendConfig(fetch_image_urls=True)) as api:
        answer = ask(api, "/cat.jpg")
        assert answer.status_code == 400
        assert "'127.0.0.1' is a non-public address (127.0.0.1)" in answer.json()["error"]["message"]


# --- AIPerf -------------------------------------------------------------------------------------------

AIPERF = Path(os.environ.get("AIPERF", BUILD / "aiperf-venv" / "bin" / "aiperf"))


def test_aiperf_runs_against_the_endpoint_and_its_counts_match_the_servers(api, triton_server, tiny_checkpoint,
                                                                           tmp_path):
    if not AIPERF.is_file():
        message = f"AIPerf is not installed at {AIPERF} (make aiperf)"
        if "AIPERF" in os.environ:  # make test sets it: the venv must be there
            pytest.fail(message)
        pytest.skip(message)
    requests = 6
    # Nothing else generating (a stream abandoned by an earlier test runs to its max_tokens: Triton 2.51).
    deadline = time.monotonic() + 120
    while scrape_metrics(triton_server.url_metrics)[spec.METRIC_REQUESTS_RUNNING.name] and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    before = scrape_metrics(triton_server.url_metrics)
    command = [str(AIPERF), "profile", "--model", "llava", "--url", api.url.removesuffix("/v1"),
               "--endpoint-type", "chat", "--streaming", "--tokenizer", str(tiny_checkpoint),
               "--image-width-mean", "96", "--image-height-mean", "64", "--image-batch-size", "1",
               "--image-format", "png", "--prompt-input-tokens-mean", "16", "--prompt-output-tokens-mean", "8",
               "--extra-inputs", "ignore_eos:true", "--request-count", str(requests), "--concurrency", "2",
               "--use-server-token-count", "--random-seed", "1", "--workers-max", "1", "--ui-type", "none",
               "--artifact-dir", str(tmp_path / "aiperf")]
    # (Not HF_HUB_OFFLINE: with it AIPerf 0.13 takes the local tokenizer directory for a Hub repo id.)
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    after = scrape_metrics(triton_server.url_metrics)
    report = json.loads((tmp_path / "aiperf" / "profile_export_aiperf.json").read_text())

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert report["request_count"]["avg"] == requests and not report.get("error_summary")
    assert delta(f"{spec.METRIC_TIME_TO_FIRST_TOKEN.name}_count") == requests  # requests the model answered
    assert report["total_osl"]["avg"] == delta(spec.METRIC_GENERATION_TOKENS.name) == requests * 8
    assert report["total_isl"]["avg"] == delta(spec.METRIC_PROMPT_TOKENS.name)
