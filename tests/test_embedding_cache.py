"""The image-embedding cache on its own: the shared-memory directory (real segments, a real second
process), image keys, and the LM-side cache with a fake clock."""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import random
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pytest

from llava_triton import embedding_cache
from llava_triton.embedding_cache import (
    CLOSED,
    OPEN,
    SHARED,
    Directory,
    EmbeddingCache,
    EmbeddingCacheStats,
    directory_name,
    image_key,
)
from llava_triton.spec import IMAGE_KEY_BYTES

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def name():
    """A fresh shared-memory name; whatever segment a failing test left under it is removed."""
    name = f"llava-test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        leftover = SharedMemory(name)
    except FileNotFoundError:
        return
    leftover.close()
    leftover.unlink()


def segment_exists(name: str) -> bool:
    directory = Directory.attach(name)
    if directory is None:
        return False
    directory.close()
    return True


def key_in_slot(slot: int, capacity: int, tag: int) -> bytes:
    """A key that lives in entry `slot` of a directory of `capacity` entries; `tag` tells keys apart."""
    return (slot + capacity * tag).to_bytes(8, "little") + bytes([tag]) * (IMAGE_KEY_BYTES - 8)


def random_key() -> bytes:
    return random.randbytes(IMAGE_KEY_BYTES)


def lookups_in_child(name: str, keys: list[bytes]) -> tuple[bytes, list[tuple[int, int] | None]]:
    """Run in a spawned process: attach to the directory and look the keys up."""
    directory = Directory.attach(name)
    assert directory is not None, f"no directory {name!r} in the child"
    with closing(directory):
        found = directory.secret, [directory.lookup(key) for key in keys]
    # A spawned process shares its parent's resource tracker (a Triton stub has its own): give back the
    # registration that attaching took from the creator, so the creator's unlink finds it.
    multiprocessing.resource_tracker.register(f"/{name}", "shared_memory")
    return found


# -- Directory ----------------------------------------------------------------------------------------


def test_a_reader_sees_what_the_writer_published(name):
    with closing(Directory.create(name, capacity=64)) as writer, closing(Directory.attach(name)) as reader:
        assert writer.usable and reader.usable and writer.state == reader.state == OPEN
        assert reader.capacity == writer.capacity == 64
        assert len(writer.secret) == 32 and reader.secret == writer.secret
        known, unknown = random_key(), random_key()
        writer.publish(known, 480, 640)
        assert reader.lookup(known) == (480, 640)
        assert writer.lookup(known) == (480, 640)
        assert reader.lookup(unknown) is None


def test_every_directory_draws_its_own_secret(name):
    with closing(Directory.create(name)) as first:
        secret = first.secret
    with closing(Directory.create(name)) as second:
        assert second.usable and second.secret != secret


def test_a_reader_in_another_process_sees_what_the_writer_published(name):
    with closing(Directory.create(name, capacity=1024)) as writer:
        published, unpublished, unknown = random_key(), random_key(), random_key()
        writer.publish(published, 336, 672)
        writer.publish(unpublished, 10, 20)
        writer.unpublish(unpublished)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            secret, found = pool.submit(lookups_in_child, name, [published, unpublished, unknown]).result(60)
        assert secret == writer.secret
        assert found == [(336, 672), None, None]
        assert segment_exists(name)  # the child's close left it
        assert writer.lookup(published) == (336, 672)


def test_a_reader_process_exiting_does_not_unlink_the_segment(name):
    # A plain subprocess has a resource tracker of its own (a spawned one shares its parent's), which
    # would unlink at exit every segment the process attached and left registered.
    with closing(Directory.create(name)) as writer:
        key = random_key()
        writer.publish(key, 3, 4)
        script = ("import sys; from llava_triton.embedding_cache import Directory\n"
                  f"d = Directory.attach({name!r}); print(d.lookup({key!r}))")  # exits without close()
        child = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=60)
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == "(3, 4)"
        assert "leaked" not in child.stderr
        assert segment_exists(name)
        assert writer.lookup(key) == (3, 4)


def test_unpublish_clears_only_the_key_its_slot_holds(name):
    with closing(Directory.create(name, capacity=8)) as writer, closing(Directory.attach(name)) as reader:
        first, second = key_in_slot(5, 8, tag=1), key_in_slot(5, 8, tag=2)
        assert writer.slot(first) == writer.slot(second) == 5
        writer.publish(first, 1, 2)
        writer.unpublish(second)  # the slot holds `first`: nothing changes
        assert reader.lookup(first) == (1, 2)
        writer.unpublish(first)
        assert reader.lookup(first) is None
        writer.unpublish(first)  # twice is harmless
        assert reader.lookup(first) is None


