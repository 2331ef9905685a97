"""The workloads: one JPEG, a question of about 32 tokens, a fixed number of tokens out.

- W1 (LLaVA-1.5): a 336x336 JPEG, one tile of 576 image tokens.
- W2 (LLaVA-NeXT): a 1024x768 JPEG: with LLaVA-1.6's pinpoints a 2x2 grid and the base, 5 tiles and
  2,340 image tokens (576 + 36 rows of 48 and a newline each).
- W3 (the prefix and embedding caches; bench.w3): four-turn chats about one picture, each turn the whole
  history and a new question, and one-turn requests about a few pictures shared between them; W1's
  picture size for LLaVA-1.5, W2's for LLaVA-NeXT, and pictures of their own (`w3_image`).
- W4 (LLaVA-NeXT-Video; bench.w4): one 10-second 640x360 H.264 MP4 clip at 30 fps (`W4Clip`, made by
  llava_triton.testing.video_corpus.make_clip), 16 frames sampled from it, a 33-token question.

The picture is drawn with PIL from a formula (no file, no randomness), so every run and every
machine sends the same bytes. The question's length, and the prompt's, are counted with the
checkpoint's own tokenizer and the server's preprocessing at run time and reported (33 question
tokens with the embedded presets' tokenizers).
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava_triton import spec

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
    tiles_per_request: int = 1  # vision-encoder tiles the request's images (and video frames) make
    videos: tuple[bytes, ...] = ()  # encoded videos (LLaVA-NeXT-Video checkpoints only)
    num_frames: int | None = None  # frames sampled from each video; None: the server's default_num_frames
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


# --- W3: multi-turn chats and streams that share images (the prefix and embedding caches) ------------

# The questions of a W3 chat, one a turn: each about 30 tokens (32 to 36 with the embedded presets'
# tokenizers), the first one W1's.
W3_QUESTIONS = (
    QUESTION,
    "Look at the largest shape again. How big is it next to the whole picture, and what colour is it?",
    "Now compare the two shapes. Which one is closer to the middle of the image, and do they touch?",
    "Where does the white line begin and end, and which of the shapes does it cross on its way?",
)
W3_MAX_TURNS = len(W3_QUESTIONS)
W3_INDEX_BITS = 12  # the squares along a W3 picture's bottom edge: indices up to 4,094 draw different pictures


@functools.cache
def w3_image(index: int, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE) -> bytes:
    """W3's picture number `index` (0 to 4,094), a deterministic JPEG `width` x `height`: W1's gradient
    with its colour channels rolled by `index`, a rectangle and a disc placed and coloured by `index`,
    a diagonal line, and a row of squares along the bottom edge, white for the 1 bits of `index + 1`
    and black for the 0 bits. The squares make every index a different picture, and none of them W1's
    (which has no squares), so a server that has seen W1's image has seen none of these."""
    if not 0 <= index < 2**W3_INDEX_BITS - 1:
        raise ValueError(f"a W3 picture's index is in [0, {2**W3_INDEX_BITS - 1}), got {index}")
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 // (width - 1), y * 255 // (height - 1),
                         (x + y) * 255 // (width + height - 2)], axis=-1).astype(np.uint8)  # (H, W, 3)
    image = Image.fromarray(np.roll(gradient, index % 3, axis=-1), "RGB")
    draw = ImageDraw.Draw(image)
    shift = (index * 37) % 64  # percent of a quarter of the picture
    left, top = width // 16 + width * shift // 400, height // 16 + height * shift // 400
    draw.rectangle((left, top, left + width // 3, top + height // 3),
                   fill=((40 * index) % 256, 200, (90 + 70 * index) % 256))
    draw.ellipse((width // 2 - width * shift // 400, height // 3, width - 12, height - 12),
                 fill=((200 + 50 * index) % 256, (30 * index) % 256, 220))
    draw.line((0, 0, width - 1, height - 1), fill=(255, 255, 255), width=3)
    side = width // (W3_INDEX_BITS + 4)
    for bit in range(W3_INDEX_BITS):
        on = (index + 1) >> bit & 1
        x0 = (bit + 2) * side
        draw.rectangle((x0, height - side - 4, x0 + side - 3, height - 5), fill=(255, 255, 255) if on else (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


@dataclass(frozen=True)
class Conversation:
    """A W3 chat about one image: a question a turn. Each turn sends the whole history (the earlier
    questions and their answers) and its own question; the image goes in the first user turn only."""

    image: bytes
    questions: tuple[str, ...]

    @property
    def turns(self) -> int:
        return len(self.questions)

    def messages(self, answers: Sequence[str]) -> list[dict[str, Any]]:
        """The `messages` input of turn len(answers) + 1, given the answers to the turns before it."""
        if len(answers) >= self.turns:
            raise ValueError(f"{len(answers)} answers already: the conversation has {self.turns} turns")
        turns: list[dict[str, Any]] = []
        for index, question in enumerate(self.questions[:len(answers) + 1]):
            image = [{"type": spec.PART_IMAGE}] if index == 0 else []
            turns.append({"role": "user", "content": [*image, {"type": spec.PART_TEXT, "text": question}]})
            if index < len(answers):
                turns.append({"role": "assistant", "content": [{"type": spec.PART_TEXT, "text": answers[index]}]})
        return turns


def w3_chats(count: int, turns: int, image_size: tuple[int, int], first_image: int = 0) -> list[Conversation]:
    """`count` chats of `turns` turns (W3_QUESTIONS in order), chat j about W3 picture first_image + j."""
    if not 1 <= turns <= W3_MAX_TURNS:
        raise ValueError(f"a W3 chat has 1 to {W3_MAX_TURNS} turns, got {turns}")
    return [Conversation(w3_image(first_image + chat, *image_size), W3_QUESTIONS[:turns]) for chat in range(count)]


def w3_streams(count: int, images: int, image_size: tuple[int, int], first_image: int = 0) -> list[Conversation]:
    """`count` one-turn requests about `images` W3 pictures (first_image, first_image + 1, ...): request i
    asks about picture i mod `images` the question (i div `images`) mod 4 of W3_QUESTIONS, with its own
    number at the end, so that no two ask the same and those about one picture share the longest prefix."""
    if count < 1 or images < 1:
        raise ValueError(f"count and images must be positive, got {count}, {images}")
    return [Conversation(w3_image(first_image + stream % images, *image_size),
                         (f"{W3_QUESTIONS[stream // images % W3_MAX_TURNS]} (Request {stream + 1}.)",))
            for stream in range(count)]


@dataclass(frozen=True)
class W3Workload:
    """W3's sizes for one checkpoint: its pictures' size and tiles, its questions' tokens and the
    first turn's prompt tokens (every chat's first turn has the same)."""

    name: str
    image_size: tuple[int, int]  # width, height
    tiles_per_image: int
    question_tokens: tuple[int, ...]  # each of W3_QUESTIONS alone, no chat template
    first_turn_prompt_tokens: int  # template + image tokens + the first question
    max_tokens: int
    ignore_eos: bool = True
    temperature: float = 0.0  # greedy

    def describe(self) -> str:
        width, height = self.image_size
        return (f"{self.name}: chats about one {width}x{height} JPEG ({self.tiles_per_image} tile(s) of the vision "
                f"encoder), each turn the whole history and a new question of {min(self.question_tokens)} to "
                f"{max(self.question_tokens)} tokens ({self.first_turn_prompt_tokens} prompt tokens in the first "
                f"turn), {self.max_tokens} tokens out a turn (ignore_eos, greedy), streamed")


def w3(checkpoint: Path | str, max_tokens: int = 128) -> W3Workload:
    """W3 for `checkpoint`: W1's picture size for LLaVA-1.5, W2's (1024x768) for LLaVA-NeXT, with the
    token and tile counts from the checkpoint's tokenizer and the server's preprocessing."""
    preprocessor = _w3_preprocessor(str(checkpoint))
    image_size = W2_IMAGE_SIZE if preprocessor.spec.anyres else (IMAGE_SIZE, IMAGE_SIZE)
    question_tokens = tuple(len(preprocessor.tokenizer(question, add_special_tokens=False)["input_ids"])
                            for question in W3_QUESTIONS)
    chat = w3_chats(1, 1, image_size)[0]
    input_ids, pixel_values, _ = preprocessor([chat.image], None, messages=_json(chat.messages([])))
    return W3Workload(name="W3 (LLaVA-NeXT)" if preprocessor.spec.anyres else "W3 (LLaVA-1.5)", image_size=image_size,
                      tiles_per_image=len(pixel_values), question_tokens=question_tokens,
                      first_turn_prompt_tokens=len(input_ids), max_tokens=max_tokens)


def prompt_tokens(checkpoint: Path | str, conversation: Conversation, answers: Sequence[str]) -> int:
    """What the server should count as the prompt of `conversation`'s turn after `answers`: its messages
    rendered, tokenized and with the image tokens, by the server's preprocessing."""
    input_ids, _, _ = _w3_preprocessor(str(checkpoint))([conversation.image], None,
                                                         messages=_json(conversation.messages(answers)))
    return len(input_ids)


def _json(messages: list[dict[str, Any]]) -> str:
    return json.dumps(messages, ensure_ascii=False)  # as llava_triton.client sends them


@functools.cache
def _w3_preprocessor(checkpoint: str):
    return _preprocessor(checkpoint)  # loaded once: W3 counts the prompt of every turn it sent


# --- W4: a video (LLaVA-NeXT-Video; bench.w4) ------------------------------------------------------------

# 33 tokens with the llava-next-video-7b preset's tokenizer (36 with tiny-next-video's): counted at run time.
W4_QUESTION = "Describe the video in detail. Which shapes and colours do you see, and where do they move?"
W4_NUM_FRAMES = 16
CODEC_NAMES = {"libx264": "H.264", "libx265": "HEVC", "libvpx": "VP8", "libvpx-vp9": "VP9", "libaom-av1": "AV1",
               "mpeg4": "MPEG-4"}


@dataclass(frozen=True)
class W4Clip:
    """W4's clip, made in code by llava_triton.testing.video_corpus.make_clip (drifting gradients and two
    moving blocks, encoded with one thread), so every run and every machine sends the same bytes."""

    width: int = 640
    height: int = 360
    fps: float = 30.0
    seconds: float = 10.0
    codec: str = "libx264"
    container: str = "mp4"

    def __post_init__(self) -> None:
        if self.width < 2 or self.height < 2 or self.width % 2 or self.height % 2:
            raise ValueError(f"a clip's width and height must be even and at least 2 (4:2:0), got "
                             f"{self.width}x{self.height}")
        if not (self.fps > 0 and self.seconds > 0):
            raise ValueError(f"a clip's fps and seconds must be positive, got {self.fps} and {self.seconds}")

    @property
    def frames(self) -> int:
        return max(1, round(self.fps * self.seconds))

    def encode(self) -> bytes:
        from llava_triton.testing.video_corpus import make_clip

        return make_clip(frames=self.frames, fps=self.fps, width=self.width, height=self.height, codec=self.codec,
                         container=self.container)

    def describe(self) -> str:
        return (f"a {self.seconds:g}-second {self.width}x{self.height} {CODEC_NAMES.get(self.codec, self.codec)} "
                f"{self.container.upper()} clip at {self.fps:g} fps ({self.frames} frames)")


@dataclass(frozen=True)
class W4Workload(Workload):
    """W4 for one checkpoint: a Workload whose request is a question about one video (no image)."""

    clip: W4Clip = field(default_factory=W4Clip)
    frame_tokens: int = 0  # language-model tokens of one sampled frame (pooled): 144 for LLaVA-NeXT-Video-7B

    @property
    def frames_sampled(self) -> int:
        return self.tiles_per_request

    def describe(self) -> str:
        return (f"{self.name}: {self.clip.describe()}, {len(self.videos[0]):,} bytes; {self.frames_sampled} frames "
                f"sampled (each a tile of the vision encoder, pooled to {self.frame_tokens} tokens: "
                f"{self.frames_sampled * self.frame_tokens} video tokens), a question of {self.question_tokens} "
                f"tokens ({self.prompt_tokens} prompt tokens with the video tokens and the chat template), "
                f"{self.max_tokens} tokens out (ignore_eos, greedy), streamed"
                + (", each request new to the server's caches (its own cache_salt)" if self.fresh else ""))


def w4(checkpoint: Path | str, max_tokens: int = 128, num_frames: int = W4_NUM_FRAMES, clip: W4Clip | None = None,
       video: bytes | None = None) -> W4Workload:
    """W4 for a LLaVA-NeXT-Video `checkpoint`: `clip` encoded (or `video`, its bytes already made), with the
    frame and token counts from the checkpoint's tokenizer and the server's preprocessing (which decodes it)."""
    clip = clip or W4Clip()
    preprocessor = _preprocessor(checkpoint)
    if not preprocessor.spec.videos:
        raise ValueError(f"W4 needs a LLaVA-NeXT-Video checkpoint; {checkpoint} is {preprocessor.spec.model_type}")
    video = clip.encode() if video is None else video
    question_tokens = len(preprocessor.tokenizer(W4_QUESTION, add_special_tokens=False)["input_ids"])
    prepared = preprocessor.prepare([], W4_QUESTION, videos=[video], num_frames=num_frames)
    return W4Workload(name="W4 (LLaVA-NeXT-Video)", prompt=W4_QUESTION, images=(), videos=(video,),
                      num_frames=num_frames, max_tokens=max_tokens, question_tokens=question_tokens,
                      prompt_tokens=len(prepared.input_ids), image_size=(clip.width, clip.height),
                      tiles_per_request=int(prepared.video_frames.sum()), clip=clip,
                      frame_tokens=preprocessor.spec.num_frame_tokens)
