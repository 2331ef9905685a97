"""Request preprocessing: encoded images and a prompt (or messages) in, `input_ids` and `pixel_values`
(and, for LLaVA-NeXT, `image_sizes`) out.

Plain code (no Triton): the `preprocess` model's `model.py` holds one `Preprocessor` and calls it
per request. Its output equals what transformers' `LlavaProcessor` / `LlavaNextProcessor` gives for
the same messages (`tests/test_preprocess.py` checks that), except that `<image>` is expanded after
tokenization and a LLaVA-NeXT request's tiles are sent one after another, not padded per image.

A request's text is one conversation rendered by the checkpoint's chat template, in one place
(`chat_messages`): either a `prompt`, the single user turn `build_messages` makes of it, or the
`messages` input, a JSON array of turns that `parse_messages` checks (the OpenAI frontend sends it).

Images are decoded like transformers' `load_image`: EXIF orientation applied, then converted to
RGB (alpha dropped, as LLaVA's own training code does). One deliberate difference: 16-bit
grayscale PNGs are scaled to 8 bits, where PIL's conversion would clip them to white.

With the language model's caches (`ImageCacheClient`), each image gets a content key before it is
decoded, and an image the language model's embedding cache holds is not decoded at all: the request
carries its key and size, not its tiles (`Preprocessor.prepare`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from llava_triton.anyres import TileLayout, tile_layout
from llava_triton.embedding_cache import CLOSED, Directory, image_key
from llava_triton.errors import InvalidRequestError
from llava_triton.processor import load_processor, video_processor_config
from llava_triton.sampling import scalar_input
from llava_triton.spec import (
    IMAGE_KEY_BYTES,
    IMAGE_TOKEN,
    IN_FPS,
    IN_MESSAGES,
    IN_NUM_FRAMES,
    IN_PROMPT,
    PART_IMAGE,
    PART_TEXT,
    PART_VIDEO,
    REQUEST_INPUTS,
    ROLES,
    SAMPLING_INPUTS,
    VIDEO_TOKEN,
    ModelSpec,
    ServingConfig,
    one_of,
    wire_dtype,
)
from llava_triton.video import (
    FrameTransform,
    VideoInfo,
    check_sampling,
    decode_frames,
    probe_video,
    sample_frame_indices,
    video_pixel_table,
)

# Formats we decode, as PIL names them (recognised by their leading bytes), with their usual names.
SUPPORTED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
# Other formats, recognised only to name them in the error message (never handed to PIL).
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)
_ISO_MEDIA_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF",
                     b"msf1": "HEIF"}
# What PIL raises on a broken file (its decoders report truncation and corruption as OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def _sniff_format(data: bytes) -> str | None:
    """PIL's name of a supported format from the leading bytes, None if it is none of them."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(data: bytes) -> str | None:
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[4:8] == b"ftyp":
        return _ISO_MEDIA_BRANDS.get(data[8:12])
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips values above 255 (a white image); scale instead.
        gray = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, serving: ServingConfig, index: int = 0, *,
                 shortest_edge: int | None = None) -> Image.Image:
    """Decode one encoded JPEG/PNG/WebP image into an RGB PIL image, or refuse it.

    Cheap checks come first: size in bytes, format from the leading bytes, and width * height
    from the header, before any pixel is decoded (a decompression bomb costs a header read).
    With `shortest_edge` (the image processor's resize target) the resized image is held to the
    same pixel limit: CLIP's resize scales the short side up or down to it, so a 1x100000 strip,
    cheap to send, would become 336x33600000 pixels.
    Then the whole image is decoded, so truncated or corrupt data is refused here rather than
    half-decoded. Only the first frame of an animated PNG/WebP is used.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process switched PIL to padding truncated images with gray; refuse to
        # serve rather than silently accept broken images.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; image decoding requires False")
    data = bytes(data)
    if not data:
        raise InvalidRequestError(f"image {index}: empty (0 bytes)")
    if len(data) > serving.max_image_bytes:
        raise InvalidRequestError(
            f"image {index}: {len(data)} bytes is more than the limit of {serving.max_image_bytes} bytes "
            "(max_image_bytes)")
    image_format = _sniff_format(data)
    if image_format is None:
        other = _other_format(data)
        if other is not None:
            raise InvalidRequestError(f"image {index}: unsupported format {other}; send JPEG, PNG or WebP")
        raise InvalidRequestError(f"image {index}: not an image (unrecognised data; send JPEG, PNG or WebP)")

    corrupt = f"image {index}: corrupt or truncated {SUPPORTED_FORMATS[image_format]} data"
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except Image.DecompressionBombError as err:  # PIL's own limit, far above ours: only huge headers
        claimed = re.search(r"\((\d+) pixels\)", str(err))  # PIL refuses before it returns the image
        raise InvalidRequestError(
            f"image {index}: more than the limit of {serving.max_image_pixels} pixels (max_image_pixels): its header "
            f"says {claimed.group(1) if claimed else 'more than PIL.Image.MAX_IMAGE_PIXELS'} pixels") from None
    except UnidentifiedImageError:  # its message names a Python object, not the problem
        raise InvalidRequestError(f"{corrupt} (unreadable header)") from None
    except _DECODE_ERRORS as err:
        raise InvalidRequestError(f"{corrupt} ({err})") from None
    width, height = image.size
    if width * height > serving.max_image_pixels:
        image.close()
        raise InvalidRequestError(
            f"image {index}: {width}x{height} = {width * height} pixels is more than the limit of "
            f"{serving.max_image_pixels} pixels (max_image_pixels)")
    if shortest_edge is not None:
        scale = shortest_edge / min(width, height)
        resized = round(width * scale) * round(height * scale)
        if resized > serving.max_image_pixels:
            image.close()
            raise InvalidRequestError(
                f"image {index}: {width}x{height} is too elongated: with its short side resized to {shortest_edge} "
                f"it has {resized} pixels, more than the limit of {serving.max_image_pixels} pixels (max_image_pixels)")
    try:
        image.load()  # the full decode: raises on truncated data since LOAD_TRUNCATED_IMAGES is False
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except _DECODE_ERRORS as err:
        raise InvalidRequestError(f"{corrupt} ({err})") from None


def decode_prompt(prompt: str | bytes, serving: ServingConfig) -> str:
    """The prompt as text: UTF-8, not blank, at most `serving.max_prompt_bytes`."""
    if isinstance(prompt, str):
        try:
            data = prompt.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate
            raise InvalidRequestError(f"prompt is not valid UTF-8 (character {err.start}: {err.reason})") from None
    else:
        data = bytes(prompt)
    if len(data) > serving.max_prompt_bytes:
        raise InvalidRequestError(
            f"prompt is {len(data)} bytes, more than the limit of {serving.max_prompt_bytes} bytes (max_prompt_bytes)")
    try:
        prompt = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRequestError(f"prompt is not valid UTF-8 (byte {err.start}: {err.reason})") from None
    if not prompt.strip():
        raise InvalidRequestError("prompt is empty")
    return prompt


def _one_string(name: str, value: np.ndarray) -> bytes:
    items = np.asarray(value, dtype=object).reshape(-1)
    if items.size != 1:
        raise InvalidRequestError(f"{name} must hold exactly one string, got {items.size}")
    item = items[0]
    return item if isinstance(item, bytes) else str(item).encode("utf-8", errors="surrogatepass")


def request_prompt(value: np.ndarray | None) -> bytes:
    """The one prompt of a request's `prompt` tensor (None when the client left the input out)."""
    if value is None:
        raise InvalidRequestError("the prompt input is required (BYTES [1], the user message)")
    return _one_string(IN_PROMPT, value)


