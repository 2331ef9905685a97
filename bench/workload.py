"""Workload W1: one 336x336 JPEG, a question of about 32 tokens, a fixed number of tokens out.

The picture is drawn with PIL from a formula (no file, no randomness), so every run and every
machine sends the same bytes. The question's length is counted with the checkpoint's own
tokenizer at run time and reported (33 tokens with the embedded presets' tokenizer).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
JPEG_QUALITY = 90
QUESTION = "Describe the picture in detail. Which shapes and colours do you see, and where are they in the image?"


def w1_image(size: int = IMAGE_SIZE) -> bytes:
    """A deterministic JPEG: a colour gradient with a rectangle, a disc and a diagonal line."""
    y, x = np.mgrid[0:size, 0:size]
    background = np.stack([x * 255 // (size - 1), y * 255 // (size - 1),
                           (x + y) * 255 // (2 * size - 2)], axis=-1).astype(np.uint8)  # (H, W, 3)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 8, size // 8, size // 2, size // 2), fill=(200, 40, 30))
    draw.ellipse((size // 2, size // 3, size - 12, size - 12), fill=(20, 90, 220))
    draw.line((0, size - 1, size - 1, 0), fill=(255, 255, 255), width=3)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


@dataclass(frozen=True)
class Workload:
    """One request, sent over and over: the prompt, its images and the generation settings."""

    name: str
    prompt: str
    images: tuple[bytes, ...]
    max_tokens: int
    ignore_eos: bool = True
    temperature: float = 0.0  # greedy
    question_tokens: int | None = None  # the question alone, no chat template, no image tokens
    prompt_tokens: int | None = None  # what the language model prefills: template + image tokens + question

    def describe(self) -> str:
        return (f"{self.name}: {len(self.images)} JPEG image(s) of {IMAGE_SIZE}x{IMAGE_SIZE}, a question of "
                f"{self.question_tokens} tokens ({self.prompt_tokens} prompt tokens with the image tokens and the "
                f"chat template), {self.max_tokens} tokens out (ignore_eos, greedy), streamed")


def w1(checkpoint: Path | str, max_tokens: int = 128) -> Workload:
    """W1 with its token counts from the checkpoint's tokenizer and the server's preprocessing."""
    from llava_triton.preprocess import Preprocessor
    from llava_triton.spec import ModelSpec, ServingConfig

    preprocessor = Preprocessor.from_pretrained(checkpoint, ModelSpec.from_pretrained(checkpoint), ServingConfig())
    question_tokens = len(preprocessor.tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    prompt_tokens = len(preprocessor.build_input_ids(QUESTION, 1))
    return Workload(name="W1", prompt=QUESTION, images=(w1_image(),), max_tokens=max_tokens,
                    question_tokens=question_tokens, prompt_tokens=prompt_tokens)


def w1_pixel_values(checkpoint: Path | str) -> np.ndarray:
    """The W1 image preprocessed exactly as the `preprocess` model does: FP32 (3, H, W)."""
    from llava_triton.preprocess import Preprocessor
    from llava_triton.spec import ModelSpec, ServingConfig

    preprocessor = Preprocessor.from_pretrained(checkpoint, ModelSpec.from_pretrained(checkpoint), ServingConfig())
    return preprocessor.pixel_values(preprocessor.decode_images([w1_image()]))[0]
