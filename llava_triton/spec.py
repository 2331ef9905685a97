"""One source for every name, size and limit the serving stack uses.

`ModelSpec` is derived from a Hugging Face LLaVA checkpoint's `config.json` (field names are
Hugging Face's). `ServingConfig` holds the serving knobs (limits, batching, instances) with
their defaults written once here. The export writes both into every `config.pbtxt` as
parameters, and each `model.py` reads them back with `ServingConfig.from_parameters` /
`ModelSpec.from_parameters`, so no size is typed twice.
"""

from __future__ import annotations

import dataclasses
import json
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

# Tensor names of the ensemble's public contract.
# Inputs: only `prompt` is required; the rest are optional with the defaults in ServingConfig.
IN_IMAGES = "images"  # BYTES [num_images], encoded JPEG/PNG/WebP; may be omitted or empty
IN_PROMPT = "prompt"  # BYTES [1], UTF-8 user message; `<image>` marks where each image goes
IN_MAX_TOKENS = "max_tokens"  # INT32 [1]
IN_TEMPERATURE = "temperature"  # FP32 [1], 0 = greedy
IN_TOP_P = "top_p"  # FP32 [1], (0, 1]
IN_TOP_K = "top_k"  # INT32 [1], 0 = off
IN_SEED = "seed"  # INT64 [1]
IN_STOP = "stop"  # BYTES [num_stop], stop strings
IN_STREAM = "stream"  # BOOL [1], one response per new text chunk when true
IN_IGNORE_EOS = "ignore_eos"  # BOOL [1], keep generating past EOS (benchmarks)
# Outputs, present in every response (streamed responses carry the delta).
OUT_TEXT = "text"  # BYTES [1]
OUT_TOKEN_IDS = "token_ids"  # INT64 [n], the generated ids carried by this response
OUT_PROMPT_TOKENS = "prompt_tokens"  # INT32 [1]
OUT_COMPLETION_TOKENS = "completion_tokens"  # INT32 [1], generated so far
OUT_FINISH_REASON = "finish_reason"  # BYTES [1]: "" while running, then "stop" or "length"

# Internal tensors between the ensemble steps; the three image tensors travel in `wire_dtype(serving)`.
INPUT_IDS = "input_ids"  # INT64 [seq_len], `<image>` already expanded to num_image_tokens ids
PIXEL_VALUES = "pixel_values"  # [num_images, 3, image_size, image_size]
IMAGE_FEATURES = "image_features"  # [num_images, num_image_tokens, vision_hidden_size]
IMAGE_EMBEDS = "image_embeds"  # [num_images, num_image_tokens, text_hidden_size]

# Sampling inputs, shared by preprocess (early validation) and language_model.
SAMPLING_INPUTS = (IN_MAX_TOKENS, IN_TEMPERATURE, IN_TOP_P, IN_TOP_K, IN_SEED, IN_STOP, IN_STREAM,
                   IN_IGNORE_EOS)

IMAGE_TOKEN = "<image>"
SPEC_FILE = "llava_triton_spec.json"  # written by export next to each model's artifacts


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
    num_patches: int = field(init=False)
    num_image_tokens: int = field(init=False)

    def __post_init__(self) -> None:
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

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelSpec":
        vision, text = config["vision_config"], config["text_config"]
        eos = text.get("eos_token_id", config.get("eos_token_id"))
        eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (int(eos),))
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
            max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
            eos_token_id=eos,
            torch_dtype=str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype")
                            or config.get("dtype") or "float32"),
        )

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path) -> "ModelSpec":
        return cls.from_hf_config(full_hf_config(checkpoint))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        data["eos_token_id"] = tuple(data["eos_token_id"])
        return cls(**data)


# Values of kv_cache_dtype, lm_weight_dtype and vision_weight_dtype: "auto" = the model's dtype, or FP8 (e4m3).
STORAGE_DTYPES = ("auto", "fp8_e4m3")

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


