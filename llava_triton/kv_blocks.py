"""The KV cache's fixed-size blocks: which are free, and how many a sequence needs.

The language model's keys and values live in a pool of blocks of `block_size` token positions per
layer (llava_triton.llama.KVBlockPool); a sequence holds the blocks its block table lists. Block 0
is the null block: it is never handed out, and every block-table entry that no sequence owns points
to it, so padding tokens (of a CUDA graph's batch or length bucket) write their keys and values
there and nowhere that matters.

The engine reserves all the blocks a request can use (its prompt plus its max_tokens) when it
admits it, so a running sequence never runs out of blocks and nothing has to be preempted.
"""

from __future__ import annotations

NULL_BLOCK = 0


def blocks_needed(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


class BlockAllocator:
    """Blocks 1..num_blocks-1 of a pool of `num_blocks` (block 0 is NULL_BLOCK), handed out and taken back.

    Plain Python, no tensors: the engine calls it between steps, on its own thread.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"a pool of {num_blocks} blocks has no block besides the null block")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack, lowest block on top: a lightly loaded server keeps reusing the same few blocks.
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._is_free = [False] + [True] * (num_blocks - 1)

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold: all but the null block."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def usage(self) -> float:
        """The fraction of the blocks in use."""
        return self.num_used / self.capacity

    def blocks_for(self, tokens: int) -> int:
        return blocks_needed(tokens, self.block_size)

    def allocate(self, count: int) -> list[int]:
        """`count` free blocks, now held by the caller. Raises ValueError when fewer are free."""
        if count > len(self._free):
            raise ValueError(f"{count} KV-cache blocks asked for, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._is_free[block] = False
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Take back blocks handed out by `allocate`. Raises ValueError for the null block, a block
        outside the pool or one already free (a double free would hand one block to two sequences)."""
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"blocks {blocks} name a block twice")
        for block in blocks:
            if not NULL_BLOCK < block < self.num_blocks:
                raise ValueError(f"block {block} is not one of the pool's 1..{self.num_blocks - 1}")
            if self._is_free[block]:
                raise ValueError(f"block {block} is already free")
        for block in reversed(blocks):
            self._is_free[block] = True
            self._free.append(block)
