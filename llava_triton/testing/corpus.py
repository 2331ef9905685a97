"""The hostile-input corpus: requests built to hurt the server, generated here in code.

Every file and request is made deterministically by the functions below (no binary files in
the repository). Each `HostileCase` says what is sent and what must come back: the error
message (a regular expression, `re.search`ed) and, for a refusal by one of our limits, the
`ServingConfig` field the message must name. A few cases are hostile-looking but valid (a
PNG with a ZIP archive appended, a prompt of NUL characters): they must be answered, exactly
as transformers answers them (`expect=None`).

Errors from Triton itself (a wrong dtype, shape or input name, checked against config.pbtxt
before our code runs) have Triton's wording; ours name the input and the limit.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from llava_triton import spec
from llava_triton.spec import IMAGE_TOKEN, ModelSpec, ServingConfig
from llava_triton.testing.reference import make_test_images

PROMPT = "What is in the picture?"
MAX_TOKENS = 4  # every case asks for this few tokens: the answers are compared, not read


@dataclass(frozen=True)
class RawTensor:
    """A tensor sent exactly as given; `value=None` leaves the input out of the request."""

    name: str
    value: np.ndarray | None
    datatype: str = ""


@dataclass(frozen=True)
class HostileCase:
    name: str
    expect: str | None  # regex the error message must match; None: the request must succeed
    prompt: str = PROMPT
    images: tuple[bytes, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # LlavaClient keyword arguments
    raw: tuple[RawTensor, ...] = ()  # replace (or, with value None, drop) inputs by name
    parameters: dict[str, Any] | None = None  # request parameters (gRPC `parameters` map)
    model: str = spec.ENSEMBLE  # another model, called directly with the `raw` tensors only
    limit: str | None = None  # the ServingConfig field the message must name

    @property
    def needs_raw_client(self) -> bool:
        """True when LlavaClient cannot express the request (bytes it would not send)."""
        return bool(self.raw) or self.parameters is not None or self.model != spec.ENSEMBLE


# --- files -----------------------------------------------------------------------------------

def _encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_claiming(width: int, height: int, idat: bytes, bit_depth: int = 8, color_type: int = 2,
                 extra_chunks: bytes = b"") -> bytes:
    """A PNG whose IHDR says width x height, whatever `idat` holds."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + extra_chunks + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height black pixels: a few KB for many megapixels."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_claiming(width, height, idat, bit_depth=1, color_type=0)


def png_idat_bomb() -> bytes:
    """A 1x1 PNG whose IDAT inflates to 64 MB: only the pixel the header promises may be read."""
    compressor = zlib.compressobj(9)
    block = b"\x00" * (1 << 20)
    idat = b"".join(compressor.compress(block) for _ in range(64)) + compressor.flush()
    return png_claiming(1, 1, idat, color_type=0)


def png_text_bomb(tag: bytes) -> bytes:
    """A small valid PNG with a compressed ancillary chunk (zTXt or iCCP) inflating to 64 MB."""
    compressor = zlib.compressobj(9)
    block = b"\x00" * (1 << 20)
    payload = b"".join(compressor.compress(block) for _ in range(64)) + compressor.flush()
    body = b"Comment\x00\x00" + payload if tag == b"zTXt" else b"icc\x00\x00" + payload
    pixels = zlib.compress(b"".join(b"\x00" + b"\x80" * 24 for _ in range(8)))
    return png_claiming(8, 8, pixels, extra_chunks=_png_chunk(tag, body))


