"""GPU-only checks (skipped where torch sees no CUDA device; run on the H100 with
`python3 -m pytest tests/test_gpu.py`): every CUDA-graph runner (llava_triton.cuda_graphs) gives what
its model gives eagerly: the vision models for every batch size up to the largest bucket and past it,
the language model's decode and prefill steps; and the language model prepared as the engine gets it."""

import numpy as np
import pytest
import torch
from test_llama import row_positions, setup_blocks
from transformers import CLIPVisionConfig

from llava_triton import vision
from llava_triton.batching import BatchedModule
from llava_triton.cuda_graphs import DecodeGraphs, GraphedModule, PrefillGraphs, maybe_graphed
from llava_triton.errors import InvalidRequestError
from llava_triton.llama import LlamaConfig, LlamaForCausalLM
from llava_triton.torch_compile import compile_model, maybe_compiled
from llava_triton.vision import Projector, VisionEncoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_modules(device, dtype):
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=32)
    encoder = VisionEncoder(config, vision_feature_layer=-2).to(device, dtype)
    projector = Projector(64, 96).to(device, dtype)
    return encoder, projector


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_vision_models_match_eager(dtype):
    device = torch.device("cuda")
    encoder, projector = tiny_modules(device, dtype)
    graphed_encoder = GraphedModule(encoder, (3, 56, 56), dtype, device, max_batch=8)
    graphed_projector = GraphedModule(projector, (16, 64), dtype, device, max_batch=8)
    assert sorted(graphed_encoder.graphs) == [1, 2, 4, 8]
    with torch.inference_mode():
        for n in (1, 3, 8, 11):  # 11: past the largest bucket, eager
            pixels = torch.randn(n, 3, 56, 56, device=device, dtype=dtype)
            eager = encoder(pixels)
            got = graphed_encoder(pixels)
            # A padded batch may pick another GEMM kernel: equal up to rounding, not bit for bit (in
            # bf16 a rounding step is 0.4 %, and three layers compound it).
            tolerance = {} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
            torch.testing.assert_close(got, eager, **tolerance)
            torch.testing.assert_close(graphed_projector(eager), projector(eager), **tolerance)
            assert (got.float() - eager.float()).abs().mean() <= 1e-2 * eager.float().abs().mean()


