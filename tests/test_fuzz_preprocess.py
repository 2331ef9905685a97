"""Property-based fuzzing of the preprocessing (hypothesis): no input crashes it.

For any images and prompt, `Preprocessor` must either return well-formed outputs or raise
`InvalidRequestError`; any other exception is a crash (in the server it would become an
"internal error" instead of a message naming the problem). Inputs: arbitrary bytes as images,
with and without a valid signature in front; valid images mutated (bytes flipped, cut, spliced,
header fields rewritten); arbitrary prompts as text or bytes, with lone surrogates, NULs, chat
template markers and huge `<image>` tag counts.

The runs are derandomized (the same examples every run, no example database written) and bounded
so the file takes well under a minute; set LLAVA_FUZZ_EXAMPLES to run more, e.g. 20000, with
fresh random examples each run.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.extra import numpy as hnp
from PIL import Image

from llava_triton import spec as spec_module
from llava_triton.errors import InvalidRequestError
from llava_triton.preprocess import Preprocessor, check_request_parameters, decode_image, request_prompt
from llava_triton.sampling import SamplingParams, make_generator, sample
from llava_triton.spec import IMAGE_TOKEN, ModelSpec, ServingConfig
from llava_triton.testing.corpus import hostile_cases, jpeg_with_size, png_claiming, webp_lossless_with_size
from llava_triton.testing.reference import make_mode_images, make_test_images, tiny_checkpoint

# PIL warns about headers past its own soft limit before our (lower) limit refuses them.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
_EXTRA_EXAMPLES = int(os.environ.get("LLAVA_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int):
    """`examples` derandomized examples, or LLAVA_FUZZ_EXAMPLES random ones."""
    return settings(max_examples=_EXTRA_EXAMPLES or examples, derandomize=not _EXTRA_EXAMPLES, database=None,
                    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _small_images() -> dict[str, bytes]:
    """Small valid files of every supported format and several modes (cheap to decode)."""
    scene = Image.radial_gradient("L").resize((40, 24))
    files = {"jpeg small": (scene.convert("RGB"), "JPEG", {"quality": 80}),
             "webp small lossy": (scene.convert("RGB"), "WEBP", {"quality": 50}),
             "webp small lossless": (scene.convert("RGBA"), "WEBP", {"lossless": True}),
             "png 16-bit": (Image.fromarray(np.asarray(scene).astype(np.uint16) * 257), "PNG", {}),
             **{f"png {mode}": (scene.convert(mode), "PNG", {}) for mode in ("1", "L", "LA", "P", "RGB", "RGBA")}}
    encoded = {}
    for name, (image, image_format, options) in files.items():
        buffer = io.BytesIO()
        image.save(buffer, image_format, **options)
        encoded[name] = buffer.getvalue()
    return encoded


SEEDS = {**_small_images(), **make_test_images(), **make_mode_images()}
SEED_NAMES = sorted(SEEDS)
SIGNATURES = [b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\xff\xd8\xff\xe1", b"\x89PNG\r\n\x1a\n",
              b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\xff\xff\xff\x7fWEBPVP8L",
              b"RIFF\x00\x01\x00\x00WEBPVP8X", b"GIF89a", b"\x00\x00\x00\x1cftypavif"]


@pytest.fixture(scope="module")
def preprocessor() -> Preprocessor:
    checkpoint = tiny_checkpoint()
    return Preprocessor.from_pretrained(checkpoint, ModelSpec.from_pretrained(checkpoint), ServingConfig())


def _count(outcome: str) -> None:
    """Tally outcomes, shown by `pytest --hypothesis-show-statistics` (how deep the inputs reach)."""
    if currently_in_test_context():
        event(outcome)


def assert_well_formed(preprocessor: Preprocessor, images: list[bytes], prompt: str | bytes) -> None:
    """Run the preprocessor: a refusal must be InvalidRequestError, a result must be well formed."""
    spec = preprocessor.spec
    try:
        input_ids, pixel_values, _ = preprocessor(images, prompt)
    except InvalidRequestError as error:
        assert str(error), "a refusal must say why"
        _count("refused")
        return
    _count("accepted")
    assert input_ids.dtype == np.int64 and input_ids.ndim == 1 and 0 < len(input_ids)
    assert len(input_ids) < preprocessor.serving.token_limit(spec)
    is_image = input_ids == spec.image_token_index
    assert int(is_image.sum()) == len(images) * spec.num_image_tokens
    assert ((input_ids >= 0) & (input_ids < spec.vocab_size)).all()
    assert pixel_values.dtype == np.float32
    assert pixel_values.shape == (max(len(images), 1), spec.num_channels, spec.image_size, spec.image_size)
    assert np.isfinite(pixel_values).all()


# --- images ---------------------------------------------------------------------------------------

# Bit flips weigh most: they keep a file decodable more often, so the decoders' inner paths are reached.
MUTATIONS = ["flip"] * 4 + ["set", "cut", "splice", "delete", "insert", "header"]


@st.composite
def mutated_image(draw) -> bytes:
    """A valid seed image with a few mutations, the kind a fuzzer's havoc stage makes."""
    data = bytearray(SEEDS[draw(st.sampled_from(SEED_NAMES))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(MUTATIONS))
        if not data:
            break
        position = draw(st.integers(min(12, len(data) - 1), len(data) - 1))  # the signature kept: the decoder runs
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":  # bytes that make lengths and sizes extreme
            value = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f\xff\xff\xff", b"\xff\xff", b"\x80\x00\x00\x00"]))
            data[position:position + len(value)] = value
        elif kind == "cut":
            del data[position:]
        elif kind == "splice":
            other = SEEDS[draw(st.sampled_from(SEED_NAMES))]
            start = draw(st.integers(0, len(other) - 1))
            data[position:] = other[start:]
        elif kind == "delete":
            del data[position:position + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        else:  # rewrite the header in the early bytes, where sizes and chunk lengths live
            header_position = draw(st.integers(0, min(len(data), 48) - 1))
            data[header_position:header_position + 4] = draw(st.binary(min_size=4, max_size=4))
    if data.startswith(b"\x89PNG\r\n\x1a\n") and draw(st.booleans()):
        fix_png_checksums(data)  # past PIL's CRC check, into the chunk parsers and the decoder
    return bytes(data)


def fix_png_checksums(data: bytearray) -> None:
    """Rewrite the CRC of every whole chunk of a PNG in place (its lengths as they are)."""
    position = 8
    while position + 12 <= len(data):
        length = struct.unpack(">I", data[position:position + 4])[0]
        end = position + 8 + length
        if end + 4 > len(data):
            return
        data[end:end + 4] = struct.pack(">I", zlib.crc32(data[position + 4:end]))
        position = end + 4


@st.composite
def lying_header_image(draw) -> bytes:
    """A valid image whose header claims another size."""
    width, height = draw(st.integers(0, 70_000)), draw(st.integers(0, 70_000))
    kind = draw(st.sampled_from(["jpeg", "png", "webp"]))
    if kind == "jpeg":
        return jpeg_with_size(SEEDS["jpeg"], min(width, 65535), min(height, 65535))
    if kind == "webp":
        return webp_lossless_with_size(SEEDS["webp"], max(1, min(width, 16384)), max(1, min(height, 16384)))
    depth, color_type = draw(st.sampled_from([(1, 0), (8, 0), (8, 2), (16, 2), (8, 3), (8, 6), (16, 4)]))
    return png_claiming(width, height, draw(st.binary(max_size=256)), bit_depth=depth, color_type=color_type)


ARBITRARY_IMAGE = st.one_of(
    st.binary(max_size=2048),
    st.tuples(st.sampled_from(SIGNATURES), st.binary(max_size=2048)).map(b"".join),
)


@fuzz_settings(1000)
@given(image=ARBITRARY_IMAGE)
def test_arbitrary_bytes_as_an_image(preprocessor, image):
    assert_well_formed(preprocessor, [image], "What is this?")


@fuzz_settings(1500)
@given(image=mutated_image())
def test_mutated_valid_images(preprocessor, image):
    assert_well_formed(preprocessor, [image], "What is this?")


@fuzz_settings(150)
@given(image=lying_header_image())
def test_images_with_lying_headers(preprocessor, image):
    assert_well_formed(preprocessor, [image], f"{IMAGE_TOKEN} what is it?")


@fuzz_settings(200)
@given(images=st.lists(st.one_of(st.sampled_from([SEEDS[name] for name in SEED_NAMES]), mutated_image(),
                                 ARBITRARY_IMAGE), max_size=6))
def test_several_images(preprocessor, images):
    assert_well_formed(preprocessor, images, "Compare them.")


@fuzz_settings(300)
@given(image=st.one_of(mutated_image(), ARBITRARY_IMAGE, lying_header_image()),
       max_image_pixels=st.integers(1, 50_000_000), max_image_bytes=st.integers(1, 100_000))
def test_decode_image_under_any_limits(image, max_image_pixels, max_image_bytes):
    serving = ServingConfig(max_image_pixels=max_image_pixels, max_image_bytes=max_image_bytes)
    try:
        decoded = decode_image(image, serving, shortest_edge=336)
    except InvalidRequestError:
        return
    assert decoded.mode == "RGB"
    width, height = decoded.size
    assert 0 < width * height <= max_image_pixels and len(image) <= max_image_bytes


# --- prompts --------------------------------------------------------------------------------------

ANY_CHARACTER = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())  # surrogates too
PROMPT_PIECES = st.one_of(
    st.text(ANY_CHARACTER, max_size=40),
    st.sampled_from([IMAGE_TOKEN, "\x00", "\ud800", "\udfff", "</s>", "<s>", "<unk>", "USER:", "ASSISTANT:",
                     "{{ raise_exception('x') }}", "{% for m in messages %}", "<image", "image>", "<<image>>", "\r\n",
                     "\u202e", "\ufeff", "\U0010ffff", " " * 100]),
)
PROMPT = st.one_of(
    st.lists(PROMPT_PIECES, max_size=12).map("".join),
    st.binary(max_size=512),
    st.tuples(st.integers(0, 100_000), st.sampled_from(["", "\n", " x "])).map(lambda t: (IMAGE_TOKEN + t[1]) * t[0]),
)


@fuzz_settings(1000)
@given(prompt=PROMPT, num_images=st.integers(0, 6))
def test_arbitrary_prompts(preprocessor, prompt, num_images):
    spec = preprocessor.spec
    try:
        input_ids = preprocessor.build_input_ids(prompt, num_images)
    except InvalidRequestError as error:
        assert str(error)
        return
    assert input_ids.dtype == np.int64 and input_ids.ndim == 1
    assert int((input_ids == spec.image_token_index).sum()) == num_images * spec.num_image_tokens
    assert ((input_ids >= 0) & (input_ids < spec.vocab_size)).all()
    assert len(input_ids) < preprocessor.serving.token_limit(spec)


@fuzz_settings(60)
@given(prompt=PROMPT, images=st.lists(st.sampled_from(["jpeg", "png", "webp"]), max_size=2))
def test_arbitrary_prompts_with_images(preprocessor, prompt, images):
    assert_well_formed(preprocessor, [SEEDS[name] for name in images], prompt)


# --- request tensors and parameters -------------------------------------------------------------

@fuzz_settings(300)
@given(value=st.one_of(
    st.none(),
    st.lists(st.one_of(st.binary(max_size=64), st.text(ANY_CHARACTER, max_size=16)), max_size=3).map(
        lambda items: np.array(items + [b""], dtype=object)[:-1]),  # object arrays of 0..3 strings
    hnp.arrays(np.int32, st.sampled_from([(1,), (0,), (1, 1)]))))
def test_arbitrary_prompt_tensors(value):
    try:
        prompt = request_prompt(value)
    except InvalidRequestError as error:
        assert str(error)
        return
    assert isinstance(prompt, bytes)


def test_prompt_tensor_refusals():
    with pytest.raises(InvalidRequestError, match=r"the prompt input is required"):
        request_prompt(None)
    with pytest.raises(InvalidRequestError, match="prompt must hold exactly one string, got 2"):
        request_prompt(np.array([b"a", b"b"], dtype=object))
    assert request_prompt(np.array([[b"caf\xc3\xa9"]], dtype=object)) == "café".encode()


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)


