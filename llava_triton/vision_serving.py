"""The vision encoder and the projector as their Triton instances run them: loaded from their artifacts,
weights in their final form (fused, FP8), compiled, captured as CUDA graphs, behind a BatchedModule."""

from __future__ import annotations

from pathlib import Path

import torch

from .batching import BatchedModule
from .cuda_graphs import maybe_graphed
from .dtypes import resolve_dtype
from .spec import IMAGE_EMBEDS, IMAGE_FEATURES, PIXEL_VALUES, ServingConfig, read_spec, wire_dtype
from .torch_compile import maybe_compiled
from .vision import Projector, image_embeds_shape, image_features_shape, pixel_values_shape
from .vision_artifacts import load_encoder, load_projector


def select_device(instance_kind: str, device_id: str | int) -> torch.device:
    """The torch device of a Triton model instance: "GPU" -> cuda:<id>, anything else -> cpu."""
    if instance_kind == "GPU":
        if not torch.cuda.is_available():
            raise RuntimeError("the model instance is KIND_GPU but torch sees no CUDA device")
        return torch.device(f"cuda:{int(device_id)}")
    return torch.device("cpu")


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

