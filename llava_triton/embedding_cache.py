"""The image-embedding cache: projected image embeddings kept in the language model, announced to preprocess.

A repeated image (the same bytes, preprocessing and model, and the same cache_salt) can skip decoding and
the vision encoder: the language model (LM) keeps each image's projected embeddings in an `EmbeddingCache`,
keyed by a 32-byte content key (`image_key`). The decision to skip is made in preprocess, which runs in
other processes (several of them, on the CPU), so the LM publishes the keys it holds in a `Directory`, a
small table in POSIX shared memory that it alone writes and every preprocess process reads. Preprocess
then leaves a cached image's tiles out of the request and marks it `image_cached`; the LM takes its
embeddings from the cache.

A hit seen in preprocess is a promise the LM must keep a little later. Eviction keeps it: an evicted
entry leaves the directory at once (no new request claims it) but its tensor stays readable for
`grace_s` seconds, for the requests that preprocess already sent as hits. Whatever the directory says
wrongly is a miss (a key overwritten by another in its slot, a torn read, a closed or shared
directory), and a miss only costs encoding the image again.

Plain Python, numpy and the standard library: preprocess imports this module and needs no torch.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .spec import IMAGE_KEY_BYTES

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SECRET_BYTES = 32
FINGERPRINT_BYTES = 32

# The directory's states (its header's `state` field).
OPEN = 1  # the one LM that created it publishes: readers trust it
CLOSED = 2  # the LM closed it (and unlinked it): readers see misses
SHARED = 3  # a second LM instance found it: an image may be cached in one instance and not the other

_MAGIC = int.from_bytes(b"LLVEMBDR", "little")
_VERSION = 2
# `pid`: the creating LM process, so that a directory whose LM died without closing it (killed) is
# found and removed (`remove_stale_directories`).
_HEADER = np.dtype([("magic", "<u8"), ("version", "<u4"), ("state", "<u4"), ("capacity", "<u8"),
                    ("secret", "u1", (SECRET_BYTES,)), ("pid", "<u8")])  # 64 bytes
_SHM_DIR = Path("/dev/shm")
_NAME_PREFIX = "llava-"
# An entry is valid when height > 0; an unused or unpublished one is all zeros. `seq` is the seqlock's
# counter: odd while the writer is changing the entry.
_ENTRY = np.dtype([("seq", "<u8"), ("key", "u1", (IMAGE_KEY_BYTES,)), ("height", "<i8"), ("width", "<i8")])
# How long `Directory.create` waits for another LM instance, which created the segment an instant
# earlier, to finish writing its header before marking it SHARED.
_JOIN_TIMEOUT_S = 2.0

# Roles of a Directory object.
_WRITER = "writer"  # created the segment: publishes, unlinks it on close
_JOINED = "joined"  # Directory.create found another LM's segment: marked it SHARED, never publishes
_READER = "reader"  # Directory.attach: looks keys up

# Segments this process created and has not unlinked (the resource tracker holds their registration).
_created: set[str] = set()


def directory_name(repository: str | Path, server_pid: int) -> str:
    """The shared-memory name of one server's directory (22 characters: macOS allows 31).

    The LM and preprocess both know the model repository and the server's process id, and two servers
    on one host (or one server restarted) never share a directory."""
    digest = hashlib.sha256(f"{Path(repository).resolve()}:{server_pid}".encode()).hexdigest()
    return f"llava-{digest[:16]}"


def image_key(secret: bytes, fingerprint: bytes, cache_salt: bytes, image: bytes) -> bytes:
    """An image's cache key: keyed BLAKE2b (32 bytes) of the fingerprint, the salt's length (4 bytes,
    little-endian), the salt and the encoded image.

    `secret` is the directory's, drawn by the LM for each server: a client that calls the language model
    directly (its image_keys input) cannot name another request's image, since it cannot compute keys.
    `fingerprint` (32 bytes) covers everything that changes the embeddings for the same image bytes: the
    preprocessing config and the model. `cache_salt` separates tenants; its length prefix keeps the salt
    and the image apart (salt b"ab" and image b"c" is not salt b"a" and image b"bc")."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"an image key's secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"an image key's fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(fingerprint)}")
    if len(cache_salt) >= 1 << 32:
        raise ValueError(f"a cache_salt of {len(cache_salt)} bytes is too long for its 4-byte length prefix")
    digest = hashlib.blake2b(digest_size=IMAGE_KEY_BYTES, key=secret)
    digest.update(fingerprint)
    digest.update(len(cache_salt).to_bytes(4, "little"))
    digest.update(cache_salt)
    digest.update(image)
    return digest.digest()