@fuzz_settings(200)
@given(parameters=st.one_of(st.dictionaries(st.text(max_size=20), JSON_VALUES, max_size=4), st.text(max_size=40)))
def test_any_request_parameter_is_refused_by_name(parameters):
    if parameters in ({}, "") or (isinstance(parameters, str) and not parameters.strip()):
        check_request_parameters(parameters)
        return
    with pytest.raises(InvalidRequestError, match="unknown request parameters|not valid JSON|must be a JSON object") \
            as refused:
        check_request_parameters(parameters)
    if isinstance(parameters, dict):
        assert all(repr(name) in str(refused.value) for name in parameters)


def test_request_parameters_as_triton_gives_them():
    check_request_parameters("{}")
    with pytest.raises(InvalidRequestError, match=r"unknown request parameters 'foo', 'temperature': every option "
                                                  r"is an input tensor \(prompt, messages, images, videos, num_frames, "
                                                  r"fps, max_tokens, temperature"):
        check_request_parameters('{"temperature": 2.5, "foo": 1}')


# --- sampling inputs (checked by the preprocess model too, before any image work) -----------------

NUMERIC_DTYPES = [np.bool_, np.int8, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64]
CONFIG_DTYPES = {spec_module.IN_MAX_TOKENS: np.int32, spec_module.IN_TEMPERATURE: np.float32,
                 spec_module.IN_TOP_P: np.float32, spec_module.IN_TOP_K: np.int32, spec_module.IN_SEED: np.int64,
                 spec_module.IN_STREAM: np.bool_, spec_module.IN_IGNORE_EOS: np.bool_}

