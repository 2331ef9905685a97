"""llava_triton.video against transformers: the sampled indices, the decoded frames and the pixel
values are theirs; every limit at its edge; every hostile video refused with its limit named."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata, read_video_pyav

from llava_triton.errors import InvalidRequestError
from llava_triton.spec import ServingConfig
from llava_triton.testing.video_corpus import (
    CLIP_FORMATS,
    DECODE_FRAMES,
    clip_frames,
    encode_packets,
    hostile_videos,
    make_clip,
    matroska,
    mp4_claiming_frames,
)
from llava_triton.video import (
    MAX_SAMPLING_FPS,
    FrameTransform,
    VideoInfo,
    check_sampling,
    decode_frames,
    probe_video,
    sample_frame_indices,
    sniff_container,
    video_pixel_table,
)

SERVING = ServingConfig()
# Small limits, so the corpus's cases sized by a limit (bytes, frames) stay small.
SMALL = ServingConfig(max_video_bytes=100_000, max_video_duration_s=20.0, max_video_frames=120,
                      max_video_pixels=320 * 240, max_frames_per_request=8, default_num_frames=8)


def identity(frame: np.ndarray) -> np.ndarray:
    return frame


def given(indices: np.ndarray):
    """A sample_indices_fn for read_video_pyav that picks `indices`."""
    return lambda metadata, **kwargs: indices


def hf_sample(total: int, video_fps: float, **sampling) -> np.ndarray:
    """transformers' BaseVideoProcessor.sample_frames, called without a processor (it needs torchvision)."""
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps, duration=total / video_fps)
    owner = SimpleNamespace(num_frames=None, fps=None)
    return BaseVideoProcessor.sample_frames(owner, metadata, **sampling).numpy()


# --- sampling ------------------------------------------------------------------------------------

# Every total to 130, then awkward and large ones.
TOTALS = [*range(1, 131), 149, 150, 151, 239, 240, 241, 299, 300, 301, 599, 600, 601, 719, 997, 999, 1000]


def test_num_frames_sampling_equals_transformers():
    for total in TOTALS:
        for num_frames in range(1, min(64, total) + 1):
            ours = sample_frame_indices(total, 29.97, num_frames=num_frames)
            np.testing.assert_array_equal(ours, hf_sample(total, 29.97, num_frames=num_frames),
                                          err_msg=f"total={total} num_frames={num_frames}")
            assert ours.dtype == np.int64


def test_float32_arange_sometimes_gives_one_frame_more():
    """transformers' float32 arange gives num_frames + 1 indices for some totals: so do we, and the
    callers count len(indices), never num_frames."""
    assert len(hf_sample(15, 30.0, num_frames=13)) == 14
    assert len(sample_frame_indices(15, 30.0, num_frames=13)) == 14


def test_fps_sampling_equals_transformers():
    compared = 0
    for total in TOTALS:
        for video_fps in (23.976, 25.0, 29.97, 30.0, 60.0):
            for fps in (0.5, 1.0, 2.0, 3.3):
                wanted = int(total / video_fps * fps)
                ours = sample_frame_indices(total, video_fps, fps=fps)
                if 0 < wanted <= total:  # transformers refuses the rest
                    np.testing.assert_array_equal(ours, hf_sample(total, video_fps, fps=fps),
                                                  err_msg=f"total={total} video_fps={video_fps} fps={fps}")
                    compared += 1
                elif wanted == 0:  # a clip shorter than 1 / fps: its first frame
                    np.testing.assert_array_equal(ours, [0])
    assert compared > 1000


def test_short_clip_gives_every_frame():
    """The one difference: transformers refuses num_frames > total; a short clip gives all its frames."""
    with pytest.raises(ValueError, match="exceeds"):
        hf_sample(5, 30.0, num_frames=8)
    np.testing.assert_array_equal(sample_frame_indices(5, 30.0, num_frames=8), np.arange(5))
    np.testing.assert_array_equal(sample_frame_indices(5, 30.0, fps=60.0), np.arange(5))  # 10 wanted
    np.testing.assert_array_equal(sample_frame_indices(5, 30.0, num_frames=5), hf_sample(5, 30.0, num_frames=5))


def test_sample_frame_indices_refuses_bad_arguments():
    with pytest.raises(ValueError, match="total_frames must be positive"):
        sample_frame_indices(0, 30.0, num_frames=4)
    with pytest.raises(ValueError, match="exactly one of num_frames and fps"):
        sample_frame_indices(10, 30.0, num_frames=4, fps=1.0)
    with pytest.raises(ValueError, match="exactly one of num_frames and fps"):
        sample_frame_indices(10, 30.0)
    with pytest.raises(ValueError, match="num_frames must be positive"):
        sample_frame_indices(10, 30.0, num_frames=0)
    with pytest.raises(ValueError, match="positive rates"):
        sample_frame_indices(10, 0.0, fps=1.0)


