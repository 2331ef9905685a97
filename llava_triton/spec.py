"""One source for every name, size and limit the serving stack uses.

`ModelSpec` is derived from a Hugging Face LLaVA checkpoint's `config.json` (field names are
Hugging Face's). `ServingConfig` holds the serving knobs (limits, batching, instances) with
their defaults and meanings written once here. The export writes both beside every model
(`write_spec`), and each `model.py` reads them back (`read_spec`), so no size is typed twice.

The `llava` ensemble's public contract is here too: `INPUTS` and `OUTPUTS` (name, Triton datatype,
shape, default, meaning) and the language model's `METRICS`. The config.pbtxt files, the client's
tensors and flags, docs/api.md and the Helm chart's values.schema.json are all produced from them.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Model names in the Triton model repository.
PREPROCESS = "preprocess"
VISION_ENCODER = "vision_encoder"
PROJECTOR = "projector"
LANGUAGE_MODEL = "language_model"
ENSEMBLE = "llava"
MODEL_NAMES = (PREPROCESS, VISION_ENCODER, PROJECTOR, LANGUAGE_MODEL, ENSEMBLE)

# Tensor names of the ensemble's public contract; INPUTS and OUTPUTS below say what each holds.
IN_PROMPT = "prompt"
IN_MESSAGES = "messages"
IN_IMAGES = "images"
IN_MAX_TOKENS = "max_tokens"
IN_TEMPERATURE = "temperature"
IN_TOP_P = "top_p"
IN_TOP_K = "top_k"
IN_SEED = "seed"
IN_STOP = "stop"
IN_STREAM = "stream"
IN_IGNORE_EOS = "ignore_eos"
IN_CACHE_SALT = "cache_salt"
IN_VIDEOS = "videos"
IN_NUM_FRAMES = "num_frames"
IN_FPS = "fps"
OUT_TEXT = "text"
OUT_TOKEN_IDS = "token_ids"
OUT_PROMPT_TOKENS = "prompt_tokens"
OUT_COMPLETION_TOKENS = "completion_tokens"
OUT_FINISH_REASON = "finish_reason"

# Internal tensors between the ensemble steps; the three image tensors travel in `wire_dtype(serving)`.
INPUT_IDS = "input_ids"  # INT64 [seq_len], each `<image>` already expanded to its image's token count
# A LLaVA-1.5 image is one tile; a LLaVA-NeXT image is a base tile and its grid's tiles (llava_triton.anyres),
# every request's tiles one after another, image by image.
PIXEL_VALUES = "pixel_values"  # [num_tiles, 3, image_size, image_size]
IMAGE_FEATURES = "image_features"  # [num_tiles, num_image_tokens, vision_hidden_size]
IMAGE_EMBEDS = "image_embeds"  # [num_tiles, num_image_tokens, text_hidden_size]
IMAGE_SIZES = "image_sizes"  # LLaVA-NeXT only: INT64 [num_images, 2], each image's (height, width) as decoded
# LLaVA-NeXT-Video only: INT64 [num_videos], the frames sampled from each video. A video's frames are
# tiles of pixel_values after every image's tiles, video after video; the language model pools each
# frame's features (spatial_pool_stride) before projecting them, so such exports project there.
VIDEO_FRAMES = "video_frames"
# Each image's content key (llava_triton.embedding_cache.image_key): UINT8 [num_images, IMAGE_KEY_BYTES];
# no rows: the request's images are neither cached nor shared.
IMAGE_KEYS = "image_keys"
# BOOL [num_images]: true where preprocess found the image in the language model's embedding cache and
# left its tiles out of pixel_values (the language model reads them from its cache instead).
IMAGE_CACHED = "image_cached"
IMAGE_KEY_BYTES = 32

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# The checkpoint architectures served: LLaVA-1.5 (one 336x336 tile an image), LLaVA-NeXT (anyres tiles)
# and LLaVA-NeXT-Video (LLaVA-NeXT's images, and videos: sampled frames, each a tile pooled 2x2).
MODEL_TYPES = ("llava", "llava_next", "llava_next_video")
# LLaVA-NeXT-Video's pooling of a frame's feature grid (transformers' LlavaNextVideoPooler): "conv" has
# weights of its own and is not served.
SPATIAL_POOL_MODES = ("average", "max")
# LLaVA-NeXT's `image_newline` embedding, saved in the language model's version directory (it packs the tiles).
IMAGE_NEWLINE_FILE = "image_newline.safetensors"
SPEC_FILE = "llava_triton_spec.json"  # written by export next to each model's artifacts


# --- the `llava` ensemble's public contract -----------------------------------------------------------
# Export writes it into the config.pbtxt files, the client builds its tensors and command-line flags
# from it, the server takes its defaults from it, and docs/api.md lists it (python -m llava_triton.generated).

# Triton's datatype names (the gRPC and HTTP protocols'), as numpy holds them.
NUMPY_DTYPES = {"BYTES": np.dtype(np.object_), "BOOL": np.dtype(np.bool_), "INT32": np.dtype(np.int32),
                "INT64": np.dtype(np.int64), "FP32": np.dtype(np.float32)}


@dataclass(frozen=True)
class Tensor:
    """One input or output of the `llava` ensemble."""

    name: str
    datatype: str  # a key of NUMPY_DTYPES (config.pbtxt says TYPE_STRING for BYTES, else TYPE_<datatype>)
    shape: tuple[int, ...]  # -1: any length
    meaning: str
    # What the server uses when a request leaves the input out: `default`, or when `serving_default`
    # names a ServingConfig field, that field's value.
    default: Any = None
    serving_default: str = ""
    required: bool = False  # preprocess refuses a request without it
    instead_of: str = ""  # the input a request sends in its place: exactly one of the two is required

    def __post_init__(self) -> None:
        if self.datatype not in NUMPY_DTYPES:
            raise ValueError(f"{self.name}: datatype {self.datatype!r} is not one of {sorted(NUMPY_DTYPES)}")

    @property
    def repeated(self) -> bool:
        """Whether the tensor holds any number of values (shape [-1]) rather than one."""
        return self.shape == (-1,)

    def default_value(self, serving: ServingConfig) -> Any:
        return getattr(serving, self.serving_default) if self.serving_default else self.default


# The most frames per second a request may ask to sample from a video (the `fps` input).
MAX_SAMPLING_FPS = 60.0

# The roles of a `messages` turn, and the content parts of one (llava_triton.preprocess.parse_messages).
ROLES = ("system", "user", "assistant")
PART_TEXT, PART_IMAGE, PART_VIDEO = "text", "image", "video"

INPUTS = (
    Tensor(IN_PROMPT, "BYTES", (1,), "the user message (UTF-8); `<image>` marks where each image goes, with no tag "
           "the images go first", instead_of=IN_MESSAGES),
    Tensor(IN_MESSAGES, "BYTES", (1,), "the conversation instead of `prompt` (UTF-8 JSON): an array of turns with "
           "`role` (system, user or assistant) and `content`, a string or a list of `{\"type\": \"text\", "
           "\"text\": ...}` and `{\"type\": \"image\"}` parts (in user turns, each the next of `images`); at "
           "most `max_messages` turns and `max_messages_bytes` bytes", instead_of=IN_PROMPT),
    Tensor(IN_IMAGES, "BYTES", (-1,), "encoded JPEG, PNG or WebP images, zero or more (at most "
           "`max_images_per_request`)", default=()),
    Tensor(IN_VIDEOS, "BYTES", (-1,), "encoded videos, zero or more (at most `max_videos_per_request`), "
           "LLaVA-NeXT-Video checkpoints only: MP4 or QuickTime, WebM or Matroska with H.264, HEVC, VP8, VP9, "
           "AV1 or MPEG-4 video; `<video>` marks where each goes (with no tag: first, after the images)",
           default=()),
    Tensor(IN_NUM_FRAMES, "INT32", (1,), "frames sampled from each video, uniformly over its length (a shorter "
           "video gives all its frames); at most `max_frames_per_request` in all",
           serving_default="default_num_frames"),
    Tensor(IN_FPS, "FP32", (1,), "when above 0: frames sampled at this rate (per second of video) instead of "
           f"num_frames, at most {MAX_SAMPLING_FPS:g}", default=0.0),
    Tensor(IN_MAX_TOKENS, "INT32", (1,), "tokens to generate; a value past the context (`max_seq_len`) is refused, "
           "the default is cut to the room left", serving_default="default_max_tokens"),
    Tensor(IN_TEMPERATURE, "FP32", (1,), "0 = greedy; otherwise sampling, in [0, 100]",
           serving_default="default_temperature"),
    Tensor(IN_TOP_P, "FP32", (1,), "nucleus sampling: the most likely tokens whose probabilities add up to top_p, "
           "in (0, 1]", serving_default="default_top_p"),
    Tensor(IN_TOP_K, "INT32", (1,), "sample from the k most likely tokens; 0 = off", serving_default="default_top_k"),
    Tensor(IN_SEED, "INT64", (1,), "the request's sampling seed, reproducible whatever else is batched with it; "
           "left out: a random one"),
    Tensor(IN_STOP, "BYTES", (-1,), "stop strings (at most `max_stop_strings`); the text ends just before the first "
           "occurrence of any of them in the decoded text", default=()),
    Tensor(IN_STREAM, "BOOL", (1,), "true: a response per generated token (when the server's sender falls behind, "
           "one carries the tokens queued since the last); false: one response at the end", default=False),
    Tensor(IN_IGNORE_EOS, "BOOL", (1,), "keep generating past EOS, to exactly max_tokens (benchmarks)",
           default=False),
    Tensor(IN_CACHE_SALT, "BYTES", (1,), "a tenant's secret, at most `max_cache_salt_bytes` bytes: requests reuse "
           "each other's cached KV-cache blocks and image embeddings only when their cache_salts are equal",
           default=""),
)
OUTPUTS = (
    Tensor(OUT_TEXT, "BYTES", (1,), "the new text when streaming, else the whole answer; every streamed piece is "
           "final, and the pieces joined equal `tokenizer.decode(token_ids, skip_special_tokens=True)`"),
    Tensor(OUT_TOKEN_IDS, "INT64", (-1,), "the generated ids this response carries"),
    Tensor(OUT_PROMPT_TOKENS, "INT32", (1,), "the prompt's tokens, image tokens included"),
    Tensor(OUT_COMPLETION_TOKENS, "INT32", (1,), "tokens generated so far"),
    Tensor(OUT_FINISH_REASON, "BYTES", (1,), "empty until the last response, then `stop` (EOS or a stop string) or "
           "`length` (max_tokens)"),
)
INPUTS_BY_NAME = {tensor.name: tensor for tensor in INPUTS}

# What the request asks about (preprocess alone reads them), and the sampling inputs, shared by
# preprocess (early validation) and language_model.
REQUEST_INPUTS = (IN_PROMPT, IN_MESSAGES, IN_IMAGES, IN_VIDEOS, IN_NUM_FRAMES, IN_FPS)
SAMPLING_INPUTS = tuple(tensor.name for tensor in INPUTS if tensor.name not in (*REQUEST_INPUTS, IN_CACHE_SALT))


@dataclass(frozen=True)
class Metric:
    """One metric family the language model publishes on Triton's metrics endpoint."""

    name: str
    kind: str  # "counter", "gauge" or "histogram" (pb_utils.MetricFamily's COUNTER, GAUGE, HISTOGRAM)
    help: str
    label: str = ""  # the one label its series carry, if any
    label_values: tuple[str, ...] = ()


