"""LLaVA's vision side in plain PyTorch: the CLIP vision tower with feature selection, and the projector.

Two modules, one tensor contract, served as two Triton models (`vision_encoder`, `projector`):

    pixel_values   (B, 3, image_size, image_size)
    image_features (B, num_image_tokens, vision_hidden_size)
    image_embeds   (B, num_image_tokens, text_hidden_size)

each in `spec.wire_dtype` between the models (FP32, or FP16 when they compute in half precision).

`VisionEncoder` equals transformers' `LlavaModel.get_image_features` up to the projector: the
hidden state at `vision_feature_layer` (an index into `hidden_states`, 0 = embeddings), with CLS
dropped for the "default" strategy. Only the layers up to that index are built and loaded, so the
usual -2 skips the tower's last layer instead of computing and discarding it.

Weights come from a Hugging Face LLaVA checkpoint's safetensors only (no pickle, no remote code).
`save_for_serving` writes each module's weights and small config into a Triton model version
directory; the Triton adapters (`model_repository/*/1/model.py`) load them back through
`serve_encoder` / `serve_projector`, which also hold the request batching logic so that tests can
run it without a server.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel
from transformers.activations import ACT2FN

from llava_triton.cuda_graphs import maybe_graphed
from llava_triton.errors import InvalidRequestError
from llava_triton.fp8 import quantize_linears
from llava_triton.spec import (IMAGE_EMBEDS, IMAGE_FEATURES, PIXEL_VALUES, TRITON_TYPE_NAMES, ModelSpec, ServingConfig,
                               read_spec, wire_dtype)
from llava_triton.torch_compile import maybe_compiled

WEIGHTS_FILE = "model.safetensors"  # one module's weights in a model version directory
MODULE_CONFIG_FILE = "module_config.json"  # the small config that rebuilds the module around them
_CHECKPOINT_INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WIRE_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


# --- modules -------------------------------------------------------------------------------------

def num_layers_needed(vision_feature_layer: int, num_hidden_layers: int) -> int:
    """Encoder layers to run so that the last one's output is `hidden_states[vision_feature_layer]`."""
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise ValueError(f"only a single integer vision_feature_layer is supported, got {vision_feature_layer!r}")
    # hidden_states holds num_hidden_layers + 1 entries: the embeddings, then each layer's output.
    needed = vision_feature_layer if vision_feature_layer >= 0 else num_hidden_layers + 1 + vision_feature_layer
    if not 0 <= needed <= num_hidden_layers:
        raise ValueError(f"vision_feature_layer {vision_feature_layer} is out of range for a vision tower "
                         f"with {num_hidden_layers} layers")
    return needed