def _check_key(key: bytes) -> None:
    if len(key) != IMAGE_KEY_BYTES:
        raise ValueError(f"an image key must be {IMAGE_KEY_BYTES} bytes, got {len(key)}")


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"an image's height and width must be positive, got {height} x {width}")


def _open_segment(name: str) -> SharedMemory | None:
    """Another process's segment, or None where there is none (or it is still empty: being created).

    Attaching registers the segment with this process's resource tracker (Python 3.11 and 3.12 have no
    `track=False`), which unlinks it when the process exits: unregistered here, so a preprocess process
    that exits leaves the LM's directory in place; the creator's own registration still unlinks it if
    the LM dies. Not where this process created the segment: registrations are a set, and unregistering
    would take the creator's away. (A process started by multiprocessing shares its parent's tracker,
    so its attaching does take the parent's registration away: the Triton stubs are not such processes.)"""
    try:
        shm = SharedMemory(name)
    except (FileNotFoundError, ValueError):  # ValueError: mmap of an empty file (created, not yet sized)
        return None
    if name not in _created:
        resource_tracker.unregister(shm._name, "shared_memory")  # the name as registered (with its "/")
    return shm


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_directories() -> list[str]:
    """Unlink the directories (in /dev/shm) whose creating LM process is gone without closing them: a
    killed LM's resource tracker may die with it and leave its segment behind. Returns their names."""
    removed = []
    for path in sorted(_SHM_DIR.glob(f"{_NAME_PREFIX}*")) if _SHM_DIR.is_dir() else []:
        shm = Directory._open_valid(path.name)
        if shm is None:
            continue
        try:
            header = np.ndarray((1,), dtype=_HEADER, buffer=shm.buf)
            pid = int(header["pid"][0])
            del header
            if pid and not _alive(pid):
                path.unlink(missing_ok=True)  # shm_unlink, without the resource tracker's bookkeeping
                removed.append(path.name)
        finally:
            shm.close()
    for name in removed:
        log.warning("removed embedding-cache directory %r: the language model that made it is gone", name)
    return removed