# Reasons the language model refuses or drops a request (METRIC_REQUESTS_REFUSED's label).
REFUSED_INVALID, REFUSED_QUEUE_FULL, REFUSED_QUEUE_TIMEOUT, REFUSED_CANCELLED = (
    "invalid", "queue_full", "queue_timeout", "cancelled")
REFUSAL_REASONS = (REFUSED_INVALID, REFUSED_QUEUE_FULL, REFUSED_QUEUE_TIMEOUT, REFUSED_CANCELLED)

METRIC_TIME_TO_FIRST_TOKEN = Metric("llava_time_to_first_token_seconds", "histogram",
                                    "Time from the language model receiving a request to its first token")
METRIC_INTER_TOKEN_LATENCY = Metric("llava_inter_token_latency_seconds", "histogram",
                                    "Time between consecutive tokens of a request")
METRIC_PROMPT_TOKENS = Metric("llava_prompt_tokens_total", "counter", "Prompt tokens received (image tokens included)")
METRIC_GENERATION_TOKENS = Metric("llava_generation_tokens_total", "counter", "Tokens generated")
METRIC_REQUESTS_RUNNING = Metric("llava_requests_running", "gauge", "Requests holding KV-cache blocks")
METRIC_REQUESTS_WAITING = Metric("llava_requests_waiting", "gauge", "Requests waiting for KV-cache blocks")
METRIC_KV_CACHE_USAGE = Metric("llava_kv_cache_usage_ratio", "gauge",
                               "Fraction of KV-cache blocks in use (reserved by admitted requests)")
