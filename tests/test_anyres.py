"""LLaVA-NeXT's tiles and image tokens (llava_triton.anyres) against transformers' own code:

- the image token count of every image size equals `LlavaNextProcessor`'s, for a sweep of sizes, with
  the tiny presets' 112-pixel tiles and with LLaVA-1.6's 336-pixel tiles and pinpoints;
- the tile count equals what `LlavaNextImageProcessor` makes;
- `pack_index` gathers exactly what `LlavaNextModel.pack_image_features` builds;
- preprocessing equals the processor for images of every shape, and refuses what passes a limit by name;
- the language model's checks of what preprocess sent (`engine.plan_images`).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_triton.anyres import max_tiles_per_image, pack_index, tile_layout
from llava_triton.checkpoint import load_preset
from llava_triton.engine import plan_images
from llava_triton.errors import InvalidRequestError
from llava_triton.preprocess import Preprocessor
from llava_triton.spec import IMAGE_EMBEDS, ModelSpec, ServingConfig
from llava_triton.testing.reference import NEXT_PRESETS, hf_inputs, hf_model, hf_processor, preset_checkpoint

# (width, height): the shapes the issue names, each relative to the tiny presets' 112-pixel tiles.
SHAPES = {
    "square": (224, 224),
    "landscape 4:3": (320, 240),
    "portrait": (200, 360),
    "very wide strip": (900, 30),
    "smaller than a tile": (60, 50),
    "larger than the largest pinpoint": (1000, 800),
}


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((width, height), Image.NEAREST).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=NEXT_PRESETS)
def next_checkpoint(request):
    return preset_checkpoint(request.param)


def processor_with_336_tiles(checkpoint):
    """A LlavaNextProcessor with llava-v1.6-mistral-7b's tiles and pinpoints (no 7B weights needed)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config = load_preset("llava-v1.6-mistral-7b")["config"]
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=config["image_grid_pinpoints"], size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336})
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=hf_processor(checkpoint).tokenizer,
                                   patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    return processor, ModelSpec.from_hf_config(config)


def processor_token_count(processor, height: int, width: int) -> int:
    tile = processor.image_processor.crop_size["height"]
    return processor._get_number_of_features(height, width, tile, tile) - 1  # "default": CLS dropped


def test_image_tokens_equal_the_processors_for_a_sweep_of_sizes(next_checkpoint):
    processor = hf_processor(next_checkpoint)
    spec = ModelSpec.from_pretrained(next_checkpoint)
    sizes = list(itertools.product(range(1, 1200, 37), range(1, 1200, 41)))
    counts = {(h, w): tile_layout(h, w, spec).num_image_tokens for h, w in sizes}
    expected = {(h, w): processor_token_count(processor, h, w) for h, w in sizes}
    assert counts == expected
    assert len(set(counts.values())) > 30  # the sweep reaches many different layouts


def test_image_tokens_with_llava_1_6_tiles_and_pinpoints():
    processor, spec = processor_with_336_tiles(preset_checkpoint("tiny-next"))
    sizes = list(itertools.product(range(1, 3000, 97), range(1, 3000, 89))) + [(768, 1024), (336, 336), (672, 672)]
    assert {size: tile_layout(*size, spec).num_image_tokens for size in sizes} == \
        {size: processor_token_count(processor, *size) for size in sizes}
    # The bench's W2 image: a 2x2 grid cut to 4:3 (42 of 48 feature rows), a newline per row.
    layout = tile_layout(768, 1024, spec)
    assert (layout.rows, layout.cols, layout.num_tiles) == (2, 2, 5)
    assert layout.num_image_tokens == 576 + 36 * 48 + 36
    assert max_tiles_per_image(spec) == 5


def test_tile_counts_equal_the_image_processors(next_checkpoint):
    processor = hf_processor(next_checkpoint)
    spec = ModelSpec.from_pretrained(next_checkpoint)
    for width, height in [*SHAPES.values(), (112, 112), (113, 111), (336, 112), (5, 500)]:
        tiles = processor.image_processor([Image.new("RGB", (width, height))], do_pad=False,
                                          return_tensors="np")["pixel_values"][0]
        assert tiles.shape[0] == tile_layout(height, width, spec).num_tiles, (width, height)