class VisionEncoder(nn.Module):
    """CLIP vision tower cut at `vision_feature_layer`, then the select strategy (CLS dropped for "default")."""

    def __init__(self, vision_config: CLIPVisionConfig, vision_feature_layer: int = -2,
                 vision_feature_select_strategy: str = "default"):
        super().__init__()
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {vision_feature_select_strategy!r}")
        self.vision_config = vision_config  # the checkpoint's, with all its layers (saved as is)
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        tower_config = copy.deepcopy(vision_config)
        tower_config.num_hidden_layers = num_layers_needed(vision_feature_layer, vision_config.num_hidden_layers)
        tower_config._attn_implementation = "sdpa"
        self.vision_tower = CLIPVisionModel(tower_config)
        self.encoder_layer = encoder_layer  # compile_layers() replaces it with a compiled version
        self.eval()

    @property
    def num_image_tokens(self) -> int:
        num_patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def hidden_size(self) -> int:
        return self.vision_config.hidden_size

    def module_config(self) -> dict[str, Any]:
        return {"vision_config": self.vision_config.to_dict(), "vision_feature_layer": self.vision_feature_layer,
                "vision_feature_select_strategy": self.vision_feature_select_strategy}

    @classmethod
    def from_module_config(cls, config: dict[str, Any]) -> "VisionEncoder":
        return cls(CLIPVisionConfig.from_dict(config["vision_config"]), config["vision_feature_layer"],
                   config["vision_feature_select_strategy"])

    def fuse(self) -> None:
        """One GEMM for each layer's q, k and v instead of three (the same rows and biases,
        concatenated), as the served encoder runs them; the same products up to the GEMM library's
        blocking."""
        for layer in self.vision_tower.encoder.layers:
            attention = layer.self_attn
            attention.qkv_proj = _concat_linears(attention.q_proj, attention.k_proj, attention.v_proj)
            del attention.q_proj, attention.k_proj, attention.v_proj

    def quantize_fp8(self) -> None:
        """Each layer's projections (q/k/v, out, fc1, fc2: 91 % of the FLOPs) in FP8 with per-output-
        channel scales (llava_triton.fp8); the patch embedding and the norms stay in the model's
        dtype. After any dtype change (Module.to would convert the FP8 buffers)."""
        for layer in self.vision_tower.encoder.layers:
            quantize_linears(layer.self_attn, ("qkv_proj", "q_proj", "k_proj", "v_proj", "out_proj"))
            quantize_linears(layer.mlp, ("fc1", "fc2"))

    def compile_layers(self) -> None:
        """torch.compile one encoder layer function (dynamic shapes, so every batch bucket shares it)
        that serves all the layers: layer norms, bias adds, the activation and the residuals fuse
        into few kernels around the GEMMs and attention. It compiles on its first call; make that
        before capturing CUDA graphs."""
        self.encoder_layer = torch.compile(encoder_layer, dynamic=True, fullgraph=True)

    def uncompile_layers(self) -> None:
        self.encoder_layer = encoder_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # CLIPVisionModel.forward's steps, minus the pooled output (post_layernorm of CLS) LLaVA
        # does not use. The tower is cut at the selected layer, so its last hidden state is the
        # selected one.
        tower = self.vision_tower
        hidden_states = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (B, 1 + num_patches, D)
        for layer in tower.encoder.layers:
            hidden_states = self.encoder_layer(layer, hidden_states)
        if self.vision_feature_select_strategy == "default":
            hidden_states = hidden_states[:, 1:]  # (B, num_patches, D): drop CLS
        return hidden_states


