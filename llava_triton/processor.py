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

# What AutoProcessor.from_pretrained reads for a LLaVA checkpoint (whichever of them exist).
PROCESSOR_FILES = (
    "config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json",
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
    processor = AutoProcessor.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and not type(image_processor).__name__.endswith("Pil"):
        processor.image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil", local_files_only=True)
    return processor


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
