"""Preprocessing without a server: equal to transformers' LlavaProcessor, and every refusal.

Tolerances: none. input_ids and pixel_values must be equal, bit for bit: both sides resize and crop
with the same PIL image processor, and our rescale-and-normalize tables come from its own methods.
"""

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from llava_triton.errors import InvalidRequestError
from llava_triton.preprocess import Preprocessor, decode_image, pixel_values_to_wire
from llava_triton.processor import PROCESSOR_FILES, copy_processor_files
from llava_triton.spec import IMAGE_TOKEN, ModelSpec, ServingConfig
from llava_triton.testing.reference import hf_inputs, make_mode_images, make_test_images, tiny_checkpoint

IMAGES = make_test_images()
PROMPT = "What is in this image?"


@pytest.fixture(scope="module")
def checkpoint():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def spec(checkpoint):
    return ModelSpec.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def preprocessor(checkpoint, spec):
    return Preprocessor.from_pretrained(checkpoint, spec, ServingConfig())


def with_limits(preprocessor, spec=None, **serving):
    """The same loaded tokenizer and image processor under other limits."""
    return Preprocessor(preprocessor.tokenizer, preprocessor.image_processor, preprocessor.chat_template,
                        spec or preprocessor.spec, ServingConfig(**serving))


def assert_matches_hf(checkpoint, preprocessor, images, prompt):
    input_ids, pixel_values, _ = preprocessor(images, prompt)
    hf_ids, hf_pixel_values = hf_inputs(checkpoint, images, prompt)
    assert input_ids.dtype == np.int64 and pixel_values.dtype == np.float32
    np.testing.assert_array_equal(input_ids, hf_ids)
    assert int((input_ids == preprocessor.spec.image_token_index).sum()) == len(images) * 576
    if images:
        assert pixel_values.shape == hf_pixel_values.shape == (len(images), 3, 336, 336)
        np.testing.assert_array_equal(pixel_values, hf_pixel_values)
    return input_ids, pixel_values


def png_claiming(width: int, height: int, bit_depth: int = 8, color_type: int = 2, idat: bytes | None = None) -> bytes:
    """A PNG whose header says width x height; the pixel data is whatever `idat` holds."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def decompression_bomb(width: int = 8000, height: int = 8000) -> bytes:
    """A valid 1-bit grayscale PNG of width x height black pixels, a few KB on disk."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_claiming(width, height, bit_depth=1, color_type=0, idat=idat)


# --- equal to the Hugging Face processor -------------------------------------------------

@pytest.mark.parametrize("name", sorted(IMAGES))
def test_one_image_matches_hf(checkpoint, preprocessor, name):
    assert_matches_hf(checkpoint, preprocessor, [IMAGES[name]], PROMPT)


@pytest.mark.parametrize("name", sorted(make_mode_images()))
def test_colour_modes_and_orientation_match_hf(checkpoint, preprocessor, name):
    assert_matches_hf(checkpoint, preprocessor, [make_mode_images()[name]], PROMPT)


def test_two_images_match_hf(checkpoint, preprocessor):
    images = [IMAGES["jpeg"], IMAGES["png"]]
    input_ids, pixel_values = assert_matches_hf(checkpoint, preprocessor, images, "Compare the two pictures.")
    assert not np.allclose(pixel_values[0], pixel_values[1])


def test_interleaved_tags_match_hf(checkpoint, preprocessor):
    prompt = "Is <image> brighter than <image>? Answer briefly."
    input_ids, _ = assert_matches_hf(checkpoint, preprocessor, [IMAGES["webp"], IMAGES["jpeg"]], prompt)
    runs = np.flatnonzero(np.diff((input_ids == 1000).astype(np.int8)) == 1)
    assert len(runs) == 2  # two separate runs of image tokens, with text between them


def test_tag_alone_matches_hf(checkpoint, preprocessor):
    assert_matches_hf(checkpoint, preprocessor, [IMAGES["png"]], IMAGE_TOKEN)


