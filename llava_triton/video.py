"""Videos for LLaVA-NeXT-Video: probing, frame sampling, decoding and the per-frame transform.

Supported: MP4 and QuickTime, WebM and Matroska containers, with H.264, HEVC, VP8, VP9, AV1 or
MPEG-4 (Part 2) video; the first video stream is used, as transformers' `read_video_pyav` does.

The container is recognised from its leading bytes (an ISO BMFF `ftyp` box, an EBML header)
before any byte reaches FFmpeg, and FFmpeg is then told which demuxer to use: it never probes the
data against its hundreds of formats (image sequences, playlists that name other files, ...).
`probe_video` checks every limit from the header before a frame is decoded. MP4 headers count
the frames; Matroska and WebM headers do not, so their frames are counted by reading the video
packets (no decoding), stopping as soon as the count passes `max_video_frames`.

The frames and pixel values equal transformers' (`read_video_pyav`, the video processor's
`sample_frames`, `LlavaNextVideoVideoProcessor`), with one difference: transformers refuses to
sample more frames than a video has, where `sample_frame_indices` gives a short clip all its
frames. The transform is written with torch alone (the video processor needs torchvision).
"""

from __future__ import annotations

import io
import math
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from llava_triton.errors import InvalidRequestError
from llava_triton.spec import MAX_SAMPLING_FPS, ServingConfig

if TYPE_CHECKING:
    import av


def _av():
    """PyAV, imported at the first video: a model without videos never loads FFmpeg's libraries
    (tens of MB in each preprocess process)."""
    import av

    return av

# Our container names, with the name a user knows and the FFmpeg demuxer that reads it.
CONTAINERS = {"mp4": ("MP4", "mov"), "mov": ("QuickTime", "mov"), "webm": ("WebM", "matroska"),
              "matroska": ("Matroska", "matroska")}
# Video codecs served, by FFmpeg's codec name (the codec's, not the decoder's: AV1 is decoded by libdav1d).
CODECS = {"h264": "H.264", "hevc": "HEVC", "vp8": "VP8", "vp9": "VP9", "av1": "AV1", "mpeg4": "MPEG-4"}
SUPPORTED = "send MP4, QuickTime, WebM or Matroska"
# A frame rate above this is a broken or hostile header: it would make frames / fps, the length
# checked against max_video_duration_s, look short. High-speed cameras record up to 960 fps.
MAX_VIDEO_FPS = 1000.0

_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
# ISO BMFF files that are still images (an `ftyp` like a video's): named, never demuxed.
_IMAGE_BRANDS = {b"avif": "AVIF image", b"avis": "AVIF image sequence", b"heic": "HEIC image",
                 b"heix": "HEIC image", b"mif1": "HEIF image", b"msf1": "HEIF image sequence"}
