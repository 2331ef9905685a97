"""The KV cache's fixed-size blocks: which are free, which keep a prompt's prefix for reuse, and how
many a sequence needs.

The language model's keys and values live in a pool of blocks of `block_size` token positions per
layer (llava_triton.llama.KVBlockPool); a sequence holds the blocks its block table lists. Block 0
is the null block: it is never handed out, and every block-table entry that no sequence owns points
to it, so padding tokens (of a CUDA graph's batch or length bucket) write their keys and values
there and nowhere that matters.

The engine reserves all the blocks a request can use (its prompt plus its max_tokens) when it
admits it, so a running sequence never runs out of blocks and nothing has to be preempted.

Prefix caching: a full block of a prompt is named by a hash chained over every token before it and
in it (`prefix_block_hashes`): the token ids, and for image tokens the image's content key, since
every image is the same run of placeholder ids. A block whose keys and values are complete is
registered under its hash; a later prompt that begins with the same blocks takes them instead of
computing them (several sequences may hold one block: it is reference-counted, and nobody writes to
a full prompt block again). A registered block that no sequence holds any more stays cached and is
handed out again, least recently used first, only when no plain free block is left.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

NULL_BLOCK = 0
HASH_BYTES = 32


def blocks_needed(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


def prefix_root(cache_salt: bytes) -> bytes:
    """The hash every prompt's chain starts from: requests share blocks only when their salts are equal."""
    return hashlib.blake2b(len(cache_salt).to_bytes(4, "little") + cache_salt, digest_size=HASH_BYTES,
                           person=b"llava-kv-root").digest()


def prefix_block_hashes(input_ids: np.ndarray, block_size: int, root: bytes, image_token_index: int,
                        image_token_counts: Sequence[int], image_keys: Sequence[bytes] | None,
                        stop_token: int | None = None) -> list[bytes]:
    """The hash of each full block of a prompt, input_ids (T,) int64 with `<image>` expanded: block i's
    is blake2b(block i-1's hash, its token ids, which image each of its image tokens belongs to, and
    the content key of each of those images), so equal hashes mean equal blocks and equal everything
    before them.

    image_token_counts[j]: image j's run of image tokens (in prompt order); image_keys[j]: its content
    key (llava_triton.embedding_cache.image_key). Without keys the chain stops before the first block
    that holds an image token: nothing then says which image it was, and such a block is never shared.
    The chain also stops before the first block that holds `stop_token` (a `<video>` token: videos have
    no content key).
    """
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    is_image = ids == image_token_index
    # Image j's tokens are the j-th run of sum(image_token_counts[:j])..: the i-th image token overall
    # belongs to image owner[i].
    owner = np.repeat(np.arange(len(image_token_counts)), np.asarray(image_token_counts, dtype=np.int64))
    if len(owner) != int(is_image.sum()):
        raise ValueError(f"the prompt holds {int(is_image.sum())} image tokens, its images {len(owner)}")
    if image_keys is not None and len(image_keys) != len(image_token_counts):
        raise ValueError(f"{len(image_keys)} image keys for {len(image_token_counts)} images")
    image_rank = np.cumsum(is_image) - 1  # the index among image tokens of each image position
    hashes, parent = [], root
    for start in range(0, len(ids) - block_size + 1, block_size):
        block = slice(start, start + block_size)
        if stop_token is not None and bool((ids[block] == stop_token).any()):
            break
        digest = hashlib.blake2b(parent, digest_size=HASH_BYTES, person=b"llava-kv-block")
        digest.update(ids[block].tobytes())
        if is_image[block].any():
            if image_keys is None:
                break
            # Which image each image token of the block belongs to (two runs can meet inside a block),
            # then each of those images' keys.
            owners = owner[image_rank[block][is_image[block]]]
            digest.update(owners.astype(np.int32).tobytes())
            for image in range(int(owners[0]), int(owners[-1]) + 1):
                digest.update(bytes(image_keys[image]))
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class BlockAllocator:
    """Blocks 1..num_blocks-1 of a pool of `num_blocks` (block 0 is NULL_BLOCK), handed out and taken
    back, with the prompt blocks registered for prefix caching (see the module's docstring).

    A block is in exactly one of three states: held (by one or more sequences: its reference count),
    free, or cached (held by nobody, its hash registered: reusable by `match` until it is evicted).
    Plain Python, no tensors: the engine calls it between steps, on its own thread.
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a pool of {num_blocks} blocks has no block besides the null block")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        # A stack, lowest block on top: a lightly loaded server keeps reusing the same few blocks.
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._refs = [0] * num_blocks  # sequences holding each block
        self._hash_of: dict[int, bytes] = {}  # registered blocks
        self._block_of: dict[bytes, int] = {}
        # Cached blocks nobody holds, least recently used first: evicted in this order when _free is empty.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.evictions = 0

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold: all but the null block."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks nobody holds, cached ones included (`allocate` evicts those when it must)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Free blocks that keep a prefix for reuse."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def usage(self) -> float:
        """The fraction of the blocks held by sequences."""
        return self.num_used / self.capacity

    def blocks_for(self, tokens: int) -> int:
        return blocks_needed(tokens, self.block_size)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The registered blocks of the longest prefix of `hashes` (nothing taken yet: see `acquire`)."""
        blocks = []
        if self.caching:
            for block_hash in hashes:
                block = self._block_of.get(block_hash)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def free_after_acquiring(self, blocks: Sequence[int]) -> int:
        """num_free once `blocks` (from `match`) are acquired: those nobody held leave the free count."""
        return self.num_free - sum(1 for block in blocks if self._refs[block] == 0)

    def acquire(self, blocks: Sequence[int]) -> None:
        """Hold registered blocks (from `match`) for one more sequence."""
        for block in blocks:
            if block not in self._hash_of:
                raise ValueError(f"block {block} is not a cached block")
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` blocks, now held by the caller: free ones first, then cached ones nobody holds, least
        recently used first (their hashes are forgotten). Raises ValueError when fewer are free."""
        if count > self.num_free:
            raise ValueError(f"{count} KV-cache blocks asked for, {self.num_free} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def register(self, block: int, block_hash: bytes) -> bool:
        """Name a held block whose keys and values are complete by its prefix hash, so `match` finds it.
        False (nothing changes) when caching is off, the block already has a name, or another block
        has this one (two sequences computed the same prefix at once: the first keeps it)."""
        if self._refs[block] == 0:
            raise ValueError(f"block {block} is not held")
        if not self.caching or block in self._hash_of or block_hash in self._block_of:
            return False
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        return True

    def free(self, blocks: list[int]) -> None:
        """Let go of blocks from `allocate` or `acquire`. A block nobody holds any more becomes free, or
        cached (most recently used) if it is registered. Raises ValueError for the null block, a block
        outside the pool or one nobody holds (a double free would hand one block to two sequences)."""
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"blocks {blocks} name a block twice")
        for block in blocks:
            if not NULL_BLOCK < block < self.num_blocks:
                raise ValueError(f"block {block} is not one of the pool's 1..{self.num_blocks - 1}")
            if self._refs[block] == 0:
                raise ValueError(f"block {block} is already free")
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
