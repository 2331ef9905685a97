"""Prefix caching and the embedding cache in the engine, without a server: prompt blocks reused only for
the same tokens, the same images and the same cache_salt; cached images read from the embedding cache;
answers equal to transformers' whether anything came from a cache or not. (The block allocator alone:
tests/test_kv_blocks.py; the embedding cache alone: tests/test_embedding_cache.py; through a real
server: tests/test_e2e_caches.py.)"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from llava_triton import lm_runtime
from llava_triton.engine import Engine, Metrics
from llava_triton.errors import InvalidRequestError
from llava_triton.spec import IMAGE_KEY_BYTES, ServingConfig
from tests.test_engine import Collect, assert_all_free, engine_parts, hf_greedy, params, prepared, run_until_done

BLOCK = 4


@pytest.fixture(scope="module")
def parts(tiny_checkpoint, tmp_path_factory):
    return engine_parts(tiny_checkpoint, tmp_path_factory)


class PrefixMetrics(Metrics):
    def __init__(self):
        self.lookups: list[tuple[int, int]] = []

    def prefix_cache(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.lookups.append((prompt_tokens, hit_tokens))


def engine_for(parts, metrics: Metrics | None = None, blocks: int | None = None, **options) -> Engine:
    _, model_spec, tokenizer, _ = parts
    serving = ServingConfig(kv_block_size=BLOCK, **options)
    if blocks is not None:
        original = lm_runtime.kv_cache_blocks
        lm_runtime.kv_cache_blocks = lambda model, serving, max_seq_len: 1 + blocks
        try:
            runtime = prepared(parts, serving)
        finally:
            lm_runtime.kv_cache_blocks = original
    else:
        runtime = prepared(parts, serving)
    return Engine(runtime, tokenizer, model_spec, serving, metrics=metrics)


def key(name: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(name.encode()).digest(), dtype=np.uint8).reshape(1, IMAGE_KEY_BYTES)


def image_request(parts, question: str, seed: int):
    """input_ids with one expanded image, its pixels and the projector's embeddings of them (transformers')."""
    _, model_spec, tokenizer, hf = parts
    n = model_spec.num_image_tokens
    text_ids = tokenizer(f"USER: <image>\n{question} ASSISTANT:")["input_ids"]
    at = text_ids.index(model_spec.image_token_index)
    input_ids = torch.tensor(text_ids[:at] + [model_spec.image_token_index] * n + text_ids[at + 1:])
    pixel_values = torch.randn(1, 3, model_spec.image_size, model_spec.image_size,
                               generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        features = hf.model.get_image_features(pixel_values=pixel_values)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    image_embeds = (torch.cat(list(features), 0).reshape(1, n, -1) if isinstance(features, (list, tuple))
                    else features).clone()
    return input_ids, pixel_values, image_embeds


def run(engine: Engine, input_ids, image_embeds=None, max_tokens: int = 6, **submit) -> Collect:
    sink = Collect()
    engine.submit(input_ids, image_embeds, params(max_tokens=max_tokens, ignore_eos=True), sink, **submit)
    run_until_done(engine, [sink])
    assert sink.errors == []
    return sink


def test_a_repeated_prompt_reuses_its_blocks_and_answers_the_same(parts):
    """The second time, every full block but the one holding the last token comes from the cache; the
    answer equals the first, the answer with caching off, and transformers'."""
    _, _, _, hf = parts
    input_ids, pixel_values, image_embeds = image_request(parts, "What is this?", seed=1)
    metrics = PrefixMetrics()
    engine = engine_for(parts, metrics)
    first = run(engine, input_ids, image_embeds, image_keys=key("a"))
    second = run(engine, input_ids, image_embeds, image_keys=key("a"))
    reused = (len(input_ids) - 1) // BLOCK * BLOCK
    assert metrics.lookups == [(len(input_ids), 0), (len(input_ids), reused)] and reused > 0
    off = run(engine_for(parts, prefix_caching=False), input_ids, image_embeds, image_keys=key("a"))
    expected = hf_greedy(hf, input_ids, 6, pixel_values=pixel_values)
    assert first.token_ids == second.token_ids == off.token_ids == expected
    assert_all_free(engine)
    assert engine.blocks.num_cached >= reused // BLOCK