METRIC_KV_CACHE_FREE_BLOCKS = Metric("llava_kv_cache_free_blocks", "gauge",
                                     "KV-cache blocks no request holds (cached ones included: they are reused or "
                                     "evicted as needed)")
METRIC_KV_CACHE_CACHED_BLOCKS = Metric("llava_kv_cache_cached_blocks", "gauge",
                                       "Free KV-cache blocks that keep a finished prompt's keys and values for reuse")
METRIC_PREFIX_QUERY_TOKENS = Metric("llava_prefix_cache_query_tokens_total", "counter",
                                    "Prompt tokens looked up in the prefix cache (each prompt's full blocks, less "
                                    "the last token, which is always computed)")
METRIC_PREFIX_HIT_TOKENS = Metric("llava_prefix_cache_hit_tokens_total", "counter",
                                  "Prompt tokens whose keys and values came from cached blocks, not prefill")
METRIC_PREFIX_HIT_RATIO = Metric("llava_prefix_cache_hit_ratio", "gauge",
                                 "Prefix-cache hit tokens over query tokens since the start")
METRIC_EMBEDDING_CACHE_HITS = Metric("llava_embedding_cache_hits_total", "counter",
                                     "Images whose embeddings came from the embedding cache (no decode, no vision "
                                     "encoder)")
METRIC_EMBEDDING_CACHE_MISSES = Metric("llava_embedding_cache_misses_total", "counter",
                                       "Images with a cache key that were encoded (and then cached)")
METRIC_EMBEDDING_CACHE_EVICTIONS = Metric("llava_embedding_cache_evictions_total", "counter",
                                          "Images' embeddings evicted, least recently used first")
METRIC_EMBEDDING_CACHE_BYTES = Metric("llava_embedding_cache_bytes", "gauge",
                                      "Bytes the embedding cache holds (within embedding_cache_bytes)")
METRIC_REQUESTS_REFUSED = Metric("llava_requests_refused_total", "counter",
                                 "Requests the language model refused or dropped, by reason", label="reason",
                                 label_values=REFUSAL_REASONS)