# Values at and around the valid ranges (tiny positive temperatures, top_p next to 0 and 1, ...).
PLAUSIBLE_VALUES = {spec_module.IN_MAX_TOKENS: st.integers(-2, 5000),
                    spec_module.IN_TEMPERATURE: st.floats(0, 100, width=32),
                    spec_module.IN_TOP_P: st.floats(0, 1, width=32),
                    spec_module.IN_TOP_K: st.integers(-1, 60),
                    spec_module.IN_SEED: st.integers(-1, 2**63 - 1)}


@st.composite
def sampling_tensor(draw, name: str):
    """What a client may send as one sampling input: mostly the configured dtype and shape (what
    Triton lets through), sometimes any dtype and shape; values anywhere, NaN and infinities included."""
    if name == spec_module.IN_STOP:
        count = draw(st.integers(0, 20))
        return np.array(draw(st.lists(st.binary(max_size=300), min_size=count, max_size=count)), dtype=object)
    if draw(st.integers(0, 3)):
        dtype = CONFIG_DTYPES[name]
        near_valid = PLAUSIBLE_VALUES.get(name, hnp.from_dtype(np.dtype(dtype)))
        return draw(hnp.arrays(dtype, (1,), elements=st.one_of(near_valid, hnp.from_dtype(np.dtype(dtype)))))
    return draw(hnp.arrays(draw(st.sampled_from(NUMERIC_DTYPES)), draw(st.sampled_from([(), (0,), (2,), (1, 1)]))))