def test_a_key_published_in_a_taken_slot_overwrites_the_older_key(name):
    with closing(Directory.create(name, capacity=8)) as writer, closing(Directory.attach(name)) as reader:
        older, newer, elsewhere = key_in_slot(3, 8, tag=1), key_in_slot(3, 8, tag=2), key_in_slot(4, 8, tag=1)
        writer.publish(older, 10, 11)
        writer.publish(elsewhere, 30, 31)
        writer.publish(newer, 20, 21)
        assert reader.lookup(older) is None
        assert reader.lookup(newer) == (20, 21)
        assert reader.lookup(elsewhere) == (30, 31)


def test_a_second_language_model_instance_makes_the_directory_unusable(name):
    with closing(Directory.create(name, capacity=16)) as first, closing(Directory.attach(name)) as reader:
        key, later = random_key(), random_key()
        first.publish(key, 5, 6)
        assert reader.lookup(key) == (5, 6)
        with closing(Directory.create(name, capacity=16)) as second:
            assert not second.usable and not first.usable and not reader.usable
            assert first.state == reader.state == SHARED
            assert second.secret == first.secret
            assert reader.lookup(key) is None
            assert first.lookup(key) is None
            first.publish(later, 7, 8)  # neither publishes any more
            second.publish(later, 7, 8)
        # The second instance's close leaves the first's segment in place, still SHARED.
        with closing(Directory.attach(name)) as late_reader:
            assert late_reader.state == SHARED and not late_reader.usable
            assert late_reader.lookup(key) is None and late_reader.lookup(later) is None
            assert int(late_reader._entries["height"].max()) == 5  # `later` was never written


def test_closing_the_writer_makes_readers_miss_and_removes_the_segment(name):
    writer = Directory.create(name)
    with closing(writer), closing(Directory.attach(name)) as reader:
        key = random_key()
        writer.publish(key, 9, 9)
        assert reader.lookup(key) == (9, 9)
        writer.close()
        assert reader.state == CLOSED and not reader.usable
        assert reader.lookup(key) is None
        assert Directory.attach(name) is None
        assert not segment_exists(name)
        writer.close()  # idempotent
        assert not writer.usable and writer.lookup(key) is None
        writer.publish(key, 9, 9)  # a closed writer publishes nothing, and does not fail


def test_closing_a_reader_leaves_the_segment(name):
    with closing(Directory.create(name)) as writer:
        key = random_key()
        writer.publish(key, 2, 3)
        reader = Directory.attach(name)
        reader.close()
        reader.close()  # idempotent
        assert reader.lookup(key) is None and not reader.usable
        assert writer.usable and writer.lookup(key) == (2, 3)
        with closing(Directory.attach(name)) as again:
            assert again.lookup(key) == (2, 3)


def test_attach_finds_nothing_where_there_is_no_directory(name):
    assert Directory.attach(name) is None
    foreign = SharedMemory(name, create=True, size=4096)  # a segment this module did not write
    foreign.close()
    # As if another process had created it (attaching unregisters it); the `name` fixture unlinks it.
    multiprocessing.resource_tracker.unregister(foreign._name, "shared_memory")
    assert Directory.attach(name) is None


def test_create_gives_up_on_a_segment_that_is_not_a_directory(name, monkeypatch):
    monkeypatch.setattr(embedding_cache, "_JOIN_TIMEOUT_S", 0.05)
    foreign = SharedMemory(name, create=True, size=4096)  # no header: not a directory
    foreign.close()
    multiprocessing.resource_tracker.unregister(foreign._name, "shared_memory")  # another process's
    with closing(Directory.create(name)) as directory:
        assert not directory.usable and directory.state is None and len(directory.secret) == 32
        key = random_key()
        directory.publish(key, 1, 1)
        assert directory.lookup(key) is None
    leftover = SharedMemory(name)  # left as it was
    try:
        assert bytes(leftover.buf[:64]) == bytes(64)
    finally:
        leftover.close()
        multiprocessing.resource_tracker.unregister(leftover._name, "shared_memory")