METRICS = (METRIC_TIME_TO_FIRST_TOKEN, METRIC_INTER_TOKEN_LATENCY, METRIC_PROMPT_TOKENS, METRIC_GENERATION_TOKENS,
           METRIC_REQUESTS_RUNNING, METRIC_REQUESTS_WAITING, METRIC_KV_CACHE_USAGE, METRIC_KV_CACHE_FREE_BLOCKS,
           METRIC_KV_CACHE_CACHED_BLOCKS, METRIC_PREFIX_QUERY_TOKENS, METRIC_PREFIX_HIT_TOKENS, METRIC_PREFIX_HIT_RATIO,
           METRIC_EMBEDDING_CACHE_HITS, METRIC_EMBEDDING_CACHE_MISSES, METRIC_EMBEDDING_CACHE_EVICTIONS,
           METRIC_EMBEDDING_CACHE_BYTES, METRIC_REQUESTS_REFUSED)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of one LLaVA checkpoint, named as in its Hugging Face config."""

    image_size: int
    patch_size: int
    num_channels: int
    vision_hidden_size: int
    text_hidden_size: int
    vocab_size: int
    image_token_index: int
    vision_feature_layer: int
    vision_feature_select_strategy: str
    max_position_embeddings: int  # the context length
    eos_token_id: tuple[int, ...]
    torch_dtype: str = "float32"
    model_type: str = "llava"  # one of MODEL_TYPES
    # LLaVA-NeXT: the (height, width) resolutions an image may be tiled to, multiples of image_size.
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # LLaVA-NeXT-Video: the `<video>` token, and how a frame's feature grid is pooled before the projector.
    video_token_index: int = -1
    spatial_pool_mode: str = ""  # one of SPATIAL_POOL_MODES
    spatial_pool_stride: int = 0
    num_patches: int = field(init=False)
    num_image_tokens: int = field(init=False)  # of one tile (a LLaVA-1.5 image is one tile)
    num_frame_tokens: int = field(init=False)  # of one pooled video frame (0: no videos)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; served: {one_of(MODEL_TYPES)}")
        if self.anyres:
            if not self.image_grid_pinpoints:
                raise ValueError(f"a {self.model_type} checkpoint needs image_grid_pinpoints")
            for height, width in self.image_grid_pinpoints:
                if height <= 0 or width <= 0 or height % self.image_size or width % self.image_size:
                    raise ValueError(f"image_grid_pinpoints entry {[height, width]} is not a multiple of the "
                                     f"vision tower's image_size {self.image_size}")
            if self.vision_feature_select_strategy != "default":
                # transformers' LlavaNextModel.pack_image_features cannot reshape a tile's CLS token either.
                raise ValueError(f"{self.model_type} needs vision_feature_select_strategy 'default'")
        elif self.image_grid_pinpoints:
            raise ValueError("image_grid_pinpoints is for llava_next checkpoints only")
        if self.videos:
            if self.spatial_pool_mode not in SPATIAL_POOL_MODES:
                raise ValueError(f"unsupported spatial_pool_mode {self.spatial_pool_mode!r}; served: "
                                 f"{one_of(SPATIAL_POOL_MODES)}")
            if not 1 <= self.spatial_pool_stride <= self.image_size // self.patch_size:
                raise ValueError(f"spatial_pool_stride {self.spatial_pool_stride} must be in [1, the feature grid's "
                                 f"{self.image_size // self.patch_size}]")
            if not 0 <= self.video_token_index or self.video_token_index == self.image_token_index:
                raise ValueError(f"video_token_index {self.video_token_index} must be an id other than the image "
                                 "token's")
        elif self.spatial_pool_mode or self.spatial_pool_stride or self.video_token_index != -1:
            raise ValueError("video_token_index and spatial_pool_* are for llava_next_video checkpoints only")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.vision_feature_select_strategy!r}")
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError("only a single integer vision_feature_layer is supported")
        num_patches = (self.image_size // self.patch_size) ** 2
        object.__setattr__(self, "num_patches", num_patches)
        # "default" drops the CLS token, "full" keeps it (transformers' LlavaModel.get_image_features).
        extra = 0 if self.vision_feature_select_strategy == "default" else 1
        object.__setattr__(self, "num_image_tokens", num_patches + extra)
        # nn.AvgPool2d / MaxPool2d with kernel = stride = spatial_pool_stride: the grid shrinks by floor division.
        pooled = (self.image_size // self.patch_size) // self.spatial_pool_stride if self.videos else 0
        object.__setattr__(self, "num_frame_tokens", pooled * pooled)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelSpec:
        vision, text = config["vision_config"], config["text_config"]
        eos = text.get("eos_token_id", config.get("eos_token_id"))
        eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (int(eos),))
        context = int(text.get("max_position_embeddings", 4096))
        if text.get("sliding_window"):
            # Mistral with a sliding window: up to the window, attention is the full causal attention we
            # compute; past it transformers' would differ, so the window is the context served.
            context = min(context, int(text["sliding_window"]))
        model_type = config.get("model_type", "llava")
        return cls(
            image_size=int(vision["image_size"]),
            patch_size=int(vision["patch_size"]),
            num_channels=int(vision.get("num_channels", 3)),
            vision_hidden_size=int(vision["hidden_size"]),
            text_hidden_size=int(text["hidden_size"]),
            vocab_size=int(text["vocab_size"]),
            image_token_index=int(config.get("image_token_index", config.get("image_token_id"))),
            vision_feature_layer=config.get("vision_feature_layer", -2),
            vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
            max_position_embeddings=context,
            eos_token_id=eos,
            torch_dtype=str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype")
                            or config.get("dtype") or "float32"),
            model_type=model_type,
            image_grid_pinpoints=tuple((int(h), int(w)) for h, w in config.get("image_grid_pinpoints") or ())
            if model_type in ("llava_next", "llava_next_video") else (),
            **({} if model_type != "llava_next_video" else dict(
                video_token_index=int(config.get("video_token_index", config.get("video_token_id"))),
                spatial_pool_mode=str(config.get("spatial_pool_mode", "average")),
                spatial_pool_stride=int(config.get("spatial_pool_stride", 2)))),
        )

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path) -> ModelSpec:
        return cls.from_hf_config(full_hf_config(checkpoint))

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT (and -Video): images become a variable number of tiles (llava_triton.anyres)."""
        return self.model_type in ("llava_next", "llava_next_video")

    @property
    def videos(self) -> bool:
        """LLaVA-NeXT-Video: the model takes videos as well as images."""
        return self.model_type == "llava_next_video"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        data["eos_token_id"] = tuple(data["eos_token_id"])
        data["image_grid_pinpoints"] = tuple(tuple(p) for p in data.get("image_grid_pinpoints", ()))
        return cls(**data)


# Values of kv_cache_dtype, lm_weight_dtype and vision_weight_dtype: "auto" = the model's dtype, or FP8 (e4m3).
STORAGE_DTYPES = ("auto", "fp8_e4m3")

# vision_instances of an export for a GPU of at least GPU_VISION_INSTANCES_MIN_BYTES. One instance's
# batch-32 step is ~2/3 GPU work, the rest its tensors crossing shared memory in the Python backend
# (docs/performance.md); three overlap one's copies with another's forward (on the H200: 50-54 % of
# the GEMM rate against 35 % for one). Each vision model's instance is a process with its own CUDA
# context, weights and graphs, in the memory the language model's KV cache leaves
# (kv_cache_memory_fraction): on a smaller GPU a 7B model's cache would leave too little for six.
GPU_VISION_INSTANCES = 3
GPU_VISION_INSTANCES_MIN_BYTES = 64 * 2**30