class Directory:
    """Which image keys the LM's cache holds, with each image's (height, width): a fixed-size table in
    shared memory that one process (the LM) writes and many (preprocess) read.

    Layout: a 64-byte header (magic, format version, state, capacity, the 32-byte secret for `image_key`)
    then `capacity` 56-byte entries (seqlock counter, key, height, width). Direct-mapped: a key lives in
    entry `int.from_bytes(key[:8], "little") % capacity`, with no probing: publishing a key overwrites
    whatever key held its slot, which just becomes invisible (a miss).

    Each entry is a seqlock: the writer makes its counter odd, writes the fields, then makes it even; a
    reader copies the entry between two reads of the counter and takes an odd or changed counter as a
    miss. That relies on stores reaching other processes in program order, as x86 guarantees (Python has
    no memory fence to make it so on weakly ordered CPUs such as Arm's).

    Not thread-safe for writing: the LM's EmbeddingCache publishes under its lock.
    """

    def __init__(self, shm: SharedMemory | None, role: str, name: str, secret: bytes):
        """Use `create` or `attach`. `shm` None: a directory with no table, never usable."""
        self.name = name
        self._shm = shm
        self._role = role
        self._secret = secret
        self._header = self._entries = None
        if shm is not None:
            self._header = np.ndarray((1,), dtype=_HEADER, buffer=shm.buf)
            capacity = int(self._header["capacity"][0])
            self._entries = np.ndarray((capacity,), dtype=_ENTRY, buffer=shm.buf, offset=_HEADER.itemsize)

    @classmethod
    def create(cls, name: str, capacity: int = 65536) -> Directory:
        """The LM's directory, new and OPEN.

        If a segment of that name exists, another LM instance of the same server made it, and a request
        may reach an instance that does not hold its image: the existing directory is marked SHARED (so
        readers stop trusting it) and the directory returned is never usable and never publishes."""
        if capacity < 1:
            raise ValueError(f"a directory needs at least 1 entry, got capacity {capacity}")
        size = _HEADER.itemsize + capacity * _ENTRY.itemsize
        remove_stale_directories()
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while True:
            try:
                shm = SharedMemory(name, create=True, size=size)
            except FileExistsError:
                joined = cls._join(name)
                if joined is not None:
                    return joined
            else:
                break
            if time.monotonic() > deadline:
                log.warning("shared memory %r exists but holds no embedding-cache directory: the cache is off", name)
                return cls(None, _JOINED, name, secrets.token_bytes(SECRET_BYTES))
            time.sleep(0.01)
        secret = secrets.token_bytes(SECRET_BYTES)
        header = np.ndarray((1,), dtype=_HEADER, buffer=shm.buf)
        header["version"] = _VERSION
        header["capacity"] = capacity
        header["secret"] = np.frombuffer(secret, dtype=np.uint8)
        header["pid"] = os.getpid()
        header["state"] = OPEN
        header["magic"] = _MAGIC  # last: a reader that sees the magic sees the rest of the header
        del header  # a view of shm.buf would keep close() from releasing the mapping
        _created.add(name)
        return cls(shm, _WRITER, name, secret)

    @classmethod
    def _join(cls, name: str) -> Directory | None:
        """Another LM's directory, now SHARED; None while it is not there or not yet written."""
        shm = cls._open_valid(name)
        if shm is None:
            return None
        directory = cls(shm, _JOINED, name, cls._read_secret(shm))
        directory._header["state"] = SHARED
        log.warning("embedding-cache directory %r is used by another language-model instance: "
                    "preprocess no longer skips cached images", name)
        return directory

    @classmethod
    def attach(cls, name: str) -> Directory | None:
        """A reader's view of the LM's directory; None where there is none (no such segment, or not one
        this version wrote)."""
        shm = cls._open_valid(name)
        return None if shm is None else cls(shm, _READER, name, cls._read_secret(shm))

    @classmethod
    def _open_valid(cls, name: str) -> SharedMemory | None:
        """The segment `name` if it holds a directory of this version, else None (closed again)."""
        shm = _open_segment(name)
        if shm is not None and not cls._valid(shm):
            shm.close()
            return None
        return shm

    @staticmethod
    def _valid(shm: SharedMemory) -> bool:
        if shm.size < _HEADER.itemsize:
            return False
        header = np.ndarray((1,), dtype=_HEADER, buffer=shm.buf)[0].copy()
        return (int(header["magic"]) == _MAGIC and int(header["version"]) == _VERSION
                and shm.size >= _HEADER.itemsize + int(header["capacity"]) * _ENTRY.itemsize)

    @staticmethod
    def _read_secret(shm: SharedMemory) -> bytes:
        return np.ndarray((1,), dtype=_HEADER, buffer=shm.buf)["secret"][0].tobytes()

    @property
    def secret(self) -> bytes:
        """The 32-byte key of `image_key` for this server."""
        return self._secret

    @property
    def capacity(self) -> int:
        return 0 if self._entries is None else len(self._entries)

    @property
    def state(self) -> int | None:
        """OPEN, CLOSED or SHARED; None once this object is closed (or never had a table)."""
        return None if self._header is None else int(self._header["state"][0])

    @property
    def usable(self) -> bool:
        """Whether lookups can be trusted (and, for the LM, whether it publishes): the directory is OPEN
        and this object is not the second LM instance that found it."""
        return self._role != _JOINED and self.state == OPEN

    def slot(self, key: bytes) -> int:
        """The entry a key lives in."""
        _check_key(key)
        if self._entries is None:
            raise ValueError(f"directory {self.name!r} is closed")
        return int.from_bytes(key[:8], "little") % self.capacity

    def publish(self, key: bytes, height: int, width: int) -> None:
        """Announce that the LM holds `key`'s embeddings (of an image of height x width), replacing what
        its slot held. Does nothing once the directory is not usable."""
        _check_key(key)
        _check_size(height, width)
        if self._role == _READER:
            raise ValueError(f"directory {self.name!r} is attached for reading: only the LM that created it "
                             "publishes")
        if not self.usable:
            return
        self._write(self.slot(key), np.frombuffer(key, dtype=np.uint8), height, width)

    def unpublish(self, key: bytes) -> None:
        """Withdraw `key`, if its slot still holds it (it may since hold another key)."""
        _check_key(key)
        if self._role == _READER:
            raise ValueError(f"directory {self.name!r} is attached for reading: only the LM that created it "
                             "unpublishes")
        if not self.usable:
            return
        index = self.slot(key)
        if self._entries["key"][index].tobytes() == key:
            self._write(index, 0, 0, 0)

    def _write(self, index: int, key: np.ndarray | int, height: int, width: int) -> None:
        entries = self._entries
        entries["seq"][index] += 1  # odd: readers of this entry now see a miss
        entries["key"][index] = key
        entries["height"][index] = height
        entries["width"][index] = width
        entries["seq"][index] += 1

    def lookup(self, key: bytes) -> tuple[int, int] | None:
        """(height, width) of a published key while the directory is usable; None otherwise (a miss)."""
        _check_key(key)
        if not self.usable:
            return None
        index = self.slot(key)
        seq = self._entries["seq"]
        before = int(seq[index])
        if before & 1:
            return None
        entry = self._entries[index:index + 1].copy()[0]
        if int(seq[index]) != before:
            return None
        if int(entry["height"]) <= 0 or entry["key"].tobytes() != key:
            return None
        return int(entry["height"]), int(entry["width"])

    def close(self) -> None:
        """Release the mapping. The creator first marks the directory CLOSED (readers then miss) and
        unlinks it. Idempotent."""
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        if self._role == _WRITER:
            self._header["state"] = CLOSED
        self._header = self._entries = None  # views of shm.buf: shm.close() refuses while they exist
        shm.close()
        if self._role == _WRITER:
            _created.discard(self.name)
            try:
                shm.unlink()
            except FileNotFoundError:
                log.warning("embedding-cache directory %r was already unlinked", self.name)


