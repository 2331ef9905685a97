"""Hugging Face reference results for a checkpoint, and test inputs (a helper module, not tests).

The reference path is transformers' own: the checkpoint's processor (`LlavaProcessor` or
`LlavaNextProcessor`) `apply_chat_template` and `processor(images=..., text=...)` with the images given
as base64 strings (decoded by `transformers.image_utils.load_image`), and
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration.generate` in float32 on CPU. Our
serving path must reproduce it.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from llava_triton.checkpoint import build_checkpoint
from llava_triton.spec import IMAGE_TOKEN, VIDEO_TOKEN

# The checkout this file is in (llava_triton/testing/reference.py): presets are built into its build/.
REPO_ROOT = Path(__file__).resolve().parents[2]
# The tiny model with each tokenizer style real checkpoints ship (llava_triton.preset_tokenizers):
# byte-level BPE (the embedded default) and Llama/SentencePiece with byte fallback.
TOKENIZER_PRESETS = ("tiny", "tiny-sentencepiece")
# LLaVA-NeXT (anyres tiles) with each decoder family: Llama (byte-level BPE, LLaVA-1.5's chat format) and
# Mistral (grouped-query attention, rope_theta 1e6; SentencePiece tokenizer, Mistral's chat format).
NEXT_PRESETS = ("tiny-next", "tiny-next-mistral")
# LLaVA-NeXT-Video (images as tiny-next's, and videos).
VIDEO_PRESET = "tiny-next-video"


def preset_checkpoint(preset: str) -> Path:
    """The preset built into build/<preset>-llava (rebuilt only when its stamp is stale)."""
    return build_checkpoint(preset, REPO_ROOT / "build" / f"{preset}-llava", log=lambda message: None)


def tiny_checkpoint() -> Path:
    return preset_checkpoint("tiny")


def _model_type(checkpoint: Path) -> str:
    return json.loads((Path(checkpoint) / "config.json").read_text())["model_type"]


@functools.cache
def hf_processor(checkpoint: Path):
    from transformers import LlavaNextProcessor, LlavaProcessor

    # LLaVA-NeXT-Video's processor is LlavaNextProcessor's for text and images, and cannot be built without
    # its video processor (torchvision): `hf_video_inputs` expands `<video>` as LlavaNextVideoProcessor does.
    processor_class = LlavaNextProcessor if _model_type(checkpoint) in ("llava_next", "llava_next_video") \
        else LlavaProcessor
    processor = processor_class.from_pretrained(checkpoint)
    # With torchvision installed transformers would pick its torchvision image processor, whose
    # resize differs slightly from PIL's; the serving path always uses the PIL one.
    if not type(processor.image_processor).__name__.endswith("Pil"):
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        processor.image_processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    return processor


@functools.cache
def hf_model(checkpoint: Path):
    import torch
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaNextVideoForConditionalGeneration,
    )

    model_class = {"llava_next": LlavaNextForConditionalGeneration,
                   "llava_next_video": LlavaNextVideoForConditionalGeneration}.get(_model_type(checkpoint),
                                                                                   LlavaForConditionalGeneration)
    model = model_class.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def hf_messages(prompt: str, num_images: int) -> list[dict]:
    """The user message for `prompt`: images first when it has no `<image>` tag, else at the tags;
    text stripped around the tags (the convention `llava_triton.preprocess` documents)."""
    if IMAGE_TOKEN not in prompt:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt.strip()}]
    else:
        content = []
        for piece in re.split(f"({re.escape(IMAGE_TOKEN)})", prompt):
            if piece == IMAGE_TOKEN:
                content.append({"type": "image"})
            elif piece.strip():
                content.append({"type": "text", "text": piece.strip()})
    return [{"role": "user", "content": content}]


def hf_processor_outputs(checkpoint: Path, images: list[bytes], prompt: str | None, *,
                         messages: list[dict] | None = None):
    """The processor's BatchFeature (numpy) for the prompt (or a whole conversation, `messages`, as the
    processor's chat template takes them) and images, as a user of transformers makes it."""
    processor = hf_processor(Path(checkpoint))
    conversation = hf_messages(prompt, len(images)) if messages is None else messages
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    encoded_images = [base64.b64encode(data).decode("ascii") for data in images] or None
    return processor(images=encoded_images, text=text, return_tensors="np")