def test_an_odd_seqlock_counter_reads_as_a_miss(name):
    with closing(Directory.create(name, capacity=4)) as writer, closing(Directory.attach(name)) as reader:
        key = random_key()
        writer.publish(key, 4, 5)
        slot = writer.slot(key)
        writer._entries["seq"][slot] += 1  # as if the writer were in the middle of changing the entry
        assert reader.lookup(key) is None
        writer._entries["seq"][slot] += 1
        assert reader.lookup(key) == (4, 5)


class StartsChangingOnCopy(np.ndarray):
    """A reader's entries, as they are when the writer starts changing an entry just after the reader read
    its counter: `change` runs at the reader's copy of the entry (a slice), once."""

    change = None

    def __getitem__(self, index):
        if isinstance(index, slice) and StartsChangingOnCopy.change is not None:
            change, StartsChangingOnCopy.change = StartsChangingOnCopy.change, None
            change()
        return super().__getitem__(index)


def test_an_entry_that_starts_changing_while_it_is_read_reads_as_a_miss(name):
    with closing(Directory.create(name, capacity=2)) as writer, closing(Directory.attach(name)) as reader:
        first, second = key_in_slot(1, 2, tag=1), key_in_slot(1, 2, tag=2)
        writer.publish(first, 1, 1)
        entries = writer._entries

        def half_publish_second():  # the writer's first stores of publish(second, 2, 2), not the rest
            entries["seq"][1] += 1
            entries["key"][1] = np.frombuffer(second, dtype=np.uint8)

        reader._entries = reader._entries.view(StartsChangingOnCopy)
        StartsChangingOnCopy.change = half_publish_second
        try:
            assert reader.lookup(second) is None  # the copy holds second's key and first's size
        finally:
            StartsChangingOnCopy.change = None
        assert int(entries["seq"][1]) % 2 == 1, "the change did not run: lookup no longer copies a slice"
        entries["height"][1] = entries["width"][1] = 2
        entries["seq"][1] += 1
        assert reader.lookup(second) == (2, 2)


def test_readers_never_see_a_half_written_entry(name):
    # Two keys share a slot, each always published with its own size: a reader that mixed one key with
    # the other's size would report a size that key was never published with.
    with closing(Directory.create(name, capacity=2)) as writer, closing(Directory.attach(name)) as reader:
        first, second = key_in_slot(1, 2, tag=1), key_in_slot(1, 2, tag=2)
        stop = threading.Event()
        seen = {first: set(), second: set()}

        def read():
            while not stop.is_set():
                for key in (first, second):
                    seen[key].add(reader.lookup(key))

        thread = threading.Thread(target=read)
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often, between the writer's stores too
        try:
            thread.start()
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                writer.publish(first, 1, 1)
                time.sleep(0)  # let the reader see each key whole too, not only mid-change
                writer.publish(second, 2, 2)
                time.sleep(0)
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(old_interval)
        assert seen[first] <= {None, (1, 1)} and seen[second] <= {None, (2, 2)}
        assert (1, 1) in seen[first] and (2, 2) in seen[second]  # the reader did read published entries


def test_directory_name_is_short_and_tells_servers_apart(tmp_path):
    name = directory_name(tmp_path, 1234)
    assert name.startswith("llava-") and len(name) <= 30
    assert directory_name(str(tmp_path), 1234) == name
    assert directory_name(tmp_path / "sub" / "..", 1234) == name  # the resolved path
    assert directory_name(tmp_path, 1235) != name
    assert directory_name(tmp_path / "other", 1234) != name


def test_directory_refuses_bad_arguments(name):
    with pytest.raises(ValueError, match="at least 1 entry, got capacity 0"):
        Directory.create(name, capacity=0)
    with closing(Directory.create(name)) as writer, closing(Directory.attach(name)) as reader:
        for bad in (bytes(31), bytes(33)):
            for call in (lambda k: writer.publish(k, 1, 1), writer.unpublish, writer.lookup, reader.lookup,
                         writer.slot):
                with pytest.raises(ValueError, match=f"must be 32 bytes, got {len(bad)}"):
                    call(bad)
        with pytest.raises(ValueError, match="height and width must be positive, got 0 x 5"):
            writer.publish(random_key(), 0, 5)
        with pytest.raises(ValueError, match="height and width must be positive, got 5 x -1"):
            writer.publish(random_key(), 5, -1)
        with pytest.raises(ValueError, match="attached for reading: only the LM that created it publishes"):
            reader.publish(random_key(), 1, 1)
        with pytest.raises(ValueError, match="attached for reading: only the LM that created it unpublishes"):
            reader.unpublish(random_key())
    with pytest.raises(ValueError, match=f"directory '{name}' is closed"):
        writer.slot(random_key())