def test_compiled_graphed_vision_models_match_eager():
    """What serve_encoder / serve_projector build with torch_compile on: compiled layers, then graphs."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    encoder, projector = tiny_modules(device, dtype)
    pixels = torch.randn(11, 3, 56, 56, device=device, dtype=dtype)
    with torch.inference_mode():
        eager = [encoder(pixels[:n]) for n in (1, 3, 8)]
        eager_embeds = [projector(features) for features in eager]
    maybe_compiled(encoder, (3, 56, 56), dtype, device, True)
    maybe_compiled(projector, (16, 64), dtype, device, True)
    assert encoder.encoder_layer is not vision.encoder_layer and "forward" in projector.__dict__  # compiled
    graphed_encoder = GraphedModule(encoder, (3, 56, 56), dtype, device, max_batch=8)
    graphed_projector = GraphedModule(projector, (16, 64), dtype, device, max_batch=8)
    with torch.inference_mode():
        for n, expected, expected_embeds in zip((1, 3, 8), eager, eager_embeds):
            got = graphed_encoder(pixels[:n])
            # Fused kernels round in other places: equal up to bfloat16 rounding.
            torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)
            assert (got.float() - expected.float()).abs().mean() <= 1e-2 * expected.float().abs().mean()
            torch.testing.assert_close(graphed_projector(expected), expected_embeds, rtol=5e-2, atol=5e-2)


def test_fp8_vision_models_compiled_and_graphed_stay_close_to_float32():
    """vision_weight_dtype=fp8_e4m3 as serve_encoder / serve_projector build it on a GPU: fused q/k/v,
    FP8 weights (cuBLASLt's FP8 GEMM, activations rounded per token), compiled layers, graphs."""
    device = torch.device("cuda")
    reference_encoder, reference_projector = tiny_modules(device, torch.float32)
    encoder, projector = tiny_modules(device, torch.bfloat16)
    encoder.fuse()
    encoder.quantize_fp8()
    projector.quantize_fp8()
    maybe_compiled(encoder, (3, 56, 56), torch.bfloat16, device, True)
    maybe_compiled(projector, (16, 64), torch.bfloat16, device, True)
    graphed_encoder = GraphedModule(encoder, (3, 56, 56), torch.bfloat16, device, max_batch=8)
    graphed_projector = GraphedModule(projector, (16, 64), torch.bfloat16, device, max_batch=8)
    pixels = torch.randn(8, 3, 56, 56, device=device)
    with torch.inference_mode():
        for n in (1, 3, 8):
            expected = reference_projector(reference_encoder(pixels[:n]))
            got = graphed_projector(graphed_encoder(pixels[:n].to(torch.bfloat16))).float()
            error = ((got - expected).norm() / expected.norm()).item()
            assert 0 < error < 0.08, (n, error)


def test_fp16_wire_stages_through_pinned_memory_and_refuses_nan_rows_on_the_gpu():
    device = torch.device("cuda")
    encoder, _ = tiny_modules(device, torch.bfloat16)
    graphed = maybe_graphed(encoder, (3, 56, 56), torch.bfloat16, device, 8, True)
    batched = BatchedModule(graphed, "pixel_values", "image_features", (3, 56, 56), (16, 64), device, torch.bfloat16,
                            np.dtype(np.float16))
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1)).half().numpy()
    nan = pixels[:1].copy()
    nan[0, 0, 0, 0] = np.nan
    good, refused, alone = batched.run_requests([pixels, nan, pixels[1:2]])
    assert isinstance(refused, InvalidRequestError) and "pixel_values contains NaN" in str(refused)
    assert good.dtype == alone.dtype == np.float16 and good.shape == (3, 16, 64)
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(pixels).to(device).to(torch.bfloat16)).float().cpu().numpy()
    # Another batch size may pick another GEMM kernel: equal up to bfloat16 rounding.
    np.testing.assert_allclose(good.astype(np.float32), expected, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(alone.astype(np.float32), expected[1:2], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("wire", [np.float16, np.float32])
def test_pipelined_batches_give_what_one_forward_gives_and_refuse_nan_rows(wire):
    """Past PIPELINE_ROWS rows a GPU batch runs in chunks on three streams (BatchedModule._forward_gpu):
    the same outputs as the whole batch in one forward, request by request, whatever chunk a request
    straddles, and a NaN row still refuses its own request only."""
    device = torch.device("cuda")
    encoder, _ = tiny_modules(device, torch.float32)
    graphed = maybe_graphed(encoder, (3, 56, 56), torch.float32, device, 32, True)
    batched = BatchedModule(graphed, "pixel_values", "image_features", (3, 56, 56), (16, 64), device, torch.float32,
                            np.dtype(wire))
    whole = BatchedModule(graphed, "pixel_values", "image_features", (3, 56, 56), (16, 64), device, torch.float32,
                          np.dtype(wire))
    whole.PIPELINE_ROWS = 1000  # always one forward
    pixels = torch.randn(27, 3, 56, 56, generator=torch.Generator().manual_seed(2)).numpy().astype(wire)
    nan = pixels[:3].copy()
    nan[2, 1, 0, 0] = np.nan
    requests = [pixels[:7], nan, pixels[7:20], pixels[20:21], pixels[21:]]  # 7 + 3 + 13 + 1 + 6 = 30 rows
    if wire == np.float32:  # refused on the host before the batch
        requests[1] = pixels[:3]
    for _ in range(2):  # the second time on the streams and pinned blocks the first left
        got, expected = batched.forward(requests), whole.forward(requests)
        for index, (a, b) in enumerate(zip(got, expected)):
            if wire == np.float16 and index == 1:
                assert isinstance(a, InvalidRequestError) and isinstance(b, InvalidRequestError)
                continue
            assert a.dtype == wire and a.shape == (len(requests[index]), 16, 64)
            # Chunks replay other graph buckets than the whole batch: other GEMM kernels, float32 rounding.
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_maybe_graphed_is_eager_on_the_cpu_or_when_off():
    encoder, _ = tiny_modules("cpu", torch.float32)
    assert maybe_graphed(encoder, (3, 56, 56), torch.float32, torch.device("cpu"), 8, True) is encoder
    encoder = encoder.cuda()
    assert maybe_graphed(encoder, (3, 56, 56), torch.float32, torch.device("cuda"), 8, False) is encoder


def test_decode_graphs_match_eager_decode():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(config).cuda().eval()
    setup_blocks(model, rows=4, seq_len=64, block_size=4)  # each row's blocks scattered over the pool
    graphs = DecodeGraphs(model, max_batch=4, length_step=16)
    assert graphs.batch_buckets == [1, 2, 4] and graphs.length_buckets == [16, 32, 48, 64]
    with torch.inference_mode():
        for row in range(3):  # three prompts of different lengths, prefilled eagerly
            model.prefill(torch.randn(1, 5 + row, 64, device="cuda"), [(row, 0, 5 + row)])
        ids = torch.tensor([3, 7, 11], device="cuda")
        positions = torch.tensor([5, 6, 7], device="cuda")
        rows = torch.tensor([2, 0, 1], device="cuda")
        eager = model.decode(ids, positions[rows], rows, 8).clone()
        before = [layer.self_attn.cache.k.clone() for layer in model.model.layers]
        replayed = graphs(ids, positions[rows], rows, 8).clone()  # batch 3 padded to 4, length 8 to 16
        # The padding row wrote the null block only: row 3's blocks (not in the batch) are as they were.
        row_3 = model.block_tables[3].long()
        for layer, k in zip(model.model.layers, before):
            assert torch.equal(layer.self_attn.cache.k[row_3], k[row_3])
    # Batch 3 runs as a padded batch of 4: another GEMM kernel may round differently.
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights", ["auto", "fp8_e4m3"])
@pytest.mark.usefixtures("fresh_dynamo")
def test_prefill_graphs_match_eager_prefill(weights):
    """PrefillGraphs on the serving configuration (fused, compiled; bf16, or FP8 projections and KV
    cache): a lone first chunk replays its length bucket's graph and gives eager prefill's logits
    and cache; other chunks (several sequences, a later chunk, past the largest bucket) run eager
    prefill."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    model.fuse()
    if weights == "fp8_e4m3":  # with an FP8 KV cache too
        model.quantize_fp8()
    setup_blocks(model, rows=4, seq_len=64, block_size=16,
                 kv_cache_dtype=torch.float8_e4m3fn if weights != "auto" else None)
    with torch.inference_mode():
        assert compile_model(model)
        graphs = PrefillGraphs(model, max_tokens=40, step=16)
        assert graphs.buckets == [16, 32, 40]
        graphs.capture_all()
        calls = []
        eager_prefill = model.prefill
        model.prefill = lambda *args: calls.append(args[1]) or eager_prefill(*args)
        x = torch.randn(1, 23, 64, device="cuda", dtype=torch.bfloat16)
        got = graphs(x, [(2, 0, 23)])  # padded to 32
        cache = [row_positions(model, layer.self_attn.cache.k, 2)[:, :23].clone() for layer in model.model.layers]
        assert calls == []
        expected = eager_prefill(x, [(2, 0, 23)])
        # Another GEMM size (32 rows, not 23) may round differently in bf16.
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
        for layer, k in zip(model.model.layers, cache):
            torch.testing.assert_close(k.float(), row_positions(model, layer.self_attn.cache.k, 2)[:, :23].float(),
                                       rtol=2e-2, atol=2e-2)
        for segments, tokens in (([(0, 0, 5), (1, 0, 6)], 11), ([(2, 23, 4)], 4), ([(3, 0, 41)], 41)):
            graphs(torch.randn(1, tokens, 64, device="cuda", dtype=torch.bfloat16), segments)
        assert calls == [[(0, 0, 5), (1, 0, 6)], [(2, 23, 4)], [(3, 0, 41)]]


@pytest.mark.parametrize("decode_kernel", [False, True])
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_fused_decode_graphs_match_eager_decode(decode_kernel):
    """The serving configuration on a GPU: fused projections, torch.compile'd decode layers
    (one compiled function for every layer), replayed from CUDA graphs; decode attention by SDPA
    or by the Triton kernel (compared with eager SDPA decode either way)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(config).cuda().eval()
    setup_blocks(model, rows=4, seq_len=64, block_size=16)
    ids = torch.tensor([3, 7, 11], device="cuda")
    positions = torch.tensor([5, 6, 7], device="cuda")
    rows = torch.tensor([0, 1, 2], device="cuda")
    prompts = torch.randn(1, 18, 64, device="cuda")
    segments = [(0, 0, 5), (1, 0, 6), (2, 0, 7)]  # three prompts of different lengths, packed
    with torch.inference_mode():
        model.prefill(prompts, segments)
        eager = model.decode(ids, positions, rows, 8).clone()
        model.fuse()
        fused = model.decode(ids, positions, rows, 8).clone()
        for layer in model.model.layers:
            layer.self_attn.decode_kernel = decode_kernel
        counters.clear()
        assert compile_model(model)  # its warm-up writes dummy tokens (into rows 0 and 1's blocks here)
        model.prefill(prompts, segments)  # again, through the compiled prefill parts
        graphs = DecodeGraphs(model, max_batch=4, length_step=16)
        graphs.capture_all()
        replayed = graphs(ids, positions, rows, 8).clone()
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    # As in tests/test_llama.py: prefill 2, decode 4, whatever the layers and buckets.
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


@pytest.mark.usefixtures("fresh_dynamo")
def test_batch_one_decode_by_the_gemv_compiled_and_graphed_matches_cublas():
    """decode_gemv's path: a bfloat16 model's one-row projections and lm_head by llava_triton.gemv,
    eager and then compiled and replayed from a CUDA graph, against cuBLAS's."""
    from llava_triton.gemv import GemvLinear

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    setup_blocks(model, rows=2, seq_len=64, block_size=16)
    ids, positions, rows = (torch.tensor([value], device="cuda") for value in (3, 5, 0))
    prompt = torch.randn(1, 5, 64, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        model.fuse()
        model.prefill(prompt, [(0, 0, 5)])
        cublas = model.decode(ids, positions, rows, 8).clone()
        model.use_gemv()
        assert isinstance(model.lm_head, GemvLinear)
        eager = model.decode(ids, positions, rows, 8).clone()
        assert compile_model(model)
        model.prefill(prompt, [(0, 0, 5)])
        graphs = DecodeGraphs(model, max_batch=1, length_step=16)
        graphs.capture_all()
        replayed = graphs(ids, positions, rows, 8).clone()
    torch.testing.assert_close(eager, cublas, rtol=2e-2, atol=2e-2)  # the same products, summed in another order
    torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2)  # bfloat16, compiled: fused elementwise kernels


@pytest.mark.usefixtures("fresh_dynamo")
def test_prepared_language_model_replays_graphs_that_match_eager():
    """prepare_language_model on a GPU, as the language model's adapter calls it before making the
    engine: fused, compiled, decode and prefill captured (DecodeGraphs, PrefillGraphs); the steps it
    hands over give what the model's eager steps give."""
    from llava_triton.lm_runtime import prepare_language_model
    from llava_triton.spec import ModelSpec, ServingConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    spec = ModelSpec.from_hf_config({"vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32},
                                     "text_config": {"hidden_size": 64, "vocab_size": 128,
                                                     "max_position_embeddings": 64},
                                     "image_token_index": 100})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    runtime = prepare_language_model(model, spec, ServingConfig(max_num_seqs=4, prefill_chunk_tokens=64))
    assert isinstance(runtime.decode_step, DecodeGraphs) and isinstance(runtime.prefill_step, PrefillGraphs)
    assert (runtime.max_seqs, runtime.max_seq_len, runtime.block_size) == (4, 64, 16)
    assert model.model.layers[0].self_attn.qkv_proj is not None
    assert type(model.lm_head).__name__ == "GemvLinear"  # decode_gemv auto: the Triton GEMV on a GPU
    # A block-table row per sequence, as the engine sets it at admission.
    model.set_block_table(0, [1, 2, 3, 4])
    model.set_block_table(1, [8, 7, 6, 5])
    assert runtime.decode_step.graphs and runtime.prefill_step.graphs  # captured before any request
    with torch.inference_mode():
        x = torch.randn(1, 9, 64, device="cuda", dtype=torch.bfloat16)
        got = runtime.prefill_step(x[:, :4], [(0, 0, 4)])  # a lone first chunk: replayed, padded to 64
        # Eager prefill of both prompts (slot 0's again: the same keys and values at the same positions).
        expected = model.prefill(x, [(0, 0, 4), (1, 0, 5)])
        torch.testing.assert_close(got, expected[:1], rtol=2e-2, atol=2e-2)
        ids, positions = torch.tensor([3, 7], device="cuda"), torch.tensor([4, 5], device="cuda")
        rows = torch.tensor([0, 1], device="cuda")
        replayed = runtime.decode_step(ids, positions, rows, 6).clone()  # batch 2, length 6 -> 64
        eager = model.decode(ids, positions, rows, 6)
    torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype, kv_cache_dtype", [(torch.float32, "auto"), (torch.bfloat16, "fp8_e4m3")])
def test_prefix_cached_prompts_on_the_gpu_answer_as_a_full_prefill(dtype, kv_cache_dtype, tiny_checkpoint, tmp_path):
    """The engine on a GPU as served (fused, compiled, CUDA graphs), the embedded default, with prefix
    caching: in float32 a prompt whose first blocks come from the cache answers as a full prefill does;
    with an FP8 KV cache (cached blocks read back through the gather) it runs and reuses them (its
    rounding differs from a full prefill's, so its tokens are not compared)."""
    from test_engine import Collect, params, run_until_done

    from export.language_model import export_language_model
    from llava_triton.engine import Engine
    from llava_triton.lm_runtime import prepare_language_model
    from llava_triton.processor import load_processor
    from llava_triton.spec import ModelSpec, ServingConfig

    lm_dir = export_language_model(tiny_checkpoint, tmp_path / "lm")
    spec = ModelSpec.from_pretrained(tiny_checkpoint)
    tokenizer = load_processor(tiny_checkpoint).tokenizer
    prompt = torch.tensor(tokenizer("USER: Tell me a long story about the sea, the sky, the moon and the stars, "
                                    "and about the ships that sail at night. ASSISTANT:")["input_ids"])
    answers = {}
    for caching in (True, False):
        model = LlamaForCausalLM.from_pretrained(lm_dir, device="cuda", dtype=dtype)
        serving = ServingConfig(max_num_seqs=4, max_seq_len=256, prefix_caching=caching, kv_cache_dtype=kv_cache_dtype)
        engine = Engine(prepare_language_model(model, spec, serving), tokenizer, spec, serving)
        runs = []
        for _ in range(2):
            sink = Collect()
            engine.submit(prompt, None, params(max_tokens=8, ignore_eos=True), sink)
            run_until_done(engine, [sink])
            assert sink.errors == []
            runs.append(sink.token_ids)
        answers[caching] = runs
        full_blocks = len(prompt) // serving.kv_block_size
        assert engine.blocks.num_cached == (full_blocks if caching else 0) and full_blocks >= 2
        assert all(len(run) == 8 for run in runs)
    if dtype == torch.float32:
        assert answers[True][0] == answers[True][1] == answers[False][0] == answers[False][1]


@pytest.mark.parametrize("dtype, fp8", [(torch.float32, "auto"), (torch.bfloat16, "fp8_e4m3")])
@pytest.mark.usefixtures("fresh_dynamo")
def test_engine_steps_on_the_gpu_wait_for_it_only_to_read_tokens(dtype, fp8, tiny_checkpoint, tmp_path):
    """The engine as served (compiled, CUDA graphs, overlap_decode) never blocks the host on the GPU while
    it admits, embeds prompts (images sent as FP16 embeddings), prefills and launches decode steps: the
    only waits are on the events after each step's token copy (engine.InFlight), which CUDA's sync debug
    mode does not count. Any blocking copy, .item() or device mask would raise here; a run with the
    debug mode off gives the same tokens."""
    from test_engine import Collect, params, run_until_done

    from export.language_model import export_language_model
    from llava_triton.engine import Engine
    from llava_triton.lm_runtime import prepare_language_model
    from llava_triton.processor import load_processor
    from llava_triton.spec import ModelSpec, ServingConfig

    lm_dir = export_language_model(tiny_checkpoint, tmp_path / "lm")
    spec = ModelSpec.from_pretrained(tiny_checkpoint)
    tokenizer = load_processor(tiny_checkpoint).tokenizer
    # The second run's prompts hit the prefix cache. In float32 that answers as a full prefill; with an
    # FP8 cache the cached blocks round otherwise (test_prefix_cached_prompts_on_the_gpu_...), so off.
    serving = ServingConfig(max_num_seqs=3, max_seq_len=1024, prefill_chunk_tokens=256, lm_weight_dtype=fp8,
                            kv_cache_dtype=fp8, prefix_caching=fp8 == "auto")
    model = LlamaForCausalLM.from_pretrained(lm_dir, device="cuda", dtype=dtype)
    engine = Engine(prepare_language_model(model, spec, serving), tokenizer, spec, serving)
    text = torch.tensor(tokenizer("USER: Tell me a long story about the sea, the sky, the moon and the stars, "
                                  "and about the ships that sail at night. ASSISTANT:")["input_ids"])
    with_image = torch.cat([text[:1], torch.full((spec.num_image_tokens,), spec.image_token_index), text[1:]])
    embeds = torch.randn(1, spec.num_image_tokens, spec.text_hidden_size, generator=torch.Generator().manual_seed(0))
    requests = [(with_image, embeds.half(), params(max_tokens=6, ignore_eos=True)),
                (text, None, params(max_tokens=9, ignore_eos=True)),
                (with_image, (embeds * 2).half(), params(max_tokens=5, temperature=0.8, seed=4, ignore_eos=True)),
                (text[:9], None, params(max_tokens=1)),
                (with_image, embeds.half(), params(max_tokens=7, ignore_eos=True))]

    def run():
        sinks = [Collect() for _ in requests]
        for (ids, image_embeds, request), sink in zip(requests, sinks):
            engine.submit(ids, image_embeds, request, sink)
        run_until_done(engine, sinks)
        engine.step()  # nothing in flight is left behind
        assert all(sink.errors == [] for sink in sinks)
        return [sink.token_ids for sink in sinks]

    reference = run()  # also the first calls of every shape: compiling may synchronize
    assert [len(tokens) for tokens in reference] == [6, 9, 5, 1, 7]
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert run() == reference
    finally:
        torch.cuda.set_sync_debug_mode("default")
