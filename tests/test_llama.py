"""The serving Llama on its own (CPU): packed prefill, fused projections and compiled layers give
what the plain eager path gives, reading and writing the KV cache through block tables.
Equality with transformers is checked in test_engine/test_e2e."""

import pytest
import torch

from llava_triton.kv_blocks import NULL_BLOCK, blocks_needed
from llava_triton.llama import LlamaConfig, LlamaForCausalLM, gather_blocks
from llava_triton.torch_compile import compile_model

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def setup_blocks(model: LlamaForCausalLM, rows: int = 4, seq_len: int = 64, block_size: int = 4,
                 kv_cache_dtype: torch.dtype | None = None, decode_kernel: bool = False,
                 blocks_per_row: int | None = None) -> None:
    """The model's caches with `rows` block tables of seq_len tokens, each row holding
    `blocks_per_row` blocks (default: all its seq_len) scattered over the pool in a fixed random
    order (a row's blocks are not in order nor next to each other): what reads and writes
    through the tables must get right."""
    per_row = blocks_needed(seq_len, block_size) if blocks_per_row is None else blocks_per_row
    model.setup_caches(1 + rows * per_row, block_size, rows, seq_len, kv_cache_dtype, decode_kernel)
    order = (torch.randperm(rows * per_row, generator=torch.Generator().manual_seed(7)) + 1).tolist()
    for row in range(rows):
        model.set_block_table(row, order[row * per_row: (row + 1) * per_row])


def make_model(rows: int = 4, seq_len: int = 64, **blocks) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    setup_blocks(model, rows, seq_len, **blocks)
    return model


def caches(model: LlamaForCausalLM) -> list[torch.Tensor]:
    return [t.clone() for layer in model.model.layers for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)]


def row_positions(model: LlamaForCausalLM, pool: torch.Tensor, row: int) -> torch.Tensor:
    """(nkv, seq_len, hs): the keys or values of block-table row `row`, position by position."""
    return gather_blocks(pool, model.block_tables[row: row + 1])[0]


def rows_of(batch: int) -> torch.Tensor:
    return torch.arange(batch)


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


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_results_do_not_depend_on_where_the_blocks_are_nor_their_size(block_size):
    """The same sequences, their blocks scattered over the pool or one slot-like run each (row r:
    blocks r*n+1..r*n+n in order), with blocks of 1 to 64 positions: the same logits from packed
    prefill (a later chunk reading its prefix through the table) and from decode."""
    def run(model):
        x = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(3))
        logits = [model.prefill(x[:, :12], [(1, 0, 5), (3, 0, 7)]),
                  model.prefill(x[:, 12:], [(1, 5, 9), (0, 0, 9)])]  # a later chunk and a first one
        positions = torch.tensor([14, 7, 9])
        for step in range(3):
            logits.append(model.decode(torch.tensor([3, 5, 7]) + step, positions + step, torch.tensor([1, 3, 0]), 20))
        return logits

    scattered = make_model(block_size=block_size)
    torch.manual_seed(0)
    in_order = LlamaForCausalLM(CONFIG).eval()
    per_row = blocks_needed(64, block_size)
    in_order.setup_caches(1 + 4 * per_row, block_size, 4, 64)
    for row in range(4):
        in_order.set_block_table(row, list(range(1 + row * per_row, 1 + (row + 1) * per_row)))
    reference = make_model(block_size=64)  # one block a row: a slot
    for got, slotted, expected in zip(run(scattered), run(in_order), run(reference)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(slotted, expected, rtol=1e-5, atol=1e-5)


def test_block_tables_hold_what_they_are_given():
    model = make_model(rows=2, seq_len=10, block_size=4)  # tables of 3 blocks
    assert model.block_tables.shape == (3, 3) and model.block_tables.dtype == torch.int32
    model.set_block_table(1, [5])
    assert model.block_tables[1].tolist() == [5, NULL_BLOCK, NULL_BLOCK]
    assert model.block_tables[model.padding_row].tolist() == [NULL_BLOCK] * 3
    with pytest.raises(ValueError, match="4 blocks exceed a block table's 3"):
        model.set_block_table(0, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="row 2 is not one of 0..1"):
        model.set_block_table(2, [1])


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
    model.decode(torch.tensor([1, 2]), torch.tensor([8, 4]), rows_of(2), 16)
    assert cudnn_allowed == [True] * CONFIG.num_hidden_layers


def test_fused_projections_give_the_same_logits():
    x = torch.randn(1, 11, 64)
    ids, positions = torch.tensor([3, 9]), torch.tensor([5, 6])
    model = make_model()
    expected = model.prefill(x, [(0, 0, 5), (1, 0, 6)]), model.decode(ids, positions, rows_of(2), 16)
    model.fuse()
    assert not hasattr(model.model.layers[0].self_attn, "q_proj")  # the separate weights are freed
    got = model.prefill(x, [(0, 0, 5), (1, 0, 6)]), model.decode(ids, positions, rows_of(2), 16)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused,kv_cache_dtype", [(False, None), (True, None), (True, torch.float8_e4m3fn)])
def test_first_chunk_prefill_with_padding_equals_prefill(fused, kv_cache_dtype):
    """The graph-safe first-chunk prefill (what PrefillGraphs captures): a prompt padded to its
    bucket, the block-table row and the last real token given as device tensors, gives prefill's
    logits and writes the same cache positions (in an FP8 cache too); the padding writes only the
    sequence's own blocks past its prompt and, past them, the null block."""
    x = torch.randn(1, 7, 64)
    # 3 blocks of 4 a row: the 7-token prompt and 5 positions more, the bucket's last 4 in no block.
    expected_model, model = (make_model(blocks_per_row=3, kv_cache_dtype=kv_cache_dtype) for _ in range(2))
    for m in (expected_model, model):
        if fused:
            m.fuse()
    expected = expected_model.prefill(x, [(2, 0, 7)])
    # 7 tokens padded to a bucket of 16 (with whatever an earlier chunk left there: not zeros, whose
    # keys and values would be zeros, leaving no trace)
    padded = torch.cat([x, torch.randn(1, 9, 64)], dim=1)
    got = model.prefill_first_chunk(padded, torch.tensor([2]), torch.tensor([6]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    own = model.block_tables[2, :3].tolist()
    others = [b for b in range(model.num_blocks) if b not in own and b != NULL_BLOCK]
    for a, b in zip(caches(model), caches(expected_model)):
        prompt = gather_blocks(a, model.block_tables[2:3, :2]).float()[0, :, :7]  # (nkv, 7, hs)
        torch.testing.assert_close(prompt, gather_blocks(b, model.block_tables[2:3, :2]).float()[0, :, :7],
                                   rtol=1e-5, atol=1e-5)  # the prompt's positions
        assert not a[others].float().any()  # no other row's blocks
        assert a[NULL_BLOCK].float().any()  # the padding past the row's blocks
    with pytest.raises(ValueError, match="exceeds the cache's 64"):
        model.prefill_first_chunk(torch.zeros(1, 65, 64), torch.tensor([0]), torch.tensor([0]))


def test_prefill_refuses_segments_that_do_not_fit():
    model = make_model(seq_len=16, block_size=4)
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
        ids, positions, rows = torch.arange(batch) + 5, torch.arange(batch) + 9, rows_of(batch).flip(0)
        torch.testing.assert_close(compiled.decode(ids, positions, rows, length),
                                   eager.decode(ids, positions, rows, length), rtol=1e-4, atol=1e-4)
    # One graph for each prefill part; four for decode (batch 1 or more, times a length short of
    # or equal to the cache's), whatever the number of layers, batches, lengths and prompts.
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
