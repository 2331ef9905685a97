"""The vision tower and projector of a Hugging Face LLaVA checkpoint, built as llava_triton.vision's
modules with only their tensors loaded (safetensors only: no pickle, no remote code). The export's
starting point; the server loads the modules from their artifacts (llava_triton.vision_artifacts).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, CLIPVisionConfig

from llava_triton.dtypes import resolve_dtype
from llava_triton.spec import MODEL_TYPES
from llava_triton.vision import Projector, VisionEncoder

_CHECKPOINT_INDEX = "model.safetensors.index.json"


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
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"{checkpoint_dir} is not a LLaVA-1.5 or LLaVA-NeXT checkpoint (model_type "
                         f"{config.model_type!r})")
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