def test_no_image_matches_hf_and_sends_one_zero_image(checkpoint, preprocessor):
    input_ids, pixel_values = assert_matches_hf(checkpoint, preprocessor, [], "Tell me about the sea.")
    assert 1000 not in input_ids
    assert pixel_values.shape == (1, 3, 336, 336) and not pixel_values.any()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_get_fp16_pixel_values(checkpoint, preprocessor, dtype):
    import torch

    half = with_limits(preprocessor, dtype=dtype)
    images = [IMAGES["jpeg"], IMAGES["png"]]
    input_ids, pixel_values, _ = half(images, PROMPT)
    full_ids, full_pixel_values, _ = preprocessor(images, PROMPT)
    assert pixel_values.dtype == np.float16 and pixel_values.shape == full_pixel_values.shape
    np.testing.assert_array_equal(input_ids, full_ids)
    # The encoder casts FP16 to its dtype: that gives what it gets from the float32 values directly.
    compute = getattr(torch, dtype)
    got = torch.from_numpy(pixel_values).to(compute)
    assert torch.equal(got, torch.from_numpy(full_pixel_values).to(compute))
    np.testing.assert_array_equal(pixel_values, pixel_values_to_wire(full_pixel_values, half.serving))
    assert half([], PROMPT)[1].dtype == np.float16


