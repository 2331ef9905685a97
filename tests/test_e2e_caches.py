"""The caches through a real tritonserver and the real gRPC client: served answers equal transformers'
whether the KV-cache blocks and image embeddings came from the caches or not; two images, two file
formats and two cache_salts never share; eviction under pressure while streams run.

The default server (conftest's `triton_server`) runs with both caches on, their default; a second
server here runs with them off, a third with caches small enough to evict all the time.
"""

from __future__ import annotations

import io
import json
import threading

import pytest
from PIL import Image

from bench.soak import scrape_metrics
from client import LlavaClient, LlavaError
from llava_triton import spec
from llava_triton.testing.reference import hf_generate, varied_image

MAX_TOKENS = 6
BUILD_LOGS = "build/test-logs"


def served(checkpoint, tmp_path_factory, name: str, *options: str):
    from pathlib import Path

    from export.__main__ import main as export_main
    from llava_triton.server import TritonServer

    output = tmp_path_factory.mktemp(f"{name}_repository")
    assert export_main(["--model", str(checkpoint), "--output", str(output), "--work-dir",
                        str(tmp_path_factory.mktemp(f"{name}_work")), "--engine", "pytorch", "--device", "cpu",
                        "--no-onnx", *options]) == 0
    log_path = Path(__file__).resolve().parent.parent / BUILD_LOGS / f"tritonserver-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return TritonServer(output, log_path=log_path, ready_timeout_s=300)


@pytest.fixture(scope="module")
def server_without_caches(tiny_checkpoint, tmp_path_factory):
    with served(tiny_checkpoint, tmp_path_factory, "caches-off", "--set", "prefix_caching=false",
                "--set", "embedding_cache_bytes=0") as server:
        yield server


@pytest.fixture(scope="module")
def server_under_pressure(tiny_checkpoint, tmp_path_factory):
    """Room for two images' embeddings and two sequences' blocks: both caches evict all the time."""
    from llava_triton.spec import ModelSpec

    model = ModelSpec.from_pretrained(tiny_checkpoint)
    two_images = 2 * model.num_image_tokens * model.text_hidden_size * 4
    with served(tiny_checkpoint, tmp_path_factory, "caches-small", "--set", f"embedding_cache_bytes={two_images}",
                "--set", "embedding_cache_grace_s=0.001", "--set", "max_num_seqs=2") as server:
        server.budget = two_images
        yield server


def metric(server, definition: spec.Metric) -> float:
    return scrape_metrics(server.url_metrics).get(definition.name, 0.0)


class Deltas:
    """The cache metrics' change over a block of requests."""

    NAMES = (spec.METRIC_PREFIX_HIT_TOKENS, spec.METRIC_EMBEDDING_CACHE_HITS, spec.METRIC_EMBEDDING_CACHE_MISSES,
             spec.METRIC_EMBEDDING_CACHE_EVICTIONS)

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        self.before = {m.name: metric(self.server, m) for m in self.NAMES}
        return self

    def __exit__(self, *exc):
        # Metric updates leave the language model from its outbox thread: they land right after the answer.
        self.after = {m.name: metric(self.server, m) for m in self.NAMES}

    def __getitem__(self, definition: spec.Metric) -> float:
        return self.after[definition.name] - self.before[definition.name]


def ask(server, images: list[bytes], prompt: str | None = None, **options):
    with LlavaClient(server.url_grpc) as client:
        return client.generate(prompt, images, max_tokens=MAX_TOKENS, temperature=0.0, **options)


def png(seed: int) -> bytes:
    return reencode(varied_image(seed), "PNG")


def reencode(data: bytes, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, image_format, **options)
    return buffer.getvalue()


def test_a_chat_about_one_image_reuses_it_turn_after_turn(triton_server, tiny_checkpoint):
    """Three turns, each sending the whole history: from the second on, the image is not encoded again and
    the history's blocks come from the cache, and every answer equals transformers' for that history."""
    image = png(101)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it?"}]}]
    for turn in range(3):
        with Deltas(triton_server) as deltas:
            answer = ask(triton_server, [image], messages=json.dumps(messages))
        assert answer.token_ids == hf_generate(tiny_checkpoint, [image], None, MAX_TOKENS, messages=messages)
        if turn == 0:
            assert (deltas[spec.METRIC_EMBEDDING_CACHE_MISSES], deltas[spec.METRIC_EMBEDDING_CACHE_HITS]) == (1, 0)
        else:
            assert (deltas[spec.METRIC_EMBEDDING_CACHE_MISSES], deltas[spec.METRIC_EMBEDDING_CACHE_HITS]) == (0, 1)
            assert deltas[spec.METRIC_PREFIX_HIT_TOKENS] > 0
        messages += [{"role": "assistant", "content": answer.text},
                     {"role": "user", "content": f"And question {turn + 2}?"}]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_the_same_text_about_another_image_gets_that_image_answer(triton_server, tiny_checkpoint, order):
    """The wrong-image bug: the same prompt with another image shares nothing of the image, in either
    order: each answer equals transformers' for its own image."""
    images = [png(200 + 2 * order[0]), png(201 + 2 * order[0])]  # fresh images for each order
    expected = [hf_generate(tiny_checkpoint, [image], "Describe it.", MAX_TOKENS) for image in images]
    assert expected[0] != expected[1]
    for index in order:
        with Deltas(triton_server) as deltas:
            assert ask(triton_server, [images[index]], "Describe it.").token_ids == expected[index]
        assert deltas[spec.METRIC_EMBEDDING_CACHE_HITS] == 0  # a new image is never a hit