def apng_claiming_frames(num_frames: int) -> bytes:
    """An animated PNG of 3 frames whose acTL chunk says `num_frames`."""
    frames = [Image.new("RGB", (16, 16), (40 * i, 90, 200 - 40 * i)) for i in range(3)]
    data = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    start = data.index(b"acTL") - 4  # the chunk: length (4), type (4), frames and plays (8), CRC (4)
    return data[:start] + _png_chunk(b"acTL", struct.pack(">II", num_frames, 0)) + data[start + 20:]


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG `data` with its frame header (SOF0/SOF2) rewritten to say width x height."""
    position = 2
    while position < len(data):
        marker, length = data[position + 1], struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker in (0xC0, 0xC2):
            start = position + 5  # marker (2), length (2), precision (1)
            return data[:start] + struct.pack(">HH", height, width) + data[start + 4:]
        position += 2 + length
    raise ValueError("no SOF marker in the JPEG")


def webp_lossless_with_size(data: bytes, width: int, height: int) -> bytes:
    """The lossless WebP `data` with its VP8L header rewritten to say width x height (<= 16384)."""
    assert data[12:16] == b"VP8L"
    bits = struct.unpack("<I", data[21:25])[0]
    bits = (bits & ~0xFFFFFFF) | (width - 1) | ((height - 1) << 14)
    return data[:21] + struct.pack("<I", bits) + data[25:]


def jpeg_with_app1(data: bytes, payload: bytes) -> bytes:
    """`data` with an APP1 segment (EXIF) holding `payload` right after SOI."""
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def garbage_exif() -> bytes:
    """An EXIF block whose IFD claims 65535 entries at offsets past its end."""
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0xFFFF) + b"\xff" * 64


def zip_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("payload.sh", "#!/bin/sh\necho pwned\n")
    return buffer.getvalue()


def padded(signature: bytes, size: int) -> bytes:
    """`size` bytes starting with a format signature (only the size matters to the check)."""
    return signature + b"\x00" * (size - len(signature))


# --- the corpus ----------------------------------------------------------------------------------

def raw_inputs(case: HostileCase, build_inputs: Callable[..., list], max_tokens: int = MAX_TOKENS) -> list:
    """The case's tensors: the client's for its prompt, images and options, then `raw` applied.

    `build_inputs` is the client's (`client.build_inputs`), passed in since the package never
    imports `client/`."""
    import tritonclient.grpc as grpcclient

    inputs = []
    if case.model == spec.ENSEMBLE:
        inputs = build_inputs(case.prompt, list(case.images), **{"max_tokens": max_tokens, **case.options})
    replaced = {tensor.name for tensor in case.raw}
    inputs = [tensor for tensor in inputs if tensor.name() not in replaced]
    for tensor in case.raw:
        if tensor.value is not None:
            value = grpcclient.InferInput(tensor.name, list(tensor.value.shape), tensor.datatype)
            value.set_data_from_numpy(tensor.value)
            inputs.append(value)
    return inputs


def _float(name: str, value: float) -> RawTensor:
    return RawTensor(name, np.array([value], dtype=np.float32), "FP32")


def _strings(name: str, values: list[bytes]) -> RawTensor:
    return RawTensor(name, np.array(values, dtype=np.object_), "BYTES")


def _ints(name: str, values: list[int], datatype: str = "INT64") -> RawTensor:
    return RawTensor(name, np.array(values, dtype=np.int32 if datatype == "INT32" else np.int64), datatype)


def hostile_cases(model: ModelSpec, serving: ServingConfig | None = None) -> list[HostileCase]:
    """Every case, for a server serving `model` with `serving` (the defaults unless given)."""
    serving = serving or ServingConfig()
    image_run = [model.image_token_index] * model.num_image_tokens
    # Sampling inputs of a direct language_model call: a short sampled answer.
    direct = (_ints(spec.IN_MAX_TOKENS, [MAX_TOKENS], "INT32"), _float(spec.IN_TEMPERATURE, 1.0))
    images = make_test_images()
    jpeg, png, webp = images["jpeg"], images["png"], images["webp"]
    pixel_limit = rf"more than the limit of {serving.max_image_pixels} pixels"
    corrupt = r"image 0: corrupt or truncated {} data"
    tags = 5000
    small = _encode(Image.new("RGB", (32, 32), (10, 200, 10)), "JPEG", quality=90)
    strip = _encode(Image.new("RGB", (4000, 1), (1, 2, 3)), "PNG")
    cases = [
        # Decompression bombs and lying headers: refused from the header, before decoding.
        HostileCase("png bomb 8000x8000 in a few KB", rf"image 0: 8000x8000 = 64000000 pixels is {pixel_limit}",
                    images=(png_bomb(8000, 8000),), limit="max_image_pixels"),
        HostileCase("png header claims 100000x100000", rf"image 0: {pixel_limit} .*says 10000000000 pixels",
                    images=(png_claiming(100_000, 100_000, zlib.compress(b"\x00" * 64)),), limit="max_image_pixels"),
        HostileCase("jpeg header claims 60000x60000", rf"image 0: {pixel_limit} .*says 3600000000 pixels",
                    images=(jpeg_with_size(jpeg, 60_000, 60_000),), limit="max_image_pixels"),
        HostileCase("webp header claims 16384x16384", rf"image 0: {pixel_limit} .*says 268435456 pixels",
                    images=(webp_lossless_with_size(webp, 16384, 16384),), limit="max_image_pixels"),
        HostileCase("strip 4000x1 that resizes to 451 M pixels", rf"image 0: 4000x1 is too elongated.*{pixel_limit}",
                    images=(strip,), limit="max_image_pixels"),
        # libjpeg fills the rows its data lacks (as for transformers, which decodes with the same PIL).
        HostileCase("jpeg header claims 3000x3000 over 320x240 data (decoded)", None,
                    images=(jpeg_with_size(jpeg, 3000, 3000),)),
        HostileCase("png header claims 64x64, data for 8 pixels", corrupt.format("PNG"),
                    images=(png_claiming(64, 64, zlib.compress(b"\x00" * 25)),)),
        HostileCase("png of 0x0 pixels", corrupt.format("PNG"),
                    images=(png_claiming(0, 0, zlib.compress(b"")),)),
        HostileCase("png with a broken IHDR checksum", corrupt.format("PNG"),
                    images=(png[:29] + bytes([png[29] ^ 0xFF]) + png[30:],)),
        HostileCase("png zTXt chunk inflating to 64 MB", corrupt.format("PNG"), images=(png_text_bomb(b"zTXt"),)),
        HostileCase("png iCCP profile inflating to 64 MB", corrupt.format("PNG"), images=(png_text_bomb(b"iCCP"),)),
        HostileCase("apng claiming 2**31-1 frames (first frame used)", None,
                    images=(apng_claiming_frames(2**31 - 1),)),
        # Truncated files.
        HostileCase("jpeg cut in half", corrupt.format("JPEG"), images=(jpeg[: len(jpeg) // 2],)),
        HostileCase("jpeg without its last 2 bytes", corrupt.format("JPEG"), images=(jpeg[:-2],)),
        HostileCase("jpeg signature only", corrupt.format("JPEG"), images=(jpeg[:3],)),
        HostileCase("png cut in half", corrupt.format("PNG"), images=(png[: len(png) // 2],)),
        HostileCase("webp cut in half", corrupt.format("WebP"), images=(webp[: len(webp) // 2],)),
        HostileCase("empty image", r"image 0: empty \(0 bytes\)", images=(b"",)),
        # Polyglots and things that are not images.
        HostileCase("gif + zip (GIFAR)", "image 0: unsupported format GIF; send JPEG, PNG or WebP",
                    images=(_encode(Image.new("RGB", (16, 16)), "GIF") + zip_archive(),)),
        HostileCase("pdf with a jpeg inside", "image 0: unsupported format PDF", images=(b"%PDF-1.4\n" + jpeg,)),
        HostileCase("jpeg signature on a png body", corrupt.format("JPEG"), images=(b"\xff\xd8\xff" + png,)),
        HostileCase("html before a png", "image 0: not an image", images=(b"<html><script>alert(1)</script>" + png,)),
        HostileCase("svg", "image 0: not an image",
                    images=(b'<svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999"/>',)),
        HostileCase("avif", "image 0: unsupported format AVIF",
                    images=(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 64,)),
        HostileCase("random bytes", "image 0: not an image", images=(np.random.default_rng(7).bytes(4096),)),
        HostileCase("png + zip appended (valid png)", None, images=(png + zip_archive(),)),
        HostileCase("jpeg with garbage EXIF (valid jpeg)", None, images=(jpeg_with_app1(small, garbage_exif()),)),
        HostileCase("png 1x1 whose IDAT inflates to 64 MB (valid png)", None, images=(png_idat_bomb(),)),
        # Sizes and counts.
        HostileCase("image one byte over max_image_bytes",
                    rf"image 0: {serving.max_image_bytes + 1} bytes is more than the limit of "
                    rf"{serving.max_image_bytes} bytes", images=(padded(b"\xff\xd8\xff", serving.max_image_bytes + 1),),
                    limit="max_image_bytes"),
        HostileCase("one image more than max_images_per_request",
                    rf"too many images: {serving.max_images_per_request + 1}, the limit is "
                    rf"{serving.max_images_per_request}", images=(small,) * (serving.max_images_per_request + 1),
                    limit="max_images_per_request"),
        HostileCase("2000 images", r"too many images: 2000", images=(b"\xff\xd8\xff\xe0",) * 2000,
                    limit="max_images_per_request"),
        # Prompts.
        HostileCase("prompt of 1 MB", rf"prompt is 1048576 bytes, more than the limit of {serving.max_prompt_bytes}",
                    prompt="a" * (1 << 20), limit="max_prompt_bytes"),
        HostileCase("prompt past the context", r"prompt is \d+ tokens .*the limit is \d+",
                    prompt="The red square is next to the blue circle. " * 1200, images=(small,), limit="max_seq_len"),
        HostileCase("prompt in Latin-1", r"prompt is not valid UTF-8 \(byte 3",
                    raw=(_strings(spec.IN_PROMPT, ["café".encode("latin-1")]),)),
        HostileCase("prompt with an encoded surrogate", "prompt is not valid UTF-8",
                    raw=(_strings(spec.IN_PROMPT, [b"lone \xed\xa0\x80 surrogate"]),)),
        HostileCase("prompt of whitespace", "prompt is empty", prompt=" \n\t "),
        HostileCase("prompt of NUL characters (valid)", None, prompt="\x00" * 64),
        HostileCase(f"{tags} {IMAGE_TOKEN} tags, one image",
                    f"the prompt has {tags} {IMAGE_TOKEN} tags but 1 images were sent",
                    prompt=IMAGE_TOKEN * tags, images=(small,)),
        HostileCase(f"{tags} {IMAGE_TOKEN} tags, no image", f"the prompt has {tags} {IMAGE_TOKEN} tags but 0 images",
                    prompt=f"{IMAGE_TOKEN}\n" * tags),
        HostileCase("prompt left out", r"prompt.*(required|missing)", raw=(RawTensor(spec.IN_PROMPT, None),)),
        HostileCase("two prompts", r"unexpected shape for input 'prompt'.*Expected \[1\], got \[2\]",
                    raw=(_strings(spec.IN_PROMPT, [b"a", b"b"]),)),
        HostileCase("prompt of shape [1, 1]", r"unexpected shape for input 'prompt'.*got \[1,1\]",
                    raw=(RawTensor(spec.IN_PROMPT, np.array([[PROMPT.encode()]], dtype=np.object_), "BYTES"),)),
        HostileCase("prompt as INT32", r"input 'prompt' data-type is 'INT32', but model 'llava' expects 'BYTES'",
                    raw=(RawTensor(spec.IN_PROMPT, np.array([7], np.int32), "INT32"),)),
        HostileCase("images as FP32 pixels", r"input 'images' data-type is 'FP32', but model 'llava' expects 'BYTES'",
                    raw=(RawTensor(spec.IN_IMAGES, np.zeros((1, 3, 8, 8), np.float32), "FP32"),)),
        HostileCase("images of shape [1, 1]", r"unexpected shape for input 'images'.*got \[1,1\]",
                    raw=(RawTensor(spec.IN_IMAGES, np.array([[png]], dtype=np.object_), "BYTES"),)),
        # Sampling values.
        HostileCase("temperature NaN", "temperature must be a finite number", options={"temperature": float("nan")}),
        HostileCase("temperature +inf", "temperature must be a finite number", options={"temperature": float("inf")}),
        HostileCase("temperature -inf", "temperature must be a finite number", options={"temperature": float("-inf")}),
        HostileCase("temperature 1e30", r"temperature must be a finite number in \[0, 100\]",
                    options={"temperature": 1e30}),
        HostileCase("temperature 1e-40 (valid, greedy in effect)", None, options={"temperature": 1e-40}),
        HostileCase("top_p NaN", r"top_p must be in \(0, 1\]", options={"top_p": float("nan")}),
        HostileCase("top_p 1.5", r"top_p must be in \(0, 1\], got 1.5", options={"top_p": 1.5}),
        HostileCase("top_p one ulp above 1", r"top_p must be in \(0, 1\]",
                    raw=(_float(spec.IN_TOP_P, float(np.nextafter(np.float32(1), np.float32(2)))),)),
        HostileCase("top_p 0", r"top_p must be in \(0, 1\]", options={"top_p": 0.0}),
        HostileCase("top_k -1", "top_k must be 0", options={"top_k": -1}),
        HostileCase("max_tokens 0", "max_tokens must be at least 1, got 0", options={"max_tokens": 0}),
        HostileCase("max_tokens -1", "max_tokens must be at least 1, got -1", options={"max_tokens": -1}),
        HostileCase("max_tokens 2**31-1", r"max_tokens 2147483647 plus the prompt's \d+ tokens exceeds the context",
                    options={"max_tokens": 2**31 - 1}, limit="max_seq_len"),
        HostileCase("seed -1", "seed must be non-negative", options={"seed": -1}),
        HostileCase("10000 stop strings", rf"at most {serving.max_stop_strings} stop strings are allowed, got 10000",
                    options={"stop": [f"s{i}" for i in range(10_000)]}, limit="max_stop_strings"),
        HostileCase("stop string of 1 MB", rf"stop string 0 has 1048576 bytes, more than the limit of "
                    rf"{serving.max_stop_string_bytes}", options={"stop": ["x" * (1 << 20)]},
                    limit="max_stop_string_bytes"),
        HostileCase("empty stop string", "stop string 1 is empty", options={"stop": ["###", ""]}),
        HostileCase("stop string in Latin-1", "stop string 0 is not valid UTF-8",
                    raw=(_strings(spec.IN_STOP, ["café".encode("latin-1")]),)),
        HostileCase("temperature as INT32",
                    "input 'temperature' data-type is 'INT32', but model 'llava' expects 'FP32'",
                    raw=(RawTensor(spec.IN_TEMPERATURE, np.array([1], np.int32), "INT32"),)),
        HostileCase("max_tokens as FP64", r"input 'max_tokens' data-type is 'FP64', but model 'llava' expects 'INT32'",
                    raw=(RawTensor(spec.IN_MAX_TOKENS, np.array([4.0], np.float64), "FP64"),)),
        HostileCase("max_tokens of shape [2]", r"unexpected shape for input 'max_tokens'.*Expected \[1\], got \[2\]",
                    raw=(RawTensor(spec.IN_MAX_TOKENS, np.array([4, 4], np.int32), "INT32"),)),
        HostileCase("stream of shape [0]", r"unexpected shape for input 'stream'.*got \[0\]",
                    raw=(RawTensor(spec.IN_STREAM, np.zeros((0,), np.bool_), "BOOL"),)),
        # Unknown inputs and parameters.
        HostileCase("unknown input frequency_penalty", "unexpected inference input 'frequency_penalty'",
                    raw=(_float("frequency_penalty", 2.0),)),
        HostileCase("unknown request parameters", r"unknown request parameter.*'frequency_penalty'",
                    parameters={"frequency_penalty": 2.0, "temperature": 5.0}),
        # The composing models are reachable too: called directly with what the ensemble never sends.
        HostileCase("language_model: ids outside the vocabulary", "input_ids holds ids outside the vocabulary",
                    model=spec.LANGUAGE_MODEL, raw=(_ints(spec.INPUT_IDS, [1, 2**40, -5]), *direct)),
        HostileCase("language_model: half an image of image tokens", "image tokens, not a multiple of",
                    model=spec.LANGUAGE_MODEL, raw=(_ints(spec.INPUT_IDS, [1] + image_run[:7]), *direct)),
        HostileCase("language_model: image tokens without embeddings", "refers to 1 images but 0 image embeddings",
                    model=spec.LANGUAGE_MODEL, raw=(_ints(spec.INPUT_IDS, [1, *image_run, 2]), *direct)),
        HostileCase("language_model: 100000 input ids", r"the prompt has 100000 tokens, which leaves no room",
                    model=spec.LANGUAGE_MODEL, raw=(_ints(spec.INPUT_IDS, [1] * 100_000), *direct)),
        HostileCase("language_model: NaN image embeddings", r"image_embeds .*(NaN|finite)", model=spec.LANGUAGE_MODEL,
                    raw=(_ints(spec.INPUT_IDS, [1, *image_run, 2]), *direct, RawTensor(
                        spec.IMAGE_EMBEDS, np.full((1, model.num_image_tokens, model.text_hidden_size), np.nan,
                                                   np.float32), "FP32"))),
        HostileCase("vision_encoder: 8x8 pixel_values", r"unexpected shape for input 'pixel_values' for model "
                    "'vision_encoder'", model=spec.VISION_ENCODER,
                    raw=(RawTensor(spec.PIXEL_VALUES, np.zeros((1, 3, 8, 8), np.float32), "FP32"),)),
    ]
    return cases


def request_bytes_case(serving: ServingConfig) -> HostileCase:
    """Images each under max_image_bytes that are over max_request_bytes together."""
    count = serving.max_request_bytes // serving.max_image_bytes + 1
    each = serving.max_request_bytes // count + 1
    return HostileCase("images over max_request_bytes together",
                       rf"more than the limit of {serving.max_request_bytes} bytes",
                       images=(padded(b"\xff\xd8\xff", each),) * count, limit="max_request_bytes")
