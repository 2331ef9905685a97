"""The workloads: one JPEG, a question of about 32 tokens, a fixed number of tokens out.

- W1 (LLaVA-1.5): a 336x336 JPEG, one tile of 576 image tokens.
- W2 (LLaVA-NeXT): a 1024x768 JPEG: with LLaVA-1.6's pinpoints a 2x2 grid and the base, 5 tiles and
  2,340 image tokens (576 + 36 rows of 48 and a newline each).

The picture is drawn with PIL from a formula (no file, no randomness), so every run and every
machine sends the same bytes. The question's length, and the prompt's, are counted with the
checkpoint's own tokenizer and the server's preprocessing at run time and reported (33 question
tokens with the embedded presets' tokenizers).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
W2_IMAGE_SIZE = (1024, 768)  # width, height
JPEG_QUALITY = 90
QUESTION = "Describe the picture in detail. Which shapes and colours do you see, and where are they in the image?"


def w1_image(size: int = IMAGE_SIZE, height: int | None = None) -> bytes:
    """A deterministic JPEG, `size` wide and `height` (default: `size`) high: a colour gradient with a
    rectangle, a disc and a diagonal line."""
    width, height = size, height or size
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // (width - 1), y * 255 // (height - 1),
                           (x + y) * 255 // (width + height - 2)], axis=-1).astype(np.uint8)  # (H, W, 3)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 8, width // 2, height // 2), fill=(200, 40, 30))
    draw.ellipse((width // 2, height // 3, width - 12, height - 12), fill=(20, 90, 220))
    draw.line((0, height - 1, width - 1, 0), fill=(255, 255, 255), width=3)
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
    image_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)  # width, height
    tiles_per_request: int = 1  # vision-encoder tiles the request's images make
    # Each request carries a cache_salt of its own, so the server's caches (KV-cache prefixes, image
    # embeddings) find nothing and every request is new to them, as W1 and W2 are defined: the same
    # bytes sent over and over would otherwise measure cache hits.
    fresh: bool = True

    def describe(self) -> str:
        width, height = self.image_size
        return (f"{self.name}: {len(self.images)} JPEG image(s) of {width}x{height} ({self.tiles_per_request} "
                f"tile(s) of the vision encoder), a question of {self.question_tokens} tokens ({self.prompt_tokens} "
                f"prompt tokens with the image tokens and the chat template), {self.max_tokens} tokens out "
                "(ignore_eos, greedy), streamed" + (", each request new to the server's caches (its own cache_salt)"
                                                     if self.fresh else ""))


WORKLOADS = ("W1", "W2")


def workload(name: str, checkpoint: Path | str, max_tokens: int = 128) -> Workload:
    """W1 or W2 with its token and tile counts from the checkpoint's tokenizer and the server's preprocessing."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")
    width, height = (IMAGE_SIZE, IMAGE_SIZE) if name == "W1" else W2_IMAGE_SIZE
    image = w1_image(width, height)
    preprocessor = _preprocessor(checkpoint)
    question_tokens = len(preprocessor.tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    input_ids, pixel_values, _ = preprocessor([image], QUESTION)
    return Workload(name=name, prompt=QUESTION, images=(image,), max_tokens=max_tokens,
                    question_tokens=question_tokens, prompt_tokens=len(input_ids), image_size=(width, height),
                    tiles_per_request=len(pixel_values))


def w1(checkpoint: Path | str, max_tokens: int = 128) -> Workload:
    return workload("W1", checkpoint, max_tokens)


def _preprocessor(checkpoint: Path | str):
    from llava_triton.preprocess import Preprocessor
    from llava_triton.spec import ModelSpec, ServingConfig

    return Preprocessor.from_pretrained(checkpoint, ModelSpec.from_pretrained(checkpoint), ServingConfig())


def w1_pixel_values(checkpoint: Path | str, image: bytes | None = None) -> np.ndarray:
    """The first tile of `image` (default: W1's) preprocessed exactly as the `preprocess` model does: FP32
    (3, H, W). The vision encoder's speed is the same for any tile."""
    preprocessor = _preprocessor(checkpoint)
    return preprocessor.pixel_values(preprocessor.decode_images([image or w1_image()]))[0]
