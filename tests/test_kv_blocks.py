"""The KV cache's block allocator on its own."""

import pytest

from llava_triton.kv_blocks import NULL_BLOCK, BlockAllocator, blocks_needed


def test_blocks_needed_rounds_up_to_whole_blocks():
    assert [blocks_needed(n, 16) for n in (1, 15, 16, 17, 50, 3000)] == [1, 1, 1, 2, 4, 188]
    assert blocks_needed(0, 16) == 0


def test_allocate_and_free_account_for_every_block():
    blocks = BlockAllocator(num_blocks=9, block_size=16)  # block 0 is the null block: 8 to hand out
    assert (blocks.capacity, blocks.num_free, blocks.num_used, blocks.usage) == (8, 8, 0, 0.0)
    a = blocks.allocate(3)
    b = blocks.allocate(5)
    assert NULL_BLOCK not in a + b and sorted(a + b) == list(range(1, 9))
    assert (blocks.num_free, blocks.usage) == (0, 1.0)
    with pytest.raises(ValueError, match="1 KV-cache blocks asked for, 0 free"):
        blocks.allocate(1)
    blocks.free(a)
    assert blocks.num_free == 3 and blocks.usage == 5 / 8
    assert sorted(blocks.allocate(3)) == sorted(a)  # the same blocks again
    assert blocks.allocate(0) == []


def test_lowest_blocks_are_handed_out_first_and_reused():
    blocks = BlockAllocator(num_blocks=100, block_size=16)
    first = blocks.allocate(4)
    assert first == [1, 2, 3, 4]
    blocks.free(first)
    assert blocks.allocate(2) == [1, 2]


@pytest.mark.parametrize("bad, message", [
    ([NULL_BLOCK], "block 0 is not one of the pool's 1..4"),
    ([5], "block 5 is not one of the pool's 1..4"),
    ([3], "block 3 is already free"),
    ([1, 1], "name a block twice"),
])
def test_freeing_what_was_not_handed_out_is_refused_and_changes_nothing(bad, message):
    blocks = BlockAllocator(num_blocks=5, block_size=4)
    held = blocks.allocate(2)  # 1 and 2
    with pytest.raises(ValueError, match=message):
        blocks.free(bad)
    assert blocks.num_free == 2
    blocks.free(held)
    assert blocks.num_free == 4


def test_a_pool_needs_a_block_besides_the_null_block():
    with pytest.raises(ValueError, match="no block besides the null block"):
        BlockAllocator(num_blocks=1, block_size=16)
    with pytest.raises(ValueError, match="block_size must be positive"):
        BlockAllocator(num_blocks=4, block_size=0)