@pytest.mark.parametrize("settings", [
    {"image_mean": [0.5, 0.25, 0.125], "image_std": [0.1, 0.2, 0.3]},
    {"do_normalize": False},
    {"do_rescale": False},
    {"rescale_factor": 1 / 127.5, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0]},
])
def test_other_image_processor_settings_match_the_processor(checkpoint, spec, settings):
    """The rescale-and-normalize tables follow the checkpoint's processor settings, whatever they are."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil", local_files_only=True, **settings)
    loaded = Preprocessor.from_pretrained(checkpoint, spec, ServingConfig())
    custom = Preprocessor(loaded.tokenizer, image_processor, loaded.chat_template, spec, ServingConfig())
    decoded = custom.decode_images([IMAGES["jpeg"], IMAGES["png"]])
    expected = image_processor(decoded, return_tensors="np")["pixel_values"].astype(np.float32)
    np.testing.assert_array_equal(custom.pixel_values(decoded), expected)
    assert not np.array_equal(expected, loaded.pixel_values(decoded))  # the settings did change the values


def test_pixel_values_to_wire_rounds_once():
    import torch

    values = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 2
    values = values[np.abs(values) >= 2**-14]  # below, float16 holds fewer bits than bfloat16 (subnormals)
    values[:4] = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-14]  # ties: to even, as torch rounds
    expected = torch.from_numpy(values).to(torch.bfloat16)
    wire = pixel_values_to_wire(values, ServingConfig(dtype="bfloat16"))
    assert wire.dtype == np.float16 and torch.equal(torch.from_numpy(wire).to(torch.bfloat16), expected)
    # Rounding to float16 first and then to bfloat16 would differ on about 1 value in 16.
    twice = torch.from_numpy(values.astype(np.float16)).to(torch.bfloat16)
    assert 0.03 < float((twice != expected).float().mean()) < 0.1
    np.testing.assert_array_equal(pixel_values_to_wire(values, ServingConfig(dtype="float16")),
                                  values.astype(np.float16))
    assert pixel_values_to_wire(values, ServingConfig()) is values  # float32: untouched


def test_prompt_format(preprocessor):
    input_ids = preprocessor.build_input_ids(PROMPT, 1)
    collapsed = [t for i, t in enumerate(input_ids.tolist()) if t != 1000 or input_ids[i - 1] != 1000]
    assert preprocessor.tokenizer.decode(collapsed) == f"<s>USER: {IMAGE_TOKEN}\n{PROMPT} ASSISTANT:"
    # A leading tag is where images go anyway; whitespace around tags is not part of the text.
    np.testing.assert_array_equal(preprocessor.build_input_ids(f"{IMAGE_TOKEN}\n{PROMPT}\n", 1), input_ids)
    np.testing.assert_array_equal(preprocessor.build_input_ids(PROMPT.encode(), 1), input_ids)


def test_processor_files_copied_elsewhere_load_the_same(checkpoint, spec, preprocessor, tmp_path):
    copied = copy_processor_files(checkpoint, tmp_path / "preprocess" / "1")
    assert {p.name for p in copied} == {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                        "preprocessor_config.json", "processor_config.json"}
    assert {p.name for p in copied} <= set(PROCESSOR_FILES)
    elsewhere = Preprocessor.from_pretrained(tmp_path / "preprocess" / "1", spec, ServingConfig())
    for expected, actual in zip(preprocessor([IMAGES["jpeg"]], PROMPT), elsewhere([IMAGES["jpeg"]], PROMPT)):
        np.testing.assert_array_equal(actual, expected)
    with pytest.raises(FileNotFoundError, match="config.json, tokenizer_config.json"):
        copy_processor_files(tmp_path / "nothing-here", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no config.json.*exported again"):
        Preprocessor.from_pretrained(tmp_path / "nothing-here", spec, ServingConfig())


def test_mismatched_spec_is_refused_at_load(checkpoint, spec):
    with pytest.raises(ValueError, match="image_token_index"):
        Preprocessor.from_pretrained(checkpoint, dataclasses.replace(spec, image_token_index=999), ServingConfig())
    with pytest.raises(ValueError, match="image tokens per image"):
        Preprocessor.from_pretrained(checkpoint, dataclasses.replace(spec, vision_feature_select_strategy="full"),
                                     ServingConfig())


def test_decoded_images_are_rgb_and_upright():
    for data in [*IMAGES.values(), *make_mode_images().values()]:
        assert decode_image(data, ServingConfig()).mode == "RGB"
    # Stored 160x96 with EXIF orientation 6: displayed (and decoded) as 96x160.
    assert decode_image(make_mode_images()["exif_rotated_jpeg"], ServingConfig()).size == (96, 160)


def test_16_bit_grayscale_is_scaled_not_clipped():
    gray = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "PNG")
    pixels = np.asarray(decode_image(buffer.getvalue(), ServingConfig()))
    assert pixels.shape == (64, 64, 3)
    assert abs(int(pixels[0, 0, 0]) - 0) <= 1 and abs(int(pixels[-1, -1, 0]) - 255) <= 1
    assert 100 < pixels.mean() < 155


# --- refusals -------------------------------------------------------------------------------

def test_refuses_empty_image(preprocessor):
    with pytest.raises(InvalidRequestError, match=r"image 0: empty \(0 bytes\)"):
        preprocessor([b""], PROMPT)


def test_refuses_too_many_bytes(preprocessor):
    small = with_limits(preprocessor, max_image_bytes=1000)
    with pytest.raises(InvalidRequestError, match=r"image 0: \d+ bytes is more than the limit of 1000 bytes"):
        small([IMAGES["jpeg"]], PROMPT)


def test_refuses_random_bytes(preprocessor):
    noise = np.random.default_rng(0).bytes(4096)
    with pytest.raises(InvalidRequestError, match="image 0: not an image"):
        preprocessor([noise], PROMPT)


def test_refuses_other_formats(preprocessor):
    for image_format, name in (("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (10, 200, 10)).save(buffer, image_format)
        with pytest.raises(InvalidRequestError, match=f"image 0: unsupported format {name}; send JPEG, PNG or WebP"):
            preprocessor([buffer.getvalue()], PROMPT)


def test_refuses_decompression_bomb_before_decoding(preprocessor, monkeypatch):
    bomb = decompression_bomb()
    assert len(bomb) < 20_000  # small on disk, 64 M pixels inside

    def no_decoding(self):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InvalidRequestError, match="image 0: 8000x8000 = 64000000 pixels is more than the limit of "
                                                  "36000000 pixels"):
        preprocessor([bomb], PROMPT)
    # Above PIL's own limit PIL refuses at open; the request is refused the same way.
    with pytest.raises(InvalidRequestError, match="image 0: more than the limit of 36000000 pixels"):
        preprocessor([png_claiming(100_000, 100_000)], PROMPT)


def test_refuses_more_pixels_than_configured(preprocessor):
    with pytest.raises(InvalidRequestError, match="image 0: 320x240 = 76800 pixels is more than the limit of 1000"):
        with_limits(preprocessor, max_image_pixels=1000)([IMAGES["jpeg"]], PROMPT)


def test_refuses_elongated_image_before_decoding(preprocessor, monkeypatch):
    strip = io.BytesIO()
    Image.new("RGB", (4000, 1), (1, 2, 3)).save(strip, "PNG")  # 4000 pixels, 336 * 1344000 once resized
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before the check"))
    with pytest.raises(InvalidRequestError, match="image 0: 4000x1 is too elongated: with its short side resized to "
                                                  "336 it has 451584000 pixels, more than the limit of 36000000"):
        preprocessor([strip.getvalue()], PROMPT)


@pytest.mark.parametrize("name, format_name", [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WebP")])
def test_refuses_truncated_image(preprocessor, name, format_name):
    data = IMAGES[name]
    with pytest.raises(InvalidRequestError, match=f"image 1: corrupt or truncated {format_name} data"):
        preprocessor([IMAGES["jpeg"], data[: len(data) // 2]], f"{IMAGE_TOKEN} {IMAGE_TOKEN} compare")


def test_refuses_truncated_jpeg_even_when_only_the_end_is_missing(preprocessor):
    data = IMAGES["jpeg"]
    for cut in (len(data) - 200, len(data) - 20):
        with pytest.raises(InvalidRequestError, match="image 0: corrupt or truncated JPEG data"):
            preprocessor([data[:cut]], PROMPT)


def test_refuses_corrupt_data_after_a_valid_signature(preprocessor):
    noise = np.random.default_rng(1).bytes(2048)
    for signature in (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x10\x00\x00WEBPVP8 "):
        with pytest.raises(InvalidRequestError, match=r"image 0: corrupt or truncated (JPEG|PNG|WebP) data \(\w"):
            preprocessor([signature + noise], PROMPT)
    broken_pixels = png_claiming(64, 64, idat=b"not zlib data")
    with pytest.raises(InvalidRequestError, match="image 0: corrupt or truncated PNG data"):
        preprocessor([broken_pixels], PROMPT)


def test_refuses_to_run_with_truncated_images_allowed(preprocessor, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        preprocessor([IMAGES["jpeg"]], PROMPT)


def test_refuses_tag_count_mismatch(preprocessor):
    with pytest.raises(InvalidRequestError, match=f"the prompt has 2 {IMAGE_TOKEN} tags but 1 images were sent"):
        preprocessor([IMAGES["jpeg"]], f"{IMAGE_TOKEN} and {IMAGE_TOKEN}")
    with pytest.raises(InvalidRequestError, match=f"the prompt has 1 {IMAGE_TOKEN} tags but 0 images were sent"):
        preprocessor([], f"{IMAGE_TOKEN} what is it?")


def test_refuses_too_many_images(preprocessor):
    with pytest.raises(InvalidRequestError, match="too many images: 5, the limit is 4 per request"):
        preprocessor([IMAGES["jpeg"]] * 5, PROMPT)
    with pytest.raises(InvalidRequestError, match="too many images: 5"):
        preprocessor.build_input_ids(PROMPT, 5)


@pytest.mark.parametrize("prompt", ["", "  \n\t", b"", b" "])
def test_refuses_empty_prompt(preprocessor, prompt):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        preprocessor([IMAGES["jpeg"]], prompt)


def test_refuses_non_utf8_prompt(preprocessor):
    with pytest.raises(InvalidRequestError, match="prompt is not valid UTF-8 \\(byte 3"):
        preprocessor([], b"caf\xe9 au lait")
    with pytest.raises(InvalidRequestError, match="prompt is not valid UTF-8"):
        preprocessor([], "lone \ud800 surrogate")


def test_refuses_prompt_over_the_byte_limit(preprocessor):
    small = with_limits(preprocessor, max_prompt_bytes=16)
    small.build_input_ids("é" * 8, 0)  # 16 bytes
    with pytest.raises(InvalidRequestError, match="prompt is 18 bytes, more than the limit of 16 bytes"):
        small.build_input_ids("é" * 9, 0)


def test_refuses_prompt_past_the_context(preprocessor, spec):
    with pytest.raises(InvalidRequestError, match=r"prompt is \d+ tokens .* the limit is 4095 \(context of 4096"):
        preprocessor([IMAGES["jpeg"]], "The red square is next to the blue circle. " * 500)
    # At the boundary: a prompt of n tokens needs a context of n + 1 (room for one new token).
    length = len(preprocessor.build_input_ids(PROMPT, 1))  # 576 image tokens + text
    with_limits(preprocessor, dataclasses.replace(spec, max_position_embeddings=length + 1)).build_input_ids(PROMPT, 1)
    with pytest.raises(InvalidRequestError, match=f"prompt is {length} tokens \\(1 images, 576 image tokens included"):
        with_limits(preprocessor, dataclasses.replace(spec, max_position_embeddings=length)).build_input_ids(PROMPT, 1)