def test_pack_index_gathers_what_transformers_packs(next_checkpoint):
    model = hf_model(next_checkpoint).model
    spec = ModelSpec.from_pretrained(next_checkpoint)
    sizes = [(240, 320), (360, 200), (30, 900), (50, 60), (800, 1000), (112, 112)]
    layouts = [tile_layout(h, w, spec) for h, w in sizes]
    generator = torch.Generator().manual_seed(0)
    tiles = [torch.randn(layout.num_tiles, spec.num_image_tokens, 8, generator=generator) for layout in layouts]
    newline = torch.randn(8, generator=generator)
    expected, lengths = model.pack_image_features(tiles, torch.tensor(sizes), "default", image_newline=newline)
    source = torch.cat([torch.cat(tiles).reshape(-1, 8), newline[None]])
    packed = source[torch.from_numpy(pack_index(layouts))]
    assert torch.equal(packed, torch.cat(expected))
    assert lengths.tolist() == [layout.num_image_tokens for layout in layouts]


@pytest.fixture(scope="module")
def next_preprocessor(next_checkpoint):
    return Preprocessor.from_pretrained(next_checkpoint, ModelSpec.from_pretrained(next_checkpoint), ServingConfig())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_preprocessing_equals_the_processor(next_checkpoint, next_preprocessor, shape):
    images = [png(*SHAPES[shape])]
    input_ids, pixel_values, image_sizes = next_preprocessor(images, "What is in the picture?")
    expected_ids, expected_pixels = hf_inputs(next_checkpoint, images, "What is in the picture?")
    np.testing.assert_array_equal(input_ids, expected_ids)
    np.testing.assert_array_equal(pixel_values, expected_pixels)
    assert image_sizes.tolist() == [list(reversed(SHAPES[shape]))]


def test_two_images_and_no_image_equal_the_processor(next_checkpoint, next_preprocessor):
    images = [png(320, 240), png(200, 360, 1)]
    for prompt, sent in (("Compare <image> with <image>.", images), ("Tell me about the sea.", [])):
        input_ids, pixel_values, image_sizes = next_preprocessor(sent, prompt)
        expected_ids, expected_pixels = hf_inputs(next_checkpoint, sent, prompt)
        np.testing.assert_array_equal(input_ids, expected_ids)
        if sent:
            np.testing.assert_array_equal(pixel_values, expected_pixels)
        else:  # one all-zero tile: Triton cannot batch zero tiles (see Preprocessor.__call__)
            assert pixel_values.shape[0] == 1 and not pixel_values.any()
        assert image_sizes.shape == (len(sent), 2)


def with_serving(preprocessor, **serving):
    return Preprocessor(preprocessor.tokenizer, preprocessor.image_processor, preprocessor.chat_template,
                        preprocessor.spec, ServingConfig(**serving))


@pytest.mark.parametrize("serving, images, message", [
    ({"max_image_tiles": 4}, [png(60, 50), png(320, 240)],
     r"image 1: 320x240 makes 5 tiles \(2x2 and the base\), more than the limit of 4 \(max_image_tiles\)"),
    ({"vision_max_batch_size": 8, "vision_preferred_batch_sizes": [8]}, [png(320, 240), png(224, 224)],
     r"the images make 10 tiles, more than the vision encoder's largest batch of 8 \(vision_max_batch_size\)"),
    ({"max_image_tokens": 500}, [png(320, 240), png(224, 224)],
     r"the images make \d+ image tokens \(\d+, \d+\), more than the limit of 500 per request \(max_image_tokens\)"),
    ({"max_prompt_tokens": 200}, [png(320, 240)], r"prompt is \d+ tokens .*the limit is 200 \(max_prompt_tokens\)"),
    ({"max_seq_len": 200}, [png(320, 240)],
     r"prompt is \d+ tokens .*the limit is 199 \(context of 200 tokens, one left for the answer; max_seq_len\)"),
])
def test_limits_refuse_by_name_before_any_pixel_values(next_preprocessor, serving, images, message, monkeypatch):
    limited = with_serving(next_preprocessor, **serving)
    monkeypatch.setattr(limited, "_pixel_values", lambda *args: pytest.fail("pixel values made past a limit"))
    with pytest.raises(InvalidRequestError, match=message):
        limited(images, "What is in the picture?")


def test_a_next_checkpoint_with_other_pinpoints_than_its_processor_is_refused(next_checkpoint, tmp_path):
    spec = ModelSpec.from_pretrained(next_checkpoint)
    other = dataclasses.replace(spec, image_grid_pinpoints=((112, 224), (224, 112)))
    with pytest.raises(ValueError, match="image processor tiles to .* image_grid_pinpoints are"):
        Preprocessor.from_pretrained(next_checkpoint, other, ServingConfig())