# Values of projector_placement (see ServingConfig).
PROJECTOR_PLACEMENTS = ("model", "language_model")
# With projector_placement "language_model": the projector's weights and module config, in this
# directory of the language model's version directory.
LANGUAGE_MODEL_PROJECTOR_DIR = "projector"
# The checkpoint's processor files (config.json included: llava_triton.processor says why), in this
# directory of the version directories of the models that tokenize (preprocess) or detokenize
# (language_model).
PROCESSOR_DIR = "processor"

# Serving options that were renamed: old name → what to use instead (named in the error).
RENAMED_OPTIONS = {"decode_weight_dtype": "lm_weight_dtype (FP8 weights for prefill too; export again)"}

# Serving options that must be positive (ServingConfig refuses 0 and below; so does the chart's schema).
POSITIVE_OPTIONS = ("max_images_per_request", "max_image_tiles", "max_image_tokens", "max_image_bytes",
                    "max_image_pixels", "max_prompt_bytes", "max_messages", "max_messages_bytes",
                    "max_cache_salt_bytes", "max_videos_per_request", "max_video_bytes", "max_video_duration_s",
                    "max_video_frames", "max_video_pixels", "max_frames_per_request", "max_video_tokens",
                    "default_num_frames", "default_max_tokens", "vision_max_batch_size", "max_num_seqs",
                    "prefill_chunk_tokens",
                    "kv_block_size", "max_queue_size", "max_request_bytes", "queue_timeout_us",
                    "preprocess_instances", "vision_instances", "language_model_instances")


def _option(default: Any, meaning: str, choices: tuple[str, ...] = ()) -> Any:
    """A ServingConfig field: its default, what it means (docs/api.md and the Helm chart's schema say
    it) and, for a string, the values it may take (checked in __post_init__)."""
    return field(default=default, metadata={"meaning": meaning, "choices": choices})


def one_of(choices: tuple[str, ...]) -> str:
    """("a", "b", "c") → "a, b or c", as error messages list the allowed values."""
    return " or ".join(filter(None, (", ".join(choices[:-1]), choices[-1])))


