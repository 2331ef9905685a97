"""A video request's checks outside a server: preprocess (a model without videos, tags, sampling values,
the vision batch) and the language model's engine (video_frames against the prompt and the features),
and the frame pooling against transformers' LlavaNextVideoPooler. Served end to end:
tests/test_e2e_video.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llava_triton.engine import check_image_tensor_shape, plan_videos, pool_frames
from llava_triton.errors import InvalidRequestError
from llava_triton.preprocess import Preprocessor, video_sampling
from llava_triton.spec import IN_FPS, IN_NUM_FRAMES, ModelSpec, ServingConfig
from llava_triton.testing.reference import VIDEO_PRESET, preset_checkpoint
from llava_triton.testing.video_corpus import make_clip

SERVING = ServingConfig()


@pytest.fixture(scope="module")
def video_checkpoint():
    return preset_checkpoint(VIDEO_PRESET)


@pytest.fixture(scope="module")
def video_preprocessor(video_checkpoint):
    return Preprocessor.from_pretrained(video_checkpoint, ModelSpec.from_pretrained(video_checkpoint), SERVING)


@pytest.fixture(scope="module")
def clip():
    return make_clip(frames=12, fps=12, width=96, height=72)


def test_a_model_without_videos_refuses_them_by_name(tiny_checkpoint, clip):
    preprocessor = Preprocessor.from_pretrained(tiny_checkpoint, ModelSpec.from_pretrained(tiny_checkpoint), SERVING)
    with pytest.raises(InvalidRequestError, match=r"this model \(llava\) takes no videos"):
        preprocessor.prepare([], "Describe it.", videos=[clip])
    # Its prompts may say <video>: it is text there.
    assert len(preprocessor.prepare([], "What is a <video>?").input_ids) > 0


@pytest.mark.parametrize("prompt, videos, options, expect", [
    ("Describe <video> and <video>.", 1, {}, r"2 <video> tags but 1 videos"),
    ("Describe <video>.", 0, {}, r"1 <video> tags but 0 videos"),
    ("Describe it.", 2, {}, r"too many videos: 2.*max_videos_per_request"),
    ("Describe it.", 1, {"num_frames": 33}, r"num_frames 33 .*max_frames_per_request"),
    ("Describe it.", 1, {"num_frames": 4, "fps": 2.0}, r"num_frames \(4\) or fps \(2\), not both"),
    ("Describe it.", 1, {"fps": float("nan")}, r"fps nan"),
], ids=["more tags than videos", "a tag without a video", "too many videos", "num_frames past the limit",
        "num_frames and fps", "fps not a number"])
def test_video_requests_are_refused_by_name(video_preprocessor, clip, prompt, videos, options, expect):
    with pytest.raises(InvalidRequestError, match=expect):
        video_preprocessor.prepare([], prompt, videos=[clip] * videos, **options)


def test_frames_and_tiles_share_the_vision_batch(video_checkpoint, clip):
    spec = ModelSpec.from_pretrained(video_checkpoint)
    preprocessor = Preprocessor.from_pretrained(video_checkpoint, spec,
                                                dataclasses.replace(SERVING, vision_max_batch_size=8,
                                                                    vision_preferred_batch_sizes=(8,)))
    from tests.test_anyres import SHAPES, png

    image = png(*SHAPES["landscape 4:3"], 0)  # 3 tiles with tiny-next's pinpoints, or more
    tiles = len(preprocessor.prepare([image], "Describe it.").pixel_values)
    expect = rf"{tiles} tiles and {9 - tiles} video frames.*vision_max_batch_size"
    with pytest.raises(InvalidRequestError, match=expect):
        preprocessor.prepare([image], "Describe it.", videos=[clip], num_frames=9 - tiles)
    prepared = preprocessor.prepare([image], "Describe it.", videos=[clip], num_frames=8 - tiles)
    assert len(prepared.pixel_values) == 8 and prepared.video_frames.tolist() == [8 - tiles]
    video_tokens = int((prepared.input_ids == spec.video_token_index).sum())
    assert video_tokens == (8 - tiles) * spec.num_frame_tokens


def test_video_sampling_inputs_are_one_value_of_their_type():
    assert video_sampling({IN_NUM_FRAMES: None, IN_FPS: None}) == (None, 0.0)
    assert video_sampling({IN_NUM_FRAMES: np.array([8], np.int32), IN_FPS: np.array([0.5], np.float32)}) == (8, 0.5)
    with pytest.raises(InvalidRequestError, match="num_frames must hold exactly one value"):
        video_sampling({IN_NUM_FRAMES: np.array([8, 9], np.int32), IN_FPS: None})
    with pytest.raises(InvalidRequestError, match="fps has dtype int32"):
        video_sampling({IN_NUM_FRAMES: None, IN_FPS: np.array([2], np.int32)})


# --- the language model's side ---------------------------------------------------------------------------

def video_ids(spec: ModelSpec, frames: int) -> torch.Tensor:
    return torch.tensor([1, 5, *[spec.video_token_index] * (frames * spec.num_frame_tokens), 7, 9])


@pytest.mark.parametrize("frames, expect", [
    (np.array([3, 1]), r"holds 2 videos, more than max_videos_per_request"),
    (np.array([0]), r"at least 1 frame a video"),
    (np.array([33]), r"at most max_frames_per_request \(32\)"),
    (np.array([[3]]), r"must be INT64 \[n\]"),
    (np.array([3.0]), r"must be INT64 \[n\]"),
    (np.array([2]), r"holds 48 video tokens, the 1 videos of video_frames make 32"),
], ids=["too many videos", "no frames", "too many frames", "two dimensions", "floats", "tokens and frames differ"])
def test_video_frames_are_checked_against_the_prompt(video_checkpoint, frames, expect):
    spec = ModelSpec.from_pretrained(video_checkpoint)
    with pytest.raises(InvalidRequestError, match=expect):
        plan_videos(video_ids(spec, 3), frames, spec, SERVING)
    assert plan_videos(video_ids(spec, 3), np.array([3]), spec, SERVING) == (3,)


def test_a_model_without_videos_refuses_video_frames(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint)
    with pytest.raises(InvalidRequestError, match=r"takes no videos, but video_frames was sent"):
        plan_videos(torch.tensor([1, 2, 3]), np.array([2]), spec, SERVING)
    assert plan_videos(torch.tensor([1, 2, 3]), None, spec, SERVING) == ()


@pytest.mark.parametrize("mode", ["average", "max"])
def test_pooling_equals_transformers_pooler(video_checkpoint, mode):
    from transformers import LlavaNextVideoConfig
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

    spec = dataclasses.replace(ModelSpec.from_pretrained(video_checkpoint), spatial_pool_mode=mode)
    config = LlavaNextVideoConfig.from_pretrained(video_checkpoint)
    config.spatial_pool_mode = mode
    features = torch.randn(5, spec.num_image_tokens, spec.vision_hidden_size,
                           generator=torch.Generator().manual_seed(0))
    pooled = pool_frames(features, spec)
    assert pooled.shape == (5, spec.num_frame_tokens, spec.vision_hidden_size)
    assert torch.equal(pooled, LlavaNextVideoPooler(config)(features))
    check_image_tensor_shape(tuple(features.shape), spec, "image_features")


def test_the_default_frame_count_is_within_the_request_limit():
    with pytest.raises(ValueError, match="default_num_frames 40 must not exceed max_frames_per_request 32"):
        ServingConfig(default_num_frames=40)
    assert ServingConfig(default_num_frames=4, max_frames_per_request=4).default_num_frames == 4


def test_the_spec_refuses_what_it_cannot_pool(video_checkpoint):
    spec = ModelSpec.from_pretrained(video_checkpoint)
    with pytest.raises(ValueError, match="unsupported spatial_pool_mode 'conv'"):
        dataclasses.replace(spec, spatial_pool_mode="conv")
    with pytest.raises(ValueError, match="spatial_pool_stride 9 must be in"):
        dataclasses.replace(spec, spatial_pool_stride=9)
    with pytest.raises(ValueError, match="must be an id other than the image token's"):
        dataclasses.replace(spec, video_token_index=spec.image_token_index)
    with pytest.raises(ValueError, match="for llava_next_video checkpoints only"):
        dataclasses.replace(spec, model_type="llava_next")
