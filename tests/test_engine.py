"""The in-flight batching engine against transformers, without a server."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from export.language_model import export_language_model
from export.vision_weights import load_from_checkpoint
from llava_triton import lm_runtime
from llava_triton.engine import Engine, Metrics, Output, count_images
from llava_triton.errors import InvalidRequestError, ServerBusyError
from llava_triton.llama import LlamaForCausalLM
from llava_triton.lm_runtime import prepare_language_model
from llava_triton.sampling import SamplingParams
from llava_triton.spec import ModelSpec, ServingConfig

SERVING = ServingConfig()


class Collect:
    """A sink that records what the engine sends."""

    def __init__(self):
        self.outputs: list[Output] = []
        self.errors: list[str] = []
        self.cancel = False

    def send(self, output: Output) -> None:
        self.outputs.append(output)

    def error(self, message: str) -> None:
        self.errors.append(message)

    def cancelled(self) -> bool:
        return self.cancel

    @property
    def done(self) -> bool:
        return bool(self.errors) or bool(self.outputs and self.outputs[-1].final)

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)


def params(**overrides) -> SamplingParams:
    inputs = {}
    for name, value in overrides.items():
        if name == "stop":
            inputs[name] = np.array([s.encode() for s in value], dtype=object)
        elif isinstance(value, bool):
            inputs[name] = np.array([value])
        elif isinstance(value, float):
            inputs[name] = np.array([value], dtype=np.float32)
        else:
            inputs[name] = np.array([value], dtype=np.int64)
    return SamplingParams.from_inputs(inputs, SERVING)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint, tmp_path_factory):
    return engine_parts(tiny_checkpoint, tmp_path_factory)


def engine_parts(tiny_checkpoint, tmp_path_factory):
    """(the exported language model's directory, the spec, the tokenizer, transformers' model)."""
    lm_dir = export_language_model(tiny_checkpoint, tmp_path_factory.mktemp("lm"))
    model_spec = ModelSpec.from_pretrained(tiny_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return lm_dir, model_spec, tokenizer, hf


def prepared(parts, serving: ServingConfig):
    """The exported language model, loaded and prepared as the language model's Triton adapter does."""
    lm_dir, model_spec, _, _ = parts
    return prepare_language_model(LlamaForCausalLM.from_pretrained(lm_dir), model_spec, serving)


def make_engine(parts, **serving) -> Engine:
    _, model_spec, tokenizer, _ = parts
    serving = ServingConfig(**serving)
    return Engine(prepared(parts, serving), tokenizer, model_spec, serving)


def assert_all_free(engine: Engine) -> None:
    """Every block-table row and KV-cache block back, nothing running or waiting."""
    assert engine.free_rows == engine.max_seqs and engine.free_blocks == engine.blocks.capacity
    assert not engine.has_work()


def run_until_done(engine: Engine, sinks: list[Collect], max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if all(s.done for s in sinks):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(f"USER: {text} ASSISTANT:")["input_ids"])


def hf_greedy(hf, input_ids: torch.Tensor, max_new_tokens: int, pixel_values=None) -> list[int]:
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids[None], pixel_values=pixel_values, max_new_tokens=max_new_tokens,
                          do_sample=False)
    return out[0, input_ids.shape[0]:].tolist()


def test_greedy_batch_matches_transformers_with_chunked_prefill_and_queueing(parts):
    _, model_spec, tokenizer, hf = parts
    # Two sequences at a time for four requests: two wait and join between decode steps. Chunks of 5 tokens
    # make every prompt take several prefill steps while others decode.
    engine = make_engine(parts, max_num_seqs=2, prefill_chunk_tokens=5)
    prompts = ["What is in the picture?", "Describe a cat.", "One", "Tell me a long story about the sea and sky."]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    sinks = [Collect() for _ in prompts]
    for i, (x, sink) in enumerate(zip(ids, sinks)):
        engine.submit(x, None, params(max_tokens=6 + 3 * i, temperature=0.0), sink)
    run_until_done(engine, sinks)
    for i, (x, sink) in enumerate(zip(ids, sinks)):
        assert sink.errors == []
        expected = hf_greedy(hf, x, 6 + 3 * i)
        assert sink.token_ids == expected[: len(sink.token_ids)]
        # Shorter only when EOS came first.
        assert len(sink.token_ids) == len(expected) or sink.token_ids[-1] in model_spec.eos_token_id
    assert_all_free(engine)