# -- image_key ----------------------------------------------------------------------------------------

SECRET, FINGERPRINT = bytes(range(32)), bytes(range(100, 132))


def test_image_key_is_keyed_blake2b_of_the_length_prefixed_fields():
    key = image_key(SECRET, FINGERPRINT, b"tenant", b"\x89PNG...")
    assert len(key) == IMAGE_KEY_BYTES
    assert key == image_key(SECRET, FINGERPRINT, b"tenant", b"\x89PNG...")
    expected = hashlib.blake2b(FINGERPRINT + (6).to_bytes(4, "little") + b"tenant" + b"\x89PNG...",
                               digest_size=32, key=SECRET).digest()
    assert key == expected


def test_image_key_changes_with_every_input():
    key = image_key(SECRET, FINGERPRINT, b"salt", b"image")
    others = [image_key(bytes(32), FINGERPRINT, b"salt", b"image"),
              image_key(SECRET, bytes(32), b"salt", b"image"),
              image_key(SECRET, FINGERPRINT, b"salt2", b"image"),
              image_key(SECRET, FINGERPRINT, b"", b"image"),
              image_key(SECRET, FINGERPRINT, b"salt", b"image2")]
    assert len({key, *others}) == 1 + len(others)


def test_the_salts_length_keeps_salt_and_image_apart():
    assert image_key(SECRET, FINGERPRINT, b"ab", b"c") != image_key(SECRET, FINGERPRINT, b"a", b"bc")


def test_image_key_refuses_a_secret_or_fingerprint_of_the_wrong_length():
    with pytest.raises(ValueError, match="secret must be 32 bytes, got 16"):
        image_key(bytes(16), FINGERPRINT, b"", b"image")
    with pytest.raises(ValueError, match="fingerprint must be 32 bytes, got 33"):
        image_key(SECRET, bytes(33), b"", b"image")

    class HugeSalt(bytes):
        def __len__(self):
            return 1 << 32

    with pytest.raises(ValueError, match="too long for its 4-byte length prefix"):
        image_key(SECRET, FINGERPRINT, HugeSalt(), b"image")


# -- EmbeddingCache -----------------------------------------------------------------------------------
# torch is imported in the tests that need it: the spawned reader process imports this module.

KIB = 1024


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self):
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:  # threads share it: never lose a step, never go back
            self.now += seconds


def embeds(kib: int = 1, fill: float = 0.0):
    """(tiles, tokens, hidden) float32 embeddings of `kib` KiB."""
    import torch

    return torch.full((kib, 16, 16), fill)


def test_least_recently_used_entries_are_evicted_first(name):
    clock = FakeClock()
    with closing(Directory.create(name)) as directory:
        cache = EmbeddingCache(budget_bytes=3 * KIB, grace_s=10.0, directory=directory, clock=clock)
        a, b, c, d = (random_key() for _ in range(4))
        for key in (a, b, c):
            assert cache.put(key, embeds(), 1, 1)
        assert cache.get(a) is not None  # a is now the most recently used: b is the least
        assert not cache.put(d, embeds(), 1, 1)  # b retires to make room, which frees after the grace
        assert directory.lookup(b) is None
        assert [directory.lookup(key) for key in (a, c)] == [(1, 1), (1, 1)]
        clock.now += 10.0
        assert cache.put(d, embeds(), 1, 1)
        assert directory.lookup(d) == (1, 1)
        assert cache.get(b) is None
        # Two more entries retire c, then a: the order they were last used in.
        assert not cache.put(random_key(), embeds(2), 1, 1)
        assert directory.lookup(c) is None and directory.lookup(a) is None and directory.lookup(d) == (1, 1)
        assert cache.stats().evictions == 3