@dataclass(frozen=True)
class ServingConfig:
    """Serving knobs. Every default, and what each knob means, lives here and nowhere else
    (`serving_options()` lists them; docs/api.md and the chart's values.schema.json are generated)."""

    # Request limits (checked before any expensive work).
    max_images_per_request: int = _option(4, "images per request")
    # LLaVA-NeXT's default pinpoints make at most 5 (a 2x2 grid, or 1x3, and the base); 10 leaves room for
    # checkpoints with larger grids (3x3) while refusing what would make a request hundreds of tiles.
    max_image_tiles: int = _option(10, "vision-encoder tiles of one image (LLaVA-NeXT: its grid's tiles and the "
                                   "base image; LLaVA-1.5: always 1)")
    max_image_tokens: int = _option(12288, "image tokens of one request, all its images together")
    max_prompt_tokens: int = _option(0, "prompt tokens, image tokens included; 0 = the context less one token "
                                     "for the answer")
    max_image_bytes: int = _option(20 * 1024 * 1024, "bytes of one encoded image")
    max_image_pixels: int = _option(36_000_000, "width x height of one image, read from its header before "
                                    "decoding (and after CLIP's resize)")
    max_prompt_bytes: int = _option(256 * 1024, "the prompt's UTF-8 bytes")
    max_messages: int = _option(256, "turns in a request's messages")
    max_messages_bytes: int = _option(1024 * 1024, "bytes of a request's messages (its UTF-8 JSON)")
    max_request_bytes: int = _option(32 * 1024 * 1024, "bytes of one request's images and prompt (or messages) "
                                     "together")
    max_cache_salt_bytes: int = _option(256, "bytes of a request's cache_salt")
    # Videos (LLaVA-NeXT-Video): every limit is checked from the container's header, before decoding, where
    # the container says; frame counts a header leaves out are counted by reading packets (no decoding).
    max_videos_per_request: int = _option(1, "videos per request")
    max_video_bytes: int = _option(32 * 1024 * 1024, "bytes of one encoded video")
    max_video_duration_s: float = _option(600.0, "seconds of one video")
    max_video_frames: int = _option(36_000, "frames of one video (all of them, not only those sampled)")
    max_video_pixels: int = _option(3840 * 2160, "width x height of a video's frames")
    max_frames_per_request: int = _option(32, "frames sampled from a request's videos, all together (each is "
                                          "a vision-encoder tile)")
    max_video_tokens: int = _option(4608, "video tokens of one request, all its videos together")
    default_num_frames: int = _option(16, "frames sampled from each video of a request that sends no num_frames "
                                      "and no fps")
    max_stop_strings: int = _option(16, "stop strings per request")
    max_stop_string_bytes: int = _option(256, "bytes of one stop string")
    # Sampling defaults: what the server uses when a request leaves the input out (INPUTS).
    default_max_tokens: int = _option(256, "tokens generated when a request has no max_tokens (fewer when "
                                      "the context has less room)")
    default_temperature: float = _option(0.0, "temperature of a request that has none; 0 = greedy, as "
                                         "LLaVA-1.5's generation_config")
    default_top_p: float = _option(1.0, "top_p of a request that has none")
    default_top_k: int = _option(0, "top_k of a request that has none; 0 = off")
    # Batching: the vision models batch across requests through Triton's dynamic batcher;
    # the language model batches in flight (requests join and leave between decode steps).
    vision_max_batch_size: int = _option(32, "largest batch of the vision encoder and projector")
    vision_preferred_batch_sizes: tuple[int, ...] = _option((8, 16, 32), "batch sizes the vision models' "
                                                            "dynamic batcher aims for")
    # Every request pays it when traffic is light, while under load batches form anyway from what
    # queues during a forward pass. 0: on the H100 (FP8 options, same machine) 500 µs cost 1.1 ms of
    # TTFT at c=1 (two steps' queues, 0.66 and 0.63 ms against 0.11 and 0.10) and gave no larger
    # batches at c=128 (3.56 against 3.41).
    vision_max_queue_delay_us: int = _option(0, "how long (µs) a lone image waits for others to batch with")
    max_num_seqs: int = _option(32, "sequences admitted together (prefilling or decoding; the decode batch); more "
                                "wait in the language model's queue")
    # 1024: a LLaVA-1.5 prompt (576 image tokens and the text) is one chunk, which PrefillGraphs
    # replays from a CUDA graph; a step of 1024 tokens takes ~25 ms of a 7B's bf16 GEMMs on the H100.
    prefill_chunk_tokens: int = _option(1024, "prompt tokens prefilled per step, so that a long prompt does not "
                                        "stall running decodes")
    max_seq_len: int = _option(0, "tokens one request may use (prompt and output); 0 = the model's context length")
    # 16: a request wastes at most 15 positions of its last block (a 50-token prompt's 4 blocks hold
    # 64), and llava_triton.decode_attention reads 32 positions a tile anyway, gathering 2 blocks of
    # 16 positions each a contiguous 4 KiB per head (bfloat16, head_dim 128): larger blocks would
    # save a few int32 block-id loads per tile and waste more. The size vLLM and FlashInfer default to.
    kv_block_size: int = _option(16, "token positions per KV-cache block; a request reserves the blocks of its "
                                 "prompt and max_tokens when it is admitted")
    prefix_caching: bool = _option(True, "keep the KV-cache blocks of finished prompts and reuse them for a later "
                                   "prompt that begins with the same blocks (the same tokens, images and "
                                   "cache_salt); cached blocks are evicted least recently used when blocks run out")
    embedding_cache_bytes: int = _option(1 << 30, "memory (on the language model's device) for projected image "
                                         "embeddings kept for reuse, keyed by image content; a hit skips decoding "
                                         "and the vision encoder; evicted entries count until their grace ends; "
                                         "0 = off (off too with several language-model instances)")
    embedding_cache_grace_s: float = _option(10.0, "how long (s) an evicted image's embeddings stay readable by "
                                             "requests already past preprocess when it was evicted")
    kv_cache_memory_fraction: float = _option(0.8, "share of the GPU memory free after the weights that the "
                                              "KV cache takes (at most max_num_seqs x max_seq_len tokens)")
    # FP8 (e4m3, unscaled, saturating) is half the bytes of bfloat16, so twice the tokens fit and decode
    # attention reads half as much. Not bit-exact with transformers: keys and values keep 3 mantissa bits.
    kv_cache_dtype: str = _option("auto", "KV-cache element type: auto = the model's dtype; fp8_e4m3 = FP8, "
                                  "twice the tokens (not bit-exact)", STORAGE_DTYPES)
    # The language model's q/k/v/o and MLP matrices in FP8 with a scale per output channel, in place of
    # the model's (llava_triton/fp8.py): half the bytes a decode step reads, twice the tensor-core rate
    # for prefill, half the memory. Not bit-exact with transformers: weights, and activations of GEMMs
    # over more than one token, keep 3 mantissa bits.
    lm_weight_dtype: str = _option("auto", "the language model's projection weights: auto = the model's dtype; "
                                   "fp8_e4m3 = FP8 with a scale per output channel (not bit-exact)", STORAGE_DTYPES)
    # FP8 as for lm_weight_dtype, activations rounded to FP8 per token too: twice the tensor-core rate for
    # the GEMMs that are 91 % of the encoder's FLOPs. Not bit-exact.
    vision_weight_dtype: str = _option("auto", "the vision encoder's layer projections and the projector's "
                                       "linears: auto = the model's dtype; fp8_e4m3 = FP8 (not bit-exact)",
                                       STORAGE_DTYPES)
    # "triton" = llava_triton.decode_attention (each sequence reads only its own length, through its
    # block table, in the cache's dtype), "sdpa" = PyTorch's scaled_dot_product_attention over a
    # gathered copy of the length bucket (lm_runtime.use_decode_kernel says why auto picks triton).
    decode_attention: str = _option("auto", "decode attention: triton, sdpa, or auto = triton on a GPU where the "
                                    "triton package is importable, else sdpa", ("auto", "triton", "sdpa"))
    # One-row products are a decode step's at batch 1: "triton" = llava_triton.gemv's kernel, which
    # read a 7B layer's bfloat16 weights in 10 % less time than cuBLAS on an H200 (bench.kernels); FP8
    # weights always take it (lm_runtime.use_gemv).
    decode_gemv: str = _option("auto", "one-row products of weights in the model's dtype (decode at batch 1): "
                               "triton, cublas, or auto = triton on a GPU where the triton package is importable",
                               ("auto", "triton", "cublas"))
    # Step N+1 is launched with step N's tokens still on the device, and the host reads step N's tokens
    # back, detokenizes and hands out its responses while the GPU computes N+1: the host's share of a
    # step is hidden behind the GPU's instead of added to it (llava_triton.engine says how).
    overlap_decode: bool = _option(True, "launch each decode step before the host handles the previous step's "
                                   "tokens, so the GPU does not wait for Python between steps; a sequence that "
                                   "stops on EOS or a stop string computes one more step, thrown away")
    cuda_graphs: bool = _option(True, "on a GPU, replay decode steps and the vision models from CUDA graphs "
                                "(captured at load)")
    # At load, before capturing the graphs; eager layers if it cannot compile (no C compiler).
    torch_compile: bool = _option(True, "on a GPU, fuse the small kernels around the GEMMs and attention with "
                                  "torch.compile (the language model's, vision encoder's and projector's layers)")
    # The language model's threads (engine loop, response sender, Triton's execute) share the GIL;
    # the engine gives it up at each GPU sync and waits up to this long to get it back (Python's
    # default is 5 ms, a big share of a decode step).
    gil_switch_interval_s: float = _option(0.0005, "the language model process's sys.setswitchinterval (s)")
    max_queue_size: int = _option(256, "requests waiting per queueing model before new ones are refused")
    queue_timeout_us: int = _option(30_000_000, "how long (µs) a request may wait in a queue before it is refused")
    instance_kind: str = _option("KIND_CPU", "where the vision and language model instances run (the export "
                                 "sets it from --device)", ("KIND_CPU", "KIND_GPU"))
    preprocess_instances: int = _option(2, "preprocess instances (on the CPU whatever the device)")
    vision_instances: int = _option(1, "vision encoder instances per GPU (or on the CPU); an export for a GPU "
                                    f"of {GPU_VISION_INSTANCES_MIN_BYTES // 2**30} GiB or more sets "
                                    f"{GPU_VISION_INSTANCES} unless given")
    # The projector's step is bound by copying its output (576 x 4096 values an image, 4x the
    # encoder's) through host memory, work that more instances spread over more CPU cores, while its
    # GPU work is small (1.2 ms for 32 images on an H100).
    projector_instances: int = _option(0, "projector instances per GPU; 0 = vision_instances")
    # "language_model" moves 4x fewer bytes between processes (576 x 1024 values an image instead of
    # 576 x 4096) and saves a step: on the H100 the projector's step was bound by those copies (1.2 ms
    # of GPU work for 32 images, ~36 ms of execute) and cost ~5 ms of TTFT at c=1.
    projector_placement: str = _option("model", "where the projector runs: model = its own Triton model, an "
                                       "ensemble step (a TensorRT plan with the TensorRT engine); language_model = "
                                       "inside the language model's step (PyTorch)", PROJECTOR_PLACEMENTS)
    language_model_instances: int = _option(1, "language model instances per GPU, each with its own KV cache "
                                            "(lower kv_cache_memory_fraction)")
    gpus: tuple[int, ...] = _option((), "GPUs to place instances on; [] = every visible GPU")
    device: str = _option("cpu", "torch device of the PyTorch-served models (the export's --device; cuda uses "
                          "Triton's device id)")
    dtype: str = _option("float32", "compute dtype of the PyTorch-served models (the export's --dtype)",
                         ("float32", "float16", "bfloat16"))

    def __post_init__(self) -> None:
        for name in POSITIVE_OPTIONS:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for option in dataclasses.fields(self):
            choices, value = option.metadata["choices"], getattr(self, option.name)
            if choices and value not in choices:
                raise ValueError(f"{option.name} must be {one_of(choices)}, got {value!r}")
        if self.default_num_frames > self.max_frames_per_request:
            raise ValueError(f"default_num_frames {self.default_num_frames} must not exceed max_frames_per_request "
                             f"{self.max_frames_per_request}")
        if any(b > self.vision_max_batch_size for b in self.vision_preferred_batch_sizes):
            raise ValueError("vision_preferred_batch_sizes must not exceed vision_max_batch_size")
        if any(g < 0 for g in self.gpus):
            raise ValueError(f"gpus must be GPU indices, got {self.gpus}")
        if self.projector_instances < 0:
            raise ValueError(f"projector_instances must be 0 (as vision_instances) or positive, "
                             f"got {self.projector_instances}")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens must be 0 (the context less one) or positive, "
                             f"got {self.max_prompt_tokens}")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len must be 0 (the context length) or positive, got {self.max_seq_len}")
        if not 0.0 < self.gil_switch_interval_s <= 1.0:
            raise ValueError(f"gil_switch_interval_s must be in (0, 1], got {self.gil_switch_interval_s}")
        if self.embedding_cache_bytes < 0:
            raise ValueError(f"embedding_cache_bytes must be 0 (off) or positive, got {self.embedding_cache_bytes}")
        if not 0.0 < self.embedding_cache_grace_s <= 3600.0:
            raise ValueError(f"embedding_cache_grace_s must be in (0, 3600], got {self.embedding_cache_grace_s}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")

    @property
    def projector_in_language_model(self) -> bool:
        """projector_placement "language_model": no projector model; the language model projects."""
        return self.projector_placement == "language_model"

    def instances_of(self, model: str) -> int:
        """Instances per GPU (or on the CPU) of the vision encoder or the projector (projector_instances,
        0 = as many as vision_instances)."""
        if model == PROJECTOR:
            return self.projector_instances or self.vision_instances
        if model == VISION_ENCODER:
            return self.vision_instances
        raise ValueError(f"instances_of takes {VISION_ENCODER!r} or {PROJECTOR!r}, got {model!r}")

    def token_limit(self, model: ModelSpec) -> int:
        """Prompt plus output tokens one request may use: the context, or less with max_seq_len."""
        return min(self.max_seq_len or model.max_position_embeddings, model.max_position_embeddings)

    def prompt_token_limit(self, model: ModelSpec) -> int:
        """The most prompt tokens one request may have: max_prompt_tokens, and room for one token of answer."""
        room = self.token_limit(model) - 1
        return min(self.max_prompt_tokens, room) if self.max_prompt_tokens else room

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingConfig:
        data = dict(data)
        for name in ("vision_preferred_batch_sizes", "gpus"):
            if name in data:
                data[name] = tuple(data[name])
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            renamed = "".join(f"; {old} is now {RENAMED_OPTIONS[old]}"
                              for old in sorted(unknown & set(RENAMED_OPTIONS)))
            raise ValueError(f"unknown serving options: {sorted(unknown)}{renamed}")
        return cls(**data)



