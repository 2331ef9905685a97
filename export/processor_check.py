"""Export's check that the served prompt ids equal the checkpoint's Hugging Face processor's.

The preprocess model loads the exported copy of the processor files; this compares its
`input_ids` with what `AutoProcessor.from_pretrained(checkpoint)` gives for the same messages
(chat template, tokenizer and `<image>` expansion all transformers'), on prompts that exercise
what differs between tokenizer pipelines: `<image>` at the start, in the middle and twice, text
right after a tag, non-Latin scripts and emoji (byte fallback), accents, spaces and newlines.
A mismatch stops the export with the first differing prompt and position.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from llava_triton.anyres import tile_layout
from llava_triton.preprocess import Preprocessor, build_messages
from llava_triton.processor import load_processor
from llava_triton.spec import ModelSpec, ServingConfig

# (prompt, number of images)
PROBE_PROMPTS = (
    ("What is in this image?", 1),
    ("<image>\nDescribe it.", 1),
    ("Compare <image> with <image>: which is brighter?", 2),
    ("Look at this: <image>", 1),
    ("  leading and trailing spaces  ", 0),
    ("Line one\nline two\n\nend", 0),
    ("这张图片里有什么？ 日本語も 🙂🐱", 1),
    ("Café, naïve, Ångström, résumé.", 0),
)


class ProcessorMismatchError(RuntimeError):
    pass


def probe_image_size(spec: ModelSpec) -> tuple[int, int]:
    """(height, width) of the probes' images: a tile; for LLaVA-NeXT wider than tall, so that its tiles
    are unpadded and the newline count differs from the row count of a square grid."""
    return (spec.image_size, spec.image_size * 3 // 2) if spec.anyres else (spec.image_size, spec.image_size)


def reference_input_ids(processor, prompt: str, num_images: int, image_size: tuple[int, int]) -> np.ndarray:
    """The processor's ids: its chat template, its tokenizer and its own `<image>` expansion."""
    text = processor.apply_chat_template(build_messages(prompt, num_images), add_generation_prompt=True)
    height, width = image_size
    images = [Image.new("RGB", (width, height))] * num_images or None
    return np.asarray(processor(images=images, text=text, return_tensors="np")["input_ids"][0], dtype=np.int64)


def check_prompt_ids(checkpoint: Path, processor_dir: Path, spec: ModelSpec, serving: ServingConfig) -> int:
    """Raise ProcessorMismatchError unless every probe prompt gives the same ids both ways;
    returns the number of prompts checked."""
    # The probes check tokenization, not the request limits: an export for short contexts (max_seq_len)
    # or few image tokens must still be able to check a two-image prompt.
    unlimited = dataclasses.replace(serving, max_seq_len=0, max_prompt_tokens=0,
                                    max_image_tokens=len(PROBE_PROMPTS) * spec.max_position_embeddings)
    served = Preprocessor.from_pretrained(processor_dir, spec, unlimited)
    reference = load_processor(checkpoint)
    height, width = probe_image_size(spec)
    tokens = tile_layout(height, width, spec).num_image_tokens if spec.anyres else spec.num_image_tokens
    for prompt, num_images in PROBE_PROMPTS:
        ids = served.build_input_ids(prompt, num_images, [tokens] * num_images)
        expected = reference_input_ids(reference, prompt, num_images, (height, width))
        if not np.array_equal(ids, expected):
            at = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
            tokenizer = reference.tokenizer
            raise ProcessorMismatchError(
                f"the exported preprocessing tokenizes {prompt!r} with {num_images} image(s) to {len(ids)} ids, the "
                f"checkpoint's processor to {len(expected)}; they differ from position {at}: served "
                f"{tokenizer.convert_ids_to_tokens(ids[at: at + 4].tolist())}, processor "
                f"{tokenizer.convert_ids_to_tokens(expected[at: at + 4].tolist())}")
    return len(PROBE_PROMPTS)
