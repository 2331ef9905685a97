"""The vision modules' serving artifacts: each module's weights and `module_config.json` in its Triton
model version directory, written by the export and loaded back by the server."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .dtypes import resolve_dtype
from .vision import Projector, VisionEncoder

WEIGHTS_FILE = "model.safetensors"  # one module's weights in a model version directory
MODULE_CONFIG_FILE = "module_config.json"  # the small config that rebuilds the module around them


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