@dataclass(frozen=True)
class ServingOption:
    """One ServingConfig field, as `python -m export --set NAME=VALUE` takes it."""

    name: str
    type: Any  # int, float, bool, str or tuple[int, ...]
    default: Any
    meaning: str
    choices: tuple[str, ...]  # the values a string option may take; () = any


def serving_options() -> tuple[ServingOption, ...]:
    """Every serving option with its type, default and meaning, in ServingConfig's order."""
    hints = typing.get_type_hints(ServingConfig)
    return tuple(ServingOption(f.name, hints[f.name], f.default, f.metadata["meaning"], f.metadata["choices"])
                 for f in dataclasses.fields(ServingConfig))

@dataclass(frozen=True)
class FrontendConfig:
    """Options of the OpenAI-compatible frontend (llava_triton.openai_frontend): its command-line flags, one
    per field (`--max-body-bytes`), and docs/openai.md's table are generated from these fields. The image
    limits it checks early (max_image_bytes, max_images_per_request) are the served repository's
    ServingConfig, which preprocess enforces anyway."""

    served_model_name: str = _option(ENSEMBLE, "the model id /v1/models lists and requests name")
    # A 20 MiB image (max_image_bytes) is about 27 MiB of base64; 64 MiB leaves room for a few of them.
    max_body_bytes: int = _option(64 * 1024 * 1024, "bytes of one request body, counted as it is read "
                                  "(413 past it)")
    max_json_depth: int = _option(32, "nesting depth of a request's JSON (a chat request needs 6)")
    max_json_containers: int = _option(20_000, "JSON arrays and objects in one request (a JSON bomb is refused "
                                       "before it is parsed)")
    fetch_image_urls: bool = _option(False, "fetch http(s) image URLs; off: only data: URLs are taken")
    fetch_private_addresses: bool = _option(False, "with fetch_image_urls, also fetch from loopback, private and "
                                            "link-local addresses (the cluster's own services)")
    fetch_timeout_s: float = _option(10.0, "seconds one image fetch may take, redirects included")
    fetch_max_redirects: int = _option(3, "redirects one image fetch follows")

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_depth", "max_json_containers", "fetch_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.fetch_max_redirects < 0:
            raise ValueError(f"fetch_max_redirects must be 0 or more, got {self.fetch_max_redirects}")
        if not self.served_model_name.strip():
            raise ValueError("served_model_name must not be empty")