def request_text(prompt: np.ndarray | None, messages: np.ndarray | None) -> tuple[bytes | None, bytes | None]:
    """(prompt, messages) of a request's tensors: exactly one of the two inputs is sent."""
    if prompt is not None and messages is not None:
        raise InvalidRequestError(f"send either {IN_PROMPT} or {IN_MESSAGES}, not both")
    if messages is None:
        if prompt is None:
            raise InvalidRequestError(f"the {IN_PROMPT} input is required (BYTES [1], the user message), or "
                                      f"{IN_MESSAGES} (BYTES [1], the conversation as JSON) instead")
        return _one_string(IN_PROMPT, prompt), None
    return None, _one_string(IN_MESSAGES, messages)


def video_sampling(inputs: dict[str, np.ndarray | None]) -> tuple[int | None, float]:
    """The request's num_frames (None: the server's default_num_frames) and fps (0: num_frames decides),
    each one value of its type; their ranges are checked with the videos (video.check_sampling)."""
    num_frames = scalar_input(inputs, IN_NUM_FRAMES, np.integer)
    fps = scalar_input(inputs, IN_FPS, np.floating, 0.0)
    return None if num_frames is None else int(num_frames), float(fps)


def check_request_parameters(parameters: str | dict[str, Any] | None) -> None:
    """Refuse request parameters (the JSON `request.parameters()` gives): every option of this
    server is an input tensor, so a parameter (say `temperature`, sent the way other servers
    take it) would otherwise be ignored without a word."""
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters) if parameters.strip() else {}
        except json.JSONDecodeError:
            raise InvalidRequestError("request parameters are not valid JSON") from None
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequestError(f"request parameters must be a JSON object, got {type(parameters).__name__}")
    if parameters:
        names = ", ".join(repr(name) for name in sorted(parameters))
        inputs = ", ".join((*REQUEST_INPUTS, *SAMPLING_INPUTS))
        raise InvalidRequestError(f"unknown request parameters {names}: every option is an input tensor ({inputs})")


def build_messages(text: str, num_images: int, num_videos: int = 0) -> list[dict[str, Any]]:
    """One user message whose content items follow the prompt's `<image>` (and `<video>`) tags.

    Without tags the images go first, as llava-hf's chat template places them ("<image>\\n" per
    image, then the text), and the videos after them. Text pieces are stripped of the whitespace
    around tags, so "<image>\\nWhat is this?" and "What is this?" with one image give the same prompt.
    The caller has checked that each kind's tag count is 0 or its count; `<video>` is a tag only when
    `num_videos` is positive.
    """
    tags = [IMAGE_TOKEN] + ([VIDEO_TOKEN] if num_videos else [])
    pieces = re.split("(" + "|".join(map(re.escape, tags)) + ")", text)
    content: list[dict[str, Any]] = []
    if IMAGE_TOKEN not in text:
        content += [{"type": PART_IMAGE}] * num_images
    if num_videos and VIDEO_TOKEN not in text:
        content += [{"type": PART_VIDEO}] * num_videos
    for piece in pieces:
        if piece in tags:
            content.append({"type": PART_IMAGE if piece == IMAGE_TOKEN else PART_VIDEO})
        elif piece.strip():
            content.append({"type": PART_TEXT, "text": piece.strip()})
    return [{"role": "user", "content": content}]


