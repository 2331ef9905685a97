"""The KV cache's block allocator on its own."""

import numpy as np
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


# -- prefix caching ------------------------------------------------------------------------------

from llava_triton.kv_blocks import prefix_block_hashes, prefix_root  # noqa: E402

IMAGE = 99


def hashes(ids, counts=(), keys=None, salt=b"", block_size=4):
    return prefix_block_hashes(np.array(ids, dtype=np.int64), block_size, prefix_root(salt), IMAGE, list(counts), keys)


def test_block_hashes_name_the_whole_prefix():
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert len(hashes(text)) == 2  # full blocks only
    assert hashes(text) == hashes(text + [10, 11])[:2]
    changed = hashes([1, 2, 3, 0, 5, 6, 7, 8])
    assert changed[0] != hashes(text)[0] and changed[1] != hashes(text)[1]  # chained: a change moves every later one
    assert hashes(text, salt=b"t1") != hashes(text) and hashes(text, salt=b"t1") != hashes(text, salt=b"t2")
    # The salt's length is hashed: b"ab" is not b"a" followed by something else.
    assert prefix_root(b"ab") != prefix_root(b"a") and len(prefix_root(b"")) == 32


def test_image_blocks_are_named_by_the_image_content_key():
    ids = [1, 2, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 3, 4, 5, 6]  # one image of 6 tokens
    a, b = hashes(ids, [6], [b"a" * 32]), hashes(ids, [6], [b"b" * 32])
    assert a[0] != b[0] and a[2] != b[2]  # every block from the image on differs
    assert hashes([1, 2, 3, 4] + ids[4:], [4], [b"a" * 32])[0] != a[0]
    assert hashes(ids, [6]) == []  # no key: the chain stops at the image
    assert len(hashes([1, 2, 3, 4, 5, 6, 7, 8, IMAGE, IMAGE], [2])) == 2  # the blocks before it are named
    # Two images: which image holds which tokens matters (3 + 3 is not 2 + 4).
    two = [IMAGE] * 6 + [1, 2]
    assert hashes(two, [3, 3], [b"a" * 32, b"b" * 32]) != hashes(two, [2, 4], [b"a" * 32, b"b" * 32])
    assert hashes(two, [3, 3], [b"a" * 32, b"b" * 32]) != hashes(two, [3, 3], [b"b" * 32, b"a" * 32])


@pytest.mark.parametrize("counts, keys, message", [
    ([5], [b"a" * 32], "the prompt holds 6 image tokens, its images 5"),
    ([6], [b"a" * 32, b"b" * 32], "2 image keys for 1 images"),
])
def test_block_hashes_refuse_images_that_do_not_fit_the_prompt(counts, keys, message):
    with pytest.raises(ValueError, match=message):
        hashes([1] + [IMAGE] * 6, counts, keys)


def test_registered_blocks_are_matched_shared_and_cached_when_let_go():
    blocks = BlockAllocator(num_blocks=9, block_size=4)
    names = [bytes([i]) * 32 for i in range(3)]
    held = blocks.allocate(3)
    assert [blocks.register(b, n) for b, n in zip(held, names)] == [True, True, True]
    assert not blocks.register(held[0], b"x" * 32)  # already named
    other = blocks.allocate(1)
    assert not blocks.register(other[0], names[0])  # the name is taken: the first block keeps it
    assert blocks.match(names) == held and blocks.match([b"?" * 32, names[1]]) == []
    # A second sequence takes the first two: while either holds them they are not free.
    assert blocks.free_after_acquiring(held[:2]) == blocks.num_free == 4
    blocks.acquire(held[:2])
    blocks.free(held)
    assert (blocks.num_free, blocks.num_cached) == (5, 1)  # the third is cached, the first two still held
    assert blocks.free_after_acquiring(held) == 4  # acquiring the cached one takes it out of the free count
    blocks.free(held[:2])
    blocks.free(other)
    assert (blocks.num_free, blocks.num_cached, blocks.usage) == (8, 3, 0.0)
    assert blocks.match(names) == held


def test_cached_blocks_are_evicted_only_when_no_free_block_is_left_tail_first():
    blocks = BlockAllocator(num_blocks=5, block_size=4)  # 4 blocks
    names = [bytes([i]) * 32 for i in range(3)]
    chain = blocks.allocate(3)
    for block, name in zip(chain, names):
        blocks.register(block, name)
    blocks.free(chain)
    assert blocks.allocate(1) not in ([b] for b in chain)  # the plain free block goes first
    assert blocks.evictions == 0
    taken = blocks.allocate(1)
    # The chain's last block is evicted first: its first blocks stay useful to a shorter prefix.
    assert taken == [chain[2]] and blocks.evictions == 1 and blocks.match(names) == chain[:2]
    with pytest.raises(ValueError, match="3 KV-cache blocks asked for, 2 free"):
        blocks.allocate(3)


def test_caching_off_registers_nothing():
    blocks = BlockAllocator(num_blocks=5, block_size=4, caching=False)
    held = blocks.allocate(2)
    assert not blocks.register(held[0], b"a" * 32) and blocks.match([b"a" * 32]) == []
    blocks.free(held)
    assert blocks.num_cached == 0 and blocks.num_free == 4


def test_only_held_blocks_are_registered_and_only_cached_ones_acquired():
    blocks = BlockAllocator(num_blocks=5, block_size=4)
    with pytest.raises(ValueError, match="block 1 is not held"):
        blocks.register(1, b"a" * 32)
    with pytest.raises(ValueError, match="block 2 is not a cached block"):
        blocks.acquire([2])