def hf_inputs(checkpoint: Path, images: list[bytes], prompt: str | None, *,
              messages: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(input_ids int64 [seq_len], pixel_values float32 [tiles, 3, H, W] or None without images) of a prompt
    or a conversation. For LLaVA-NeXT the tiles are each image's, without the padding the processor adds
    to batch them."""
    inputs = hf_processor_outputs(checkpoint, images, prompt, messages=messages)
    pixel_values = None
    if images:
        pixel_values = inputs["pixel_values"].astype(np.float32)
        if "image_sizes" in inputs:  # (N, most tiles, 3, H, W) -> each image's own tiles
            from llava_triton.anyres import tile_layout
            from llava_triton.spec import ModelSpec

            spec = ModelSpec.from_pretrained(checkpoint)
            counts = [tile_layout(int(h), int(w), spec).num_tiles for h, w in inputs["image_sizes"]]
            pixel_values = np.concatenate([tiles[:count] for tiles, count in zip(pixel_values, counts)])
    return inputs["input_ids"][0].astype(np.int64), pixel_values


def hf_generate(checkpoint: Path, images: list[bytes], prompt: str | None, max_new_tokens: int, *,
                messages: list[dict] | None = None) -> list[int]:
    """The new token ids of greedy `generate` (float32, CPU) for a prompt or a conversation (`messages`);
    it may stop early at EOS."""
    import torch

    checkpoint = Path(checkpoint)
    inputs = hf_processor_outputs(checkpoint, images, prompt, messages=messages)
    input_ids = inputs["input_ids"][0].astype(np.int64)
    model = hf_model(checkpoint)
    kwargs = {}
    if images:
        kwargs["pixel_values"] = torch.from_numpy(inputs["pixel_values"].astype(np.float32))
        if "image_sizes" in inputs:
            kwargs["image_sizes"] = torch.from_numpy(np.asarray(inputs["image_sizes"], dtype=np.int64))
    input_tensor = torch.from_numpy(input_ids)[None]
    with torch.no_grad():
        output = model.generate(input_ids=input_tensor, attention_mask=torch.ones_like(input_tensor),
                                max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return output[0, input_tensor.shape[1]:].tolist()


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _scene(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic picture: a gradient background with a few shapes."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                           np.full_like(x, (seed * 70) % 256)], axis=-1).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 8, width // 2, height // 2), fill=(200, 30 + seed * 40, 30))
    draw.ellipse((width // 2, height // 3, width - 10, height - 10), fill=(20, 90, 220 - seed * 30))
    draw.line((0, height - 1, width - 1, 0), fill=(255, 255, 255), width=3)
    return image


def varied_image(seed: int) -> bytes:
    """A JPEG of a seeded random size (64 to 399 px a side) and blocky random colours."""
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(64, 400)), int(rng.integers(64, 400)))
    pixels = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize(size, Image.NEAREST).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def make_test_images() -> dict[str, bytes]:
    """Small, different, deterministic encoded images: JPEG (landscape), PNG (portrait, RGBA),
    WebP (square, lossless)."""
    png = _scene(200, 360, 1).convert("RGBA")
    png.putalpha(Image.linear_gradient("L").resize(png.size))
    return {
        "jpeg": _encode(_scene(320, 240, 0), "JPEG", quality=90),
        "png": _encode(png, "PNG"),
        "webp": _encode(_scene(256, 256, 2), "WEBP", lossless=True),
    }


def make_mode_images() -> dict[str, bytes]:
    """Images in the colour modes and orientations a client may send, all to become RGB."""
    scene = _scene(180, 120, 3)
    rotated = _scene(160, 96, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise for display
    transparent_palette = scene.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette.info["transparency"] = 0
    translucent = scene.convert("RGBA")
    translucent.putalpha(Image.linear_gradient("L").resize(scene.size))
    return {
        "palette_png": _encode(scene.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
        "palette_transparency_png": _encode(transparent_palette, "PNG"),
        "gray_alpha_png": _encode(scene.convert("LA"), "PNG"),
        "gray_jpeg": _encode(scene.convert("L"), "JPEG", quality=90),
        "cmyk_jpeg": _encode(scene.convert("CMYK"), "JPEG", quality=90),
        "exif_rotated_jpeg": _encode(rotated, "JPEG", quality=90, exif=exif.tobytes()),
        "rgba_webp": _encode(translucent, "WEBP", quality=80),
    }


# Prompts whose tokenization differs between tokenizer pipelines: (prompt, number of images).
TOKENIZER_PROMPTS = {
    "cjk": ("这张图片里有什么？请用中文回答。", 1),
    "emoji": ("Is there a 🐱 or a 🐶 here? 🙂👍🏽", 1),
    "accents": ("Décris l'image : où est le garçon ? Ångström, naïve, Straße", 1),
    "leading and trailing spaces": ("   What   is  this?   ", 1),
    "newlines": ("First line\nsecond line\n\n  third\tline\n", 1),
    "tag at the start": ("<image>\nWhat is shown?", 1),
    "tag in the middle": ("Look at this picture <image> and tell me its colours.", 1),
    "two tags": ("<image> versus <image>: which one is darker?", 2),
    "text only": ("Tell me a story about 海 and the sea 🌊.", 0),
    "text only, other scripts": (" Привет, мир! ¿Qué tal? مرحبا ", 0),
}


def _images_for_prompts() -> list[bytes]:
    images = make_test_images()
    return [images["jpeg"], images["png"]]


IMAGES_FOR_PROMPTS = _images_for_prompts()


# --- videos (LLaVA-NeXT-Video) ---------------------------------------------------------------------------

def hf_video_frames(video: bytes, num_frames: int | None = None, fps: float | None = None,
                    total_frames: int | None = None) -> np.ndarray:
    """(frames, H, W, 3) uint8: the frames transformers samples from the file, decoded by its PyAV reader
    (`video_utils.read_video_pyav`) at the indices of its video processor's sampler
    (`BaseVideoProcessor.sample_frames`). `total_frames`: the count to sample from where the container's
    header has none (WebM, Matroska), where transformers would see 0."""
    import tempfile
    from types import SimpleNamespace

    from transformers.video_processing_utils import BaseVideoProcessor
    from transformers.video_utils import read_video_pyav

    def sample_indices_fn(metadata, **kwargs):
        if total_frames is not None:
            metadata.total_num_frames = total_frames
        # The processor's own method; its instance needs torchvision, the method only its defaults.
        return BaseVideoProcessor.sample_frames(SimpleNamespace(num_frames=None, fps=None), metadata,
                                                num_frames=num_frames, fps=fps).numpy()

    with tempfile.NamedTemporaryFile(suffix=".video") as file:
        file.write(video)
        file.flush()
        frames, _ = read_video_pyav(file.name, sample_indices_fn)
    return frames


def video_pixel_values(checkpoint: Path, frames: np.ndarray) -> np.ndarray:
    """(frames, 3, S, S) float32 of the sampled frames: transformers' LlavaNextVideoVideoProcessor where
    torchvision is installed; without it (it has no CPU build on PyPI) llava_triton.video's transform and
    table, which tests/test_video.py checks equal to that processor's wherever torchvision is installed."""
    from llava_triton.processor import video_processor_config

    config = video_processor_config(checkpoint)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        from llava_triton.video import FrameTransform, video_pixel_table

        transform = FrameTransform(config)
        table = video_pixel_table(config, 3)
        pixels = np.stack([transform(frame) for frame in frames])
        return np.stack([table[channel][pixels[:, channel]] for channel in range(3)], axis=1)
    from transformers import LlavaNextVideoVideoProcessor

    processor = LlavaNextVideoVideoProcessor.from_pretrained(checkpoint)
    return processor(videos=[frames], do_sample_frames=False, return_tensors="np")["pixel_values_videos"][0]


def hf_video_inputs(checkpoint: Path, images: list[bytes], frames: np.ndarray | None, prompt: str | None, *,
                    messages: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(input_ids, pixel_values_videos (frames, 3, S, S) or None, the image inputs for generate) of a prompt
    (its images first, then the video, without tags) or a conversation, with one video's sampled frames.
    `<video>` is expanded in the text as LlavaNextVideoProcessor does (a frame's (S / patch)^2 / 4
    tokens, its pooling's), then the images and tokens are LlavaNextProcessor's."""
    import torch

    processor = hf_processor(Path(checkpoint))
    if messages is None:
        content = [{"type": "image"}] * len(images) + ([{"type": "video"}] if frames is not None else [])
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt.strip()}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    pixel_values_videos = None
    if frames is not None:
        pixel_values_videos = video_pixel_values(checkpoint, frames)
        height, width = pixel_values_videos.shape[-2:]
        patch = processor.patch_size
        tokens = (height // patch) * (width // patch) // 4 * len(frames)
        text = text.replace(VIDEO_TOKEN, VIDEO_TOKEN * tokens)
    encoded_images = [base64.b64encode(data).decode("ascii") for data in images] or None
    inputs = processor(images=encoded_images, text=text, return_tensors="np")
    image_kwargs = {}
    if images:
        image_kwargs = {"pixel_values": torch.from_numpy(inputs["pixel_values"].astype(np.float32)),
                        "image_sizes": torch.from_numpy(np.asarray(inputs["image_sizes"], dtype=np.int64))}
    return inputs["input_ids"][0].astype(np.int64), pixel_values_videos, image_kwargs


def hf_video_generate(checkpoint: Path, images: list[bytes], frames: np.ndarray | None, prompt: str | None,
                      max_new_tokens: int, *, messages: list[dict] | None = None) -> list[int]:
    """The new token ids of LlavaNextVideoForConditionalGeneration's greedy `generate` (float32, CPU)."""
    import torch

    input_ids, pixel_values_videos, kwargs = hf_video_inputs(checkpoint, images, frames, prompt, messages=messages)
    if pixel_values_videos is not None:
        kwargs["pixel_values_videos"] = torch.from_numpy(pixel_values_videos.astype(np.float32))[None]
    model = hf_model(Path(checkpoint))
    input_tensor = torch.from_numpy(input_ids)[None]
    with torch.no_grad():
        output = model.generate(input_ids=input_tensor, attention_mask=torch.ones_like(input_tensor),
                                max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return output[0, input_tensor.shape[1]:].tolist()
