"""In-flight batching for the language model.

Requests join between decode steps and leave as soon as they finish: each `step()` first
spends a budget of prompt tokens on prefill (long prompts in chunks, so running streams are
not stalled for a whole prompt), then decodes one token for every running sequence in a
single batched forward pass.

The KV cache is a pool of fixed-size blocks (llava_triton.kv_blocks). A request is admitted, oldest
first, when a block-table row (one of max_num_seqs) and the blocks for its prompt plus its
max_tokens are free; it holds them to the end, so a running sequence never runs out of cache and
nothing is ever preempted. A short request takes a few blocks, a long one more: admission follows
what requests use, not a worst-case slot each.

With prefix caching (llava_triton.kv_blocks), a request's prompt blocks that an earlier prompt
already computed (the same tokens, images and cache_salt) are taken from the cache at admission and
its prefill starts after them. With an embedding cache (llava_triton.embedding_cache), the images
preprocess found there arrive without their tiles and their embeddings are read from it; every other
image's embeddings are put there at prefill.

Decode steps overlap the host's work (serving option overlap_decode, on by default). Step N+1 is
launched before the host has read step N's tokens: its input tokens are gathered on the device from
`_next_tokens`, where every sampling step writes each row's token, and its positions are each
sequence's last known position plus the token in flight (`Sequence.pending`). Then the host waits
for step N's tokens, appends, detokenizes and hands them out while the GPU computes step N+1. What
the host learns one step late is which sequences stopped: a sequence that stops on EOS or a stop
string at step N has also computed step N+1, whose token is thrown away (its key and value went to
a position inside its own reserved blocks). A sequence whose token in flight is its last
(max_tokens) is not launched again. Prefill's first tokens travel the same way: sampled into
`_next_tokens` and read by the host at the next step, after that step's decode launch, so the
host never waits for a prefill and the GPU always has the next step queued. Freed blocks and rows
can be given out at once: everything that writes them later (block tables, prefill) is queued on
the same CUDA stream after the step in flight; nothing between two token reads makes the host wait
for the GPU (host_tensors).

The engine only schedules: it receives the language model already prepared (fused, quantised,
its KV cache allocated, compiled and captured) as a `LanguageModelRuntime` (llava_triton.lm_runtime).
"""

from __future__ import annotations

import collections
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from .anyres import pack_index, tile_layout
from .detokenize import Detokenizer, TextStream
from .errors import InvalidRequestError, ServerBusyError
from .host_tensors import all_finite, upload
from .kv_blocks import BlockAllocator, prefix_block_hashes, prefix_root
from .lm_runtime import LanguageModelRuntime
from .outbox import Outbox
from .sampling import SamplingParams, make_generator, sample
from .spec import (
    IMAGE_EMBEDS,
    IMAGE_KEY_BYTES,
    REFUSED_CANCELLED,
    REFUSED_INVALID,
    REFUSED_QUEUE_FULL,
    REFUSED_QUEUE_TIMEOUT,
    VIDEO_FRAMES,
    ModelSpec,
    ServingConfig,
    language_model_image_input,
)
from .step_profile import NullProfile, StepProfile

if TYPE_CHECKING:
    from .embedding_cache import EmbeddingCache

log = logging.getLogger(__name__)

FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # max_tokens reached


@dataclass
class Output:
    """What one response carries. Streaming sends a delta per token; otherwise one at the end."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "" until the last output
    final: bool


class Sink(Protocol):
    """Where a request's results go (the Triton adapter wraps a response sender)."""

    def send(self, output: Output) -> None: ...
    def error(self, message: str) -> None: ...
    def cancelled(self) -> bool: ...


class Metrics:
    """What the engine reports as it runs; the Triton adapter publishes it on /metrics.

    This base class records nothing, so the engine runs the same without a server.
    """

    def request_refused(self, reason: str) -> None: ...
    def prompt_tokens(self, count: int) -> None: ...
    def generated_tokens(self, first_token_s: list[float], inter_token_s: list[float]) -> None:
        """The tokens of one step: seconds from submission to each first token, and from the
        previous token to each later one (one call a step: each metric update may be an IPC)."""
    def occupancy(self, running: int, waiting: int, kv_cache_usage: float, free_blocks: int,
                  cached_blocks: int = 0) -> None:
        """Requests admitted and waiting, the fraction of KV-cache blocks in use, the free ones and those of
        them that keep a prefix."""
    def prefix_cache(self, prompt_tokens: int, hit_tokens: int) -> None:
        """One admitted request: its prompt's tokens, and how many came from cached blocks."""
    def embedding_cache(self, hits: int, misses: int, evictions: int, cached_bytes: int) -> None:
        """Images read from the embedding cache and images encoded (one request's), the evictions since
        the last call and the bytes it now holds."""