def test_concurrent_requests_about_different_images_each_get_their_own(triton_server, tiny_checkpoint):
    images = [png(300 + i) for i in range(3)]
    expected = [hf_generate(tiny_checkpoint, [image], "What colour is it?", MAX_TOKENS) for image in images]
    results, errors = {}, []

    def worker(slot: int) -> None:
        try:
            for repeat in range(3):
                index = (slot + repeat) % len(images)
                results[(slot, repeat)] = (index, ask(triton_server, [images[index]], "What colour is it?").token_ids)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == 12
    assert all(token_ids == expected[index] for index, token_ids in results.values())


def test_the_same_pixels_in_another_format_are_another_key(triton_server, tiny_checkpoint):
    """Keys are of the encoded bytes: a lossless WebP of a PNG's pixels is encoded again (its key is
    another), and its answer is the same, since its pixels are."""
    image = png(400)
    webp = reencode(image, "WEBP", lossless=True)
    assert Image.open(io.BytesIO(webp)).tobytes() == Image.open(io.BytesIO(image)).convert("RGB").tobytes()
    first = ask(triton_server, [image], "What is it?")
    with Deltas(triton_server) as deltas:
        second = ask(triton_server, [webp], "What is it?")
    assert (deltas[spec.METRIC_EMBEDDING_CACHE_MISSES], deltas[spec.METRIC_EMBEDDING_CACHE_HITS]) == (1, 0)
    assert first.token_ids == second.token_ids == hf_generate(tiny_checkpoint, [image], "What is it?", MAX_TOKENS)


def test_different_cache_salts_never_share(triton_server, tiny_checkpoint):
    image = png(500)
    expected = hf_generate(tiny_checkpoint, [image], "What is it?", MAX_TOKENS)
    hits = []
    for salt in ("tenant-a", "tenant-b", "tenant-a"):
        with Deltas(triton_server) as deltas:
            assert ask(triton_server, [image], "What is it?", cache_salt=salt).token_ids == expected
        hits.append((deltas[spec.METRIC_EMBEDDING_CACHE_HITS], deltas[spec.METRIC_PREFIX_HIT_TOKENS] > 0))
    assert hits == [(0, False), (0, False), (1, True)]


def test_a_cache_salt_past_its_limit_is_refused_by_name(triton_server):
    from client import LlavaError

    with pytest.raises(LlavaError, match=r"cache_salt is 257 bytes, more than the limit of 256 "
                       r"\(max_cache_salt_bytes\)"):
        ask(triton_server, [], "Hi", cache_salt="x" * 257)
    assert ask(triton_server, [], "Hi").completion_tokens > 0  # still serving


def test_without_caches_the_answers_are_the_same_and_nothing_is_reused(server_without_caches, tiny_checkpoint):
    image = png(600)
    expected = hf_generate(tiny_checkpoint, [image], "What is it?", MAX_TOKENS)
    with Deltas(server_without_caches) as deltas:
        for _ in range(2):
            assert ask(server_without_caches, [image], "What is it?").token_ids == expected
    assert deltas[spec.METRIC_PREFIX_HIT_TOKENS] == deltas[spec.METRIC_EMBEDDING_CACHE_HITS] == 0
    assert deltas[spec.METRIC_EMBEDDING_CACHE_MISSES] == 0


def test_eviction_under_pressure_while_streams_run(server_under_pressure, tiny_checkpoint):
    """Six images through a cache with room for two, four streams at a time, each image twice: embeddings
    are evicted while other streams run, and every answer still equals transformers'. Afterwards no
    block is held."""
    images = [png(700 + i) for i in range(6)]
    expected = [hf_generate(tiny_checkpoint, [image], "What is it?", MAX_TOKENS) for image in images]
    results, errors = [], []

    def worker(slot: int) -> None:
        try:
            with LlavaClient(server_under_pressure.url_grpc) as client:
                for repeat in range(3):
                    index = (slot + 2 * repeat) % len(images)
                    # With a grace of 1 ms, an image evicted between preprocess and the language model is
                    # refused with "retry later" by design (caches.md): retried, as a client would.
                    for attempt in range(5):
                        try:
                            tokens = [t for chunk in client.stream("What is it?", [images[index]],
                                                                   max_tokens=MAX_TOKENS, temperature=0.0)
                                      for t in chunk.token_ids]
                            break
                        except LlavaError as error:
                            if "retry later" not in str(error) or attempt == 4:
                                raise
                    results.append(tokens == expected[index])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with Deltas(server_under_pressure) as deltas:
        threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert not errors and results == [True] * 12
    assert deltas[spec.METRIC_EMBEDDING_CACHE_EVICTIONS] > 0
    assert 0 < metric(server_under_pressure, spec.METRIC_EMBEDDING_CACHE_BYTES) <= server_under_pressure.budget
    assert metric(server_under_pressure, spec.METRIC_KV_CACHE_USAGE) == 0.0