def test_check_sampling_edges():
    check_sampling(1, 0.0, SERVING)
    check_sampling(SERVING.max_frames_per_request, MAX_SAMPLING_FPS, SERVING)
    check_sampling(8, 1e-6, SERVING)
    for num_frames in (0, -1, SERVING.max_frames_per_request + 1):
        limit = SERVING.max_frames_per_request
        with pytest.raises(InvalidRequestError,
                           match=rf"num_frames {num_frames} is not in \[1, {limit}\] \(max_frames_per_request\)"):
            check_sampling(num_frames, 0.0, SERVING)
    for fps in (-1.0, -0.0001, np.nextafter(60.0, 61.0), 61.0, float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InvalidRequestError, match=r"fps .* must be 0 \(sample num_frames\) or in \(0, 60\]"):
            check_sampling(8, fps, SERVING)


# --- decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("container", "codec"), CLIP_FORMATS)
def test_decoded_frames_equal_transformers(container, codec, tmp_path):
    data = make_clip(codec=codec, container=container, frames=30, fps=30, seed=3)
    assert data == make_clip(codec=codec, container=container, frames=30, fps=30, seed=3)  # deterministic
    info = probe_video(data, SERVING)
    assert (info.width, info.height, info.total_frames, info.fps) == (64, 48, 30, 30.0)
    assert info.container == container.replace("mkv", "matroska")
    path = tmp_path / f"clip.{container}"
    path.write_bytes(data)
    for num_frames in (8, 30):
        indices = sample_frame_indices(info.total_frames, info.fps, num_frames=num_frames)
        frames = decode_frames(data, info, indices, identity)
        # Matroska keeps no frame count (transformers reads 0): its sampler is given ours.
        reference, metadata = read_video_pyav(str(path), sample_indices_fn=given(indices))
        assert metadata.total_num_frames == (info.total_frames if container in ("mp4", "mov") else 0)
        assert metadata.fps == info.fps
        assert frames.shape == (len(indices), 48, 64, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frames, reference)
    assert len({frame.tobytes() for frame in frames}) == 30  # the clip's frames all differ


def test_fractional_frame_rate_and_fps_sampling(tmp_path):
    data = make_clip(frames=24, fps=30000 / 1001, codec="libx264", container="mp4")
    info = probe_video(data, SERVING)
    assert info.fps == pytest.approx(29.97, abs=1e-3)
    indices = sample_frame_indices(info.total_frames, info.fps, fps=3.3)
    np.testing.assert_array_equal(indices, hf_sample(24, info.fps, fps=3.3))
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    reference, _ = read_video_pyav(str(path), sample_indices_fn=given(indices))
    np.testing.assert_array_equal(decode_frames(data, info, indices, identity), reference)


def test_decode_applies_the_transform_as_it_goes():
    data = make_clip(width=96, height=64)
    info = probe_video(data, SERVING)
    transform = FrameTransform({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}})
    frames = decode_frames(data, info, np.array([0, 29]), transform)
    assert frames.shape == (2, 3, 32, 32) and frames.dtype == np.uint8
    full = decode_frames(data, info, np.array([0, 29]), identity)
    np.testing.assert_array_equal(frames[1], transform(full[1]))


def test_decode_frames_refuses_bad_indices():
    data = make_clip(frames=10)
    info = probe_video(data, SERVING)
    for indices in ([], [3, 3], [5, 2], [-1, 2], [[0, 1]]):
        with pytest.raises(ValueError, match="indices must be increasing frame numbers"):
            decode_frames(data, info, np.array(indices, dtype=np.int64), identity)
    with pytest.raises(ValueError, match="frame 10 was asked of a video of 10 frames"):
        decode_frames(data, info, np.array([0, 10]), identity)


def test_decode_errors_name_the_video():
    data = make_clip(codec="libvpx", container="webm")
    info = probe_video(data, SERVING, index=3)
    lying = dataclasses.replace(info, width=32)  # a header size the frames do not have
    with pytest.raises(InvalidRequestError, match=r"^video 3: frame 0 is 64x48, its header says 32x48"):
        decode_frames(data, lying, np.array([0]), identity, index=3)
    with pytest.raises(InvalidRequestError, match=r"^video 3: WebM data cannot be read"):
        decode_frames(data[:100], info, np.array([0]), identity, index=3)


