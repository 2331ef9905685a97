"""The serving Llama on its own (CPU): packed prefill, fused projections and compiled layers give
what the plain eager path gives. Equality with transformers is checked in test_engine/test_e2e."""

import pytest
import torch

from llava_triton.llama import LlamaConfig, LlamaForCausalLM
from llava_triton.torch_compile import compile_model

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def make_model(slots: int = 4, seq_len: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    model.setup_caches(slots, seq_len)
    return model


def caches(model: LlamaForCausalLM) -> list[torch.Tensor]:
    return [t.clone() for layer in model.model.layers for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)]


def test_packed_prefill_equals_one_sequence_at_a_time():
    x = torch.randn(1, 20, 64)
    # Slot 2 gets a later chunk (positions 4..8) after a first one of 4 tokens.
    one_by_one = make_model()
    first = one_by_one.prefill(x[:, :4], [(2, 0, 4)])
    expected = torch.cat([one_by_one.prefill(x[:, 4:9], [(0, 0, 5)]),
                          one_by_one.prefill(x[:, 9:15], [(1, 0, 6)]),
                          one_by_one.prefill(x[:, 15:20], [(2, 4, 5)])])
    packed = make_model()
    assert torch.equal(packed.prefill(x[:, :4], [(2, 0, 4)]), first)
    got = packed.prefill(x[:, 4:], [(0, 0, 5), (1, 0, 6), (2, 4, 5)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches(packed), caches(one_by_one)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prefill_attention_keeps_off_cudnn(monkeypatch):
    """cuDNN's SDPA builds an execution plan per new shape (40-800 ms on the H100), and prefill
    shapes change with every prompt length: prefill attention must run with it switched off.
    Decode keeps it (fixed shapes in its CUDA graphs)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    cudnn_allowed = []

    def recording(*args, **kwargs):
        cudnn_allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = make_model()
    model.prefill(torch.randn(1, 9, 64), [(0, 0, 5), (1, 0, 4)])  # first chunks: causal
    model.prefill(torch.randn(1, 3, 64), [(0, 5, 3)])  # a later chunk: masked
    assert cudnn_allowed == [False] * (3 * CONFIG.num_hidden_layers)
    cudnn_allowed.clear()
    model.decode(torch.tensor([1, 2]), torch.tensor([8, 4]), 16)
    assert cudnn_allowed == [True] * CONFIG.num_hidden_layers


def test_fused_projections_give_the_same_logits():
    x = torch.randn(1, 11, 64)
    ids, positions = torch.tensor([3, 9]), torch.tensor([5, 6])
    model = make_model()
    expected = model.prefill(x, [(0, 0, 5), (1, 0, 6)]), model.decode(ids, positions, 16)
    model.fuse()
    assert not hasattr(model.model.layers[0].self_attn, "q_proj")  # the separate weights are freed
    got = model.prefill(x, [(0, 0, 5), (1, 0, 6)]), model.decode(ids, positions, 16)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused,kv_cache_dtype", [(False, None), (True, None), (True, torch.float8_e4m3fn)])
def test_first_chunk_prefill_with_padding_equals_prefill(fused, kv_cache_dtype):
    """The graph-safe first-chunk prefill (what PrefillGraphs captures): a prompt padded to its
    bucket, the slot and the last real token given as device tensors, gives prefill's logits and
    writes the same cache positions (in an FP8 cache too); the padding only writes positions past
    the prompt."""
    x = torch.randn(1, 7, 64)
    expected_model, model = make_model(), make_model()
    for m in (expected_model, model):
        if fused:
            m.fuse()
        if kv_cache_dtype is not None:
            m.setup_caches(4, 64, kv_cache_dtype)
    expected = expected_model.prefill(x, [(2, 0, 7)])
    padded = torch.cat([x, torch.zeros(1, 9, 64)], dim=1)  # 7 tokens padded to a bucket of 16
    got = model.prefill_first_chunk(padded, torch.tensor([2]), torch.tensor([6]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches(model), caches(expected_model)):
        a, b = a.float(), b.float()
        torch.testing.assert_close(a[2, :, :7], b[2, :, :7], rtol=1e-5, atol=1e-5)  # the prompt's positions
        assert not a[[0, 1, 3]].any() and not a[2, :, 16:].any()  # no other slot, nothing past the bucket
    with pytest.raises(ValueError, match="exceeds the cache's 64"):
        model.prefill_first_chunk(torch.zeros(1, 65, 64), torch.tensor([0]), torch.tensor([0]))


def test_prefill_refuses_segments_that_do_not_fit():
    model = make_model(seq_len=16)
    with pytest.raises(ValueError, match="do not pack"):
        model.prefill(torch.randn(1, 6, 64), [(0, 0, 5)])
    with pytest.raises(ValueError, match="exceeds the cache's 16"):
        model.prefill(torch.randn(1, 6, 64), [(0, 12, 6)])


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_layers_match_eager_for_every_shape_with_few_compilations():
    """torch.compile (inductor, here on the CPU; on a GPU it is what `torch_compile` turns on)
    must trace the layers whole and not compile again for each batch, length or prompt size."""
    from torch._dynamo.utils import counters

    eager, compiled = make_model(), make_model()
    eager.fuse()
    compiled.fuse()
    counters.clear()
    assert compile_model(compiled)
    for chunk in ([(0, 0, 7)], [(1, 0, 3), (2, 0, 9)], [(0, 7, 2), (3, 0, 1)]):
        x = torch.randn(1, sum(n for _, _, n in chunk), 64)
        torch.testing.assert_close(compiled.prefill(x, chunk), eager.prefill(x, chunk), rtol=1e-4, atol=1e-4)
    for batch, length in ((1, 16), (2, 16), (3, 32), (4, 48), (4, 64), (1, 64)):
        ids, positions = torch.arange(batch) + 5, torch.arange(batch) + 9
        torch.testing.assert_close(compiled.decode(ids, positions, length), eager.decode(ids, positions, length),
                                   rtol=1e-4, atol=1e-4)
    # One graph for each prefill part; four for decode (batch 1 or more, times a length short of
    # or equal to the cache's), whatever the number of layers, batches, lengths and prompts.
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