@dataclass(eq=False)  # identity: sequences are compared and removed by object, never by value
class Sequence:
    input_ids: torch.Tensor  # (T,) int64, `<image>` already expanded
    image_embeds: torch.Tensor | None  # (num_tiles, num_image_tokens, C) or None
    params: SamplingParams
    max_tokens: int
    sink: Sink
    row: int = -1  # the sequence's block-table row while admitted (LlamaForCausalLM.set_block_table)
    blocks: list[int] = field(default_factory=list)  # its KV-cache blocks, reserved at admission
    prefilled: int = 0  # prompt tokens already in the KV cache
    inputs_embeds: torch.Tensor | None = None  # (1, T, C) while prefilling
    output_ids: list[int] = field(default_factory=list)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    last_event: float = field(default_factory=time.monotonic)  # submission, then each token
    # LLaVA-NeXT: the row of concat(tiles' embeddings, image_newline) for each image token (anyres.pack_index).
    image_index: np.ndarray | None = None
    image_tiles: tuple[int, ...] = ()  # each image's tiles, in prompt order
    image_sizes: np.ndarray | None = None  # (N, 2) LLaVA-NeXT's heights and widths
    image_keys: list[bytes] | None = None  # each image's content key (embedding_cache.image_key)
    # Images read from the embedding cache: index → (tiles, num_image_tokens, text_hidden_size) on the device.
    cached_embeds: dict[int, torch.Tensor] = field(default_factory=dict)
    video_frames: tuple[int, ...] = ()  # LLaVA-NeXT-Video: each video's frames, whose rows follow the images'
    block_hashes: list[bytes] = field(default_factory=list)  # each full prompt block's (kv_blocks.prefix_block_hashes)
    registered: int = 0  # leading blocks registered in the prefix cache (or taken from it)
    pending: int = 0  # launched steps (its prefill's end, decode steps) whose tokens are not appended yet (<= 2)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def position(self) -> int:
        """Position of the next token to feed: the last generated one."""
        return self.prompt_tokens + len(self.output_ids) - 1

    @property
    def next_position(self) -> int:
        """Position of the token the next decode step feeds: the last generated one, or the last in flight."""
        return self.position + self.pending

    @property
    def kv_tokens(self) -> int:
        """Cache positions the sequence can write: its prompt and every generated token but the
        last, which is never fed back."""
        return self.prompt_tokens + self.max_tokens - 1


def count_images(input_ids: torch.Tensor, image_embeds_shape: tuple[int, ...] | None, spec: ModelSpec,
                 image_input: str = IMAGE_EMBEDS, cached: np.ndarray | None = None) -> int:
    """How many LLaVA-1.5 images (one tile each) input_ids refers to, checked against the image tensor
    sent with it: the image embeddings, or the vision encoder's features (`image_input` IMAGE_FEATURES)
    when the engine runs the projector; `cached`: the images it leaves out (see `plan_images`)."""
    image_tokens = int(image_token_mask(input_ids, spec).sum())
    if image_tokens % spec.num_image_tokens:
        raise InvalidRequestError(f"input_ids holds {image_tokens} image tokens, not a multiple of "
                                  f"{spec.num_image_tokens} per image")
    num_images = image_tokens // spec.num_image_tokens
    sent = _sent_tiles((1,) * num_images, cached)
    available = 0 if image_embeds_shape is None else image_embeds_shape[0]
    if sent > available:
        what = "image embeddings" if image_input == IMAGE_EMBEDS else "images' features"
        raise InvalidRequestError(f"the prompt refers to {sent} images but {available} {what} were sent")
    if sent:
        check_image_tensor_shape(image_embeds_shape, spec, image_input)
    return num_images


def _finite(tensor: torch.Tensor) -> bool:
    """Whether a host tensor holds no NaN and no infinity (by its bits where numpy has the dtype: the
    execute thread's torch ops each give the GIL back to the engine thread, see image_token_mask)."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float16, torch.float32):
        return all_finite(tensor.numpy())
    return bool(torch.isfinite(tensor).all())


def image_token_mask(input_ids: torch.Tensor, spec: ModelSpec) -> np.ndarray:
    """Which ids of a request's non-empty 1-D input_ids are image tokens; every other id must be in the
    vocabulary."""
    if input_ids.ndim != 1 or input_ids.numel() == 0:
        raise InvalidRequestError(f"input_ids must be a non-empty 1-D tensor, got shape {list(input_ids.shape)}")
    # In numpy: this runs on Triton's execute thread, where each torch op gives up the GIL and has to
    # win it back from the engine thread (py-spy saw it take ~8 % of that thread's time under load).
    ids = input_ids.numpy()
    is_image = ids == spec.image_token_index
    if bool(((~is_image) & ((ids < 0) | (ids >= spec.vocab_size))).any()):
        raise InvalidRequestError(f"input_ids holds ids outside the vocabulary [0, {spec.vocab_size})")
    return is_image


def check_image_tensor_shape(shape: tuple[int, ...], spec: ModelSpec, image_input: str) -> None:
    """An image tensor's items: the projector's embeddings, or the vision encoder's features."""
    width = spec.text_hidden_size if image_input == IMAGE_EMBEDS else spec.vision_hidden_size
    if tuple(shape[1:]) != (spec.num_image_tokens, width):
        raise InvalidRequestError(f"{image_input} must have shape [n, {spec.num_image_tokens}, {width}], "
                                  f"got {list(shape)}")


@dataclass(frozen=True)
class ImagePlan:
    """A request's images, checked against its inputs."""

    tiles: tuple[int, ...]  # each image's vision-encoder tiles (LLaVA-1.5: 1)
    tokens: tuple[int, ...]  # each image's run of image tokens in input_ids
    index: np.ndarray | None  # LLaVA-NeXT: how its tiles are packed (anyres.pack_index)
    sent_tiles: int  # the tiles of image_embeds the request uses: those of the images not read from the cache

    @property
    def num_images(self) -> int:
        return len(self.tiles)