@pytest.mark.parametrize("fields, message", [
    ({"image_grid_pinpoints": ()}, "needs image_grid_pinpoints"),
    ({"image_grid_pinpoints": ((112, 200),)}, "not a multiple"),
    ({"vision_feature_select_strategy": "full"}, "needs vision_feature_select_strategy 'default'"),
    ({"model_type": "llava"}, "for llava_next checkpoints only"),
    ({"model_type": "qwen2_vl"}, "unsupported model_type"),
])
def test_model_spec_refuses_what_llava_next_cannot_serve(next_checkpoint, fields, message):
    data = {**ModelSpec.from_pretrained(next_checkpoint).to_dict(), **fields}
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_dict(data)


def test_mistral_sliding_window_bounds_the_served_context():
    config = json.loads(json.dumps(load_preset("tiny-next-mistral")["config"]))
    assert ModelSpec.from_hf_config(config).max_position_embeddings == 32768
    config["text_config"]["sliding_window"] = 4096
    assert ModelSpec.from_hf_config(config).max_position_embeddings == 4096


# -- the language model's checks of what preprocess sent ------------------------------------------------

@pytest.fixture(scope="module")
def next_spec():
    return ModelSpec.from_pretrained(preset_checkpoint("tiny-next"))


def request(spec, sizes):
    layouts = [tile_layout(h, w, spec) for h, w in sizes]
    ids = [5] + [spec.image_token_index] * sum(layout.num_image_tokens for layout in layouts) + [7]
    tiles = sum(layout.num_tiles for layout in layouts)
    return torch.tensor(ids), (max(tiles, 1), spec.num_image_tokens, spec.text_hidden_size), \
        np.array(sizes, dtype=np.int64).reshape(-1, 2)


def test_plan_images_packs_each_image(next_spec):
    ids, shape, sizes = request(next_spec, [(240, 320), (50, 60)])
    plan = plan_images(ids, shape, sizes, next_spec, ServingConfig())
    # A 2x2 grid; a 1x2 one (the smallest pinpoint that holds 50x60 whole); each with its base.
    assert (plan.tiles, plan.sent_tiles) == ((5, 3), 8)
    assert sum(plan.tokens) == len(plan.index) == int((ids == next_spec.image_token_index).sum())
    # The first image read from the embedding cache: only the second's tiles are sent.
    assert plan_images(ids, (3, *shape[1:]), sizes, next_spec, ServingConfig(),
                       cached=np.array([True, False])).sent_tiles == 3
    empty = plan_images(*request(next_spec, [])[:1], None, np.zeros((0, 2), np.int64), next_spec, ServingConfig())
    assert (empty.tiles, empty.sent_tiles, empty.index) == ((), 0, None)


@pytest.mark.parametrize("change, message", [
    (lambda ids, shape, sizes: (ids[:-3], shape, sizes), "image tokens, the 1 images of image_sizes make"),
    (lambda ids, shape, sizes: (ids, (2, *shape[1:]), sizes), "the images make 5 tiles but image_embeds holds 2"),
    (lambda ids, shape, sizes: (ids, (shape[0], shape[1], 64), sizes), "must have shape"),
    (lambda ids, shape, sizes: (ids, shape, sizes.reshape(-1)), r"image_sizes must be INT64 \[n, 2\]"),
    (lambda ids, shape, sizes: (ids, shape, sizes.astype(np.float32)), r"image_sizes must be INT64"),
    (lambda ids, shape, sizes: (ids, shape, -sizes), "outside"),
    (lambda ids, shape, sizes: (ids, shape, sizes * 10**7), "outside"),
    (lambda ids, shape, sizes: (torch.cat([ids, torch.tensor([99999])]), shape, sizes), "outside the vocabulary"),
    (lambda ids, shape, sizes: (ids, shape, np.repeat(sizes, 5, axis=0)),
     r"image_sizes holds 5 images, more than max_images_per_request \(4\)"),
    (lambda ids, shape, sizes: (ids, shape, sizes, np.array([True, False])),
     r"image_cached must hold one flag per image \(1\), got shape \[2\]"),
])
def test_plan_images_refuses_inconsistent_inputs(next_spec, change, message):
    with pytest.raises(InvalidRequestError, match=message):
        ids, shape, sizes, *cached = change(*request(next_spec, [(240, 320)]))
        plan_images(ids, shape, sizes, next_spec, ServingConfig(), IMAGE_EMBEDS, *cached)