def encoder_layer(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """One CLIP encoder layer (transformers' CLIPEncoderLayer in eval mode, no mask: pre-norm
    attention and quick-GELU MLP, each with a residual), a free function so that one compiled
    version serves every layer. q, k and v come from one GEMM once `VisionEncoder.fuse` ran."""
    attention, mlp = layer.self_attn, layer.mlp
    B, T, D = hidden_states.shape
    x = layer.layer_norm1(hidden_states)
    qkv_proj = getattr(attention, "qkv_proj", None)
    if qkv_proj is not None:
        q, k, v = qkv_proj(x).chunk(3, dim=-1)  # (B, T, D) each
    else:
        q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
    q, k, v = (t.view(B, T, attention.num_heads, attention.head_dim).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)  # (B, nh, T, hs); every patch sees all
    hidden_states = hidden_states + attention.out_proj(y.transpose(1, 2).reshape(B, T, D))
    return hidden_states + mlp.fc2(mlp.activation_fn(mlp.fc1(layer.layer_norm2(hidden_states))))


class Projector(nn.Module):
    """LLaVA's 2-layer MLP; the same weight names as transformers' `LlavaMultiModalProjector`."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, projector_hidden_act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        self.vision_hidden_size = vision_hidden_size
        self.text_hidden_size = text_hidden_size
        self.projector_hidden_act = projector_hidden_act
        self.bias = bias
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)
        self.act = ACT2FN[projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size, bias=bias)
        self.eval()

    def module_config(self) -> dict[str, Any]:
        return {"vision_hidden_size": self.vision_hidden_size, "text_hidden_size": self.text_hidden_size,
                "projector_hidden_act": self.projector_hidden_act, "bias": self.bias}

    @classmethod
    def from_module_config(cls, config: dict[str, Any]) -> "Projector":
        return cls(**config)

    def quantize_fp8(self) -> None:
        """Both linears in FP8 with per-output-channel scales (llava_triton.fp8), after any dtype change."""
        quantize_linears(self, ("linear_1", "linear_2"))

    def compile_layers(self) -> None:
        """torch.compile the forward (dynamic shapes): the bias add and activation fuse into one kernel."""
        self.forward = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def uncompile_layers(self) -> None:
        self.__dict__.pop("forward", None)  # the class's forward again

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self._forward(image_features)

    def _forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


def _concat_linears(*linears: nn.Linear) -> nn.Linear:
    weight = torch.cat([linear.weight.detach() for linear in linears])  # (sum of out_features, in_features)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    return fused


# --- loading from a Hugging Face checkpoint ------------------------------------------------------

def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _tower_name(checkpoint_name: str) -> str | None:
    """The CLIPVisionModel name of a checkpoint tensor, or None if it is not part of the vision tower.

    Handles `model.vision_tower.*` (transformers 5 in memory) and `vision_tower.*` (llava-hf on
    disk), each with or without the `vision_model.` level that older CLIPVisionModel had.
    """
    name = checkpoint_name.removeprefix("model.")
    if not name.startswith("vision_tower."):
        return None
    return name.removeprefix("vision_tower.").removeprefix("vision_model.")


def _projector_name(checkpoint_name: str) -> str | None:
    name = checkpoint_name.removeprefix("model.")
    return name.removeprefix("multi_modal_projector.") if name.startswith("multi_modal_projector.") else None


def _checkpoint_files(checkpoint_dir: Path) -> dict[Path, list[str] | None]:
    """Safetensors files to read, each with its tensor names where the index says them."""
    index = checkpoint_dir / _CHECKPOINT_INDEX
    if index.exists():
        files: dict[Path, list[str] | None] = {}
        for name, file_name in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(checkpoint_dir / file_name, []).append(name)
        return files
    found = sorted(checkpoint_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no .safetensors weights in {checkpoint_dir} (pickle checkpoints are not loaded)")
    return {path: None for path in found}


def _load_tensors(checkpoint_dir: Path, rename: Callable[[str], str | None], wanted: set[str],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read only the tensors whose renamed names are in `wanted`; fail on any missing or doubled."""
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for path, names in _checkpoint_files(checkpoint_dir).items():
        if names is not None and not any(rename(name) in wanted for name in names):
            continue  # a shard without any tensor of ours: not even opened
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            for name in shard.keys():
                target = rename(name)
                if target not in wanted:
                    continue  # another model part, a layer past the selected one, or a stale buffer
                if target in tensors:
                    raise ValueError(f"{checkpoint_dir}: both {sources[target]!r} and {name!r} map to {target!r}")
                tensors[target] = shard.get_tensor(name).to(dtype)
                sources[target] = name
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"{checkpoint_dir} lacks {len(missing)} needed tensors, e.g. {missing[:3]}")
    return tensors


def load_from_checkpoint(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                         dtype: str | torch.dtype = torch.float32) -> tuple[VisionEncoder, Projector]:
    """Build the encoder and projector of a Hugging Face LLaVA checkpoint and load only their tensors."""
    checkpoint_dir = Path(checkpoint_dir)
    dtype = resolve_dtype(dtype)
    config = AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=False)
    if config.model_type != "llava":
        raise ValueError(f"{checkpoint_dir} is not a LLaVA checkpoint (model_type {config.model_type!r})")
    if not isinstance(config.vision_config, CLIPVisionConfig):
        raise ValueError(f"only CLIP vision towers are supported, got {config.vision_config.model_type!r}")

    encoder = VisionEncoder(config.vision_config, config.vision_feature_layer, config.vision_feature_select_strategy)
    projector = Projector(config.vision_config.hidden_size, config.text_config.hidden_size,
                          config.projector_hidden_act, getattr(config, "multimodal_projector_bias", True))
    encoder_tensors = _load_tensors(checkpoint_dir, _tower_name, set(encoder.vision_tower.state_dict()), dtype)
    projector_tensors = _load_tensors(checkpoint_dir, _projector_name, set(projector.state_dict()), dtype)
    encoder.to(dtype).vision_tower.load_state_dict(encoder_tensors, strict=True)
    projector.to(dtype).load_state_dict(projector_tensors, strict=True)
    return encoder.to(device), projector.to(device)