def test_sniffing():
    assert sniff_container(make_clip(container="mov")) == "mov"
    assert sniff_container(make_clip(container="mp4")) == "mp4"
    assert sniff_container(make_clip(codec="libvpx", container="webm")) == "webm"
    assert sniff_container(make_clip(container="mkv")) == "matroska"
    assert sniff_container(b"\x1a\x45\xdf\xa3\xff") == "matroska"  # an unreadable EBML header: FFmpeg decides
    assert sniff_container(b"\x00\x00\x00\x1cftypheic") is None
    assert sniff_container(b"RIFF\x00\x00\x00\x00AVI ") is None


# --- limits at their edges -----------------------------------------------------------------------

def test_max_video_bytes_edge():
    data = make_clip()
    probe_video(data, dataclasses.replace(SERVING, max_video_bytes=len(data)))
    with pytest.raises(InvalidRequestError, match=rf"video 2: {len(data)} bytes is more than the limit of "
                                                  rf"{len(data) - 1} bytes \(max_video_bytes\)"):
        probe_video(data, dataclasses.replace(SERVING, max_video_bytes=len(data) - 1), index=2)


def test_max_video_duration_edge():
    at_limit = dataclasses.replace(SERVING, max_video_duration_s=1.0)
    for container, codec in (("mp4", "libx264"), ("webm", "libvpx")):
        assert probe_video(make_clip(frames=30, fps=30, container=container, codec=codec), at_limit).duration_s == 1.0
        with pytest.raises(InvalidRequestError, match=r"video 0: .* than the limit of 1 s \(max_video_duration_s\)"):
            probe_video(make_clip(frames=31, fps=30, container=container, codec=codec), at_limit)


@pytest.mark.parametrize(("container", "codec"), [("mp4", "libx264"), ("webm", "libvpx")])
def test_max_video_frames_edge(container, codec):
    """From the MP4 header; counted from the WebM packets."""
    at_limit = dataclasses.replace(SERVING, max_video_frames=30)
    data = make_clip(frames=30, container=container, codec=codec)
    info = probe_video(data, at_limit)
    assert info.total_frames == 30
    assert len(decode_frames(data, info, np.arange(30), identity)) == 30
    with pytest.raises(InvalidRequestError, match=r"video 0: (31 frames is )?more than the limit of 30 frames "
                                                  r"\(max_video_frames\)"):
        probe_video(make_clip(frames=31, container=container, codec=codec), at_limit)


def test_max_video_pixels_edge():
    data = make_clip(width=64, height=48)
    info = probe_video(data, dataclasses.replace(SERVING, max_video_pixels=64 * 48))
    assert len(decode_frames(data, info, np.arange(30), identity)) == 30  # FFmpeg's own bound lets it decode
    with pytest.raises(InvalidRequestError, match=r"video 0: 64x48 = 3072 pixels a frame is more than the limit of "
                                                  r"3071 pixels \(max_video_pixels\)"):
        probe_video(data, dataclasses.replace(SERVING, max_video_pixels=64 * 48 - 1))


def test_frame_count_missing_from_the_header_is_counted():
    """Matroska keeps no frame count: the packets are counted (stopping past the limit)."""
    packets, _ = encode_packets("libvpx", list(clip_frames(12, 32, 32)))
    data = matroska(packets, width=32, height=32, default_duration_ns=40_000_000)  # 25 fps
    info = probe_video(data, SERVING)
    assert (info.total_frames, info.fps, info.duration_s) == (12, 25.0, 12 / 25)
    with pytest.raises(InvalidRequestError, match=r"more than the limit of 11 frames \(max_video_frames\)"):
        probe_video(data, dataclasses.replace(SERVING, max_video_frames=11))


# --- the hostile corpus --------------------------------------------------------------------------

def _answer(video, serving: ServingConfig) -> str | None:
    """The refusal's message, None when the video decodes."""
    try:
        info = probe_video(video.data, serving)
        indices = sample_frame_indices(info.total_frames, info.fps, num_frames=DECODE_FRAMES)
        frames = decode_frames(video.data, info, indices, identity)
    except InvalidRequestError as err:
        return str(err)
    assert frames.shape == (len(indices), info.height, info.width, 3)
    return None


@pytest.mark.parametrize("serving", [SMALL, dataclasses.replace(SMALL, max_video_frames=500, max_video_bytes=50_000)],
                         ids=["small", "other-limits"])
