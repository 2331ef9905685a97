"""Build the embedded checkpoints: LLaVA-1.5 and LLaVA-NeXT models with seeded random weights.

The output is a directory in the Hugging Face format of `llava-hf/llava-1.5-7b-hf` (or, for a
`llava_next` preset, `llava-hf/llava-v1.6-mistral-7b-hf`), loadable with no network by
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained`:

    config.json, generation_config.json, model.safetensors    the model
    tokenizer.json, tokenizer_config.json, ...                trained on presets/corpus.txt in the preset's
                                                              style (llava_triton.preset_tokenizers)
    chat_template.jinja or chat_template.json                 LLaVA-1.5 prompt format ("USER: <image>\\n... ASSISTANT:")
    preprocessor_config.json, processor_config.json           CLIPImageProcessor values and LlavaProcessor options
    llava_triton_build.json                                   stamp: which preset and inputs built this

Presets: `tiny` (the embedded default, a byte-level BPE tokenizer), `tiny-sentencepiece` (the same
model with the Llama/SentencePiece tokenizer of llava-hf's checkpoints), `tiny-next` (LLaVA-NeXT tiles,
a Llama decoder), `tiny-next-mistral` (LLaVA-NeXT with a Mistral decoder and chat format), and the 7B
architectures for GPU benchmarks, `llava-1.5-7b` and `llava-v1.6-mistral-7b`.
Everything comes from `presets/<name>.json` (the Hugging Face config plus a seed) and
`presets/corpus.txt`, so a build is reproducible: the same inputs on the same kind of device give a
byte-identical `model.safetensors`. A build whose stamp matches the current inputs is not redone.

    python -m llava_triton.checkpoint --preset tiny --output build/tiny-llava
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_triton import preset_tokenizers
from llava_triton.preset_tokenizers import CORPUS_FILE, PRESETS_DIR, write_json, write_tokenizer
from llava_triton.processor import VIDEO_PROCESSOR_FILE
from llava_triton.spec import IMAGE_TOKEN, VIDEO_TOKEN, ModelSpec

STAMP_FILE = "llava_triton_build.json"
DEFAULT_PRESET = "tiny"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def preset_path(preset: str) -> Path:
    path = PRESETS_DIR / f"{preset}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(available_presets())}")
    return path


def load_preset(preset: str) -> dict[str, Any]:
    """The preset's JSON; one with `"extends": NAME` is that preset with its own values merged in
    (objects key by key, anything else replaced), so a variant states only what differs."""
    data = json.loads(preset_path(preset).read_text())
    base = data.pop("extends", None)
    return _merge(load_preset(base), data) if base is not None else data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _preset_files(preset: str) -> list[Path]:
    """The preset's file and those of the presets it extends."""
    path = preset_path(preset)
    base = json.loads(path.read_text()).get("extends")
    return [path, *(_preset_files(base) if base is not None else [])]


def default_output(preset: str) -> Path:
    return Path("build") / f"{preset}-llava"