# --- serving artifacts ---------------------------------------------------------------------------

def save_module(module: VisionEncoder | Projector, version_dir: Path) -> list[Path]:
    """Write one module's weights (in its current dtype) and config into `version_dir`."""
    version_dir.mkdir(parents=True, exist_ok=True)
    weights = version_dir / WEIGHTS_FILE
    config = version_dir / MODULE_CONFIG_FILE
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in module.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; the server may run as another user than the export
    config.write_text(json.dumps(module.module_config(), indent=2) + "\n")
    return [weights, config]


def save_for_serving(encoder: VisionEncoder, projector: Projector, encoder_dir: str | Path,
                     projector_dir: str | Path) -> list[Path]:
    """Write each module's weights (in its current dtype) and config into its model version directory."""
    return save_module(encoder, Path(encoder_dir)) + save_module(projector, Path(projector_dir))


def _load_module(cls, version_dir: Path, device: str | torch.device, dtype: str | torch.dtype):
    version_dir = Path(version_dir)
    config = json.loads((version_dir / MODULE_CONFIG_FILE).read_text())
    module = cls.from_module_config(config).to(resolve_dtype(dtype))
    state = {}
    with safe_open(str(version_dir / WEIGHTS_FILE), framework="pt", device="cpu") as weights:
        for name in weights.keys():
            state[name] = weights.get_tensor(name)
    module.load_state_dict(state, strict=True)  # copies into the module's dtype
    return module.to(device).eval()


def load_encoder(version_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = torch.float32) -> VisionEncoder:
    return _load_module(VisionEncoder, version_dir, device, dtype)


def load_projector(version_dir: str | Path, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = torch.float32) -> Projector:
    return _load_module(Projector, version_dir, device, dtype)


# --- batching across requests (used by the Triton adapters) -------------------------------------

def select_device(instance_kind: str, device_id: str | int) -> torch.device:
    """The torch device of a Triton model instance: "GPU" -> cuda:<id>, anything else -> cpu."""
    if instance_kind == "GPU":
        if not torch.cuda.is_available():
            raise RuntimeError("the model instance is KIND_GPU but torch sees no CUDA device")
        return torch.device(f"cuda:{int(device_id)}")
    return torch.device("cpu")