def test_hostile_videos(serving):
    cases = hostile_videos(serving)
    assert len(cases) >= 15 and len({case.name for case in cases}) == len(cases)
    fields = {field.name for field in dataclasses.fields(ServingConfig)}
    for case in cases:
        assert len(case.data) <= max(serving.max_video_bytes + 1, 2_000_000), case.name
        message = _answer(case, serving)
        if case.expect is None:
            assert message is None, f"{case.name}: refused: {message}"
            continue
        assert message is not None, f"{case.name}: accepted"
        assert message.startswith("video 0: "), message
        assert re.search(case.expect, message), f"{case.name}: {message!r} does not match {case.expect!r}"
        if case.limit is not None:
            assert case.limit in fields
            assert f"({case.limit})" in message, message


def test_hostile_videos_are_deterministic():
    assert [case.data for case in hostile_videos(SMALL)] == [case.data for case in hostile_videos(SMALL)]


def test_probe_names_the_video_index():
    with pytest.raises(InvalidRequestError, match=r"^video 4: empty"):
        probe_video(b"", SERVING, index=4)
    with pytest.raises(InvalidRequestError, match=r"^video 4: ended after 30 frames, frame 31 was to be sampled"):
        data = mp4_claiming_frames(make_clip(), 50)
        info = probe_video(data, SERVING, index=4)
        decode_frames(data, info, sample_frame_indices(50, info.fps, num_frames=8), identity, index=4)


# --- the frame transform and pixel table ---------------------------------------------------------

def frame_of(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_resized_size_equals_transformers():
    transform = FrameTransform({"size": {"shortest_edge": 224}})
    for height in (1, 7, 48, 223, 224, 225, 360, 517, 640, 1080, 4000):
        for width in (1, 9, 64, 224, 333, 640, 1920, 3000):
            expected = get_resize_output_image_size(np.zeros((3, height, width)), 224, default_to_square=False,
                                                    input_data_format=ChannelDimension.FIRST)
            assert transform.resized_size(height, width) == expected, (height, width)


def test_transform_shapes_and_crop():
    transform = FrameTransform()  # LlavaNextVideoVideoProcessor's defaults: short side 224, 224x224 crop
    assert transform.output_size == (224, 224)
    for height, width in ((360, 640), (640, 360), (80, 100), (333, 517), (224, 224), (16, 16)):
        out = transform(frame_of(height, width))
        assert out.shape == (3, 224, 224) and out.dtype == np.uint8
    assert FrameTransform({"do_center_crop": False, "size": {"height": 30, "width": 40}}).output_size == (30, 40)
    assert FrameTransform({"do_center_crop": False}).output_size is None
    assert FrameTransform({"do_center_crop": False})(frame_of(360, 640)).shape == (3, 224, 398)


def test_transform_equals_a_direct_computation():
    frame = frame_of(360, 640, seed=1)
    out = FrameTransform()(frame)
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].contiguous()
    resized = F.interpolate(image, size=[224, 398], mode="bicubic", align_corners=False, antialias=True)[0]
    np.testing.assert_array_equal(out, resized[:, :, 87:311].numpy())  # int((398 - 224) / 2) = 87


def test_transform_same_size_is_not_interpolated():
    frame = frame_of(224, 300, seed=2)  # the short side is already 224
    out = FrameTransform({"do_center_crop": False})(frame)
    np.testing.assert_array_equal(out, frame.transpose(2, 0, 1))


def test_center_crop_pads_a_small_frame_with_zeros():
    frame = frame_of(81, 100, seed=3) | 1  # no zero pixels, so the padding shows
    out = FrameTransform({"do_resize": False})(frame)
    assert out.shape == (3, 224, 224)
    top, left = (224 - 81) // 2, (224 - 100) // 2  # 71, 62: the extra row and column go after
    np.testing.assert_array_equal(out[:, top:top + 81, left:left + 100], frame.transpose(2, 0, 1))
    assert not out[:, :top].any() and not out[:, top + 81:].any()
    assert not out[:, :, :left].any() and not out[:, :, left + 100:].any()


def test_transform_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="resample 1 is not supported"):
        FrameTransform({"resample": 1})
    with pytest.raises(ValueError, match="size must be"):
        FrameTransform({"size": {"shortest_edge": 224, "longest_edge": 448}})
    with pytest.raises(ValueError, match="crop_size must be"):
        FrameTransform({"crop_size": {"shortest_edge": 224}})
    with pytest.raises(ValueError, match=r"a frame must be \(height, width, 3\) uint8"):
        FrameTransform()(np.zeros((10, 10, 4), dtype=np.uint8))