# Other formats, recognised only to name them in the error message.
_OTHER_SIGNATURES = (
    (b"FLV\x01", "FLV"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"OggS", "Ogg"), (b"\x89PNG", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"), (b"\x00\x00\x01\xba", "MPEG program stream"),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "ASF/WMV"), (b"%PDF", "PDF"), (b"fLaC", "FLAC"), (b"ID3", "MP3"),
)
_RIFF_TYPES = {b"AVI ": "AVI", b"WAVE": "WAV", b"WEBP": "WebP image"}
# FFmpeg's defaults for how much find_stream_info reads (5 MB, 5 s of media), written down so the
# bound does not depend on FFmpeg's; the same as transformers' read_video_pyav, so average_rate agrees.
_DEMUXER_OPTIONS = {"probesize": "5000000", "analyzeduration": "5000000"}
# QuickTime references to other files (data references): never followed.
_MOV_OPTIONS = {"enable_drefs": "0", "use_absolute_path": "0"}


def _ebml_doc_type(data: bytes) -> str | None:
    """The DocType of an EBML header ("webm", "matroska"), None if unreadable."""

    def vint(position: int, keep_marker: bool) -> tuple[int, int] | None:
        if position >= len(data) or data[position] == 0:
            return None
        length = 9 - data[position].bit_length()  # the leading 1 bit marks the length
        if position + length > len(data):
            return None
        value = int.from_bytes(data[position:position + length], "big")
        return (value if keep_marker else value & ((1 << (7 * length)) - 1)), length

    header_size = vint(len(_EBML_MAGIC), keep_marker=False)
    if header_size is None:
        return None
    position = len(_EBML_MAGIC) + header_size[1]
    end = min(len(data), position + header_size[0])
    while position < end:  # the header's children: (ID, size, payload) each
        element = vint(position, keep_marker=True)
        size = None if element is None else vint(position + element[1], keep_marker=False)
        if element is None or size is None:
            return None
        start = position + element[1] + size[1]
        if element[0] == 0x4282:  # DocType
            return data[start:start + size[0]].rstrip(b"\x00").decode("ascii", "replace")
        position = start + size[0]
    return None


def sniff_container(data: bytes) -> str | None:
    """A key of CONTAINERS from the leading bytes, None if the data is none of them."""
    if data[4:8] == b"ftyp":
        if data[8:12] in _IMAGE_BRANDS:
            return None
        return "mov" if data[8:12] == b"qt  " else "mp4"
    if data.startswith(_EBML_MAGIC):
        return "webm" if _ebml_doc_type(data) == "webm" else "matroska"
    return None


def _other_format(data: bytes) -> str | None:
    if data[4:8] == b"ftyp":
        return _IMAGE_BRANDS.get(data[8:12])
    if data.startswith(b"RIFF"):
        return _RIFF_TYPES.get(data[8:12], "RIFF")
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    if len(data) > 188 and data[0] == 0x47 and data[188] == 0x47:  # a sync byte every 188 bytes
        return "MPEG transport stream"
    return None


def _reason(error: av.error.FFmpegError) -> str:
    return error.strerror or str(error)


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says, every value checked against the limits by `probe_video`."""

    container: str  # a key of CONTAINERS
    codec: str  # a key of CODECS
    width: int
    height: int
    total_frames: int  # from the header, or counted from the packets where the header has none
    fps: float  # the video stream's average frame rate, as transformers' VideoMetadata.fps
    duration_s: float  # from the header, or total_frames / fps where it has none


@contextmanager
def _open(data: bytes, container: str, index: int, max_pixels: int) -> Iterator[av.container.InputContainer]:
    """The video opened with its container's demuxer; FFmpeg's errors become the request's refusal.

    `max_pixels` bounds the frames FFmpeg's decoders allocate, find_stream_info's too (it decodes
    a frame of codecs whose header lacks parameters): a few bytes of VP9 can claim 40000x40000.
    """
    name, demuxer = CONTAINERS[container]
    options = {**_DEMUXER_OPTIONS, **(_MOV_OPTIONS if demuxer == "mov" else {}), "max_pixels": str(max_pixels)}
    try:
        # metadata_errors: a title that is not UTF-8 is no reason to refuse a video.
        with _av().open(io.BytesIO(data), format=demuxer, options=options, metadata_errors="replace") as opened:
            yield opened
    except _av().error.FFmpegError as err:
        raise InvalidRequestError(f"video {index}: {name} data cannot be read: {_reason(err)}") from None


def _decoder_pixel_limit(pixels: int) -> int:
    """FFmpeg's `max_pixels` for frames of `pixels`: a memory bound with room to spare, since some
    decoders check their scratch buffers against it too (MPEG-4's needs about 50,000 pixels at 64x48).
    Our own check of each decoded frame's size is the exact one."""
    return 2 * pixels + 65536


def _header_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Seconds the header says the video lasts (the stream's, else the container's); None if it does not say."""
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / _av().time_base
    return None


def probe_video(data: bytes, serving: ServingConfig, index: int = 0) -> VideoInfo:
    """Read one encoded video's header and check it against every video limit, or refuse it.

    Nothing is decoded here (FFmpeg's find_stream_info may decode a frame, of at most about twice
    max_video_pixels). Cheap checks first: the size in bytes, the container from the leading bytes;
    then from the header: a video stream, its codec, its frame size, frame rate, duration and frame
    count (counted from the packets when the header has none).
    """
    data = bytes(data)
    if not data:
        raise InvalidRequestError(f"video {index}: empty (0 bytes)")
    if len(data) > serving.max_video_bytes:
        raise InvalidRequestError(f"video {index}: {len(data)} bytes is more than the limit of "
                                  f"{serving.max_video_bytes} bytes (max_video_bytes)")
    container_name = sniff_container(data)
    if container_name is None:
        other = _other_format(data)
        if other is not None:
            raise InvalidRequestError(f"video {index}: unsupported format {other}; {SUPPORTED}")
        raise InvalidRequestError(f"video {index}: not a video (unrecognised data; {SUPPORTED})")
    name = CONTAINERS[container_name][0]
    with _open(data, container_name, index, max_pixels=_decoder_pixel_limit(serving.max_video_pixels)) as container:
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams}) or ["none"]
            raise InvalidRequestError(f"video {index}: the {name} file has no video stream (streams: "
                                      f"{', '.join(kinds)})")
        stream = container.streams.video[0]
        codec = stream.codec_context.codec.canonical_name if stream.codec_context is not None else "unknown"
        if codec not in CODECS:
            raise InvalidRequestError(f"video {index}: unsupported codec {codec}; send "
                                      f"{', '.join(CODECS.values())} video")
        width, height = stream.width, stream.height
        if width <= 0 or height <= 0:
            raise InvalidRequestError(f"video {index}: no frame size in its header ({width}x{height})")
        if width * height > serving.max_video_pixels:
            raise InvalidRequestError(
                f"video {index}: {width}x{height} = {width * height} pixels a frame is more than the limit of "
                f"{serving.max_video_pixels} pixels (max_video_pixels)")
        rate = stream.average_rate
        fps = float(rate) if rate else 0.0
        if not 0.0 < fps <= MAX_VIDEO_FPS:
            raise InvalidRequestError(f"video {index}: frame rate {fps:g} fps from its header is not in "
                                      f"(0, {MAX_VIDEO_FPS:g}]")
        duration_limit = serving.max_video_duration_s
        header_duration = _header_duration(container, stream)
        if header_duration is not None and header_duration > duration_limit:
            raise InvalidRequestError(f"video {index}: {header_duration:.3f} s long, more than the limit of "
                                      f"{duration_limit:g} s (max_video_duration_s)")
        total_frames = stream.frames
        if total_frames > serving.max_video_frames:
            raise InvalidRequestError(f"video {index}: {total_frames} frames is more than the limit of "
                                      f"{serving.max_video_frames} frames (max_video_frames)")
        if total_frames <= 0:
            total_frames = _count_packets(container, stream, serving, index)
    if total_frames == 0:
        raise InvalidRequestError(f"video {index}: its video stream has no frames")
    # The length transformers' VideoMetadata gives (frames / fps): checked too, since a header's
    # duration may be left out or disagree with its frame count and rate.
    frames_duration = total_frames / fps
    if frames_duration > duration_limit:
        raise InvalidRequestError(f"video {index}: {total_frames} frames at {fps:g} fps last {frames_duration:.3f} s, "
                                  f"more than the limit of {duration_limit:g} s (max_video_duration_s)")
    return VideoInfo(container=container_name, codec=codec, width=width, height=height, total_frames=total_frames,
                     fps=fps, duration_s=frames_duration if header_duration is None else header_duration)


def _count_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                   serving: ServingConfig, index: int) -> int:
    """The video packets (one a frame) of a header that keeps no frame count, read without decoding
    (FFmpeg's errors here are _open's to name)."""
    count = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the empty packet demux ends with
            continue
        count += 1
        if count > serving.max_video_frames:
            raise InvalidRequestError(f"video {index}: more than the limit of {serving.max_video_frames} "
                                      "frames (max_video_frames)")
    return count


def check_sampling(num_frames: int, fps: float, serving: ServingConfig) -> None:
    """A request's `num_frames` and `fps` inputs: frames per video within the request's frame limit,
    and a sampling rate of 0 (use num_frames) or in (0, MAX_SAMPLING_FPS]."""
    if not 1 <= num_frames <= serving.max_frames_per_request:
        raise InvalidRequestError(f"num_frames {num_frames} is not in [1, {serving.max_frames_per_request}] "
                                  "(max_frames_per_request)")
    if not (math.isfinite(fps) and (fps == 0.0 or 0.0 < fps <= MAX_SAMPLING_FPS)):
        raise InvalidRequestError(f"fps {fps} must be 0 (sample num_frames) or in (0, {MAX_SAMPLING_FPS:g}]")


def sample_frame_indices(total_frames: int, video_fps: float, num_frames: int | None = None,
                         fps: float | None = None) -> np.ndarray:
    """The frames to sample (int64, increasing): transformers' `BaseVideoProcessor.sample_frames`.

    `num_frames` frames spread uniformly, or with `fps`, `int(total_frames / video_fps * fps)` of
    them; give one of the two. Its float32 arithmetic is kept (a float32 `torch.arange`, truncated),
    so the indices are the same, and so is their number, which is num_frames + 1 for some totals
    (15 frames, 13 wanted: the arange's length rounds up): callers count len(indices), not num_frames.
    Where transformers refuses (more frames asked than the video has), every frame is given; where
    fps sampling gives no frame (a clip shorter than 1 / fps), frame 0.
    """
    if total_frames <= 0:
        raise ValueError(f"total_frames must be positive, got {total_frames}")
    if (num_frames is None) == (fps is None):
        raise ValueError("give exactly one of num_frames and fps")
    if fps is not None:
        if not (video_fps > 0 and fps > 0):
            raise ValueError(f"fps sampling needs positive rates, got video_fps={video_fps} fps={fps}")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    num_frames = min(num_frames, total_frames)
    return torch.arange(0, total_frames, total_frames / num_frames).int().numpy().astype(np.int64)


def decode_frames(data: bytes, info: VideoInfo, indices: np.ndarray, transform: Callable[[np.ndarray], np.ndarray],
                  index: int = 0) -> np.ndarray:
    """The frames at `indices` (increasing, from `sample_frame_indices(info.total_frames, ...)`), each
    passed through `transform`, stacked.

    Frames are counted in the order the decoder gives them (presentation order), as transformers'
    read_video_pyav counts them, converted with the same `to_ndarray(format="rgb24")`, and
    transformed as soon as they are decoded, so full-size RGB frames are not kept. Decoding stops
    after the last one wanted. Every decoded frame must have the header's size.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or not len(indices) or indices[0] < 0 or np.any(np.diff(indices) <= 0):
        raise ValueError(f"indices must be increasing frame numbers, got {indices}")
    if indices[-1] >= info.total_frames:
        raise ValueError(f"frame {indices[-1]} was asked of a video of {info.total_frames} frames")
    name = CONTAINERS[info.container][0]
    transformed = []
    decoded = 0  # frames decoded so far
    max_pixels = _decoder_pixel_limit(info.width * info.height)  # the header's size, which probe_video checked
    with _open(data, info.container, index, max_pixels=max_pixels) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"max_pixels": str(max_pixels)}
        stream.thread_type = "AUTO"  # frame threads: faster, and the same frames in the same order
        try:
            for frame in container.decode(stream):
                if (frame.width, frame.height) != (info.width, info.height):
                    raise InvalidRequestError(
                        f"video {index}: frame {decoded} is {frame.width}x{frame.height}, its header says "
                        f"{info.width}x{info.height} (frames that change size are not supported)")
                if decoded == indices[len(transformed)]:
                    transformed.append(transform(frame.to_ndarray(format="rgb24")))
                    if len(transformed) == len(indices):
                        break
                decoded += 1
        except _av().error.FFmpegError as err:
            larger = (f"; a frame much larger than the header's {info.width}x{info.height} is refused so"
                      if isinstance(err, _av().error.ValueError) else "")
            raise InvalidRequestError(f"video {index}: {name} data cannot be decoded after {decoded} frames: "
                                      f"{_reason(err)}{larger}") from None
    if len(transformed) < len(indices):
        raise InvalidRequestError(
            f"video {index}: ended after {decoded} frames, frame {indices[len(transformed)]} was to be sampled "
            f"(truncated, or a header that claims {info.total_frames})")
    return np.stack(transformed)


def transform_threads(preprocess_instances: int, cores: int | None = None) -> int:
    """torch's intra-op threads for one preprocess process: its share of the cores. Each process would
    otherwise start a thread per core for the frames' resize, whose idle threads spin: on the H200's
    16 cores, two busy processes took 3.7 s of CPU for 0.3 s of one clip's decoding and resizing."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, preprocess_instances))


# --- the video processor's resize and crop --------------------------------------------------------

# PIL's resampling filters (the `resample` of a processor config) as torch's interpolate modes, as
# transformers maps them to torchvision's (pil_torch_interpolation_mapping); the others have no torch mode.
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def _processor_defaults() -> dict[str, Any]:
    """LlavaNextVideoVideoProcessor's class attributes: what a config leaves out."""
    from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

    names = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_convert_rgb", "do_rescale",
             "rescale_factor", "do_normalize", "image_mean", "image_std")
    return {name: getattr(LlavaNextVideoVideoProcessor, name) for name in names}


def _native_uint8(mode: str) -> bool:
    """Whether torchvision resizes uint8 frames on the CPU as uint8 (its _do_native_uint8_resize_on_cpu):
    bicubic always; bilinear where torch has its AVX2/AVX512 or Arm kernels; otherwise through float32."""
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64", "arm64")
    return True


class FrameTransform:
    """One RGB frame (H, W, 3) uint8 in, (3, h, w) uint8 out: what LlavaNextVideoVideoProcessor does
    to a frame before its rescale and normalize (`video_pixel_table` does those).

    Built from a video_preprocessor_config.json's fields (Hugging Face's names), LlavaNextVideo's
    defaults for those it lacks. The resize is torchvision's (transformers' TorchvisionBackend) on
    the CPU, with torch alone: the short side scaled to `size["shortest_edge"]` (or to
    `size["height"]` x `size["width"]`), antialiased, in uint8 as torchvision does it there;
    then the center crop, zero-padded where the frame is smaller. `do_convert_rgb` changes
    nothing: decoded frames are RGB already.
    """

    def __init__(self, config: dict[str, Any] | None = None):
        config = {**_processor_defaults(), **(config or {})}
        self.do_resize = bool(config["do_resize"])
        self.do_center_crop = bool(config["do_center_crop"])
        size, crop_size, resample = config["size"], config["crop_size"], int(config["resample"])
        if self.do_resize:
            if resample not in _RESAMPLE_MODES:
                raise ValueError(f"resample {resample} is not supported: use one of {sorted(_RESAMPLE_MODES)} "
                                 "(PIL's NEAREST, BILINEAR, BICUBIC)")
            if set(size) not in ({"shortest_edge"}, {"height", "width"}):
                raise ValueError(f"size must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {size}")
        if self.do_center_crop and set(crop_size) != {"height", "width"}:
            raise ValueError(f"crop_size must be {{'height': h, 'width': w}}, got {crop_size}")
        self.size = dict(size)
        self.mode = _RESAMPLE_MODES.get(resample, "")
        self.crop_size = (int(crop_size["height"]), int(crop_size["width"])) if self.do_center_crop else None

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output frame: the crop size; None when it depends on the frame."""
        if self.crop_size is not None:
            return self.crop_size
        if self.do_resize and "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        return None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: transformers' get_resize_output_image_size with
        default_to_square=False (the short side to shortest_edge, the long one scaled and truncated)."""
        if not self.do_resize:
            return height, width
        if "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        short, long = (width, height) if width <= height else (height, width)
        new_short = int(self.size["shortest_edge"])
        new_long = int(new_short * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 to resized_size, as torchvision's resize_image does it on the CPU."""
        new_size = self.resized_size(*image.shape[-2:])
        if new_size == tuple(image.shape[-2:]):
            return image  # torchvision returns the frame unchanged, not interpolated
        antialias = self.mode != "nearest-exact"
        align_corners = False if antialias else None
        if _native_uint8(self.mode):
            resized = F.interpolate(image[None], size=list(new_size), mode=self.mode, align_corners=align_corners,
                                    antialias=antialias)
        else:  # torchvision's float32 round trip (clamping only matters for bicubic, never here)
            resized = F.interpolate(image[None].float(), size=list(new_size), mode=self.mode,
                                    align_corners=align_corners, antialias=antialias).round_().to(torch.uint8)
        return resized[0]

    def _center_crop(self, image: torch.Tensor) -> torch.Tensor:
        """transformers' TorchvisionBackend.center_crop: zero-pad a smaller frame around its center, then crop."""
        crop_height, crop_width = self.crop_size
        height, width = image.shape[-2:]
        if crop_height > height or crop_width > width:
            pad_width, pad_height = max(crop_width - width, 0), max(crop_height - height, 0)
            image = F.pad(image, (pad_width // 2, (pad_width + 1) // 2, pad_height // 2, (pad_height + 1) // 2))
            height, width = image.shape[-2:]
        top, left = int((height - crop_height) / 2.0), int((width - crop_width) / 2.0)
        return image[:, top:top + crop_height, left:left + crop_width]

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"a frame must be (height, width, 3) uint8, got {frame.dtype} {frame.shape}")
        image = torch.from_numpy(frame).permute(2, 0, 1).contiguous()  # (3, H, W), as transformers lays it out
        if self.do_resize:
            image = self._resize(image)
        if self.do_center_crop:
            image = self._center_crop(image)
        return image.contiguous().numpy()


def video_pixel_table(config: dict[str, Any] | None, num_channels: int) -> np.ndarray:
    """(num_channels, 256) float32: the pixel value the video processor gives each 8-bit value of
    each channel, bit for bit, so that `table[c][transformed[c]]` is its pixel_values_videos.

    transformers' TorchvisionBackend folds the rescale factor into the mean and std (each times
    1 / rescale_factor, in float32) and normalizes the uint8 values in float32, (value - mean) / std:
    the same torch operations here. Rescaling first would round differently.
    """
    config = {**_processor_defaults(), **(config or {})}
    values = torch.arange(256, dtype=torch.uint8).expand(num_channels, 1, 256)  # a (C, 1, 256) image of every value
    do_rescale, do_normalize = bool(config["do_rescale"]), bool(config["do_normalize"])
    mean, std, factor = config["image_mean"], config["image_std"], config["rescale_factor"]
    if do_normalize:
        mean, std = torch.tensor(mean), torch.tensor(std)
        if mean.numel() not in (1, num_channels) or std.numel() not in (1, num_channels):
            raise ValueError(f"image_mean and image_std must have 1 or {num_channels} values, got {mean.numel()} "
                             f"and {std.numel()}")
        if do_rescale:  # the fused rescale and normalize
            mean, std = mean * (1.0 / factor), std * (1.0 / factor)
        table = (values.to(torch.float32) - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)
    elif do_rescale:
        table = values * factor
    else:
        table = values.to(torch.float32)
    return table[:, 0, :].to(torch.float32).contiguous().numpy()