def preset_hash(preset: str) -> str:
    """Content hash of everything a build depends on: the preset (and those it extends), the corpus,
    the builders' code and the versions of the libraries that write the files."""
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256()
    sources = [*_preset_files(preset), CORPUS_FILE, Path(__file__), Path(preset_tokenizers.__file__)]
    for part in (*(path.read_bytes() for path in sources),
                 f"torch {torch.__version__} transformers {transformers.__version__} "
                 f"tokenizers {tokenizers.__version__}".encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def is_built(preset: str, output: Path) -> bool:
    stamp = Path(output) / STAMP_FILE
    if not stamp.is_file():
        return False
    try:
        data = json.loads(stamp.read_text())
    except ValueError:
        return False
    return data.get("preset") == preset and data.get("hash") == preset_hash(preset)


# Per model_type: the transformers classes of the config, the model and the processor.
MODEL_CLASSES = {"llava": ("LlavaConfig", "LlavaForConditionalGeneration", "LlavaProcessor"),
                 "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
                 "llava_next_video": ("LlavaNextVideoConfig", "LlavaNextVideoForConditionalGeneration",
                                      "LlavaNextVideoProcessor")}


def processor_class(spec: ModelSpec) -> str:
    return MODEL_CLASSES[spec.model_type][2]


def _clip_processing(spec: ModelSpec) -> dict[str, Any]:
    """CLIP's resize, crop and normalization (llava-hf's processors) for this checkpoint's image size."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    return {
        "processor_class": processor_class(spec),
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": spec.image_size},
        "resample": int(PILImageResampling.BICUBIC),
        "do_center_crop": True,
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }


def image_processor_config(spec: ModelSpec) -> dict[str, Any]:
    """preprocessor_config.json of llava-hf/llava-1.5-7b-hf (or llava-hf/llava-v1.6-mistral-7b-hf for a
    llava_next spec: its tiling options added) with this checkpoint's image size."""
    tiling = {"image_processor_type": "LlavaNextImageProcessor", "aspect_ratio_setting": "anyres", "do_pad": True,
              "image_grid_pinpoints": [list(p) for p in spec.image_grid_pinpoints]} if spec.anyres else {}
    return {"image_processor_type": "CLIPImageProcessor", **_clip_processing(spec), **tiling}


def video_processor_config(spec: ModelSpec) -> dict[str, Any]:
    """video_preprocessor_config.json of llava-hf/LLaVA-NeXT-Video-7B-hf with this checkpoint's image size."""
    return {"video_processor_type": "LlavaNextVideoVideoProcessor", **_clip_processing(spec),
            "do_sample_frames": False}


def processor_config(spec: ModelSpec) -> dict[str, Any]:
    """processor_config.json in llava-hf's flat form (the image processor in its own file)."""
    return {
        "processor_class": processor_class(spec),
        "image_token": IMAGE_TOKEN,
        **({"video_token": VIDEO_TOKEN} if spec.videos else {}),
        "patch_size": spec.patch_size,
        # CLIP's CLS token: LlavaProcessor adds it, then drops one again for the "default" strategy.
        "num_additional_image_tokens": 1,
        "vision_feature_select_strategy": spec.vision_feature_select_strategy,
    }


def _apply_umask(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only files; give them the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _build_model(preset: dict[str, Any], directory: Path, device: str, log: Callable[[str], None]) -> None:
    import torch
    import transformers
    from transformers import GenerationConfig

    config_name, model_name, _ = MODEL_CLASSES[preset["config"].get("model_type", "llava")]
    config_class, model_class = getattr(transformers, config_name), getattr(transformers, model_name)
    config = config_class(**json.loads(json.dumps(preset["config"])))  # deep copy: the config mutates dicts
    dtype = getattr(torch, preset["config"]["dtype"])
    text = preset["config"]["text_config"]
    device = torch.device(device)
    log(f"initialising weights ({dtype}, {device}, seed {preset['seed']})")
    # fork_rng: seed for this build only, without changing the caller's random state.
    accelerators = [] if device.type == "cpu" else [
        device.index if device.index is not None else torch.get_device_module(device.type).current_device()]
    fork_options = {} if device.type == "cpu" else {"device_type": device.type}  # torch 2.11 refuses None
    with torch.random.fork_rng(devices=accelerators, **fork_options):
        torch.manual_seed(int(preset["seed"]))
        # Built directly on the device in the target dtype (no fp32 copy of a 7B model on the host).
        with device:
            model = model_class._from_config(config, dtype=dtype)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"])
    num_params = sum(p.numel() for p in model.parameters())
    log(f"saving {num_params / 1e6:.1f}M parameters")
    model.save_pretrained(directory, max_shard_size="5GB")


def build_checkpoint(preset: str, output: Path, *, force: bool = False, device: str = "cpu",
                     log: Callable[[str], None] = print) -> Path:
    """Build `preset` into `output` (a directory) and return it.

    Skipped when `output` holds a build of the same inputs (see `preset_hash`) unless `force`.
    The files are written to a temporary sibling directory and moved into place at the end, so an
    interrupted build never leaves a half-written checkpoint that looks complete.
    `device` is where the weights are initialised ("cuda" for the 7B preset); weights depend on the
    seed and on the device type (CPU and CUDA random generators differ).
    """
    output = Path(output)
    data = load_preset(preset)
    digest = preset_hash(preset)
    if not force and is_built(preset, output):
        log(f"{output}: already built from preset {preset!r} ({digest[:12]}), skipping")
        return output

    spec = ModelSpec.from_hf_config(data["config"])
    start = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        log(f"building preset {preset!r} into {output}")
        log(f"training the {data['tokenizer'].get('style', 'byte_level')} tokenizer on {CORPUS_FILE.name}")
        write_tokenizer(data, staging, processor_class(spec))
        write_json(staging / "preprocessor_config.json", image_processor_config(spec))
        write_json(staging / "processor_config.json", processor_config(spec))
        if spec.videos:
            write_json(staging / VIDEO_PROCESSOR_FILE, video_processor_config(spec))
        _build_model(data, staging, device, log)
        write_json(staging / STAMP_FILE, {"preset": preset, "hash": digest})
        _apply_umask(staging)
        if output.exists():
            if not force and is_built(preset, output):  # a concurrent build of the same inputs finished first
                log(f"{output}: built meanwhile by another process, keeping it")
                return output
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log(f"done in {time.perf_counter() - start:.1f} s: {output}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_triton.checkpoint",
        description="Build a LLaVA-1.5 or LLaVA-NeXT checkpoint with seeded random weights from a preset "
                    "(Hugging Face format: loads with transformers' classes and AutoProcessor).")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=available_presets(),
                        help=f"preset in llava_triton/presets/ (default: {DEFAULT_PRESET})")
    parser.add_argument("--output", type=Path, default=None,
                        help="output directory (default: build/<preset>-llava)")
    parser.add_argument("--device", default="cpu", help="torch device to initialise the weights on (default: cpu)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    args = parser.parse_args(argv)
    output = args.output if args.output is not None else default_output(args.preset)
    build_checkpoint(args.preset, output, force=args.force, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