def concat_batches(batches: list[np.ndarray], out: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """Stack every request's batch along axis 0 (into `out` if given), with the sizes `split_batch` needs."""
    if not batches:
        raise ValueError("no batches to concatenate")
    return np.concatenate(batches, axis=0, out=out), [len(batch) for batch in batches]


def split_batch(batch: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Split a stacked batch back into one array per request (inverse of `concat_batches`)."""
    if sum(sizes) != len(batch):
        raise ValueError(f"sizes {sizes} do not add up to the batch of {len(batch)}")
    return [np.ascontiguousarray(part) for part in np.split(batch, np.cumsum(sizes)[:-1], axis=0)]


@dataclass
class BatchedModule:
    """One module behind a Triton model: checks each request's batch, runs them all in one forward.

    Inputs and outputs are in `wire_dtype` (`spec.wire_dtype`). Inputs holding NaN or infinities are
    refused per request: with an FP32 wire by numpy on the host; with an FP16 wire on the device
    after the upload, since numpy has no fast float16 path (isfinite on 32 images of pixel values:
    ~18 ms in float16 against ~2 ms in float32, on the 2-core CI machine).
    """

    module: Callable[[torch.Tensor], torch.Tensor]  # the nn.Module, or its GraphedModule
    input_name: str
    output_name: str
    item_shape: tuple[int, ...]  # one item's input shape, batch axis excluded
    output_item_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype  # the module's compute dtype
    wire_dtype: np.dtype  # of the input and the output

    def check_input(self, array: np.ndarray | None) -> np.ndarray:
        """The request's input (n, *item_shape) in the wire dtype, or InvalidRequestError naming the problem.

        With an FP16 wire, NaN and infinities are refused later, by `forward`, on the device.
        """
        if array is None:
            raise InvalidRequestError(f"missing input {self.input_name!r}")
        if array.dtype != self.wire_dtype:
            raise InvalidRequestError(f"{self.input_name} must be {TRITON_TYPE_NAMES[self.wire_dtype]}, "
                                      f"got {array.dtype}")
        if array.ndim != len(self.item_shape) + 1 or tuple(array.shape[1:]) != self.item_shape:
            raise InvalidRequestError(f"{self.input_name} must have shape [n, {', '.join(map(str, self.item_shape))}], "
                                      f"got {list(array.shape)}")
        if self.wire_dtype == np.float32 and not np.isfinite(array).all():
            raise InvalidRequestError(self._not_finite_message())
        return array

    def _not_finite_message(self) -> str:
        return f"{self.input_name} contains NaN or infinite values"

    def forward(self, batches: list[np.ndarray]) -> list[np.ndarray | InvalidRequestError]:
        """One forward pass over every batch `check_input` passed: per batch, its output in the wire
        dtype, or (FP16 wire) InvalidRequestError if its input holds NaN or infinite values."""
        total = sum(len(batch) for batch in batches)
        if total == 0:
            return [np.zeros((0, *self.output_item_shape), self.wire_dtype) for _ in batches]
        wire = _WIRE_TORCH_DTYPES[self.wire_dtype]
        # On a GPU, stage through pinned host memory (PyTorch caches the blocks, so it is touched
        # memory): copying into fresh pageable memory costs more than the forward pass itself.
        pinned = self.device.type == "cuda"
        host_inputs = torch.empty((total, *self.item_shape), dtype=wire, pin_memory=pinned)
        _, sizes = concat_batches(batches, out=host_inputs.numpy())
        with torch.inference_mode():
            inputs = host_inputs.to(self.device, non_blocking=pinned)
            # FP16 wire: one finiteness flag per row, computed on the device and read after the
            # forward, so checking adds no sync. Non-finite rows go through the forward with the
            # others: every row is computed on its own (see GraphedModule), so they change nothing
            # in the others' outputs, and their requests are refused below.
            finite_rows = None if self.wire_dtype == np.float32 else torch.isfinite(inputs).flatten(1).all(1)
            # The upload stays in the wire dtype; the cast to the compute dtype runs on the device
            # (exact from FP16 to bfloat16 within FP16's range, see spec.wire_dtype).
            outputs = self.module(inputs.to(self.dtype))
            if pinned:
                host_outputs = torch.empty(outputs.shape, dtype=wire, pin_memory=True)
                # Cast to the wire dtype on the GPU, since a copy that also converts goes through
                # pageable memory. The copy waits for the GPU.
                host_outputs.copy_(outputs.to(wire))
            else:
                host_outputs = outputs.to(wire)
            if finite_rows is not None:
                finite_rows = finite_rows.cpu().numpy()  # (total,) bool: one small copy
        results: list[np.ndarray | InvalidRequestError] = split_batch(host_outputs.numpy(), sizes)  # views
        if finite_rows is not None:
            for index, rows in enumerate(split_batch(finite_rows, sizes)):
                if not rows.all():
                    results[index] = InvalidRequestError(self._not_finite_message())
        return results

    def run_requests(self, arrays: list[np.ndarray | None]) -> list[np.ndarray | InvalidRequestError]:
        """Per request, its output or the error that refused it; refused requests don't stop the others."""
        results: list[np.ndarray | InvalidRequestError] = []
        accepted: list[int] = []
        for index, array in enumerate(arrays):
            try:
                results.append(self.check_input(array))
                accepted.append(index)
            except InvalidRequestError as error:
                results.append(error)
        if accepted:
            outputs = self.forward([results[index] for index in accepted])
            for index, output in zip(accepted, outputs):
                results[index] = output
        return results


def _check_against_spec(name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if got != expected:
        raise ValueError(f"{name}: the saved module has shape {got}, the spec says {expected}; re-run the export")


def serve_encoder(version_dir: str | Path, instance_kind: str, device_id: str | int) -> BatchedModule:
    """Load the vision encoder of a model version directory as its Triton instance will run it."""
    model, serving = read_spec(Path(version_dir))
    device, dtype = select_device(instance_kind, device_id), resolve_dtype(serving.dtype)
    encoder = load_encoder(version_dir, device, dtype)
    encoder.fuse()
    if serving.vision_weight_dtype != "auto":  # FP8, the one other value
        encoder.quantize_fp8()
    output_item_shape = (encoder.num_image_tokens, encoder.hidden_size)
    _check_against_spec(IMAGE_FEATURES, output_item_shape, (model.num_image_tokens, model.vision_hidden_size))
    maybe_compiled(encoder, pixel_values_shape(model), dtype, device, serving.torch_compile)
    run = maybe_graphed(encoder, pixel_values_shape(model), dtype, device, serving.vision_max_batch_size,
                        serving.cuda_graphs)
    return BatchedModule(run, PIXEL_VALUES, IMAGE_FEATURES, pixel_values_shape(model), output_item_shape,
                         device, dtype, wire_dtype(serving))


def load_serving_projector(directory: str | Path, device: str | torch.device, serving: ServingConfig) -> Projector:
    """The projector of `directory` in serving.dtype on `device`, its linears in FP8 with
    vision_weight_dtype: as the `projector` model runs it, or the language model with
    projector_placement "language_model"."""
    projector = load_projector(directory, device, resolve_dtype(serving.dtype))
    if serving.vision_weight_dtype != "auto":  # FP8, the one other value
        projector.quantize_fp8()
    return projector


def serve_projector(version_dir: str | Path, instance_kind: str, device_id: str | int) -> BatchedModule:
    """Load the projector of a model version directory as its Triton instance will run it."""
    model, serving = read_spec(Path(version_dir))
    device, dtype = select_device(instance_kind, device_id), resolve_dtype(serving.dtype)
    projector = load_serving_projector(version_dir, device, serving)
    _check_against_spec(IMAGE_EMBEDS, (projector.vision_hidden_size, projector.text_hidden_size),
                        (model.vision_hidden_size, model.text_hidden_size))
    maybe_compiled(projector, image_features_shape(model), dtype, device, serving.torch_compile)
    run = maybe_graphed(projector, image_features_shape(model), dtype, device, serving.vision_max_batch_size,
                        serving.cuda_graphs)
    return BatchedModule(run, IMAGE_FEATURES, IMAGE_EMBEDS, image_features_shape(model),
                         image_embeds_shape(model), device, dtype, wire_dtype(serving))


def pixel_values_shape(model: ModelSpec) -> tuple[int, int, int]:
    """One image's `pixel_values` shape, batch axis excluded."""
    return (model.num_channels, model.image_size, model.image_size)


def image_features_shape(model: ModelSpec) -> tuple[int, int]:
    """One image's `image_features` shape, batch axis excluded."""
    return (model.num_image_tokens, model.vision_hidden_size)


def image_embeds_shape(model: ModelSpec) -> tuple[int, int]:
    """One image's `image_embeds` shape, batch axis excluded."""
    return (model.num_image_tokens, model.text_hidden_size)