def plan_images(input_ids: torch.Tensor, image_embeds_shape: tuple[int, ...] | None,
                image_sizes: np.ndarray | None, spec: ModelSpec, serving: ServingConfig,
                image_input: str = IMAGE_EMBEDS, cached: np.ndarray | None = None) -> ImagePlan:
    """The request's images, checked against the inputs: LLaVA-1.5 as `count_images`; LLaVA-NeXT from
    each image's size (`image_sizes`, N x 2), whose tiles and tokens must be those the prompt and the
    image tensor hold. `cached` (N,) bool: the images whose tiles image_embeds leaves out (read from
    the embedding cache)."""
    if not spec.anyres:
        num_images = count_images(input_ids, image_embeds_shape, spec, image_input, cached)
        tiles = (1,) * num_images
        return ImagePlan(tiles, (spec.num_image_tokens,) * num_images, None, _sent_tiles(tiles, cached))
    is_image = image_token_mask(input_ids, spec)
    sizes = np.zeros((0, 2), dtype=np.int64) if image_sizes is None else np.asarray(image_sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or not np.issubdtype(sizes.dtype, np.integer):
        raise InvalidRequestError(f"image_sizes must be INT64 [n, 2], got {sizes.dtype} {list(sizes.shape)}")
    if len(sizes) > serving.max_images_per_request:  # the language model can be called directly too
        raise InvalidRequestError(f"image_sizes holds {len(sizes)} images, more than max_images_per_request "
                                  f"({serving.max_images_per_request})")
    if bool((sizes <= 0).any()) or bool((sizes > 2**20).any()):
        raise InvalidRequestError("image_sizes holds a height or width outside [1, 1048576]")
    layouts = [tile_layout(int(height), int(width), spec) for height, width in sizes]
    image_tokens = int(is_image.sum())
    expected = sum(layout.num_image_tokens for layout in layouts)
    if image_tokens != expected:
        raise InvalidRequestError(f"input_ids holds {image_tokens} image tokens, the {len(layouts)} images of "
                                  f"image_sizes make {expected}")
    if not layouts:
        return ImagePlan((), (), None, 0)
    tiles = tuple(layout.num_tiles for layout in layouts)
    sent = _sent_tiles(tiles, cached)
    available = 0 if image_embeds_shape is None else image_embeds_shape[0]
    if sent > available:
        raise InvalidRequestError(f"the images make {sent} tiles but {image_input} holds {available}")
    if sent:
        check_image_tensor_shape(image_embeds_shape, spec, image_input)
    return ImagePlan(tiles, tuple(layout.num_image_tokens for layout in layouts), pack_index(layouts), sent)


def plan_videos(input_ids: torch.Tensor, video_frames: np.ndarray | None, spec: ModelSpec,
                serving: ServingConfig) -> tuple[int, ...]:
    """LLaVA-NeXT-Video: each video's frames (`video_frames`, V int64), checked against the limits (the
    language model can be called directly) and against the prompt's `<video>` tokens, num_frame_tokens
    a frame."""
    frames = np.zeros(0, dtype=np.int64) if video_frames is None else np.asarray(video_frames)
    if frames.size and not spec.videos:
        raise InvalidRequestError(f"this model ({spec.model_type}) takes no videos, but {VIDEO_FRAMES} was sent")
    if not spec.videos:
        return ()
    if frames.ndim != 1 or not np.issubdtype(frames.dtype, np.integer):
        raise InvalidRequestError(f"{VIDEO_FRAMES} must be INT64 [n], got {frames.dtype} {list(frames.shape)}")
    if len(frames) > serving.max_videos_per_request:
        raise InvalidRequestError(f"{VIDEO_FRAMES} holds {len(frames)} videos, more than max_videos_per_request "
                                  f"({serving.max_videos_per_request})")
    if bool((frames < 1).any()) or int(frames.sum()) > serving.max_frames_per_request:
        raise InvalidRequestError(f"{VIDEO_FRAMES} must hold at least 1 frame a video and at most "
                                  f"max_frames_per_request ({serving.max_frames_per_request}) in all, got "
                                  f"{frames.tolist()}")
    video_tokens = int((input_ids.numpy() == spec.video_token_index).sum())
    expected = int(frames.sum()) * spec.num_frame_tokens
    if video_tokens != expected:
        raise InvalidRequestError(f"input_ids holds {video_tokens} video tokens, the {len(frames)} videos of "
                                  f"{VIDEO_FRAMES} make {expected} ({spec.num_frame_tokens} a frame)")
    return tuple(int(count) for count in frames)


def pool_frames(features: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(frames, grid * grid, C) → (frames, num_frame_tokens, C): each frame's feature grid pooled with a
    spatial_pool_stride window and stride, as transformers' LlavaNextVideoPooler (before the projector)."""
    frames, tokens, channels = features.shape
    side = spec.image_size // spec.patch_size
    if tokens != side * side:
        raise ValueError(f"a frame's features hold {tokens} tokens, not a {side}x{side} grid")
    grid = features.view(frames, side, side, channels).permute(0, 3, 1, 2)
    pool = torch.nn.functional.avg_pool2d if spec.spatial_pool_mode == "average" else torch.nn.functional.max_pool2d
    stride = spec.spatial_pool_stride
    return pool(grid, kernel_size=stride, stride=stride).flatten(2).transpose(1, 2)


def _sent_tiles(tiles: tuple[int, ...], cached: np.ndarray | None) -> int:
    if cached is None:
        return sum(tiles)
    if cached.shape != (len(tiles),):
        raise InvalidRequestError(f"image_cached must hold one flag per image ({len(tiles)}), got shape "
                                  f"{list(cached.shape)}")
    return sum(count for count, is_cached in zip(tiles, cached.tolist()) if not is_cached)


@dataclass
class InFlight:
    """A launched decode step (or a prefill) whose sampled tokens the host has not read yet."""
    seqs: list[Sequence]
    tokens: torch.Tensor  # (B,) int64 on the host (pinned on a GPU), written by a queued copy
    done: torch.cuda.Event | None  # recorded after that copy (None on the CPU, where copies are synchronous)


def check_image_keys(image_keys: np.ndarray | None, num_images: int) -> list[bytes] | None:
    """image_keys (N, IMAGE_KEY_BYTES) uint8 → one bytes key per image; None when the request has none
    (no rows: nothing of its images is cached or shared)."""
    if image_keys is None or image_keys.size == 0:
        return None
    if image_keys.dtype != np.uint8 or image_keys.shape != (num_images, IMAGE_KEY_BYTES):
        raise InvalidRequestError(f"image_keys must be UINT8 [{num_images}, {IMAGE_KEY_BYTES}] (one key per image), "
                                  f"got {image_keys.dtype} {list(image_keys.shape)}")
    return [row.tobytes() for row in image_keys]


class Engine:
    """Admission, prefill chunks, decode steps, sampling, detokenizing and sending, over a prepared model."""

    def __init__(self, runtime: LanguageModelRuntime, tokenizer, spec: ModelSpec, serving: ServingConfig,
                 metrics: Metrics | None = None, outbox: Outbox | None = None,
                 projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 image_newline: torch.Tensor | None = None, embedding_cache: EmbeddingCache | None = None,
                 profile: StepProfile | None = None):
        """`runtime`: the language model prepared for `serving` (lm_runtime.prepare_language_model).
        `projector`: LLaVA's projector, on the model's device and in its dtype, for
        projector_placement "language_model" (requests then carry the vision encoder's features).
        `image_newline`: LLaVA-NeXT's (text_hidden_size,) embedding after each row of an image's tiles.
        `embedding_cache`: where images' embeddings are kept for reuse (None: off).
        `profile`: where the host's time per phase goes (llava_triton.step_profile; None: not measured)."""
        if spec.anyres != (image_newline is not None):
            raise ValueError("a llava_next model needs image_newline" if spec.anyres
                             else "image_newline is for llava_next models only")
        if (projector is not None) != serving.projector_in_language_model:
            raise ValueError(f"projector_placement {serving.projector_placement!r} "
                             + ("needs the projector" if projector is None else "takes no projector"))
        if spec.videos and projector is None:
            raise ValueError("a llava_next_video model pools frames before the projector: it needs "
                             "projector_placement language_model")
        if runtime.max_seq_len != serving.token_limit(spec):
            raise ValueError(f"the language model was prepared for sequences of {runtime.max_seq_len} tokens, "
                             f"the serving config allows {serving.token_limit(spec)}")
        self.projector = projector
        self.image_newline = None if image_newline is None else image_newline.to(runtime.device, runtime.dtype)
        self.image_input = language_model_image_input(serving)
        self.metrics = metrics or Metrics()
        self.out = outbox or Outbox()  # responses and errors leave through it (see outbox.py)
        self.model = runtime.model
        self.tokenizer = tokenizer
        self.spec = spec
        self.serving = serving
        self.device = runtime.device
        self.dtype = runtime.dtype
        self.max_seq_len = runtime.max_seq_len
        self.max_seqs = runtime.max_seqs
        self.blocks = BlockAllocator(runtime.num_blocks, runtime.block_size, caching=serving.prefix_caching)
        self.embedding_cache = embedding_cache
        self._evictions_reported = 0
        self.decode_step = runtime.decode_step
        self.prefill_step = runtime.prefill_step
        self.eos = frozenset(spec.eos_token_id)
        self._detokenizer = Detokenizer(tokenizer)
        # Block-table rows, a min-heap (the lowest free first); what holds keys and values is the blocks.
        self._free_rows = list(range(self.max_seqs))
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._last_cancel_check = 0.0
        self.profile = profile or NullProfile()
        self.overlap = serving.overlap_decode
        # Each block-table row's last sampled token, on the device: the next decode step's input_ids.
        self._next_tokens = torch.zeros(self.max_seqs, dtype=torch.long, device=self.device)
        # Two of each host buffer: a step's copies may still be queued while the next step fills the other.
        pinned = self.device.type == "cuda"
        self._host_tokens = [torch.empty(self.max_seqs, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._host_inputs = [torch.empty((2, self.max_seqs), dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._buffer = 0
        self._inflight: InFlight | None = None
        self._first_tokens: list[InFlight] = []  # prefills' first tokens on their way to the host

    # -- requests in ----------------------------------------------------------------------
    def submit(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None, params: SamplingParams,
               sink: Sink, image_sizes: np.ndarray | None = None, image_keys: np.ndarray | None = None,
               image_cached: np.ndarray | None = None, cache_salt: bytes = b"",
               video_frames: np.ndarray | None = None) -> Sequence:
        """Validate and queue one request (thread-safe). Raises InvalidRequestError / ServerBusyError.
        `image_sizes`: LLaVA-NeXT's (N, 2) heights and widths, which say how the tiles are packed.
        `image_keys` (N, IMAGE_KEY_BYTES) uint8: each image's content key; `image_cached` (N,) bool: the
        images whose tiles image_embeds leaves out, to be read from the embedding cache.
        `cache_salt`: the request shares cached blocks only with requests of the same salt.
        `video_frames` (V,) int64: LLaVA-NeXT-Video's frames per video, whose features follow the sent
        images' tiles in image_embeds (the vision encoder's features: such models project here)."""
        try:
            cached = None if image_cached is None else np.asarray(image_cached, dtype=bool).reshape(-1)
            plan = plan_images(input_ids, None if image_embeds is None else tuple(image_embeds.shape), image_sizes,
                               self.spec, self.serving, self.image_input, cached)
            keys = check_image_keys(image_keys, plan.num_images)
            frames = plan_videos(input_ids, video_frames, self.spec, self.serving)
            rows = plan.sent_tiles + sum(frames)
            available = 0 if image_embeds is None else int(image_embeds.shape[0])
            if rows > available:
                raise InvalidRequestError(f"the images' {plan.sent_tiles} tiles and the videos' {sum(frames)} frames "
                                          f"need {rows} rows of {self.image_input}, it holds {available}")
            if frames:
                check_image_tensor_shape(tuple(image_embeds.shape), self.spec, self.image_input)
            # Here, on the host, so that prefill has nothing to read back from the GPU (host_tensors).
            if rows and not _finite(image_embeds[:rows]):
                raise InvalidRequestError(f"{self.image_input} holds NaN or infinite values")
            cached_embeds = self._read_cached_embeds(plan, keys, cached)
            max_tokens = params.resolve_max_tokens(int(input_ids.shape[0]), self.max_seq_len, self.serving)
            self._check_fits_cache(int(input_ids.shape[0]), max_tokens)
            block_hashes = []
            if self.serving.prefix_caching:
                block_hashes = prefix_block_hashes(input_ids.numpy(), self.blocks.block_size, prefix_root(cache_salt),
                                                   self.spec.image_token_index, plan.tokens, keys,
                                                   self.spec.video_token_index if frames else None)
        except InvalidRequestError:
            self.metrics.request_refused(REFUSED_INVALID)
            raise
        seq = Sequence(input_ids=input_ids, image_embeds=image_embeds[:rows] if rows else None,
                       params=params, max_tokens=max_tokens, sink=sink, image_index=plan.index,
                       image_tiles=plan.tiles, image_sizes=image_sizes, image_keys=keys, cached_embeds=cached_embeds,
                       video_frames=frames, block_hashes=block_hashes)
        with self._cond:
            # Requests that a free block-table row will take at the next step are not queued, whatever
            # burst they arrived in: only those beyond the free rows count against the limit (blocks
            # permitting: where they run short, up to max_num_seqs more may wait).
            if len(self._waiting) - len(self._free_rows) >= self.serving.max_queue_size:
                self.metrics.request_refused(REFUSED_QUEUE_FULL)
                raise ServerBusyError(f"the language model's queue is full ({self.serving.max_queue_size} "
                                      "requests waiting); retry later")
            self._waiting.append(seq)
            self._cond.notify()
        self.metrics.prompt_tokens(seq.prompt_tokens)
        return seq

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_rows(self) -> int:
        """Block-table rows free: how many more sequences max_num_seqs lets in."""
        return len(self._free_rows)

    @property
    def free_blocks(self) -> int:
        return self.blocks.num_free

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._inflight or self._first_tokens)

    # -- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Step while there is work; sleep on the condition otherwise. Runs on its own thread."""
        while not stop.is_set():
            with self._cond:
                while not self.has_work() and not stop.is_set():
                    self._cond.wait(timeout=0.5)
            if stop.is_set():
                break
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the loop: fail what is in flight
                log.exception("language model step failed")
                self.abort_all(f"internal error in the language model: {exc}")

    def step(self) -> None:
        profile = self.profile
        profile.step()
        with profile.phase("cancel"):
            self._drop_cancelled()
        with profile.phase("admit"):
            self._admit()
        if self.overlap:
            # Launch step N+1, then handle step N's tokens while the GPU computes it; the prefill chunk
            # queues behind both. A sequence whose token in flight is its last is not launched again.
            # Sequences whose prefill ended at the last step are launched with their first token still
            # on the device; it is handed out after step N's tokens, before their second token's.
            launch = [s for s in self._running if len(s.output_ids) + s.pending < s.max_tokens]
            previous, self._inflight = self._inflight, None
            if launch:
                self._inflight = self._launch_decode(launch)
            if previous is not None:
                self._finish_tokens(previous)
            self._finish_first_tokens()
            with profile.phase("prefill"):
                self._prefill_chunk()
        else:
            already_running = list(self._running)
            with profile.phase("prefill"):
                self._prefill_chunk()
            self._finish_first_tokens()
            if already_running:
                self._finish_tokens(self._launch_decode(already_running))
        with profile.phase("occupancy"):
            self._report_occupancy()

    def _report_occupancy(self) -> None:
        self.metrics.occupancy(self.num_running, self.num_waiting, self.blocks.usage, self.blocks.num_free,
                               self.blocks.num_cached)

    def abort_all(self, message: str) -> None:
        with self._cond:
            seqs = list(self._waiting) + self._prefilling + self._running
            self._waiting.clear()
        self._inflight = None
        self._first_tokens = []
        for seq in seqs:
            self._release(seq)
            self.out.error(seq.sink, message)

    # -- internals ------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        """Drop cancelled requests, and waiting ones past queue_timeout_us.

        Asking Triton whether a request was cancelled is an IPC round trip: at most every 20 ms,
        and the outbox may make it from its own thread (ThreadedOutbox).
        """
        now = time.monotonic()
        if now - self._last_cancel_check < 0.02:
            return
        self._last_cancel_check = now
        deadline = now - self.serving.queue_timeout_us / 1e6
        with self._cond:
            live = list(self._waiting) + self._prefilling + self._running
        cancelled = {id(sink) for sink in self.out.cancelled([s.sink for s in live])}
        with self._cond:
            for seq in [s for s in self._waiting if id(s.sink) in cancelled]:
                self._waiting.remove(seq)
                self.metrics.request_refused(REFUSED_CANCELLED)
                self.out.error(seq.sink, "request cancelled")
            # Waiting requests have not produced a token yet: last_event is their submission time.
            for seq in [s for s in self._waiting if s.last_event < deadline]:
                self._waiting.remove(seq)
                self.metrics.request_refused(REFUSED_QUEUE_TIMEOUT)
                self.out.error(seq.sink, f"waited more than {self.serving.queue_timeout_us / 1e6:g} s for "
                               "KV-cache blocks (queue_timeout_us); retry later")
        for seq in [s for s in self._prefilling + self._running if id(s.sink) in cancelled]:
            self._release(seq)
            self.metrics.request_refused(REFUSED_CANCELLED)
            self.out.error(seq.sink, "request cancelled")

    def _read_cached_embeds(self, plan: ImagePlan, keys: list[bytes] | None,
                            cached: np.ndarray | None) -> dict[int, torch.Tensor]:
        """The embeddings of the images preprocess found in the embedding cache, taken now: holding the
        tensors keeps them alive whatever the cache evicts before the request's prefill."""
        if cached is None or not cached.any():
            return {}
        if keys is None:
            raise InvalidRequestError("image_cached marks images as cached but the request has no image_keys")
        if self.embedding_cache is None:
            raise InvalidRequestError("image_cached marks images as cached but the embedding cache is off")
        found = {}
        for index in np.flatnonzero(cached).tolist():
            embeds = self.embedding_cache.get(keys[index])
            if embeds is None:
                raise InvalidRequestError(
                    f"image {index}: its embeddings left the embedding cache before the request reached the language "
                    "model (evicted more than embedding_cache_grace_s before); retry later")
            if embeds.shape[0] != plan.tiles[index]:
                raise InvalidRequestError(f"image {index}: the embedding cache holds {embeds.shape[0]} tiles for it, "
                                          f"its size makes {plan.tiles[index]}")
            found[index] = embeds
        return found

    def _check_fits_cache(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request that needs more KV-cache blocks than the whole pool has: it would wait forever."""
        needed = self.blocks.blocks_for(prompt_tokens + max_tokens - 1)
        if needed > self.blocks.capacity:
            raise InvalidRequestError(
                f"the prompt's {prompt_tokens} tokens and max_tokens {max_tokens} need {needed} KV-cache blocks of "
                f"{self.blocks.block_size} tokens, more than the whole KV cache's {self.blocks.capacity} "
                "(kv_cache_memory_fraction); lower max_tokens")

    def _admit(self) -> None:
        """Oldest first, while a block-table row and the blocks of the oldest waiting request are free.
        A request that does not fit yet holds up the younger ones, so a long prompt is not starved by
        a stream of short ones."""
        admitted = []
        block_size = self.blocks.block_size
        with self._cond:
            while self._waiting and self._free_rows:
                seq = self._waiting[0]
                # Cached blocks of the prompt's prefix, short of its last token: that one is always
                # computed, for the logits of the first output token.
                hits = self.blocks.match(seq.block_hashes[: (seq.prompt_tokens - 1) // block_size])
                needed = self.blocks.blocks_for(seq.kv_tokens) - len(hits)
                if needed > self.blocks.free_after_acquiring(hits):
                    break
                self._waiting.popleft()
                self.blocks.acquire(hits)
                seq.blocks = hits + self.blocks.allocate(needed)
                seq.registered, seq.prefilled = len(hits), len(hits) * block_size
                seq.row = heapq.heappop(self._free_rows)
                admitted.append(seq)
        for seq in admitted:
            self.model.set_block_table(seq.row, seq.blocks)
            self._prefilling.append(seq)
            self.metrics.prefix_cache(seq.prompt_tokens, seq.prefilled)

    def _release(self, seq: Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.row >= 0:
            # The row's table keeps naming these blocks until the row is given out again; nothing
            # reads a row that no sequence holds.
            self.blocks.free(seq.blocks)
            heapq.heappush(self._free_rows, seq.row)
            seq.row, seq.blocks = -1, []
        seq.inputs_embeds = seq.image_embeds = seq.image_index = None
        seq.cached_embeds = {}

    def _media_embeds(self, seq: Sequence) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The request's image embeddings (`_image_embeds`) and LLaVA-NeXT-Video's video embeddings
        ((frames x num_frame_tokens, text_hidden_size): every frame's features pooled, then projected,
        video after video), on the device in the model's dtype."""
        sent = None
        if seq.image_embeds is not None:
            # Upload in the wire dtype (FP16 is half of FP32; submit checked it is finite), then convert
            # on the device.
            sent = upload(seq.image_embeds, self.device).to(self.dtype)
        videos = None
        if seq.video_frames:
            # Pooled before the projector, as transformers' get_video_features: the projector then
            # runs on a quarter of the tokens (spatial_pool_stride 2).
            frames = sum(seq.video_frames)
            videos = self.projector(pool_frames(sent[sent.shape[0] - frames:], self.spec))
            videos = videos.reshape(-1, videos.shape[-1])
            sent = sent[: sent.shape[0] - frames]
        images = self._image_embeds(seq, sent) if seq.image_tiles else None
        return images, videos

    def _image_embeds(self, seq: Sequence, sent: torch.Tensor | None) -> torch.Tensor:
        """(tiles, num_image_tokens, text_hidden_size) on the device in the model's dtype: every image's
        tiles in prompt order, the sent ones (`sent`: checked and cast, projected here) and those read
        from the embedding cache; each sent image with a key is put in the cache."""
        if sent is not None and sent.shape[0] and self.projector is not None:
            # features in: (n, num_image_tokens, vision_hidden) -> text_hidden
            sent = self.projector(sent)
        parts, offset, misses = [], 0, 0
        for index, tiles in enumerate(seq.image_tiles):
            part = seq.cached_embeds.get(index)
            if part is None:
                part = sent[offset: offset + tiles]
                offset += tiles
                if self.embedding_cache is not None and seq.image_keys is not None:
                    # LLaVA-1.5 sends no sizes: its one tile is the image resized to image_size, whatever its own.
                    height, width = ((self.spec.image_size,) * 2 if seq.image_sizes is None
                                     else map(int, seq.image_sizes[index]))
                    # A copy: a view would keep the whole request's tensor alive in the cache.
                    self.embedding_cache.put(seq.image_keys[index], part.clone(), height, width)
                    misses += 1
            parts.append(part)
        if self.embedding_cache is not None and (misses or seq.cached_embeds):
            stats = self.embedding_cache.stats()
            self.metrics.embedding_cache(len(seq.cached_embeds), misses, stats.evictions - self._evictions_reported,
                                         stats.bytes)
            self._evictions_reported = stats.evictions
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _embed_prompt(self, seq: Sequence) -> torch.Tensor:
        """(1, T, C): token embeddings with the image (and video) embeddings at the image-token (and
        video-token) positions. Nothing here waits for the GPU: the positions are found on the host
        (a boolean mask on the device would read its count back) and every upload is queued."""
        ids = seq.input_ids
        is_image = ids == self.spec.image_token_index
        embeds = self.model.embed(upload(torch.where(is_image, 0, ids), self.device))
        image_embeds, video_embeds = self._media_embeds(seq)
        if video_embeds is not None:
            # In order, as transformers' masked_scatter: video j's frames fill the j-th run of video tokens.
            embeds[self._positions(ids == self.spec.video_token_index)] = video_embeds
        if image_embeds is not None:
            image_embeds = image_embeds.reshape(-1, embeds.shape[-1])
            if seq.image_index is not None:
                # LLaVA-NeXT: each image's base tile, then its grid unpadded with a newline after each
                # row (anyres.pack_index), as one gather on the device.
                source = torch.cat([image_embeds, self.image_newline[None]])
                image_embeds = source[upload(torch.from_numpy(seq.image_index), self.device)]
            # In order, as transformers' masked_scatter: image i fills the i-th run of image tokens.
            embeds[self._positions(is_image)] = image_embeds
        return embeds[None]

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        """The indices where a host mask (T,) is true, on the device."""
        return upload(mask.nonzero()[:, 0], self.device)

    def _prefill_chunk(self) -> None:
        """Spend up to prefill_chunk_tokens on prompts, oldest first, in one packed forward pass."""
        budget = self.serving.prefill_chunk_tokens
        chunks: list[tuple[Sequence, int, int]] = []  # (sequence, start, length)
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.inputs_embeds is None:
                try:
                    with torch.inference_mode():
                        seq.inputs_embeds = self._embed_prompt(seq)
                except Exception as exc:  # noqa: BLE001 - one bad request must not take the batch down
                    self._fail_prefill(seq, exc)
                    continue
            length = min(budget, seq.prompt_tokens - seq.prefilled)
            chunks.append((seq, seq.prefilled, length))
            budget -= length
        if chunks:
            self._prefill(chunks)

    def _prefill(self, chunks: list[tuple[Sequence, int, int]]) -> None:
        try:
            with torch.inference_mode():
                packed = torch.cat([seq.inputs_embeds[:, start: start + n] for seq, start, n in chunks], dim=1)
                logits = self.prefill_step(packed, [(seq.row, start, n) for seq, start, n in chunks])  # (S, V)
        except Exception as exc:  # noqa: BLE001
            if len(chunks) == 1:
                self._fail_prefill(chunks[0][0], exc)
            else:  # find the request that fails; the others go on
                for chunk in chunks:
                    self._prefill([chunk])
            return
        done, rows = [], []
        for i, (seq, _, n) in enumerate(chunks):
            seq.prefilled += n
            self._register_blocks(seq)
            if seq.prefilled == seq.prompt_tokens:
                seq.inputs_embeds = seq.image_embeds = seq.image_index = None
                seq.cached_embeds = {}
                self._prefilling.remove(seq)
                self._running.append(seq)
                seq.text = TextStream(self._detokenizer, seq.params.stop)
                seq.generator = make_generator(seq.params, self.device)
                done.append(seq)
                rows.append(i)
        if done:
            # The first tokens stay on the device, where the next decode step reads them (_next_tokens),
            # and come to the host as a decode step's do (InFlight, read by the next step): the host
            # goes on while the GPU computes the prefill.
            if len(rows) < len(chunks):
                logits = logits.index_select(0, upload(torch.tensor(rows), self.device))
            tokens = sample(logits, [s.params for s in done], [s.generator for s in done])
            self._next_tokens[upload(torch.tensor([s.row for s in done]), self.device)] = tokens
            for seq in done:
                seq.pending += 1
            self._first_tokens.append(self._read_later(done, tokens))

    def _register_blocks(self, seq: Sequence) -> None:
        """Put the prompt blocks the sequence has filled completely in the prefix cache. Nothing writes
        them again: later chunks and decode write later positions."""
        complete = min(seq.prefilled // self.blocks.block_size, len(seq.block_hashes))
        for index in range(seq.registered, complete):
            self.blocks.register(seq.blocks[index], seq.block_hashes[index])
        seq.registered = max(seq.registered, complete)

    def _fail_prefill(self, seq: Sequence, exc: Exception) -> None:
        self._release(seq)
        if isinstance(exc, InvalidRequestError):  # the request's fault, found at prefill (image_embeds)
            self.metrics.request_refused(REFUSED_INVALID)
            self.out.error(seq.sink, str(exc))
            return
        log.error("prefill failed", exc_info=exc)
        self.out.error(seq.sink, f"prefill failed: {exc}")

    def _launch_decode(self, seqs: list[Sequence]) -> InFlight:
        """Queue one decode step for `seqs` and the copy of its tokens to the host; nothing waits for the GPU."""
        with self.profile.phase("decode_launch"):
            begin = self.profile.decode_begin()
            n = len(seqs)
            positions = [s.next_position for s in seqs]
            inputs = self._host_inputs[self._buffer][:, :n]
            inputs.copy_(torch.tensor([positions, [s.row for s in seqs]]))
            # (2, B): one copy to the device, from pinned memory, queued on the stream.
            positions_dev, rows = inputs.to(self.device, non_blocking=True)
            # One row per running sequence, each reading its own blocks through its block-table row.
            logits = self.decode_step(self._next_tokens[rows], positions_dev, rows, max(positions) + 1)
            tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
            self._next_tokens[rows] = tokens
            step = self._read_later(seqs, tokens, self._host_tokens[self._buffer][:n])
            self._buffer ^= 1
            for seq in seqs:
                seq.pending += 1
            self.profile.decode_end(begin, n)
        return step

    def _read_later(self, seqs: list[Sequence], tokens: torch.Tensor, host: torch.Tensor | None = None) -> InFlight:
        """Queue the copy of `tokens` (B,) to the host (into `host`, else a new pinned buffer) and an event
        after it."""
        if host is None:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=self.device.type == "cuda")
        host.copy_(tokens, non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return InFlight(seqs, host, done)

    def _finish_first_tokens(self) -> None:
        """Hand out the first tokens of the prefills launched since the last call."""
        first_tokens, self._first_tokens = self._first_tokens, []
        for first in first_tokens:
            self._finish_tokens(first, "prefill", "prefill")

    def _finish_tokens(self, step: InFlight, wait: str = "decode_wait", emit: str = "decode_emit") -> None:
        """Wait for a launched step's tokens (a decode step's, or a prefill's first tokens) and hand them
        out; sequences released since (stopped at the step before, cancelled) drop theirs. `wait`,
        `emit`: the profile's phases for the two parts."""
        with self.profile.phase(wait):
            if step.done is not None:
                step.done.synchronize()
            tokens = step.tokens.tolist()
        with self.profile.phase(emit):
            live, live_tokens = [], []
            for seq, token in zip(step.seqs, tokens):
                seq.pending -= 1
                if seq.row >= 0:
                    live.append(seq)
                    live_tokens.append(token)
            if live:
                self._append_tokens(live, live_tokens)

    def _append_tokens(self, seqs: list[Sequence], tokens: list[int]) -> None:
        now = time.monotonic()
        first_token_s, inter_token_s = [], []
        outputs: list[tuple[Sink, Output]] = []
        finished = False
        for seq, token in zip(seqs, tokens):
            (inter_token_s if seq.output_ids else first_token_s).append(now - seq.last_event)
            seq.last_event = now
            seq.output_ids.append(token)
            delta = seq.text.push(token)
            finish = ""
            if seq.text.stopped or (token in self.eos and not seq.params.ignore_eos):
                finish = FINISH_STOP
            elif len(seq.output_ids) >= seq.max_tokens:
                finish = FINISH_LENGTH
            if finish:
                delta += seq.text.finish()
                self._release(seq)
                finished = True
            if seq.params.stream:
                outputs.append((seq.sink, Output(delta, [token], seq.prompt_tokens, len(seq.output_ids), finish,
                                                 bool(finish))))
            elif finish:
                outputs.append((seq.sink, Output(seq.text.text, list(seq.output_ids), seq.prompt_tokens,
                                                 len(seq.output_ids), finish, True)))
        # Metrics first: a client that has its last response sees them already counted.
        self.metrics.generated_tokens(first_token_s, inter_token_s)
        if finished:
            self._report_occupancy()
        for sink, output in outputs:
            self.out.send(sink, output)