@pytest.mark.parametrize("order", ["a then b", "b then a"])
def test_the_same_text_with_another_image_shares_no_image_block(parts, order):
    """The wrong-image bug: two images are the same run of placeholder ids, so only the image's content
    key tells their blocks apart. The blocks before the image are shared; none from the image on."""
    _, model_spec, _, hf = parts
    ids_a, pixels_a, embeds_a = image_request(parts, "What is this?", seed=1)
    ids_b, pixels_b, embeds_b = image_request(parts, "What is this?", seed=2)
    assert torch.equal(ids_a, ids_b)
    metrics = PrefixMetrics()
    engine = engine_for(parts, metrics)
    requests = {"a": (ids_a, embeds_a, key("a"), pixels_a), "b": (ids_b, embeds_b, key("b"), pixels_b)}
    names = order.split(" then ")
    sinks = {name: run(engine, *requests[name][:2], image_keys=requests[name][2]) for name in names}
    before_image = int(np.flatnonzero(ids_a.numpy() == model_spec.image_token_index)[0]) // BLOCK * BLOCK
    assert metrics.lookups[1] == (len(ids_a), before_image)
    for name, (ids, _, _, pixels) in requests.items():
        assert sinks[name].token_ids == hf_greedy(hf, ids, 6, pixel_values=pixels)
    assert sinks["a"].token_ids != sinks["b"].token_ids  # the two images do give different answers


def test_an_image_without_a_key_is_never_shared(parts):
    """A request whose images have no key (a client calling the language model directly without one):
    nothing from its first image block on is cached, so the same prompt again computes it again."""
    input_ids, _, image_embeds = image_request(parts, "What is this?", seed=1)
    metrics = PrefixMetrics()
    engine = engine_for(parts, metrics)
    run(engine, input_ids, image_embeds)
    run(engine, input_ids, image_embeds)
    first_image = int(np.flatnonzero(input_ids.numpy() == parts[1].image_token_index)[0])
    assert metrics.lookups[1][1] == first_image // BLOCK * BLOCK


def test_cache_salts_keep_tenants_apart(parts):
    _, _, tokenizer, hf = parts
    input_ids = torch.tensor(tokenizer("USER: Tell me a long story about the sea and the sky. ASSISTANT:")["input_ids"])
    metrics = PrefixMetrics()
    engine = engine_for(parts, metrics)
    answers = [run(engine, input_ids, cache_salt=salt).token_ids
               for salt in (b"tenant-1", b"tenant-2", b"", b"tenant-1")]
    reused = (len(input_ids) - 1) // BLOCK * BLOCK
    assert [hits for _, hits in metrics.lookups] == [0, 0, 0, reused]
    assert all(answer == hf_greedy(hf, input_ids, 6) for answer in answers)


def test_a_later_turn_reuses_the_earlier_prompt(parts):
    """A chat's second turn sends the first turn's prompt, its answer and a new question: the first
    prompt's full blocks come from the cache and the answer still equals transformers'."""
    _, _, tokenizer, hf = parts
    input_ids, pixel_values, image_embeds = image_request(parts, "What is this?", seed=3)
    metrics = PrefixMetrics()
    engine = engine_for(parts, metrics)
    answer = run(engine, input_ids, image_embeds, max_tokens=5, image_keys=key("c")).token_ids
    follow_up = torch.tensor(tokenizer(" USER: And what colour is it? ASSISTANT:",
                                       add_special_tokens=False)["input_ids"])
    turn_2 = torch.cat([input_ids, torch.tensor(answer), follow_up])
    second = run(engine, turn_2, image_embeds, image_keys=key("c"))
    assert metrics.lookups[1][1] == len(input_ids) // BLOCK * BLOCK
    assert second.token_ids == hf_greedy(hf, turn_2, 6, pixel_values=pixel_values)


