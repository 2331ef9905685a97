"""Preprocess with the language model's caches, without a server: each image's key, and the images the
embedding cache's directory lists left undecoded and out of pixel_values."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from llava_triton.embedding_cache import Directory
from llava_triton.errors import InvalidRequestError
from llava_triton.preprocess import ImageCacheClient, Preprocessor, cache_fingerprint
from llava_triton.spec import IMAGE_KEY_BYTES, ModelSpec, ServingConfig
from llava_triton.testing.reference import NEXT_PRESETS, make_test_images, preset_checkpoint, tiny_checkpoint

IMAGES = make_test_images()
PROMPT = "What is in this image?"


@pytest.fixture
def directory():
    created = Directory.create(f"llava-test-{uuid.uuid4().hex[:12]}", capacity=64)
    yield created
    created.close()


def client_for(directory: Directory, fingerprint: bytes = b"f" * 32) -> ImageCacheClient:
    return ImageCacheClient(directory.name, fingerprint)


@pytest.fixture(scope="module")
def preprocessor():
    checkpoint = tiny_checkpoint()
    return Preprocessor.from_pretrained(checkpoint, ModelSpec.from_pretrained(checkpoint), ServingConfig())


def test_images_get_keys_and_a_listed_image_is_not_decoded(preprocessor):
    # The directory is direct-mapped: two keys in one slot would overwrite each other (a miss, as
    # designed). Keys depend on the directory's random secret: take one where the two images' differ.
    for _ in range(20):
        directory = Directory.create(f"llava-test-{uuid.uuid4().hex[:12]}", capacity=64)
        cache = client_for(directory)
        keys = cache.keys([IMAGES["jpeg"], IMAGES["png"]], b"")
        if directory.slot(keys[0]) != directory.slot(keys[1]):
            break
        directory.close()
    try:
        check_listed_images_are_not_decoded(preprocessor, directory, cache)
    finally:
        directory.close()


def check_listed_images_are_not_decoded(preprocessor, directory, cache):
    plain = preprocessor.prepare([IMAGES["jpeg"], IMAGES["png"]], PROMPT)
    assert plain.image_keys.shape == (0, IMAGE_KEY_BYTES) and not plain.image_cached.any()
    first = preprocessor.prepare([IMAGES["jpeg"], IMAGES["png"]], PROMPT, cache=cache)
    assert first.image_keys.shape == (2, IMAGE_KEY_BYTES) and first.image_cached.tolist() == [False, False]
    assert np.array_equal(first.input_ids, plain.input_ids) and np.array_equal(first.pixel_values, plain.pixel_values)
    # The language model lists the PNG: it is not decoded again and its tile is left out.
    directory.publish(first.image_keys[1].tobytes(), 336, 336)
    second = preprocessor.prepare([IMAGES["jpeg"], IMAGES["png"]], PROMPT, cache=cache)
    assert second.image_cached.tolist() == [False, True]
    assert np.array_equal(second.image_keys, first.image_keys) and np.array_equal(second.input_ids, first.input_ids)
    assert np.array_equal(second.pixel_values, first.pixel_values[:1])
    # All listed: one all-zero placeholder tile (the vision encoder takes no empty batch).
    directory.publish(first.image_keys[0].tobytes(), 336, 336)
    third = preprocessor.prepare([IMAGES["jpeg"], IMAGES["png"]], PROMPT, cache=cache)
    assert third.image_cached.all() and third.pixel_values.shape[0] == 1 and not third.pixel_values.any()


def test_a_listed_image_is_trusted_without_decoding_it(preprocessor, directory):
    """What proves it is not decoded: bytes that would be refused as corrupt pass once their key is listed
    (the language model lists a key only once it holds the embeddings that came with it)."""
    cache = client_for(directory)
    corrupt = IMAGES["jpeg"][:200]
    with pytest.raises(InvalidRequestError, match="corrupt or truncated"):
        preprocessor.prepare([corrupt], PROMPT, cache=cache)
    directory.publish(cache.keys([corrupt], b"")[0], 336, 336)
    assert preprocessor.prepare([corrupt], PROMPT, cache=cache).image_cached.tolist() == [True]


def test_keys_change_with_the_salt_the_fingerprint_and_the_server(preprocessor, directory):
    cache = client_for(directory)
    image = IMAGES["jpeg"]
    keys = {cache.keys([image], b"")[0], cache.keys([image], b"tenant")[0],
            client_for(directory, b"g" * 32).keys([image], b"")[0]}
    other_server = Directory.create(f"llava-test-{uuid.uuid4().hex[:12]}", capacity=64)
    try:
        keys.add(client_for(other_server).keys([image], b"")[0])
    finally:
        other_server.close()
    assert len(keys) == 4 and cache.keys([image], b"") == cache.keys([image], b"")
    # A salted request does not find the unsalted key.
    directory.publish(cache.keys([image], b"")[0], 336, 336)
    assert preprocessor.prepare([image], PROMPT, cache=cache, cache_salt=b"tenant").image_cached.tolist() == [False]


def test_without_a_directory_images_get_no_key_and_it_is_found_later(preprocessor):
    clock = [0.0]
    name = f"llava-test-{uuid.uuid4().hex[:12]}"
    cache = ImageCacheClient(name, b"f" * 32, clock=lambda: clock[0])
    assert preprocessor.prepare([IMAGES["jpeg"]], PROMPT, cache=cache).image_keys.shape == (0, IMAGE_KEY_BYTES)
    directory = Directory.create(name, capacity=64)
    try:
        assert cache.keys([IMAGES["jpeg"]], b"") is None  # looked for less than RETRY_S ago
        clock[0] += ImageCacheClient.RETRY_S
        assert len(cache.keys([IMAGES["jpeg"]], b"")) == 1
    finally:
        directory.close()
    assert cache.keys([IMAGES["jpeg"]], b"") is None  # the language model went: no key
    cache.close()


def test_a_cache_salt_past_its_limit_is_refused(preprocessor):
    with pytest.raises(InvalidRequestError, match=r"cache_salt is 257 bytes, more than the limit of 256 "
                       r"\(max_cache_salt_bytes\)"):
        preprocessor.prepare([], PROMPT, cache_salt=b"x" * 257)


def test_the_fingerprint_follows_the_processor_files_and_the_options(tmp_path):
    checkpoint = tiny_checkpoint()
    spec = ModelSpec.from_pretrained(checkpoint)
    (tmp_path / "preprocessor_config.json").write_text('{"a": 1}')
    first = cache_fingerprint(spec, ServingConfig(), tmp_path)
    assert cache_fingerprint(spec, ServingConfig(), tmp_path) == first
    assert cache_fingerprint(spec, ServingConfig(dtype="bfloat16"), tmp_path) != first
    (tmp_path / "preprocessor_config.json").write_text('{"a": 2}')
    assert cache_fingerprint(spec, ServingConfig(), tmp_path) != first


def test_a_listed_next_image_takes_its_size_from_the_directory(directory):
    """LLaVA-NeXT: a cached image's token count comes from its size in the directory, as if decoded."""
    checkpoint = preset_checkpoint(NEXT_PRESETS[0])
    preprocessor = Preprocessor.from_pretrained(checkpoint, ModelSpec.from_pretrained(checkpoint), ServingConfig())
    cache = client_for(directory)
    first = preprocessor.prepare([IMAGES["jpeg"]], PROMPT, cache=cache)
    height, width = first.image_sizes[0]
    directory.publish(first.image_keys[0].tobytes(), int(height), int(width))
    second = preprocessor.prepare([IMAGES["jpeg"]], PROMPT, cache=cache)
    assert second.image_cached.tolist() == [True]
    assert np.array_equal(second.input_ids, first.input_ids) and np.array_equal(second.image_sizes, first.image_sizes)