def _json_type(value: Any) -> str:
    """A JSON value's type as JSON names it, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where} must be a string, got {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate, as a JSON escape (\ud800) can give
        raise InvalidRequestError(f"{where} is not valid UTF-8 (character {err.start}: {err.reason})") from None
    if IMAGE_TOKEN in value:
        raise InvalidRequestError(f"{where} contains {IMAGE_TOKEN}: in messages an image is a "
                                  f'{{"type": "{PART_IMAGE}"}} part')
    if VIDEO_TOKEN in value:
        raise InvalidRequestError(f"{where} contains {VIDEO_TOKEN}: in messages a video is a "
                                  f'{{"type": "{PART_VIDEO}"}} part')
    return value


def _keys(where: str, item: dict[str, Any], required: tuple[str, ...], what: str) -> None:
    missing = [key for key in required if key not in item]
    if missing:
        raise InvalidRequestError(f"{where} has no {missing[0]!r} ({what})")
    unknown = sorted(set(item) - set(required))
    if unknown:
        raise InvalidRequestError(f"{where} has unknown keys {unknown} ({what})")


def _part(where: str, part: Any, role: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidRequestError(f"{where} must be an object (a content part), got {_json_type(part)}")
    kind = part.get("type")
    if kind == PART_TEXT:
        _keys(where, part, ("type", "text"), f'a text part is {{"type": "{PART_TEXT}", "text": ...}}')
        return {"type": PART_TEXT, "text": _text(f"{where}.text", part["text"])}
    if kind == PART_IMAGE:
        _keys(where, part, ("type",), f'an image part is {{"type": "{PART_IMAGE}"}}, its image the next of images')
        if role != "user":
            raise InvalidRequestError(f"{where}: an image can only be in a user turn, not in a {role} turn")
        return {"type": PART_IMAGE}
    if kind == PART_VIDEO:
        _keys(where, part, ("type",), f'a video part is {{"type": "{PART_VIDEO}"}}, its video the next of videos')
        if role != "user":
            raise InvalidRequestError(f"{where}: a video can only be in a user turn, not in a {role} turn")
        return {"type": PART_VIDEO}
    if "type" not in part:
        raise InvalidRequestError(f"{where} has no 'type' ({PART_TEXT}, {PART_IMAGE} or {PART_VIDEO})")
    shown = json.dumps(kind)[:40]
    raise InvalidRequestError(f"{where}.type {shown} is not {PART_TEXT}, {PART_IMAGE} or {PART_VIDEO}")


def parse_messages(data: str | bytes, num_images: int, serving: ServingConfig, num_videos: int = 0
                   ) -> list[dict[str, Any]]:
    """The `messages` input (a JSON array of turns) as the chat template takes it, or refused with a
    message naming the problem: its size and turn count within the limits, each turn a role of
    spec.ROLES and a content (a string or a list of text and image parts), the image parts as many
    as the images sent. Texts go to the template as they are (no stripping), as transformers' processor
    would render the same messages."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidRequestError(f"messages is not valid UTF-8 (character {err.start}: {err.reason})") from None
    data = bytes(data)
    if len(data) > serving.max_messages_bytes:
        raise InvalidRequestError(f"messages is {len(data)} bytes, more than the limit of {serving.max_messages_bytes} "
                                  "bytes (max_messages_bytes)")
    try:
        turns = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InvalidRequestError(f"messages is not valid UTF-8 (byte {err.start}: {err.reason})") from None
    except RecursionError:
        raise InvalidRequestError("messages is nested too deeply to be a conversation") from None
    except ValueError as err:  # json.JSONDecodeError, or an integer past Python's digit limit
        raise InvalidRequestError(f"messages is not valid JSON ({err})") from None
    if not isinstance(turns, list):
        raise InvalidRequestError(f"messages must be a JSON array of turns, got {_json_type(turns)}")
    if not turns:
        raise InvalidRequestError("messages is empty: send at least one turn")
    if len(turns) > serving.max_messages:
        raise InvalidRequestError(f"messages has {len(turns)} turns, more than the limit of {serving.max_messages} "
                                  "(max_messages)")
    conversation: list[dict[str, Any]] = []
    images = videos = 0
    has_text = False
    for index, turn in enumerate(turns):
        where = f"messages[{index}]"
        if not isinstance(turn, dict):
            raise InvalidRequestError(f"{where} must be an object with role and content, got {_json_type(turn)}")
        _keys(where, turn, ("role", "content"), "a turn has role and content")
        role = turn["role"]
        if role not in ROLES:
            shown = json.dumps(role)[:40] if isinstance(role, str) else _json_type(role)
            raise InvalidRequestError(f"{where}.role {shown} is not {one_of(ROLES)}")
        content = turn["content"]
        if isinstance(content, str):
            has_text = has_text or bool(_text(f"{where}.content", content).strip())
            conversation.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(f"{where}.content must be a string or an array of parts, got "
                                      f"{_json_type(content)}")
        parts = [_part(f"{where}.content[{position}]", part, role) for position, part in enumerate(content)]
        images += sum(part["type"] == PART_IMAGE for part in parts)
        videos += sum(part["type"] == PART_VIDEO for part in parts)
        has_text = has_text or any(part["type"] == PART_TEXT and part["text"].strip() for part in parts)
        conversation.append({"role": role, "content": parts})
    if images != num_images:
        raise InvalidRequestError(f"messages have {images} image parts but {num_images} images were sent")
    if videos != num_videos:
        raise InvalidRequestError(f"messages have {videos} video parts but {num_videos} videos were sent")
    if not has_text and not images and not videos:
        raise InvalidRequestError("messages hold no text and no image")
    return conversation