def frontend_options() -> tuple[ServingOption, ...]:
    """Every FrontendConfig field with its type, default and meaning."""
    hints = typing.get_type_hints(FrontendConfig)
    return tuple(ServingOption(f.name, hints[f.name], f.default, f.metadata["meaning"], f.metadata["choices"])
                 for f in dataclasses.fields(FrontendConfig))


# Triton's names of the dtypes `wire_dtype` gives (config.pbtxt's TYPE_<name>).
TRITON_TYPE_NAMES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16"}


def wire_dtype(serving: ServingConfig) -> np.dtype:
    """The dtype of pixel_values, image_features and image_embeds between the ensemble steps.

    FP32 when the models compute in float32: the CPU path stays bit-exact with transformers.
    FP16 when they compute in float16 or bfloat16, which halves the host copies between the steps
    (numpy and Triton's Python backend have no bfloat16). bfloat16 -> float16 is exact for values in
    float16's normal range (|x| in [2**-14, 65504]): float16 has more mantissa bits (10 against 7);
    smaller values lose at most 2**-25 as float16 subnormals. Larger ones become inf, which the next
    step's non-finite check refuses (the projector's input check, the language model's on
    image_embeds) rather than compute with.
    """
    return np.dtype(np.float32 if serving.dtype == "float32" else np.float16)


def language_model_image_input(serving: ServingConfig) -> str:
    """The language model's image input: the projector's output, or with projector_placement
    "language_model" the vision encoder's (the language model projects it)."""
    return IMAGE_FEATURES if serving.projector_in_language_model else IMAGE_EMBEDS


def wire_type_name(serving: ServingConfig) -> str:
    """Triton's name of `wire_dtype(serving)`: "FP32" or "FP16" (config.pbtxt says TYPE_<name>)."""
    return TRITON_TYPE_NAMES[wire_dtype(serving)]


def full_hf_config(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's config with every default filled in.

    Published configs omit fields left at their default (llava-1.5-7b-hf's text_config has no
    hidden_size), so read them through transformers' LlavaConfig, never with remote code.
    """
    from transformers import LlavaConfig, LlavaNextConfig, LlavaNextVideoConfig

    path = Path(checkpoint)
    raw = json.loads((path / "config.json").read_text())
    config_classes = {"llava": LlavaConfig, "llava_next": LlavaNextConfig, "llava_next_video": LlavaNextVideoConfig}
    if raw.get("model_type") not in config_classes:
        raise ValueError(f"{path / 'config.json'} is not a LLaVA-1.5, LLaVA-NeXT or LLaVA-NeXT-Video checkpoint "
                         "(model_type "
                         f"{raw.get('model_type')!r}; served: {one_of(MODEL_TYPES)})")
    return config_classes[raw["model_type"]].from_pretrained(path).to_dict()


def write_spec(directory: Path, model: ModelSpec, serving: ServingConfig) -> Path:
    """Write both specs as JSON beside a model's artifacts (read back by `read_spec`)."""
    path = Path(directory) / SPEC_FILE
    path.write_text(json.dumps({"model": model.to_dict(), "serving": serving.to_dict()}, indent=2) + "\n")
    return path


def read_spec(directory: Path) -> tuple[ModelSpec, ServingConfig]:
    data = json.loads((Path(directory) / SPEC_FILE).read_text())
    return ModelSpec.from_dict(data["model"]), ServingConfig.from_dict(data["serving"])