def test_cached_blocks_are_evicted_least_recently_used_when_blocks_run_out(parts):
    """A pool that holds one request at a time: each new prompt evicts cached blocks (the oldest
    first) and every answer is still right; a prompt used since stays cached longer."""
    _, _, tokenizer, hf = parts
    prompts = [torch.tensor(tokenizer(f"USER: Question number {i} is about the sea. ASSISTANT:")["input_ids"])
               for i in range(4)]
    metrics = PrefixMetrics()
    needed = -(-(len(prompts[0]) + 6 - 1) // BLOCK)
    engine = engine_for(parts, metrics, blocks=needed + needed // 2)
    for ids in prompts:
        assert run(engine, ids).token_ids == hf_greedy(hf, ids, 6)
    assert engine.blocks.evictions > 0
    assert_all_free(engine)
    # The last prompt is the most recent: it is still cached whole; of the first one, only the blocks
    # every prompt begins with (used again by each) are left.
    run(engine, prompts[3])
    run(engine, prompts[0])
    common = int(np.argmax(prompts[0][:len(prompts[3])].numpy() != prompts[3][:len(prompts[0])].numpy()))
    assert metrics.lookups[-2][1] == (len(prompts[3]) - 1) // BLOCK * BLOCK
    assert metrics.lookups[-1][1] == common // BLOCK * BLOCK < metrics.lookups[-2][1]


def test_a_cancelled_request_leaves_only_its_complete_blocks_cached(parts):
    """Cancelled halfway through its prefill: the blocks it completed are cached (a later request takes
    exactly those), the rest are free, and the later answer is right."""
    _, _, tokenizer, hf = parts
    input_ids = torch.tensor(tokenizer("USER: Tell me a long story about the sea, the sky and the moon. "
                                       "ASSISTANT:")["input_ids"])
    metrics = PrefixMetrics()
    engine = engine_for(parts, metrics, prefill_chunk_tokens=2 * BLOCK + 1)
    victim = Collect()
    engine.submit(input_ids, None, params(max_tokens=6), victim)
    engine.step()  # admits it and prefills one chunk of 9 tokens: 2 complete blocks
    victim.cancel = True
    engine._last_cancel_check = 0.0
    engine.step()
    assert victim.errors == ["request cancelled"] and engine.blocks.num_cached == 2
    assert_all_free(engine)
    later = run(engine, input_ids)
    assert metrics.lookups[-1][1] == 2 * BLOCK
    assert later.token_ids == hf_greedy(hf, input_ids, 6)


def test_identical_requests_at_once_compute_alone_then_share(parts):
    """Two identical prompts admitted together each compute their own blocks (the first to finish
    registers them); a third one later takes them. All three answers are equal."""
    _, _, tokenizer, hf = parts
    input_ids = torch.tensor(tokenizer("USER: Describe the sea. ASSISTANT:")["input_ids"])
    metrics = PrefixMetrics()
    engine = engine_for(parts, metrics)
    sinks = [Collect(), Collect()]
    for sink in sinks:
        engine.submit(input_ids, None, params(max_tokens=6, ignore_eos=True), sink)
    run_until_done(engine, sinks)
    third = run(engine, input_ids)
    assert [hits for _, hits in metrics.lookups] == [0, 0, (len(input_ids) - 1) // BLOCK * BLOCK]
    assert sinks[0].token_ids == sinks[1].token_ids == third.token_ids == hf_greedy(hf, input_ids, 6)
    assert_all_free(engine)


# -- the embedding cache in the engine ------------------------------------------------------------

def embedding_engine(parts, cache):
    _, model_spec, tokenizer, _ = parts
    serving = ServingConfig(kv_block_size=BLOCK, prefix_caching=False)  # every token prefilled: embeddings used
    return Engine(prepared(parts, serving), tokenizer, model_spec, serving, embedding_cache=cache)


def test_a_cached_image_is_read_from_the_embedding_cache(parts):
    """The first request puts the image's embeddings in the cache; the second sends no tiles, marks the
    image cached, and answers as transformers does from the pixels."""
    from llava_triton.embedding_cache import EmbeddingCache

    _, _, _, hf = parts
    input_ids, pixel_values, image_embeds = image_request(parts, "What is this?", seed=5)
    cache = EmbeddingCache(1 << 30, grace_s=10.0)
    engine = embedding_engine(parts, cache)
    first = run(engine, input_ids, image_embeds, image_keys=key("e"), image_cached=np.array([False]))
    assert cache.stats().entries == 1
    second = run(engine, input_ids, None, image_keys=key("e"), image_cached=np.array([True]))
    assert first.token_ids == second.token_ids == hf_greedy(hf, input_ids, 6, pixel_values=pixel_values)
    assert cache.stats().hits == 1


@pytest.mark.parametrize("case, message", [
    ("evicted", "image 0: its embeddings left the embedding cache before the request reached the language model"),
    ("no keys", "image_cached marks images as cached but the request has no image_keys"),
    ("cache off", "image_cached marks images as cached but the embedding cache is off"),
    ("bad keys", r"image_keys must be UINT8 \[1, 32\] \(one key per image\), got uint8 \[1, 16\]"),
    ("flags", r"image_cached must hold one flag per image \(1\), got shape \[2\]"),
])
def test_inconsistent_cache_inputs_are_refused_by_name(parts, case, message):
    from llava_triton.embedding_cache import EmbeddingCache

    input_ids, _, _ = image_request(parts, "What is this?", seed=5)
    cache = None if case == "cache off" else EmbeddingCache(1 << 30, grace_s=10.0)
    engine = embedding_engine(parts, cache)
    inputs = {"image_keys": key("never put"), "image_cached": np.array([True])}
    if case == "no keys":
        inputs["image_keys"] = None
    elif case == "bad keys":
        inputs["image_keys"] = key("x")[:, :16]
    elif case == "flags":
        inputs["image_cached"] = np.array([True, False])
    refused = []
    engine.metrics.request_refused = refused.append
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit(input_ids, None, params(max_tokens=4), Collect(), **inputs)
    assert refused == ["invalid"] and not engine.has_work()