def test_image_embeddings_are_merged_like_transformers(parts):
    _, model_spec, tokenizer, hf = parts
    engine = make_engine(parts)
    n = model_spec.num_image_tokens
    text_ids = tokenizer("USER: <image>\nWhat is this? ASSISTANT:")["input_ids"]
    at = text_ids.index(model_spec.image_token_index)
    input_ids = torch.tensor(text_ids[:at] + [model_spec.image_token_index] * n + text_ids[at + 1:])
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, model_spec.image_size, model_spec.image_size)
    with torch.no_grad():
        features = hf.model.get_image_features(pixel_values=pixel_values)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    image_embeds = torch.cat(list(features), 0).reshape(1, n, -1) if isinstance(features, (list, tuple)) else features
    sink = Collect()
    engine.submit(input_ids, image_embeds, params(max_tokens=8), sink)
    run_until_done(engine, [sink])
    expected = hf_greedy(hf, input_ids, 8, pixel_values=pixel_values)
    assert sink.token_ids == expected[: len(sink.token_ids)] and sink.token_ids


def test_projector_in_the_engine_matches_transformers(parts, tiny_checkpoint):
    """projector_placement "language_model": requests carry the vision encoder's features and the
    engine projects them; the tokens equal transformers' from the pixels."""
    _, model_spec, tokenizer, hf = parts
    encoder, projector = load_from_checkpoint(tiny_checkpoint)
    serving = ServingConfig(projector_placement="language_model")
    runtime = prepared(parts, serving)
    engine = Engine(runtime, tokenizer, model_spec, serving, projector=projector)
    n = model_spec.num_image_tokens
    text_ids = tokenizer("USER: <image>\nWhat is this? <image> ASSISTANT:")["input_ids"]
    input_ids = []
    for token in text_ids:  # both tags expanded
        input_ids += [token] * (n if token == model_spec.image_token_index else 1)
    input_ids = torch.tensor(input_ids)
    pixel_values = torch.randn(2, 3, model_spec.image_size, model_spec.image_size,
                               generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        features = encoder(pixel_values)  # (2, n, vision_hidden_size): the vision_encoder model's output
    assert features.shape == (2, n, model_spec.vision_hidden_size)
    good, nan, wrong = Collect(), Collect(), Collect()
    engine.submit(input_ids, features, params(max_tokens=8), good)
    bad = features.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(InvalidRequestError, match="image_features holds NaN or infinite values"):
        engine.submit(input_ids, bad, params(max_tokens=8), nan)
    with pytest.raises(InvalidRequestError,
                       match=f"image_features must have shape \\[n, {n}, {model_spec.vision_hidden_size}\\]"):
        engine.submit(input_ids, torch.zeros(2, n, model_spec.text_hidden_size), params(max_tokens=8), wrong)
    with pytest.raises(InvalidRequestError, match="refers to 2 images but 1 images' features were sent"):
        engine.submit(input_ids, features[:1], params(max_tokens=8), wrong)
    run_until_done(engine, [good])
    expected = hf_greedy(hf, input_ids, 8, pixel_values=pixel_values)
    assert good.token_ids == expected[: len(good.token_ids)] and good.token_ids
    with pytest.raises(ValueError, match="'language_model' needs the projector"):
        Engine(runtime, tokenizer, model_spec, serving)
    with pytest.raises(ValueError, match="'model' takes no projector"):
        Engine(runtime, tokenizer, model_spec, ServingConfig(), projector=projector)
    with pytest.raises(ValueError, match="projector_placement must be model or language_model, got 'vision'"):
        ServingConfig(projector_placement="vision")


def test_the_model_is_prepared_before_the_engine_gets_it(parts):
    """prepare_language_model does the preparing (here on the CPU: fused projections, a KV cache of
    blocks for max_num_seqs sequences of the serving token limit, the model's own steps; compiled
    layers and CUDA graphs only on a GPU, see tests/test_gpu.py); the engine takes the result as it is."""
    _, model_spec, tokenizer, _ = parts
    serving = ServingConfig(max_num_seqs=3, max_seq_len=48)
    runtime = prepared(parts, serving)
    model = runtime.model
    attention = model.model.layers[0].self_attn
    qkv_proj = attention.qkv_proj
    assert qkv_proj is not None and not hasattr(attention, "q_proj")
    # 3 sequences of 48 tokens in blocks of 16 (the default kv_block_size), and the null block.
    assert (runtime.num_blocks, runtime.block_size, runtime.max_seqs, runtime.max_seq_len) == (10, 16, 3, 48)
    assert (model.num_blocks, model.block_size, model.max_seqs, model.max_seq_len) == (10, 16, 3, 48)
    assert attention.cache.k.shape[0] == 10 and attention.cache.k.shape[2] == 16
    assert model.block_tables.shape == (4, 3)  # a row per sequence and the padding row
    assert attention.cache.k.dtype == runtime.dtype == torch.float32 and runtime.device == torch.device("cpu")
    assert runtime.decode_step == model.decode and runtime.prefill_step == model.prefill
    engine = Engine(runtime, tokenizer, model_spec, serving)
    assert engine.model is model and attention.qkv_proj is qkv_proj  # not prepared again
    assert (engine.max_seqs, engine.max_seq_len, engine.free_rows, engine.free_blocks) == (3, 48, 3, 9)
    assert engine.decode_step == model.decode and engine.prefill_step == model.prefill
    with pytest.raises(ValueError, match="prepared for sequences of 48 tokens, the serving config allows 64"):
        Engine(runtime, tokenizer, model_spec, ServingConfig(max_num_seqs=3, max_seq_len=64))


def test_streamed_text_joins_to_the_full_decode_and_stop_strings_cut(parts):
    _, _, tokenizer, _ = parts
    engine = make_engine(parts)
    ids = prompt_ids(tokenizer, "Describe the picture in detail.")
    full, streamed = Collect(), Collect()
    engine.submit(ids, None, params(max_tokens=24, ignore_eos=True), full)
    engine.submit(ids, None, params(max_tokens=24, ignore_eos=True, stream=True), streamed)
    run_until_done(engine, [full, streamed])
    assert len(full.outputs) == 1 and len(streamed.outputs) == 24
    assert full.text == streamed.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert streamed.token_ids == full.token_ids
    assert [o.completion_tokens for o in streamed.outputs] == list(range(1, 25))
    assert full.outputs[-1].finish_reason == "length"

    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    cut = Collect()
    engine.submit(ids, None, params(max_tokens=24, ignore_eos=True, stream=True, stop=[stop]), cut)
    run_until_done(engine, [cut])
    assert cut.text == text[: text.index(stop)]
    assert all(stop not in o.text for o in cut.outputs)
    assert cut.outputs[-1].finish_reason == "stop" and cut.outputs[-1].final


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(parts):
    _, _, tokenizer, _ = parts
    ids = prompt_ids(tokenizer, "Say something.")
    runs = []
    for neighbours in (0, 3):
        engine = make_engine(parts)
        sink = Collect()
        engine.submit(ids, None,
                      params(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True), sink)
        others = [Collect() for _ in range(neighbours)]
        for other in others:
            engine.submit(ids, None, params(max_tokens=16, temperature=1.0, ignore_eos=True), other)
        run_until_done(engine, [sink, *others])
        runs.append(sink.token_ids)
    assert runs[0] == runs[1] and len(runs[0]) == 16
    engine = make_engine(parts)
    other_seed = Collect()
    engine.submit(ids, None, params(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True), other_seed)
    run_until_done(engine, [other_seed])
    assert other_seed.token_ids != runs[0]


def test_cancelled_request_frees_its_blocks_and_others_continue(parts):
    _, _, tokenizer, hf = parts
    engine = make_engine(parts, max_num_seqs=2)
    ids = prompt_ids(tokenizer, "Count to ten.")
    victim, survivor = Collect(), Collect()
    engine.submit(ids, None, params(max_tokens=50, ignore_eos=True, stream=True), victim)
    engine.submit(ids, None, params(max_tokens=10), survivor)
    engine.step()
    engine.step()
    survivor_blocks = engine.blocks.blocks_for(len(ids) + 10 - 1)
    assert engine.free_rows == 0
    assert engine.free_blocks == engine.blocks.capacity - survivor_blocks - engine.blocks.blocks_for(len(ids) + 50 - 1)
    victim.cancel = True
    engine._last_cancel_check = 0.0  # the next step checks cancellation now
    engine.step()
    assert victim.errors == ["request cancelled"] and engine.free_rows == 1
    assert engine.free_blocks == engine.blocks.capacity - survivor_blocks
    run_until_done(engine, [survivor])
    assert survivor.token_ids == hf_greedy(hf, ids, 10)[: len(survivor.token_ids)]
    assert_all_free(engine)


def test_full_queue_refuses_at_once(parts):
    _, _, tokenizer, _ = parts
    engine = make_engine(parts, max_queue_size=2, max_num_seqs=1)
    ids = prompt_ids(tokenizer, "Hi")
    for _ in range(3):  # one for the free row, two queued
        engine.submit(ids, None, params(), Collect())
    with pytest.raises(ServerBusyError, match="queue is full"):
        engine.submit(ids, None, params(), Collect())


def test_abort_all_fails_every_request(parts):
    _, _, tokenizer, _ = parts
    engine = make_engine(parts)
    sinks = [Collect(), Collect()]
    ids = prompt_ids(tokenizer, "Hi")
    for sink in sinks:
        engine.submit(ids, None, params(max_tokens=30, ignore_eos=True), sink)
    engine.step()
    engine.abort_all("the server is shutting down")
    assert [s.errors for s in sinks] == [["the server is shutting down"]] * 2
    assert_all_free(engine)


def test_engine_thread_serves_concurrent_submitters(parts):
    _, _, tokenizer, hf = parts
    engine = make_engine(parts)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    loop.start()
    try:
        prompts = [f"Question number {i}?" for i in range(6)]
        sinks = [Collect() for _ in prompts]
        threads = [threading.Thread(target=engine.submit,
                                    args=(prompt_ids(tokenizer, p), None, params(max_tokens=5), s))
                   for p, s in zip(prompts, sinks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for _ in range(200):
            if all(s.done for s in sinks):
                break
            threading.Event().wait(0.05)
        for p, s in zip(prompts, sinks):
            assert s.token_ids == hf_greedy(hf, prompt_ids(tokenizer, p), 5)[: len(s.token_ids)] and s.token_ids
    finally:
        stop.set()
        loop.join(timeout=5)


@pytest.mark.parametrize("ids, shape, message", [
    ([], None, "non-empty"),
    ([5, 99999], None, "outside the vocabulary"),
    ([5] + [1000] * 7, (1, 576, 128), "not a multiple"),
    ([5] + [1000] * 576, None, "refers to 1 images but 0"),
    ([5] + [1000] * 576, (1, 576, 64), "must have shape"),
])
def test_count_images_refuses_inconsistent_inputs(parts, ids, shape, message):
    _, model_spec, _, _ = parts
    with pytest.raises(InvalidRequestError, match=message):
        count_images(torch.tensor(ids, dtype=torch.int64), shape, model_spec)


def test_count_images_counts(parts):
    _, model_spec, _, _ = parts
    ids = torch.tensor([5] + [model_spec.image_token_index] * (2 * model_spec.num_image_tokens) + [7])
    assert count_images(ids, (3, model_spec.num_image_tokens, model_spec.text_hidden_size), model_spec) == 2


def test_a_request_finishing_while_another_prefills_releases_only_itself(parts):
    # Regression: sequences must compare by identity (removing one from a list compared tensors).
    _, _, tokenizer, _ = parts
    engine = make_engine(parts, prefill_chunk_tokens=3)
    short, long_prompt = Collect(), Collect()
    engine.submit(prompt_ids(tokenizer, "Hi"), None, params(max_tokens=2, ignore_eos=True), short)
    engine.step()
    engine.step()
    engine.step()
    engine.submit(prompt_ids(tokenizer, "A much longer question that takes several prefill chunks"), None,
                  params(max_tokens=3, ignore_eos=True), long_prompt)
    run_until_done(engine, [short, long_prompt])
    assert short.errors == long_prompt.errors == []
    assert len(short.token_ids) == 2 and len(long_prompt.token_ids) == 3
    assert_all_free(engine)


def test_max_seq_len_bounds_each_request(parts):
    _, _, tokenizer, _ = parts
    engine = make_engine(parts, max_seq_len=40)
    # CPU: no memory sizing, blocks for max_num_seqs sequences of max_seq_len
    assert engine.max_seq_len == 40 and engine.blocks.capacity == SERVING.max_num_seqs * 3
    ids = prompt_ids(tokenizer, "Hi")
    with pytest.raises(InvalidRequestError, match="context length of 40"):
        engine.submit(ids, None, params(max_tokens=40), Collect())
    sink = Collect()
    engine.submit(ids, None, params(), sink)  # no max_tokens: whatever room is left
    run_until_done(engine, [sink])
    assert len(sink.token_ids) <= 40 - len(ids)


def test_a_request_waiting_past_the_queue_timeout_is_refused(parts):
    _, _, tokenizer, _ = parts
    engine = make_engine(parts, max_num_seqs=1, queue_timeout_us=50_000)
    ids = prompt_ids(tokenizer, "Hi")
    running, waiting = Collect(), Collect()
    engine.submit(ids, None, params(max_tokens=200, ignore_eos=True), running)
    engine.step()
    engine.submit(ids, None, params(max_tokens=5), waiting)
    import time
    time.sleep(0.1)
    engine._last_cancel_check = 0.0
    engine.step()
    assert waiting.errors and "queue_timeout_us" in waiting.errors[0]
    assert running.errors == [] and engine.num_waiting == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_image_embeddings_are_refused_at_submit_and_the_others_go_on(parts, bad):
    _, model_spec, tokenizer, _ = parts
    engine = make_engine(parts)
    refused = []
    engine.metrics.request_refused = refused.append
    ids = torch.tensor([5] + [model_spec.image_token_index] * model_spec.num_image_tokens + [7])
    embeds = torch.zeros(1, model_spec.num_image_tokens, model_spec.text_hidden_size).half()
    good_embeds = embeds.clone()
    embeds[0, 3, 2] = bad
    good = Collect()
    with pytest.raises(InvalidRequestError, match="image_embeds holds NaN or infinite values"):
        engine.submit(ids, embeds, params(), Collect())
    # Rows past what the prompt uses are not read, so they are not checked.
    engine.submit(ids, torch.cat([good_embeds, embeds]), params(max_tokens=3, ignore_eos=True), good)
    run_until_done(engine, [good])
    assert refused == ["invalid"]
    assert good.errors == [] and len(good.token_ids) == 3
    assert_all_free(engine)


def test_prompts_are_prefilled_together_and_a_failing_one_fails_alone(parts, monkeypatch):
    _, model_spec, tokenizer, hf = parts
    engine = make_engine(parts, prefill_chunk_tokens=4096)
    calls = []
    prefill = engine.prefill_step  # the model's prefill, or PrefillGraphs on a GPU

    def failing_for_row_1(embeds, segments):
        calls.append([row for row, _, _ in segments])
        if any(row == 1 for row, _, _ in segments):
            raise RuntimeError("injected fault")
        return prefill(embeds, segments)

    monkeypatch.setattr(engine, "prefill_step", failing_for_row_1)
    prompts = ["What is in the picture?", "Describe a cat.", "Tell me a long story about the sea and sky."]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    sinks = [Collect() for _ in prompts]
    for x, sink in zip(ids, sinks):
        engine.submit(x, None, params(max_tokens=5, temperature=0.0), sink)
    run_until_done(engine, sinks)
    # One packed call for the three prompts, then each alone to find the one that fails.
    assert calls == [[0, 1, 2], [0], [1], [2]]
    assert sinks[1].errors == ["prefill failed: injected fault"] and sinks[1].outputs == []
    for i in (0, 2):
        assert sinks[i].errors == []
        assert sinks[i].token_ids == hf_greedy(hf, ids[i], 5)[: len(sinks[i].token_ids)]
    assert_all_free(engine)


@pytest.mark.parametrize("decode_attention", ["sdpa", "triton"])
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # Triton's interpreter
def test_fp8_kv_cache_serves_and_its_first_token_matches_transformers(parts, decode_attention):
    """kv_cache_dtype=fp8_e4m3 on either decode attention (the Triton kernel runs in Triton's
    interpreter here). Prefill attends to its own fresh keys and values, so the first token is
    transformers'; later ones read rounded keys and values and may differ."""
    pytest.importorskip("triton")
    if decode_attention == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel with a CPU model needs Triton's interpreter, which conftest turns on only on a machine "
                    "without a GPU; test_gpu.py runs the kernel on the GPU")
    _, _, tokenizer, hf = parts
    engine = make_engine(parts, max_num_seqs=2, kv_cache_dtype="fp8_e4m3", decode_attention=decode_attention)
    assert engine.model.model.layers[0].self_attn.cache.k.dtype == torch.float8_e4m3fn
    assert engine.model.model.layers[0].self_attn.decode_kernel == (decode_attention == "triton")
    ids = [prompt_ids(tokenizer, p) for p in ("Describe a cat.", "Tell me a long story about the sea and sky.")]
    sinks = [Collect() for _ in ids]
    for x, sink in zip(ids, sinks):
        engine.submit(x, None, params(max_tokens=8, temperature=0.0, ignore_eos=True), sink)
    run_until_done(engine, sinks)
    for x, sink in zip(ids, sinks):
        assert sink.errors == [] and len(sink.token_ids) == 8
        assert sink.token_ids[0] == hf_greedy(hf, x, 1)[0]
    assert_all_free(engine)


def test_fp8_weights_serve(parts):
    """lm_weight_dtype=fp8_e4m3: the projections are FP8 before the KV cache is sized, and
    requests run to their length (values are not compared: FP8 weights round every projection)."""
    from llava_triton.fp8 import Fp8Linear

    _, _, tokenizer, _ = parts
    engine = make_engine(parts, max_num_seqs=2, lm_weight_dtype="fp8_e4m3")
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, Fp8Linear)
    sinks = [Collect(), Collect()]
    for text, sink in zip(("Describe a cat.", "One"), sinks):
        engine.submit(prompt_ids(tokenizer, text), None, params(max_tokens=6, ignore_eos=True), sink)
    run_until_done(engine, sinks)
    assert [len(s.token_ids) for s in sinks] == [6, 6] and not any(s.errors for s in sinks)


class Occupancy(Metrics):
    def __init__(self):
        self.seen: list[tuple[int, int, float, int]] = []

    def occupancy(self, running: int, waiting: int, kv_cache_usage: float, free_blocks: int,
                  cached_blocks: int = 0) -> None:
        self.seen.append((running, waiting, kv_cache_usage, free_blocks))


def test_admission_follows_the_blocks_requests_use(parts, monkeypatch):
    """A pool smaller than max_num_seqs sequences of max_seq_len (as on a GPU short of memory): a
    request is admitted when the blocks of its prompt and max_tokens are free, not a worst-case slot,
    and waits for blocks otherwise; every answer still equals transformers'; a request larger than
    the whole pool is refused by name; the metrics show the blocks; every block comes back."""
    _, model_spec, tokenizer, hf = parts
    monkeypatch.setattr(lm_runtime, "kv_cache_blocks", lambda model, serving, max_seq_len: 1 + 10)
    serving = ServingConfig(max_num_seqs=8, max_seq_len=48, kv_block_size=4)
    metrics = Occupancy()
    engine = Engine(prepared(parts, serving), tokenizer, model_spec, serving, metrics=metrics)
    assert (engine.blocks.capacity, engine.blocks.block_size) == (10, 4)
    prompts = ["Describe a cat.", "One", "What is in the picture?"]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    # Each takes 4 blocks (16 positions) with its max_tokens, a fifth of a max_seq_len sequence's 12.
    max_tokens = [4 * 4 - len(x) + 1 for x in ids]
    assert all(0 < n for n in max_tokens) and all(engine.blocks.blocks_for(len(x) + n - 1) == 4
                                                 for x, n in zip(ids, max_tokens))
    sinks = [Collect() for _ in prompts]
    for x, n, sink in zip(ids, max_tokens, sinks):
        engine.submit(x, None, params(max_tokens=n, ignore_eos=True), sink)
    engine.step()
    # Two fit in 10 blocks; the third waits for blocks although 6 of the 8 rows are free.
    assert (engine.num_running, engine.num_waiting, engine.free_blocks, engine.free_rows) == (2, 1, 2, 6)
    assert metrics.seen[-1] == (2, 1, 0.8, 2)
    run_until_done(engine, sinks)
    for x, n, sink in zip(ids, max_tokens, sinks):
        assert sink.errors == [] and sink.token_ids == hf_greedy(hf, x, n)
    assert metrics.seen[-1] == (0, 0, 0.0, 10)
    assert_all_free(engine)
    refused = []
    engine.metrics.request_refused = refused.append
    with pytest.raises(InvalidRequestError, match=f"the prompt's {len(ids[1])} tokens and max_tokens "
                       f"{48 - len(ids[1])} need 12 KV-cache blocks of 4 tokens, more than the whole KV cache's 10"):
        engine.submit(ids[1], None, params(max_tokens=48 - len(ids[1])), Collect())
    assert refused == ["invalid"] and not engine.has_work()


def test_oldest_waiting_request_is_admitted_first(parts, monkeypatch):
    """A request that does not fit yet is not overtaken by younger ones that would: a stream of
    short requests cannot starve a long one."""
    _, model_spec, tokenizer, _ = parts
    monkeypatch.setattr(lm_runtime, "kv_cache_blocks", lambda model, serving, max_seq_len: 1 + 10)
    serving = ServingConfig(max_num_seqs=8, max_seq_len=48, kv_block_size=4)
    engine = Engine(prepared(parts, serving), tokenizer, model_spec, serving)
    ids = prompt_ids(tokenizer, "One")
    first, long_request, short = Collect(), Collect(), Collect()
    engine.submit(ids, None, params(max_tokens=20 - len(ids) + 1, ignore_eos=True), first)  # 5 blocks
    engine.submit(ids, None, params(max_tokens=28 - len(ids) + 1, ignore_eos=True), long_request)  # 7 blocks
    engine.submit(ids, None, params(max_tokens=2, ignore_eos=True), short)  # would fit now
    assert engine.blocks.blocks_for(len(ids) + 1) <= 3  # the short one fits beside the long one
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (1, 2)
    run_until_done(engine, [first])
    engine.step()
    assert engine.num_waiting == 0  # both admitted once the first was done
    run_until_done(engine, [long_request, short])
    assert_all_free(engine)


def test_overlapped_decode_gives_what_the_serial_schedule_gives(parts):
    """overlap_decode launches step N+1 before the host reads step N's tokens: the same tokens, texts and
    finish reasons as one step at a time, for greedy and seeded requests, stop strings (one on the first
    token, which prefill samples) and max_tokens, requests queueing for rows; a sequence that stops on a
    stop string computes exactly one step more."""
    from llava_triton.step_profile import PHASES, StepProfile

    _, model_spec, tokenizer, _ = parts
    prompts = ["What is in the picture?", "Describe a cat.", "One", "Tell me a long story about the sea and sky.",
               "Count to ten.", "Why is the sky blue?"]
    # Candidates for a request whose first token holds its stop string: one whose first token decodes
    # to whole characters that do not come back later.
    candidates = [prompt_ids(tokenizer, p) for p in ("Say hi.", "Name a color.", "Hello there", "Pick a number.",
                                                      "Go on", "A dog and a ball.")]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    # Stop strings that do occur: a piece of what each prompt's greedy answer says after a few tokens.
    probe = make_engine(parts, max_num_seqs=12, overlap_decode=False)
    probes = [Collect() for _ in ids + candidates]
    for x, sink in zip(ids + candidates, probes):
        probe.submit(x, None, params(max_tokens=12, ignore_eos=True), sink)
    run_until_done(probe, probes)
    stops = [tokenizer.decode(sink.token_ids[3 + i % 4: 5 + i % 4]).strip() for i, sink in enumerate(probes[:6])]
    assert all(stops)
    firsts = [(tokenizer.decode(sink.token_ids[:1]).strip(), tokenizer.decode(sink.token_ids[1:]), x, sink)
              for x, sink in zip(candidates, probes[6:])]
    first, first_ids, first_probe = next((text, x, sink) for text, rest, x, sink in firsts
                                         if text and "\ufffd" not in text and text not in rest)
    ids.append(first_ids)

    def run(overlap: bool):
        serving = ServingConfig(max_num_seqs=3, prefill_chunk_tokens=7, overlap_decode=overlap)
        profile = StepProfile("cpu")
        engine = Engine(prepared(parts, serving), tokenizer, model_spec, serving, profile=profile)
        sinks = [Collect() for _ in ids]
        requests = [params(max_tokens=12, stop=[stops[0]]), params(max_tokens=9, temperature=0.9, seed=7),
                    params(max_tokens=12, stop=[stops[2]], temperature=0.7, seed=3), params(max_tokens=5),
                    params(max_tokens=12, stop=[stops[4]]), params(max_tokens=1), params(max_tokens=12, stop=[first])]
        for x, request, sink in zip(ids, requests, sinks):
            engine.submit(x, None, request, sink)
        run_until_done(engine, sinks)
        engine.step()  # a step thrown away may still be in flight: nothing of it must come out
        assert_all_free(engine)
        assert all(not sink.errors and sum(o.final for o in sink.outputs) == 1 for sink in sinks)
        return sinks, profile

    serial, serial_profile = run(False)
    overlapped, overlapped_profile = run(True)
    for a, b in zip(serial, overlapped):
        assert (a.token_ids, a.text, a.outputs[-1].finish_reason) == (b.token_ids, b.text, b.outputs[-1].finish_reason)
    stopped = [s for s in serial if s.outputs[-1].finish_reason == "stop"]
    assert len(stopped) >= 3 and overlapped[6].token_ids == first_probe.token_ids[:1]  # stops, one at its first token
    # Serial: a decode row per token after the first (prefill's); overlapped: one more per stop-string stop.
    assert serial_profile.decode_rows == sum(len(s.token_ids) - 1 for s in serial)
    assert overlapped_profile.decode_rows == serial_profile.decode_rows + len(stopped)
    for profile in (serial_profile, overlapped_profile):
        summary = profile.summary()
        assert set(summary["host_ms"]) == set(PHASES) and summary["gpu_decode_ms_per_step"] is None
        assert summary["steps"] == profile.steps > summary["decode_steps"] > 0
        assert all(summary["host_ms"][name] > 0 for name in ("admit", "prefill", "decode_launch", "decode_emit"))
        assert summary["host_ms_total"] == pytest.approx(sum(summary["host_ms"].values()), abs=0.01)