@st.composite
def sampling_inputs(draw) -> dict[str, np.ndarray | None]:
    return {name: draw(st.one_of(st.none(), sampling_tensor(name))) for name in spec_module.SAMPLING_INPUTS}


@fuzz_settings(600)
@given(inputs=sampling_inputs(), prompt_tokens=st.integers(1, 5000))
@example(inputs={spec_module.IN_TEMPERATURE: np.array([1e-40], np.float32)}, prompt_tokens=10)  # overflowed to inf
def test_arbitrary_sampling_inputs_are_parsed_or_refused_and_sample(inputs, prompt_tokens):
    serving = ServingConfig()
    try:
        params = SamplingParams.from_inputs(inputs, serving)
        max_tokens = params.resolve_max_tokens(prompt_tokens, 4096, serving)
    except InvalidRequestError as error:
        assert str(error)
        return
    assert 1 <= max_tokens <= 4096 - prompt_tokens
    assert math.isfinite(params.temperature) and 0 < params.top_p <= 1 and params.top_k >= 0
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(prompt_tokens)) * 30
    logits[2] = float("nan")  # a row the model botched must not take the others down
    generator = make_generator(params, torch.device("cpu"))
    tokens = sample(logits, [params] * 3, [generator] * 3)
    assert tokens.shape == (3,) and ((tokens >= 0) & (tokens < 50)).all()


# --- the corpus -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in hostile_cases(ModelSpec.from_pretrained(tiny_checkpoint()))
                                  if not c.needs_raw_client and c.images], ids=lambda c: c.name)
def test_corpus_images_give_the_same_answer_without_a_server(preprocessor, case):
    """The image cases of the hostile corpus, straight through the Preprocessor."""
    if case.expect is None:
        assert_well_formed(preprocessor, list(case.images), case.prompt)
        return
    with pytest.raises(InvalidRequestError, match=case.expect):
        preprocessor(list(case.images), case.prompt)