@dataclass(frozen=True)
class EmbeddingCacheStats:
    """Cumulative hits, misses and evictions; bytes and entries held now, retired ones included."""

    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int


@dataclass
class _Entry:
    embeds: torch.Tensor  # (num_tiles, num_image_tokens, text_hidden_size)
    height: int
    width: int
    nbytes: int


class EmbeddingCache:
    """Projected image embeddings by image key, least recently used evicted first, within a byte budget.

    An evicted entry is retired: unpublished from the directory at once, but `get` still returns it for
    `grace_s` seconds, for the requests preprocess had already sent as hits. Retired entries count against
    the budget until their grace passes, so the budget bounds the device memory the cache holds. Hence a
    `put` that needs room retires least recently used entries to make it, and is itself refused: the room
    frees when their grace passes, and the image, if it comes again, is cached then.

    Thread-safe (one lock): lookups come from Triton's execute thread, inserts from the engine's thread.
    """

    def __init__(self, budget_bytes: int, grace_s: float, directory: Directory | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """`directory`: where to publish the keys held (None: nowhere). `clock`: seconds, for the grace."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be 0 or positive, got {budget_bytes}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be 0 or positive, got {grace_s}")
        self.budget_bytes = budget_bytes
        self.grace_s = grace_s
        self.directory = directory
        self._clock = clock
        self._lock = threading.Lock()
        self._live: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()  # least recent first
        # Retired entries and when they were retired, oldest first (the clock never goes back).
        self._retired: collections.OrderedDict[bytes, tuple[_Entry, float]] = collections.OrderedDict()
        self._live_bytes = 0
        self._retired_bytes = 0
        self._hits = self._misses = self._evictions = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        """A key's embeddings, live (now the most recently used) or retired within its grace; None if
        neither. The caller's reference keeps the tensor alive whatever the cache drops later."""
        _check_key(key)
        with self._lock:
            self._expire()
            entry = self._live.get(key)
            if entry is not None:
                self._live.move_to_end(key)
            elif key in self._retired:
                entry = self._retired[key][0]
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
            return entry.embeds

    def put(self, key: bytes, embeds: torch.Tensor, height: int, width: int) -> bool:
        """Cache an image's (num_tiles, num_image_tokens, hidden) embeddings, as they are (the caller
        does not modify them), and publish the key; whether they are cached now.

        A key already held is refreshed (most recently used, published again in case another key took
        its slot) and keeps its tensor; a retired one comes back to life. Otherwise the entry is stored
        if it fits: see the class docstring for what happens when it does not."""
        _check_key(key)
        _check_size(height, width)
        if embeds.ndim != 3:
            raise ValueError(f"image embeddings must be (tiles, tokens, hidden), got shape {list(embeds.shape)}")
        nbytes = embeds.numel() * embeds.element_size()
        with self._lock:
            self._expire()
            entry = self._live.get(key)
            if entry is None and key in self._retired:
                entry = self._retired.pop(key)[0]
                self._retired_bytes -= entry.nbytes
                self._live[key] = entry
                self._live_bytes += entry.nbytes
            if entry is not None:
                self._live.move_to_end(key)
                self._publish(key, entry)
                return True
            if nbytes > self.budget_bytes:
                return False
            # Make the room the entry needs once the retired entries' grace passes.
            while self._live_bytes + nbytes > self.budget_bytes:
                self._retire_oldest()
            if self._live_bytes + self._retired_bytes + nbytes > self.budget_bytes:
                return False
            entry = _Entry(embeds, int(height), int(width), nbytes)
            self._live[key] = entry
            self._live_bytes += nbytes
            self._publish(key, entry)
            return True

    def _publish(self, key: bytes, entry: _Entry) -> None:
        if self.directory is not None:
            self.directory.publish(key, entry.height, entry.width)

    def _retire_oldest(self) -> None:
        key, entry = self._live.popitem(last=False)
        self._live_bytes -= entry.nbytes
        if self.directory is not None:
            self.directory.unpublish(key)  # first: no new request claims it
        self._retired[key] = (entry, self._clock())
        self._retired_bytes += entry.nbytes
        self._evictions += 1

    def _expire(self) -> None:
        """Drop the retired entries whose grace has passed."""
        now = self._clock()
        while self._retired:
            key, (entry, retired_at) = next(iter(self._retired.items()))
            if now - retired_at < self.grace_s:
                break
            del self._retired[key]
            self._retired_bytes -= entry.nbytes

    def stats(self) -> EmbeddingCacheStats:
        with self._lock:
            return EmbeddingCacheStats(hits=self._hits, misses=self._misses, evictions=self._evictions,
                                       bytes=self._live_bytes + self._retired_bytes,
                                       entries=len(self._live) + len(self._retired))

    def close(self) -> None:
        """Close the directory (the tensors stay with whoever still holds them)."""
        with self._lock:
            if self.directory is not None:
                self.directory.close()