def test_pixel_table_equals_the_fused_rescale_and_normalize():
    """transformers folds 1/255 into the mean and std (in float32) and normalizes the uint8 values in float32."""
    from transformers.image_processing_backends import TorchvisionBackend

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    fused_mean, fused_std, do_rescale = TorchvisionBackend._fuse_mean_std_and_rescale_factor.__wrapped__(
        None, do_normalize=True, image_mean=tuple(mean), image_std=tuple(std), do_rescale=True,
        rescale_factor=1 / 255)
    assert not do_rescale
    values = torch.arange(256, dtype=torch.uint8).float()
    expected = (values[None] - fused_mean[:, None]) / fused_std[:, None]
    table = video_pixel_table(None, 3)
    assert table.shape == (3, 256) and table.dtype == np.float32
    np.testing.assert_array_equal(table, expected.numpy())
    # Not the same bits as rescaling first: why the table follows transformers' order.
    unfused = ((values / 255)[None] - torch.tensor(mean)[:, None]) / torch.tensor(std)[:, None]
    assert not np.array_equal(table, unfused.numpy())
    np.testing.assert_array_equal(video_pixel_table({"do_normalize": False}, 3)[0],
                                  (torch.arange(256, dtype=torch.uint8) * (1 / 255)).numpy())
    np.testing.assert_array_equal(video_pixel_table({"do_normalize": False, "do_rescale": False}, 3)[1], np.arange(256))
    with pytest.raises(ValueError, match="image_mean and image_std must have 1 or 3 values"):
        video_pixel_table({"image_mean": [0.5, 0.5]}, 3)


# Sizes (height, width): landscape, portrait, smaller than the crop, odd, already at the short side.
HF_SIZES = ((360, 640), (640, 360), (120, 160), (81, 100), (333, 517), (224, 300), (17, 15))
HF_CONFIGS = (
    {},  # LlavaNextVideoVideoProcessor's defaults
    {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    {"resample": 2},
    {"size": {"height": 200, "width": 180}, "do_center_crop": False},
    {"resample": 0, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
)


@pytest.mark.parametrize("config", HF_CONFIGS, ids=[str(i) for i in range(len(HF_CONFIGS))])
def test_pixel_values_equal_the_video_processor(config):
    """The whole path against LlavaNextVideoVideoProcessor (it needs torchvision: skipped without it)."""
    pytest.importorskip("torchvision")
    from transformers import LlavaNextVideoVideoProcessor

    processor = LlavaNextVideoVideoProcessor(**config)
    transform, table = FrameTransform(config), video_pixel_table(config, 3)
    for seed, (height, width) in enumerate(HF_SIZES):
        frames = np.stack([frame_of(height, width, seed * 10 + i) for i in range(3)])
        expected = processor(videos=[frames], do_sample_frames=False, return_tensors="pt")["pixel_values_videos"]
        transformed = np.stack([transform(frame) for frame in frames])  # (T, 3, h, w) uint8
        ours = np.stack([table[channel][transformed[:, channel]] for channel in range(3)], axis=1)
        np.testing.assert_array_equal(ours, expected[0].numpy(), err_msg=f"{height}x{width} {config}")


def test_pixel_values_of_a_decoded_clip_equal_the_video_processor(tmp_path):
    pytest.importorskip("torchvision")
    from transformers import LlavaNextVideoVideoProcessor

    data = make_clip(width=128, height=96, frames=20)
    info = probe_video(data, SERVING)
    indices = sample_frame_indices(info.total_frames, info.fps, num_frames=8)
    transformed = decode_frames(data, info, indices, FrameTransform())
    table = video_pixel_table(None, 3)
    ours = np.stack([table[channel][transformed[:, channel]] for channel in range(3)], axis=1)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    frames, _ = read_video_pyav(str(path), sample_indices_fn=given(indices))
    expected = LlavaNextVideoVideoProcessor()(videos=[frames], return_tensors="pt")["pixel_values_videos"]
    np.testing.assert_array_equal(ours, expected[0].numpy())


def test_video_info_is_frozen():
    info = VideoInfo("mp4", "h264", 64, 48, 30, 30.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.width = 1  # type: ignore[misc]


def test_transform_threads_share_the_cores_among_preprocess_processes():
    from llava_triton.video import transform_threads

    assert transform_threads(2, cores=16) == 8
    assert transform_threads(8, cores=16) == 2
    assert transform_threads(32, cores=16) == 1
    assert transform_threads(3, cores=2) == 1