def test_an_evicted_entry_is_unpublished_at_once_and_readable_until_its_grace_passes(name):
    clock = FakeClock()
    with closing(Directory.create(name)) as directory, closing(Directory.attach(name)) as reader:
        cache = EmbeddingCache(budget_bytes=2 * KIB, grace_s=5.0, directory=directory, clock=clock)
        old, kept, new = random_key(), random_key(), random_key()
        old_embeds = embeds(fill=1.0)
        cache.put(old, old_embeds, 336, 448)
        cache.put(kept, embeds(), 1, 1)
        assert reader.lookup(old) == (336, 448)
        assert not cache.put(new, embeds(), 1, 1)
        assert reader.lookup(old) is None
        clock.now += 4.9
        assert cache.get(old) is old_embeds
        clock.now += 0.1
        assert cache.get(old) is None
        assert cache.get(kept) is not None


def test_retired_bytes_block_new_entries_until_their_grace_passes():
    clock = FakeClock()
    cache = EmbeddingCache(budget_bytes=2 * KIB, grace_s=5.0, clock=clock)
    first, second, third = random_key(), random_key(), random_key()
    cache.put(first, embeds(), 1, 1)
    cache.put(second, embeds(), 1, 1)
    assert not cache.put(third, embeds(), 1, 1)  # first retires, still 2 KiB held
    assert cache.stats().bytes == 2 * KIB
    clock.now += 4.0
    assert not cache.put(third, embeds(), 1, 1)  # no second retirement: first's KiB frees soon enough
    assert cache.stats().evictions == 1 and cache.get(second) is not None
    clock.now += 1.0
    assert cache.put(third, embeds(), 1, 1)
    assert cache.stats().bytes == 2 * KIB and cache.stats().entries == 2


def test_an_entry_larger_than_the_budget_is_refused_and_evicts_nothing():
    cache = EmbeddingCache(budget_bytes=2 * KIB, grace_s=5.0, clock=FakeClock())
    small = random_key()
    assert cache.put(small, embeds(), 1, 1)
    assert not cache.put(random_key(), embeds(3), 1, 1)
    assert cache.stats().evictions == 0 and cache.get(small) is not None
    assert not EmbeddingCache(budget_bytes=0, grace_s=1.0).put(random_key(), embeds(), 1, 1)


def test_putting_a_key_again_refreshes_it_and_keeps_its_tensor(name):
    clock = FakeClock()
    with closing(Directory.create(name, capacity=8)) as directory:
        cache = EmbeddingCache(budget_bytes=2 * KIB, grace_s=5.0, directory=directory, clock=clock)
        a, b = key_in_slot(0, 8, tag=1), key_in_slot(1, 8, tag=1)
        a_embeds = embeds(fill=1.0)
        cache.put(a, a_embeds, 1, 1)
        cache.put(b, embeds(), 1, 1)
        usurper = key_in_slot(0, 8, tag=2)  # takes a's slot in the directory
        directory.publish(usurper, 9, 9)
        assert cache.put(a, embeds(fill=2.0), 1, 1)  # a is the most recent now, and published again
        assert cache.get(a) is a_embeds
        assert directory.lookup(a) == (1, 1)
        assert not cache.put(random_key(), embeds(), 1, 1)
        assert directory.lookup(b) is None and directory.lookup(a) == (1, 1)  # b was the least recent
        assert cache.stats().bytes == 2 * KIB


def test_putting_a_retired_key_within_its_grace_brings_it_back(name):
    clock = FakeClock()
    with closing(Directory.create(name)) as directory:
        cache = EmbeddingCache(budget_bytes=1 * KIB, grace_s=5.0, directory=directory, clock=clock)
        old, new = random_key(), random_key()
        old_embeds = embeds(fill=1.0)
        cache.put(old, old_embeds, 1, 2)
        assert not cache.put(new, embeds(), 1, 1)
        assert directory.lookup(old) is None
        assert cache.put(old, embeds(), 1, 2)
        assert directory.lookup(old) == (1, 2) and cache.get(old) is old_embeds
        clock.now += 60.0
        assert cache.get(old) is old_embeds  # live again: no grace runs out
        assert cache.stats().bytes == 1 * KIB and cache.stats().entries == 1


