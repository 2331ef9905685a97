"""The checkpoint's processor (tokenizer, chat template, image processor), loaded exactly as
transformers loads it from the checkpoint.

transformers picks the tokenizer's pipeline from more than the tokenizer's own files. For a
`llava` model type in config.json it takes tokenizer.json as written; without config.json, the
`tokenizer_class: LlamaTokenizer` of llava-hf's checkpoints makes transformers 5 rebuild the
normalizer and pre-tokenizer itself, and every `<image>` loses the `▁` token after it. So export
copies every file `AutoProcessor.from_pretrained` reads, config.json included, into a
`processor/` directory (spec.PROCESSOR_DIR) of each model that tokenizes or detokenizes, and
both load it with `load_processor`, the same call as on the checkpoint. Export then checks the
served prompt ids against the checkpoint's processor (export/processor_check.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# LLaVA-NeXT-Video's video processor settings (transformers' name for the file).
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
# What AutoProcessor.from_pretrained reads for a LLaVA checkpoint (whichever of them exist).
PROCESSOR_FILES = (
    "config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", VIDEO_PROCESSOR_FILE,
)


def load_processor(directory: str | Path) -> Any:
    """`AutoProcessor.from_pretrained(directory)` with no network and no remote code, with the
    PIL image processor (transformers picks the torchvision one when torchvision is installed,
    and its resize differs slightly: the output must not depend on what else is installed)."""
    from transformers import AutoProcessor

    # transformers.AutoImageProcessor is a torchvision-only placeholder when torchvision is not
    # installed; the class in its module works and picks the backend asked for.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    directory = Path(directory)
    for name in ("config.json", "tokenizer_config.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}: not a checkpoint or an exported processor directory "
                                    "(a repository exported before the processor/ directory existed must be "
                                    "exported again)")
    if json.loads((directory / "config.json").read_text()).get("model_type") == "llava_next_video":
        return _next_video_processor(directory)
    processor = AutoProcessor.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and not type(image_processor).__name__.endswith("Pil"):
        processor.image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil", local_files_only=True)
    return processor


def _next_video_processor(directory: Path) -> Any:
    """A LLaVA-NeXT-Video checkpoint's tokenizer, chat template and image processor as a `LlavaNextProcessor`.

    transformers' LlavaNextVideoProcessor cannot be built without its video processor, which needs
    torchvision; its text and image handling (chat template, `<image>` expansion) is LlavaNextProcessor's,
    so that class, from the same files, gives the same ids. The video processor's settings are read by
    `video_processor_config`.
    """
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil", local_files_only=True)
    settings = {}
    if (directory / "processor_config.json").is_file():
        settings = json.loads((directory / "processor_config.json").read_text())
    keep = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token")
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=_chat_template(directory, tokenizer),
                              **{key: settings[key] for key in keep if key in settings})


def _chat_template(directory: Path, tokenizer: Any) -> str | None:
    """The chat template as AutoProcessor finds it: chat_template.jinja, chat_template.json, or the tokenizer's."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text())["chat_template"]
    return getattr(tokenizer, "chat_template", None)


def video_processor_config(directory: str | Path) -> dict[str, Any]:
    """The settings of a LLaVA-NeXT-Video checkpoint's video processor (VIDEO_PROCESSOR_FILE, or the
    `video_processor` entry of processor_config.json, as transformers 5 also saves it)."""
    directory = Path(directory)
    if (directory / VIDEO_PROCESSOR_FILE).is_file():
        return json.loads((directory / VIDEO_PROCESSOR_FILE).read_text())
    if (directory / "processor_config.json").is_file():
        nested = json.loads((directory / "processor_config.json").read_text()).get("video_processor")
        if isinstance(nested, dict):
            return nested
    raise FileNotFoundError(f"{directory} has no {VIDEO_PROCESSOR_FILE}: a LLaVA-NeXT-Video checkpoint needs its "
                            "video processor's settings")


def copy_processor_files(checkpoint_dir: str | Path, dest_dir: str | Path) -> list[Path]:
    """Copy what `load_processor` reads from a checkpoint into `dest_dir`; returns the copied paths."""
    source, dest = Path(checkpoint_dir), Path(dest_dir)
    present = [name for name in PROCESSOR_FILES if (source / name).is_file()]
    missing = [name for name in ("config.json", "tokenizer_config.json") if name not in present]
    if not ({"tokenizer.json", "tokenizer.model"} & set(present)):
        missing.append("tokenizer.json")
    # The image processor's settings: their own file, or nested in processor_config.json (transformers 5).
    if "preprocessor_config.json" not in present and not (
            "processor_config.json" in present
            and "image_processor" in json.loads((source / "processor_config.json").read_text())):
        missing.append("preprocessor_config.json")
    if missing:
        raise FileNotFoundError(f"{source} lacks {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(source / name, dest / name)) for name in present]
