"""The language model's weights for the Python-backend decoder: the Llama (or Mistral) part of a LLaVA
checkpoint, renamed to plain `LlamaForCausalLM` names, saved as safetensors with its config; for
LLaVA-NeXT also `image_newline`, which the language model places after each row of an image's tiles."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from llava_triton.spec import IMAGE_NEWLINE_FILE, full_hf_config

# LLaVA checkpoint prefix → Llama prefix. transformers 5 saves the first pair, llava-hf's
# published checkpoints (transformers 4 layout) the second.
_PREFIXES = (
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors files (single or sharded). Pickled weights are refused."""
    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / s for s in shards]
    single = checkpoint / "model.safetensors"
    if single.exists():
        return [single]
    if any(checkpoint.glob("*.bin")) or any(checkpoint.glob("*.pt")):
        raise ValueError(f"{checkpoint} has only pickled weights (.bin/.pt); convert it to safetensors first "
                         "(llava-triton never loads pickle)")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {checkpoint}")


def rename(key: str) -> str | None:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


# LLaVA-NeXT's newline embedding: transformers 5's name, then llava-hf's published one.
IMAGE_NEWLINE_KEYS = ("model.image_newline", "image_newline")


def export_language_model(checkpoint: Path, output_dir: Path) -> Path:
    """Write `config.json` (the text config) and `model.safetensors` into output_dir, and for a
    LLaVA-NeXT checkpoint `image_newline.safetensors` (spec.IMAGE_NEWLINE_FILE)."""
    config = full_hf_config(checkpoint)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    newline = None
    for path in checkpoint_files(checkpoint):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                new = rename(key)
                if new is not None:
                    state[new] = f.get_tensor(key)
                elif key in IMAGE_NEWLINE_KEYS:
                    newline = f.get_tensor(key)
    if config.get("model_type") in ("llava_next", "llava_next_video"):
        if newline is None:
            raise ValueError(f"{checkpoint} is a LLaVA-NeXT checkpoint without image_newline "
                             f"({' or '.join(IMAGE_NEWLINE_KEYS)})")
        save_file({"image_newline": newline.contiguous()}, output_dir / IMAGE_NEWLINE_FILE)
    elif (output_dir / IMAGE_NEWLINE_FILE).exists():
        (output_dir / IMAGE_NEWLINE_FILE).unlink()  # an earlier LLaVA-NeXT export's
    if not any(k.startswith("model.layers.") for k in state):
        raise ValueError(f"no language-model weights found in {checkpoint}")
    text_config = dict(config["text_config"])
    text_config.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    if text_config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    (output_dir / "config.json").write_text(json.dumps(text_config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, output_dir / "model.safetensors")
    return output_dir