def chat_messages(prompt: str | bytes | None, num_images: int, serving: ServingConfig, *,
                  messages: str | bytes | None = None, num_videos: int = 0) -> list[dict[str, Any]]:
    """The conversation the chat template renders: the `messages` input checked, or else the prompt's one
    user turn (its `<image>` tags 0 or as many as the images; with videos, `<video>` tags likewise)."""
    if messages is not None:
        if prompt is not None:
            raise InvalidRequestError(f"send either {IN_PROMPT} or {IN_MESSAGES}, not both")
        return parse_messages(messages, num_images, serving, num_videos)
    if prompt is None:
        raise InvalidRequestError(f"the {IN_PROMPT} input is required, or {IN_MESSAGES} instead")
    text = decode_prompt(prompt, serving)
    for tag, count, what in ((IMAGE_TOKEN, num_images, "images"), (VIDEO_TOKEN, num_videos, "videos")):
        tags = text.count(tag)
        if tags and tags != count and (tag == IMAGE_TOKEN or count):
            raise InvalidRequestError(f"the prompt has {tags} {tag} tags but {count} {what} were sent")
    return build_messages(text, num_images, num_videos)


class Preprocessor:
    """Tokenizer, chat template and image processor of one checkpoint, loaded once."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str, spec: ModelSpec,
                 serving: ServingConfig, video_config: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.spec = spec
        self.serving = serving
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id != spec.image_token_index:
            raise ValueError(f"tokenizer maps {IMAGE_TOKEN} to {image_token_id}, the config says "
                             f"image_token_index {spec.image_token_index}")
        # Rescale and normalize map each 8-bit value of each channel to one float: tables of them
        # replace the processor's float64 arithmetic over every pixel (its pixel values of a 336x336
        # image took 3.0 ms on the CI machine, 0.9 ms with the tables).
        self._pixel_table = pixel_table(image_processor, spec.num_channels)
        self._tiles_are_final = spec.anyres and _tiles_are_final(image_processor, spec.image_size)
        self._wire_pixel_table = pixel_values_to_wire(self._pixel_table, serving)
        # LLaVA-NeXT-Video: the video processor's resize and crop per frame, and its own normalization.
        self._frame_transform = self._wire_video_pixel_table = None
        if spec.videos:
            if video_config is None:
                raise ValueError("a llava_next_video model needs its video processor's settings")
            self._frame_transform = FrameTransform(video_config)
            if tuple(self._frame_transform.output_size) != (spec.image_size, spec.image_size):
                raise ValueError(f"the video processor crops frames to {self._frame_transform.output_size}, the vision "
                                 f"tower takes {spec.image_size}x{spec.image_size}")
            self._wire_video_pixel_table = pixel_values_to_wire(video_pixel_table(video_config, spec.num_channels),
                                                                serving)

    @classmethod
    def from_pretrained(cls, directory: str | Path, spec: ModelSpec, serving: ServingConfig) -> Preprocessor:
        """Load from a checkpoint directory, or from an exported processor directory (a copy of the
        checkpoint's files), as transformers loads the checkpoint's processor (llava_triton.processor)."""
        processor = load_processor(directory)
        if not isinstance(processor.chat_template, str):
            raise FileNotFoundError(f"{directory} has no chat template")
        _check_image_token_count(processor, spec)
        video_config = video_processor_config(directory) if spec.videos else None
        return cls(processor.tokenizer, processor.image_processor, processor.chat_template, spec, serving,
                   video_config)

    def build_input_ids(self, prompt: str | bytes | None, num_images: int,
                        image_tokens: Sequence[int] | None = None, *,
                        messages: str | bytes | None = None) -> np.ndarray:
        """Token ids (int64, 1-D) of the chat-formatted prompt (or messages), each `<image>` expanded to its
        image's token count: `image_tokens[i]` for image i (LLaVA-NeXT: `image_layouts`), by default
        `spec.num_image_tokens` each (LLaVA-1.5)."""
        return self.expand_images(self.tokenize(prompt, num_images, messages=messages),
                                  [self.spec.num_image_tokens] * num_images if image_tokens is None else image_tokens)

    def tokenize(self, prompt: str | bytes | None, num_images: int, *,
                 messages: str | bytes | None = None, num_videos: int = 0) -> np.ndarray:
        """Token ids of the chat-formatted prompt (or messages) with one `image_token_index` per image
        and one `video_token_index` per video (not expanded)."""
        if num_images < 0 or num_videos < 0:
            raise ValueError(f"num_images and num_videos must be >= 0, got {num_images} and {num_videos}")
        self._check_image_count(num_images)
        self._check_video_count(num_videos)
        rendered = self.render(chat_messages(prompt, num_images, self.serving, messages=messages,
                                             num_videos=num_videos))
        # As LlavaProcessor.apply_chat_template: BOS comes from the tokenizer unless the template wrote it.
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos is not None and rendered.startswith(bos))
        ids = np.asarray(self.tokenizer(rendered, add_special_tokens=add_special_tokens)["input_ids"], dtype=np.int64)
        found = int((ids == self.spec.image_token_index).sum())
        if found != num_images:
            raise RuntimeError(f"chat template rendered {found} {IMAGE_TOKEN} tokens for {num_images} images")
        if self.spec.videos:
            found = int((ids == self.spec.video_token_index).sum())
            if found != num_videos:  # a <video> tag in a prompt sent without videos
                raise InvalidRequestError(f"the prompt has {found} {VIDEO_TOKEN} tags but {num_videos} videos were "
                                          "sent")
        return ids

    def expand_images(self, ids: np.ndarray, image_tokens: Sequence[int], video_tokens: Sequence[int] = ()
                      ) -> np.ndarray:
        """`tokenize`'s ids with image i's token repeated `image_tokens[i]` times (and video j's
        `video_tokens[j]` times), within the limits on image tokens (max_image_tokens), video tokens
        (max_video_tokens) and prompt tokens (max_prompt_tokens, the context)."""
        is_image = ids == self.spec.image_token_index
        if int(is_image.sum()) != len(image_tokens):
            raise ValueError(f"{int(is_image.sum())} image tokens in the ids, {len(image_tokens)} token counts")
        is_video = (ids == self.spec.video_token_index) if self.spec.videos else np.zeros(len(ids), dtype=bool)
        if int(is_video.sum()) != len(video_tokens):
            raise ValueError(f"{int(is_video.sum())} video tokens in the ids, {len(video_tokens)} token counts")
        total_image_tokens = int(sum(image_tokens))
        if total_image_tokens > self.serving.max_image_tokens:
            raise InvalidRequestError(
                f"the images make {total_image_tokens} image tokens ({', '.join(map(str, image_tokens))}), more than "
                f"the limit of {self.serving.max_image_tokens} per request (max_image_tokens)")
        total_video_tokens = int(sum(video_tokens))
        if total_video_tokens > self.serving.max_video_tokens:
            raise InvalidRequestError(
                f"the videos make {total_video_tokens} video tokens ({', '.join(map(str, video_tokens))}), more than "
                f"the limit of {self.serving.max_video_tokens} per request (max_video_tokens)")
        limit = self.serving.prompt_token_limit(self.spec)
        length = len(ids) - len(image_tokens) - len(video_tokens) + total_image_tokens + total_video_tokens
        if length > limit:
            videos = f", {total_video_tokens} video tokens" if video_tokens else ""
            raise InvalidRequestError(
                f"prompt is {length} tokens ({len(image_tokens)} images, {total_image_tokens} image tokens{videos} "
                f"included), the limit is {limit} ({self._prompt_limit_reason()})")
        # LlavaProcessor repeats "<image>" in the text before tokenizing; repeating the id after
        # tokenizing gives the same ids because <image> is a special token (never merged). So is <video>.
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[is_image] = image_tokens
        repeats[is_video] = video_tokens
        return np.repeat(ids, repeats)

    def _prompt_limit_reason(self) -> str:
        context = self.serving.token_limit(self.spec)
        if self.serving.max_prompt_tokens and self.serving.max_prompt_tokens < context:
            return "max_prompt_tokens"
        return f"context of {context} tokens, one left for the answer; max_seq_len"

    def image_layouts(self, images: Sequence[Image.Image]) -> list[TileLayout]:
        """LLaVA-NeXT: each decoded image's tiles and tokens, within max_image_tiles and the vision
        encoder's largest batch (a request's tiles go to it as one batch)."""
        return self.layouts_for_sizes([(image.height, image.width) for image in images])

    def layouts_for_sizes(self, sizes: Sequence[tuple[int, int]], sent: Sequence[bool] | None = None,
                          extra_tiles: int = 0) -> list[TileLayout]:
        """`image_layouts` from each image's (height, width); `sent`: the images whose tiles go to the
        vision encoder (by default all); `extra_tiles`: the request's video frames, which go with them."""
        layouts = [tile_layout(height, width, self.spec) for height, width in sizes]
        for index, layout in enumerate(layouts):
            if layout.num_tiles > self.serving.max_image_tiles:
                raise InvalidRequestError(
                    f"image {index}: {layout.width}x{layout.height} makes {layout.num_tiles} tiles ({layout.rows}x"
                    f"{layout.cols} and the base), more than the limit of {self.serving.max_image_tiles} "
                    "(max_image_tiles)")
        total = sum(layout.num_tiles for layout, is_sent in zip(layouts, sent or [True] * len(layouts)) if is_sent)
        if total + extra_tiles > self.serving.vision_max_batch_size:
            frames = f" and {extra_tiles} video frames" if extra_tiles else ""
            raise InvalidRequestError(
                f"the images make {total} tiles{frames}, more than the vision encoder's largest batch of "
                f"{self.serving.vision_max_batch_size} (vision_max_batch_size): send fewer or smaller images")
        return layouts

    def render(self, conversation: list[dict[str, Any]]) -> str:
        """The conversation as the checkpoint's chat template writes it, with the assistant's turn opened."""
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def decode_images(self, images: Sequence[bytes], indices: Sequence[int] | None = None) -> list[Image.Image]:
        """Decode each image; `indices`: their places in the request (named in errors), by default 0, 1, ..."""
        self._check_image_count(len(images))
        # LLaVA-1.5's resize scales the short side to shortest_edge, whatever the long side becomes;
        # LLaVA-NeXT's resizes fit inside a pinpoint and a tile, so its pixels are bounded anyway.
        shortest_edge = None if self.spec.anyres else self.image_processor.size.get("shortest_edge",
                                                                                   self.spec.image_size)
        return [decode_image(data, self.serving, index, shortest_edge=shortest_edge)
                for index, data in zip(range(len(images)) if indices is None else indices, images)]

    def pixel_values(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(tiles, 3, image_size, image_size) float32, equal to the checkpoint's image processor's
        (LLaVA-NeXT: each image's tiles, base first, one image after another)."""
        return self._pixel_values(images, self._pixel_table)

    def _pixel_values(self, images: Sequence[Image.Image], table: np.ndarray) -> np.ndarray:
        size = self.spec.image_size
        if not images:
            return np.zeros((0, self.spec.num_channels, size, size), dtype=table.dtype)
        # The processor resizes, crops and tiles (8-bit, channels first); the tables do the rest.
        if self.spec.anyres:  # one image at a time: the processor would pad them to one tile count
            # Its tiles are already tile-sized: resizing each to the tile size again is an identity (PIL
            # returns a copy for a resize to the same size) that costs a numpy-PIL round trip per tile.
            tiles = [self.image_processor([image], do_rescale=False, do_normalize=False, do_pad=False,
                                          do_resize=not self._tiles_are_final, return_tensors="np")["pixel_values"][0]
                     for image in images]
            pixels = np.concatenate(tiles)
        else:
            pixels = self.image_processor(list(images), do_rescale=False, do_normalize=False,
                                          return_tensors="np")["pixel_values"]
        shape = (len(pixels), self.spec.num_channels, size, size)
        if pixels.shape != shape or pixels.dtype != np.uint8:
            raise RuntimeError(f"image processor gave {pixels.dtype} pixels of shape {pixels.shape}, expected uint8 "
                               f"{shape}")
        pixel_values = np.empty(shape, dtype=table.dtype)
        for index in range(len(pixels)):
            for channel in range(shape[1]):
                np.take(table[channel], pixels[index, channel], out=pixel_values[index, channel])
        return pixel_values

    def __call__(self, images: Sequence[bytes], prompt: str | bytes | None, *,
                 messages: str | bytes | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, pixel_values, image_sizes) of `prepare` with no cache."""
        prepared = self.prepare(images, prompt, messages=messages)
        return prepared.input_ids, prepared.pixel_values, prepared.image_sizes

    def prepare(self, images: Sequence[bytes], prompt: str | bytes | None, *, messages: str | bytes | None = None,
                cache: ImageCacheClient | None = None, cache_salt: bytes = b"", videos: Sequence[bytes] = (),
                num_frames: int | None = None, fps: float = 0.0) -> Prepared:
        """One request with a prompt or messages, ready for the vision encoder and the language model.

        The text is checked and tokenized before any image is decoded (cheap checks first), and every
        limit is checked before the pixel values are made. With `cache`, each image gets its content
        key (salted with `cache_salt`), and the images the embedding cache holds are not decoded: their
        size comes from the cache's directory and their tiles are left out of pixel_values.

        `videos` (LLaVA-NeXT-Video): each is probed (header limits) before anything is decoded, then
        `num_frames` frames (by default default_num_frames) are sampled uniformly, or at `fps` frames a
        second when fps > 0; the frames follow the images' tiles in pixel_values.
        """
        self._check_image_count(len(images))
        self._check_video_count(len(videos))
        self._check_request_bytes([*images, *videos], prompt if messages is None else messages)
        if len(cache_salt) > self.serving.max_cache_salt_bytes:
            raise InvalidRequestError(f"cache_salt is {len(cache_salt)} bytes, more than the limit of "
                                      f"{self.serving.max_cache_salt_bytes} (max_cache_salt_bytes)")
        if videos:
            if num_frames is not None and fps != 0:
                raise InvalidRequestError(f"send num_frames ({num_frames}) or fps ({fps:g}), not both: frames are "
                                          "sampled by count or by rate")
            if num_frames is None:
                num_frames = self.serving.default_num_frames if fps == 0 else 1  # 1: unused, sampled by rate
            check_sampling(num_frames, fps, self.serving)
        ids = self.tokenize(prompt, len(images), messages=messages, num_videos=len(videos))
        # Every video's header and sampled frames before any decoding.
        infos = [probe_video(data, self.serving, index) for index, data in enumerate(videos)]
        frame_indices = [sample_frame_indices(info.total_frames, info.fps, None if fps > 0 else num_frames,
                                              fps if fps > 0 else None) for info in infos]
        sampled = sum(len(indices) for indices in frame_indices)
        if sampled > self.serving.max_frames_per_request:
            raise InvalidRequestError(
                f"the videos' sampling gives {sampled} frames ({', '.join(str(len(i)) for i in frame_indices)}), more "
                f"than the limit of {self.serving.max_frames_per_request} per request (max_frames_per_request): "
                "lower num_frames or fps")
        keys = None if cache is None else cache.keys(images, cache_salt)
        known = [None] * len(images) if keys is None else [cache.lookup(key) for key in keys]
        missing = [index for index, size in enumerate(known) if size is None]
        decoded = dict(zip(missing, self.decode_images([images[index] for index in missing], missing)))
        sizes = [size if size is not None else (decoded[i].height, decoded[i].width) for i, size in enumerate(known)]
        if self.spec.anyres:
            layouts = self.layouts_for_sizes(sizes, [size is None for size in known], extra_tiles=sampled)
            image_tokens = [layout.num_image_tokens for layout in layouts]
        else:
            image_tokens = [self.spec.num_image_tokens] * len(images)
        input_ids = self.expand_images(ids, image_tokens,
                                       [len(indices) * self.spec.num_frame_tokens for indices in frame_indices])
        pixel_values = self._pixel_values([decoded[i] for i in sorted(decoded)], self._wire_pixel_table)
        if videos:
            frames = [self._video_pixel_values(data, info, indices, index)
                      for index, (data, info, indices) in enumerate(zip(videos, infos, frame_indices))]
            pixel_values = np.concatenate([pixel_values, *frames])
        if not decoded and not videos:
            # Triton cannot send a batch of 0 images to the (batched) vision model, so a request
            # without images to encode carries one all-zero image. It is harmless: the language model
            # takes only the tiles of the images input_ids refers to that are not cached (none here).
            size = self.spec.image_size
            pixel_values = np.zeros((1, self.spec.num_channels, size, size), dtype=self._wire_pixel_table.dtype)
        return Prepared(
            input_ids=input_ids, pixel_values=pixel_values,
            image_sizes=np.array(sizes, dtype=np.int64).reshape(-1, 2),
            image_keys=np.zeros((0, IMAGE_KEY_BYTES), np.uint8) if keys is None else
            np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, IMAGE_KEY_BYTES),
            image_cached=np.array([size is not None for size in known], dtype=bool),
            video_frames=np.array([len(indices) for indices in frame_indices], dtype=np.int64))

    def _video_pixel_values(self, data: bytes, info: VideoInfo, indices: np.ndarray, index: int) -> np.ndarray:
        """(frames, 3, image_size, image_size) in the wire dtype: the sampled frames, each resized and
        cropped as it is decoded (the full-size frames are not kept), then rescaled and normalized."""
        if self._frame_transform is None:
            raise InvalidRequestError(f"this model ({self.spec.model_type}) takes no videos")
        pixels = decode_frames(data, info, indices, self._frame_transform, index)
        size = self.spec.image_size
        shape = (len(indices), self.spec.num_channels, size, size)
        if pixels.shape != shape or pixels.dtype != np.uint8:
            raise RuntimeError(f"the video processor gave {pixels.dtype} frames of shape {pixels.shape}, expected "
                               f"uint8 {shape}")
        table = self._wire_video_pixel_table
        pixel_values = np.empty(shape, dtype=table.dtype)
        for frame in range(shape[0]):
            for channel in range(shape[1]):
                np.take(table[channel], pixels[frame, channel], out=pixel_values[frame, channel])
        return pixel_values

    def _check_request_bytes(self, images: Sequence[bytes], text: str | bytes | None) -> None:
        limit = self.serving.max_request_bytes
        # A str text is counted as characters: its UTF-8 size is checked by decode_prompt or parse_messages.
        total = sum(len(image) for image in images) + len(text or b"")
        if total > limit:
            raise InvalidRequestError(
                f"request is {total} bytes ({len(images)} images and the text), more than the limit of {limit} bytes "
                "(max_request_bytes)")

    def _check_video_count(self, num_videos: int) -> None:
        if num_videos and not self.spec.videos:
            raise InvalidRequestError(f"this model ({self.spec.model_type}) takes no videos: only LLaVA-NeXT-Video "
                                      "checkpoints do")
        if num_videos > self.serving.max_videos_per_request:
            raise InvalidRequestError(
                f"too many videos: {num_videos}, the limit is {self.serving.max_videos_per_request} per request "
                "(max_videos_per_request)")

    def _check_image_count(self, num_images: int) -> None:
        if num_images > self.serving.max_images_per_request:
            raise InvalidRequestError(
                f"too many images: {num_images}, the limit is {self.serving.max_images_per_request} per request "
                "(max_images_per_request)")


@dataclass(frozen=True)
class Prepared:
    """What preprocess sends on for one request (the names are llava_triton.spec's tensors)."""

    input_ids: np.ndarray  # int64 [seq_len], each <image> expanded
    pixel_values: np.ndarray  # [max(tiles sent, 1), 3, H, W] in wire_dtype: the tiles of the images not cached
    image_sizes: np.ndarray  # int64 [N, 2]: each image's (height, width) as decoded
    image_keys: np.ndarray  # uint8 [N, IMAGE_KEY_BYTES], or [0, IMAGE_KEY_BYTES] without a cache
    image_cached: np.ndarray  # bool [N]: the images whose tiles are left out (the embedding cache holds them)
    video_frames: np.ndarray  # int64 [V]: the frames sampled from each video (tiles after the images')


def cache_fingerprint(spec: ModelSpec, serving: ServingConfig, processor_dir: Path) -> bytes:
    """32 bytes that change with anything that changes an image's embeddings besides its content: the
    model spec, the serving options (dtypes, limits) and every file of the exported processor."""
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(spec), serving.to_dict()], sort_keys=True,
                                       default=str).encode())
    for path in sorted(Path(processor_dir).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(processor_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.digest()


class ImageCacheClient:
    """Preprocess's side of the language model's caches: each image's content key, and whether the
    embedding cache holds it, read from the directory the language model publishes
    (llava_triton.embedding_cache.Directory).

    The directory appears when the language model has loaded (the ensemble serves nothing before);
    until then, or when it goes (the language model unloaded), images get no key: nothing of theirs
    is cached or shared, which is always correct.
    """

    RETRY_S = 1.0  # how often to look for a missing directory

    def __init__(self, directory_name: str, fingerprint: bytes, clock: Callable[[], float] = time.monotonic):
        self.directory_name = directory_name
        self.fingerprint = fingerprint
        self._clock = clock
        self._directory: Directory | None = None
        self._last_attempt = -float("inf")

    def directory(self) -> Directory | None:
        if self._directory is not None and self._directory.state in (CLOSED, None):  # the language model went
            self._directory.close()
            self._directory = None
        if self._directory is None and self._clock() - self._last_attempt >= self.RETRY_S:
            self._last_attempt = self._clock()
            self._directory = Directory.attach(self.directory_name)
        return self._directory

    def keys(self, images: Sequence[bytes], cache_salt: bytes) -> list[bytes] | None:
        """Each image's key, or None without a directory (no secret to key them with)."""
        directory = self.directory()
        if directory is None:
            return None
        return [image_key(directory.secret, self.fingerprint, cache_salt, bytes(data)) for data in images]

    def lookup(self, key: bytes) -> tuple[int, int] | None:
        """(height, width) of an image the embedding cache holds, else None."""
        directory = self.directory()
        return None if directory is None else directory.lookup(key)

    def close(self) -> None:
        if self._directory is not None:
            self._directory.close()
            self._directory = None


def pixel_table(image_processor: Any, num_channels: int) -> np.ndarray:
    """(num_channels, 256) float32: the image processor's rescale and normalize of each 8-bit value.

    Computed by the processor's own methods on a ramp of the 256 values, so indexing the table with
    an image's pixels gives the same floats, bit for bit, as running those steps on the image.
    """
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (num_channels, 1, 256)).copy()  # channels first
    if image_processor.do_rescale:
        values = image_processor.rescale(values, image_processor.rescale_factor)
    if image_processor.do_normalize:
        values = image_processor.normalize(values, image_processor.image_mean, image_processor.image_std)
    return np.ascontiguousarray(values.reshape(num_channels, 256), dtype=np.float32)


def pixel_values_to_wire(pixel_values: np.ndarray, serving: ServingConfig) -> np.ndarray:
    """float32 pixel values in the dtype the vision encoder takes (`wire_dtype(serving)`).

    For a bfloat16 model they are rounded to bfloat16 first (to nearest even, as torch's cast): float16
    holds those values exactly (|x| >= 2**-14), so the encoder's float16 -> bfloat16 cast gives what
    float32 -> bfloat16 gives. Rounding to float16 and then again to bfloat16 would move about one
    value in 16 by a bfloat16 step (double rounding). Pixel values are finite (the image processor's).
    """
    dtype = wire_dtype(serving)
    if serving.dtype == "bfloat16":
        # In place on one array: a new array per step would cost more than the rounding itself.
        bits = np.ascontiguousarray(pixel_values, dtype=np.float32).view(np.uint32)
        rounded = bits >> 16
        rounded &= 1  # the lowest bit bfloat16 keeps: a tie rounds to make it 0 (even)
        rounded += 0x7FFF
        rounded += bits
        rounded &= 0xFFFF0000  # bfloat16 is float32's upper 16 bits
        return rounded.view(np.float32).astype(dtype)
    return pixel_values.astype(dtype, copy=False)


def _tiles_are_final(image_processor: Any, tile: int) -> bool:
    """Whether a LLaVA-NeXT image processor's per-tile resize maps a tile x tile tile to itself: its size
    is the tile (as a shortest edge or as both sides) and it crops to the tile."""
    size, crop = dict(image_processor.size or {}), dict(image_processor.crop_size or {})
    sized = size.get("shortest_edge") == tile or (size.get("height"), size.get("width")) == (tile, tile)
    return sized and (crop.get("height"), crop.get("width")) == (tile, tile)


def _check_image_token_count(processor: Any, spec: ModelSpec) -> None:
    """The processor's image token count of a tile (LlavaProcessor's formula) must equal the spec's, and
    a LLaVA-NeXT processor must tile to the model's pinpoints."""
    if spec.anyres:
        pinpoints = tuple(tuple(p) for p in getattr(processor.image_processor, "image_grid_pinpoints", None) or ())
        if pinpoints != spec.image_grid_pinpoints:
            raise ValueError(f"the image processor tiles to {[list(p) for p in pinpoints]}, the model config's "
                             f"image_grid_pinpoints are {[list(p) for p in spec.image_grid_pinpoints]}")
    crop = processor.image_processor.crop_size or {}
    if (crop.get("height"), crop.get("width")) != (spec.image_size, spec.image_size):
        raise ValueError(f"image processor crops to {dict(crop)}, the vision tower takes "
                         f"{spec.image_size}x{spec.image_size}")
    patch_size = processor.patch_size or spec.patch_size
    count = (spec.image_size // patch_size) ** 2 + (processor.num_additional_image_tokens or 0)
    if (processor.vision_feature_select_strategy or spec.vision_feature_select_strategy) == "default":
        count -= 1
    if count != spec.num_image_tokens:
        raise ValueError(f"the processor gives {count} image tokens per image, the model config "
                         f"{spec.num_image_tokens}")