@dataclass(frozen=True)
class ServingConfig:
    """Serving knobs. Every default lives here and nowhere else."""

    # Request limits (checked before any expensive work).
    max_images_per_request: int = 4
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 36_000_000  # width * height, read from the header before decoding
    max_prompt_bytes: int = 256 * 1024
    max_request_bytes: int = 32 * 1024 * 1024  # images + prompt of one request together
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    # Sampling defaults (used when the client omits the input).
    default_max_tokens: int = 256
    default_temperature: float = 0.0  # greedy, as LLaVA-1.5's generation_config
    default_top_p: float = 1.0
    default_top_k: int = 0
    # Batching: the vision models batch across requests through Triton's dynamic batcher;
    # the language model batches in flight (requests join and leave between decode steps).
    vision_max_batch_size: int = 32
    vision_preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    # How long a lone image waits for others to batch with: every request pays it when traffic is
    # light, while under load batches form anyway from what queues during a forward pass. 0: on the
    # H100 (FP8 options, same machine) 500 µs cost 1.1 ms of TTFT at c=1 (two steps' queues, 0.66
    # and 0.63 ms against 0.11 and 0.10) and gave no larger batches at c=128 (3.56 against 3.41).
    vision_max_queue_delay_us: int = 0
    max_num_seqs: int = 32  # sequences decoded together; more wait in the language model's queue
    # Prompt tokens prefilled per step, so running decodes are not stalled by a long prompt. 1024:
    # a LLaVA-1.5 prompt (576 image tokens and the text) is one chunk, which PrefillGraphs replays
    # from a CUDA graph; a step of 1024 tokens takes ~25 ms of a 7B's bf16 GEMMs on the H100.
    prefill_chunk_tokens: int = 1024
    max_seq_len: int = 0  # tokens per KV-cache slot (prompt + output); 0 = the model's context length
    kv_cache_memory_fraction: float = 0.8  # of the GPU memory free after the weights, for the KV cache
    # KV-cache element type: "auto" = the model's dtype; "fp8_e4m3" = FP8 (e4m3, unscaled,
    # saturating), half the bytes of bfloat16, so twice the tokens fit and decode attention reads
    # half as much. Not bit-exact with transformers: keys and values are rounded to 3 mantissa bits.
    kv_cache_dtype: str = "auto"
    # The language model's projection weights (its 32 layers' q/k/v/o and MLP matrices on a 7B):
    # "auto" = the model's dtype; "fp8_e4m3" = FP8 with a scale per output channel, in place of the
    # model's (llava_triton/fp8.py): half the bytes a decode step reads, twice the tensor-core rate
    # for prefill, half the memory. Not bit-exact with transformers: weights, and activations of
    # GEMMs over more than one token, keep 3 mantissa bits.
    lm_weight_dtype: str = "auto"
    # The vision encoder's layer projections and the projector's two linears: "auto" = the model's
    # dtype; "fp8_e4m3" = FP8 as for lm_weight_dtype, activations rounded to FP8 per token too: twice
    # the tensor-core rate for the GEMMs that are 91 % of the encoder's FLOPs. Not bit-exact.
    vision_weight_dtype: str = "auto"
    # Decode attention: "triton" = llava_triton.decode_attention (each sequence reads only its own
    # length; reads an FP8 cache), "sdpa" = PyTorch's scaled_dot_product_attention over the length
    # bucket, "auto" = triton for an FP8 cache on a GPU where the triton package is importable
    # (with a bfloat16 cache it measured no faster than SDPA), else sdpa.
    decode_attention: str = "auto"
    cuda_graphs: bool = True  # on a GPU, replay decode steps and the vision models from CUDA graphs (captured at load)
    # On a GPU, fuse the small kernels (norms, RoPE, activations, bias and residual adds) around the
    # GEMMs and attention with torch.compile: the language model's decode and prefill layers, the
    # vision encoder's layers and the projector. At load, before capturing the graphs; eager layers
    # if it cannot compile (no C compiler).
    torch_compile: bool = True
    # The language model's threads (engine loop, response sender, Triton's execute) share the GIL;
    # the engine gives it up at each GPU sync and waits up to this long to get it back (Python's
    # default is 5 ms, a big share of a decode step).
    gil_switch_interval_s: float = 0.0005
    max_queue_size: int = 256  # requests waiting per queueing model before new ones are refused
    queue_timeout_us: int = 30_000_000  # a request waiting longer in a queue is refused
    # Instances: `kind` is "KIND_GPU" or "KIND_CPU"; count is per device.
    instance_kind: str = "KIND_CPU"
    preprocess_instances: int = 2
    vision_instances: int = 1  # per GPU (or on the CPU)
    # Projector instances per GPU; 0 = vision_instances. Its step is bound by copying its output
    # (576 x 4096 values an image, 4x the encoder's) through host memory, work that more instances
    # spread over more CPU cores, while its GPU work is small (1.2 ms for 32 images on an H100).
    projector_instances: int = 0
    # Where the projector runs: "model" = its own Triton model, an ensemble step between the vision
    # encoder and the language model (a TensorRT plan with the TensorRT engine); "language_model" =
    # inside the language model's step, on the image features it then receives (PyTorch, on its
    # device). The second moves 4x fewer bytes between processes (576 x 1024 values an image
    # instead of 576 x 4096) and saves a step: on the H100 the projector's step was bound by those
    # copies (1.2 ms of GPU work for 32 images, ~36 ms of execute) and cost ~5 ms of TTFT at c=1.
    projector_placement: str = "model"
    language_model_instances: int = 1  # per GPU; each has its own KV cache (lower kv_cache_memory_fraction)
    gpus: tuple[int, ...] = ()  # GPUs to place instances on; () = every visible GPU
    device: str = "cpu"  # torch device for the PyTorch-served models ("cuda" uses Triton's device id)
    dtype: str = "float32"  # compute dtype of the PyTorch-served models

    def __post_init__(self) -> None:
        positive = ("max_images_per_request", "max_image_bytes", "max_image_pixels", "max_prompt_bytes",
                    "default_max_tokens", "vision_max_batch_size", "max_num_seqs", "prefill_chunk_tokens",
                    "max_queue_size", "max_request_bytes", "queue_timeout_us",
                    "preprocess_instances", "vision_instances", "language_model_instances")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if any(b > self.vision_max_batch_size for b in self.vision_preferred_batch_sizes):
            raise ValueError("vision_preferred_batch_sizes must not exceed vision_max_batch_size")
        if any(g < 0 for g in self.gpus):
            raise ValueError(f"gpus must be GPU indices, got {self.gpus}")
        if self.projector_instances < 0:
            raise ValueError(f"projector_instances must be 0 (as vision_instances) or positive, "
                             f"got {self.projector_instances}")
        if self.projector_placement not in PROJECTOR_PLACEMENTS:
            raise ValueError(f"projector_placement must be {' or '.join(PROJECTOR_PLACEMENTS)}, "
                             f"got {self.projector_placement!r}")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len must be 0 (the context length) or positive, got {self.max_seq_len}")
        if not 0.0 < self.gil_switch_interval_s <= 1.0:
            raise ValueError(f"gil_switch_interval_s must be in (0, 1], got {self.gil_switch_interval_s}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU"):
            raise ValueError(f"instance_kind must be KIND_CPU or KIND_GPU, got {self.instance_kind!r}")
        for name in ("kv_cache_dtype", "lm_weight_dtype", "vision_weight_dtype"):
            if getattr(self, name) not in STORAGE_DTYPES:
                raise ValueError(f"{name} must be {' or '.join(STORAGE_DTYPES)}, got {getattr(self, name)!r}")
        if self.decode_attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"decode_attention must be auto, triton or sdpa, got {self.decode_attention!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def projector_in_language_model(self) -> bool:
        """projector_placement "language_model": no projector model; the language model projects."""
        return self.projector_placement == "language_model"

    def token_limit(self, model: ModelSpec) -> int:
        """Prompt plus output tokens one request may use: the context, or less with max_seq_len."""
        return min(self.max_seq_len or model.max_position_embeddings, model.max_position_embeddings)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServingConfig":
        data = dict(data)
        for name in ("vision_preferred_batch_sizes", "gpus"):
            if name in data:
                data[name] = tuple(data[name])
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            renamed = "".join(f"; {old} is now {RENAMED_OPTIONS[old]}" for old in sorted(unknown & set(RENAMED_OPTIONS)))
            raise ValueError(f"unknown serving options: {sorted(unknown)}{renamed}")
        return cls(**data)


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
    from transformers import LlavaConfig

    path = Path(checkpoint)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != "llava":
        raise ValueError(f"{path / 'config.json'} is not a LLaVA checkpoint (model_type {raw.get('model_type')!r})")
    return LlavaConfig.from_pretrained(path).to_dict()


def write_spec(directory: Path, model: ModelSpec, serving: ServingConfig) -> Path:
    """Write both specs as JSON beside a model's artifacts (read back by `read_spec`)."""
    path = Path(directory) / SPEC_FILE
    path.write_text(json.dumps({"model": model.to_dict(), "serving": serving.to_dict()}, indent=2) + "\n")
    return path


def read_spec(directory: Path) -> tuple[ModelSpec, ServingConfig]:
    data = json.loads((Path(directory) / SPEC_FILE).read_text())
    return ModelSpec.from_dict(data["model"]), ServingConfig.from_dict(data["serving"])