def test_stats_count_hits_misses_evictions_bytes_and_entries():
    clock = FakeClock()
    cache = EmbeddingCache(budget_bytes=2 * KIB, grace_s=5.0, clock=clock)
    assert cache.stats() == EmbeddingCacheStats(hits=0, misses=0, evictions=0, bytes=0, entries=0)
    first, second, third = random_key(), random_key(), random_key()
    cache.put(first, embeds(), 1, 1)
    cache.put(second, embeds(), 1, 1)
    cache.get(first)
    cache.get(third)
    cache.put(third, embeds(), 1, 1)  # second retires
    cache.get(second)  # retired, within its grace: a hit
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.bytes, stats.entries) == (2, 1, 1, 2 * KIB, 2)
    clock.now += 5.0
    cache.get(second)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.bytes, stats.entries) == (2, 2, 1, 1 * KIB, 1)


def test_close_closes_the_directory(name):
    directory = Directory.create(name)
    with closing(directory):
        cache = EmbeddingCache(budget_bytes=KIB, grace_s=1.0, directory=directory)
        cache.close()
        assert not directory.usable and not segment_exists(name)
        assert cache.put(random_key(), embeds(), 1, 1)  # still a cache, published nowhere


def test_threads_putting_and_getting_keep_the_cache_consistent(name):
    clock = FakeClock()
    budget = 8 * KIB
    with closing(Directory.create(name, capacity=64)) as directory:
        cache = EmbeddingCache(budget_bytes=budget, grace_s=0.01, directory=directory, clock=clock)
        keys = [key_in_slot(slot, 64, tag=1) for slot in range(32)]  # one slot each
        tensors = {key: embeds(fill=float(i)) for i, key in enumerate(keys)}
        errors = []

        def work(seed):
            rng = random.Random(seed)
            try:
                for _ in range(2000):
                    key = rng.choice(keys)
                    if rng.random() < 0.5:
                        cache.put(key, tensors[key], 1, 1)
                    else:
                        found = cache.get(key)
                        assert found is None or found is tensors[key]
                    clock.advance(0.001)
                    stats = cache.stats()
                    assert stats.bytes <= budget and stats.bytes == stats.entries * KIB
            except Exception as error:  # an assertion, or a data structure broken by a race
                errors.append(error)

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(old_interval)
        assert not errors, errors[0]
        clock.now += 1.0
        cache.get(keys[0])  # drops every retired entry
        published = [key for key in keys if directory.lookup(key) is not None]
        assert len(published) == cache.stats().entries > 0
        assert all(cache.get(key) is tensors[key] for key in published)


def test_the_cache_refuses_bad_arguments():
    with pytest.raises(ValueError, match="budget_bytes must be 0 or positive, got -1"):
        EmbeddingCache(budget_bytes=-1, grace_s=1.0)
    with pytest.raises(ValueError, match="grace_s must be 0 or positive, got -0.5"):
        EmbeddingCache(budget_bytes=KIB, grace_s=-0.5)
    cache = EmbeddingCache(budget_bytes=KIB, grace_s=1.0)
    with pytest.raises(ValueError, match="image key must be 32 bytes, got 8"):
        cache.get(bytes(8))
    with pytest.raises(ValueError, match="image key must be 32 bytes, got 8"):
        cache.put(bytes(8), embeds(), 1, 1)
    with pytest.raises(ValueError, match="height and width must be positive, got 0 x 1"):
        cache.put(random_key(), embeds(), 0, 1)
    with pytest.raises(ValueError, match=r"must be \(tiles, tokens, hidden\), got shape \[16, 16\]"):
        cache.put(random_key(), embeds()[0], 1, 1)
    assert cache.stats().entries == 0


def test_a_directory_whose_language_model_died_is_removed():
    """A killed LM may leave its segment behind (its resource tracker killed with it): the next LM to
    create a directory removes it, and leaves a live one alone."""
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    from llava_triton.embedding_cache import Directory, remove_stale_directories

    dead, live = f"llava-{uuid.uuid4().hex[:16]}", f"llava-{uuid.uuid4().hex[:16]}"
    # A child creates a directory and is killed before closing it (SIGKILL: no clean-up of any kind).
    script = ("import os, signal, sys\nfrom multiprocessing import resource_tracker\n"
              "from llava_triton.embedding_cache import Directory\n"
              f"d = Directory.create({dead!r}, capacity=8)\n"
              "resource_tracker.unregister(d._shm._name, 'shared_memory')  # as if the tracker died too\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert Path("/dev/shm", dead).exists()
    mine = Directory.create(live, capacity=8)
    try:
        assert not Path("/dev/shm", dead).exists()  # create() swept it
        assert dead not in remove_stale_directories() and Path("/dev/shm", live).exists()
    finally:
        mine.close()
