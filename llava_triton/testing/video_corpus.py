"""Test videos, generated here in code: synthetic clips (`make_clip`) and the hostile-video corpus.

As `llava_triton.testing.corpus` does for images, every file is made deterministically by the
functions below (PyAV encodes in memory; FFmpeg's muxers are run bit-exact), so the repository
holds no binary video. A clip is small (64x48, 30 frames: a few KB) and takes milliseconds to
encode, so the tests make their clips on every run.

Each `HostileVideo` says what `llava_triton.video` must answer: the error message (a regular
expression, `re.search`ed) and, for a refusal by one of our limits, the `ServingConfig` field the
message must name. A few are hostile-looking but valid (`expect=None`): they must decode. Cases
sized by a limit (bytes, frames) grow with it: give `hostile_videos` a ServingConfig with small
limits, as the tests do.

Most hostile headers are written by hand (`matroska`): FFmpeg's muxers will not write a frame
rate of 0 or a 100000x100000 frame size, and a Matroska file is a few nested elements.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from PIL import Image

from llava_triton.spec import ServingConfig

# make_clip's containers, as PyAV's muxers are named.
MUXERS = {"mp4": "mp4", "mov": "mov", "webm": "webm", "mkv": "matroska"}
# Encoder options: one thread and fast settings, so a clip's bytes do not depend on the core count
# (encoders split work by it) and AV1 takes milliseconds rather than seconds. x264 without its
# assembly: on one AVX-512 machine (a gVisor sandbox) its assembly gave 7 different files in 40
# encodes of the same clip, its C code one. The C code is about 4x slower: milliseconds for a test
# clip, about 25 s for 300 frames of 640x360 on 2 cores.
ENCODER_OPTIONS = {
    "libx264": {"threads": "1", "x264-params": "asm=0"},
    "libx265": {"x265-params": "log-level=none:pools=none:frame-threads=1"},
    "mpeg4": {"threads": "1"},
    "libvpx": {"threads": "1"},
    "libvpx-vp9": {"threads": "1", "row-mt": "0", "deadline": "realtime", "cpu-used": "8"},
    "libaom-av1": {"threads": "1", "usage": "realtime", "cpu-used": "8"},
    "mjpeg": {"threads": "1"},
    "ffv1": {"threads": "1"},
}
# The (container, encoder) pairs make_clip is tested with; each decodes with llava_triton.video.
CLIP_FORMATS = (
    ("mp4", "libx264"), ("mp4", "mpeg4"), ("mp4", "libx265"), ("mp4", "libaom-av1"), ("mov", "libx264"),
    ("webm", "libvpx"), ("webm", "libvpx-vp9"), ("webm", "libaom-av1"), ("mkv", "libx264"),
)


def clip_frames(frames: int, width: int, height: int, seed: int = 0) -> Iterator[np.ndarray]:
    """RGB frames (height, width, 3) uint8 that all differ: gradients that drift and two moving blocks."""
    rng = np.random.default_rng(seed)
    speeds = rng.integers(1, 9, size=3)
    colours = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
    rows, columns = np.mgrid[0:height, 0:width]
    block = max(2, min(width, height) // 4)
    for t in range(frames):
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[..., 0] = (columns * 4 + t * speeds[0]) % 256
        frame[..., 1] = (rows * 5 + t * speeds[1]) % 256
        frame[..., 2] = ((columns + rows) * 2 + t * speeds[2]) % 256
        left = (t * 3) % max(1, width - block)
        top = (t * 2) % max(1, height - block)
        frame[top:top + block, left:left + block] = colours[0]
        frame[height - block - top // 2:height - top // 2, width - block - left:width - left] = colours[1]
        yield frame


def _rate(fps: float | Fraction) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def make_clip(*, frames: int = 30, fps: float | Fraction = 30, width: int = 64, height: int = 48,
              codec: str = "libx264", container: str = "mp4", pix_fmt: str = "yuv420p", seed: int = 0,
              faststart: bool = False) -> bytes:
    """A synthetic clip encoded in memory: `container` is a key of MUXERS, `codec` a PyAV encoder.

    4:2:0 formats need an even width and height. `faststart` puts an MP4's index (moov) before its
    frames, as web video has it (`mp4_faststart`); FFmpeg's muxer writes it at the end.
    """
    if container not in MUXERS:
        raise ValueError(f"container must be one of {sorted(MUXERS)}, got {container!r}")
    if faststart and container not in ("mp4", "mov"):
        raise ValueError(f"faststart is for MP4 and QuickTime, not {container}")
    buffer = io.BytesIO()
    # bitexact: no random Matroska UIDs, no library versions in the file.
    with av.open(buffer, "w", format=MUXERS[container], options={"fflags": "+bitexact"}) as output:
        stream = output.add_stream(codec, rate=_rate(fps), options=ENCODER_OPTIONS.get(codec, {}))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for frame in clip_frames(frames, width, height, seed):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return mp4_faststart(buffer.getvalue()) if faststart else buffer.getvalue()


@dataclass(frozen=True)
class Packet:
    """One encoded frame, as a container carries it."""

    data: bytes
    keyframe: bool


def encode_packets(codec: str, frames: Sequence[np.ndarray], fps: int = 30) -> tuple[list[Packet], bytes]:
    """Encode RGB frames with PyAV's encoder `codec`, outside any container: (packets, extradata)."""
    height, width = frames[0].shape[:2]
    context = av.CodecContext.create(codec, "w")
    context.width, context.height = width, height
    context.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    context.time_base = Fraction(1, fps)
    context.framerate = Fraction(fps)
    context.options = ENCODER_OPTIONS.get(codec, {})
    packets = []
    for pts, frame in enumerate([*frames, None]):
        picture = None
        if frame is not None:
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = pts
        packets += [Packet(bytes(packet), packet.is_keyframe) for packet in context.encode(picture)]
    return packets, bytes(context.extradata or b"")


# --- Matroska, written by hand -------------------------------------------------------------------

def _ebml(element_id: int, payload: bytes) -> bytes:
    """One EBML element: its ID, an 8-byte size (EBML allows any length of size field), the payload."""
    size = (0x01 << 56 | len(payload)).to_bytes(8, "big")  # the leading 0x01 says: 8 bytes long
    return element_id.to_bytes((element_id.bit_length() + 7) // 8, "big") + size + payload


def _uint(element_id: int, value: int) -> bytes:
    return _ebml(element_id, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


# Matroska's element IDs (its specification's names).
EBML, DOC_TYPE, SEGMENT, INFO, TIMECODE_SCALE, DURATION, TITLE = (
    0x1A45DFA3, 0x4282, 0x18538067, 0x1549A966, 0x2AD7B1, 0x4489, 0x7BA9)
TRACKS, TRACK_ENTRY, TRACK_NUMBER, TRACK_UID, TRACK_TYPE, CODEC_ID, CODEC_PRIVATE, DEFAULT_DURATION = (
    0x1654AE6B, 0xAE, 0xD7, 0x73C5, 0x83, 0x86, 0x63A2, 0x23E383)
VIDEO, PIXEL_WIDTH, PIXEL_HEIGHT, CLUSTER, TIMECODE, SIMPLE_BLOCK = 0xE0, 0xB0, 0xBA, 0x1F43B675, 0xE7, 0xA3


def matroska(packets: Sequence[Packet], *, codec_id: str = "V_VP8", width: int, height: int,
             timestamps_ms: Sequence[int] | None = None, default_duration_ns: int | None = None,
             duration_ms: float | None = None, codec_private: bytes = b"", doc_type: str = "webm",
             timecode_scale_ns: int = 1_000_000, title: bytes = b"") -> bytes:
    """A Matroska/WebM file with one video track whose header says exactly what it is given.

    `timestamps_ms` are in units of `timecode_scale_ns` (milliseconds by default); by default frame
    i is at i * 33. Matroska keeps no frame count: a demuxer learns it by reading every block.
    """
    if timestamps_ms is None:
        timestamps_ms = [33 * i for i in range(len(packets))]
    # EBMLVersion, EBMLReadVersion, EBMLMaxIDLength, EBMLMaxSizeLength, DocType, its version and read version.
    header = _ebml(EBML, _uint(0x4286, 1) + _uint(0x42F7, 1) + _uint(0x42F2, 4) + _uint(0x42F3, 8)
                   + _ebml(DOC_TYPE, doc_type.encode()) + _uint(0x4287, 2) + _uint(0x4285, 2))
    # TimecodeScale, MuxingApp, WritingApp.
    info = _uint(TIMECODE_SCALE, timecode_scale_ns) + _ebml(0x4D80, b"llava-triton") + _ebml(0x5741, b"llava-triton")
    if duration_ms is not None:
        info += _ebml(DURATION, struct.pack(">d", duration_ms))
    if title:
        info += _ebml(TITLE, title)
    track = (_uint(TRACK_NUMBER, 1) + _uint(TRACK_UID, 1) + _uint(TRACK_TYPE, 1)  # type 1: video
             + _ebml(CODEC_ID, codec_id.encode())
             + (_ebml(CODEC_PRIVATE, codec_private) if codec_private else b"")
             + (_uint(DEFAULT_DURATION, default_duration_ns) if default_duration_ns is not None else b"")
             + _ebml(VIDEO, _uint(PIXEL_WIDTH, width) + _uint(PIXEL_HEIGHT, height)))
    clusters, blocks, cluster_start = [], b"", None
    for packet, timestamp in zip(packets, timestamps_ms):
        # A block's time is an int16 relative to its cluster's: start a new cluster when it would not fit.
        if cluster_start is None or not 0 <= timestamp - cluster_start < 32768:
            if cluster_start is not None:
                clusters.append(_ebml(CLUSTER, _uint(TIMECODE, cluster_start) + blocks))
            cluster_start, blocks = timestamp, b""
        # SimpleBlock: track number 1 (as a 1-byte vint), relative time, flags (0x80: keyframe), the frame.
        flags = 0x80 if packet.keyframe else 0x00
        blocks += _ebml(SIMPLE_BLOCK, bytes([0x81]) + struct.pack(">hB", timestamp - cluster_start, flags)
                        + packet.data)
    if cluster_start is not None:
        clusters.append(_ebml(CLUSTER, _uint(TIMECODE, cluster_start) + blocks))
    segment = _ebml(INFO, info) + _ebml(TRACKS, _ebml(TRACK_ENTRY, track)) + b"".join(clusters)
    return header + _ebml(SEGMENT, segment)


def vp8_with_size(packet: Packet, width: int, height: int) -> Packet:
    """A VP8 keyframe whose own header (after its start code 9D 01 2A) says width x height (< 16384)."""
    start = packet.data.index(b"\x9d\x01\x2a") + 3
    return Packet(packet.data[:start] + struct.pack("<HH", width, height) + packet.data[start + 4:], packet.keyframe)


# --- MP4 boxes ------------------------------------------------------------------------------------

def _mp4_boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(offset, size, type) of the boxes from `start` to `end` (32-bit sizes, as FFmpeg writes small files)."""
    position, end = start, len(data) if end is None else end
    while position + 8 <= end:
        size, kind = struct.unpack(">I4s", data[position:position + 8])
        yield position, size, kind
        position += size


def mp4_box(data: bytes, *path: bytes) -> tuple[int, int]:
    """(offset, size) of the box at `path` (the first of each type), e.g. mp4_box(data, b"moov", b"trak")."""
    start, end = 0, len(data)
    for kind in path:
        offset, size = next((at, length) for at, length, found in _mp4_boxes(data, start, end) if found == kind)
        start, end = offset + 8, offset + size  # the next type is looked for among this box's children
    return offset, size


_STBL = (b"moov", b"trak", b"mdia", b"minf", b"stbl")


def mp4_faststart(data: bytes) -> bytes:
    """The MP4 with its index (moov) moved before its frames (mdat), as web video is (FFmpeg's
    +faststart needs a file it can reopen); the chunk offsets (stco) move by the moov's size."""
    moov_offset, moov_size = mp4_box(data, b"moov")
    mdat_offset, _ = mp4_box(data, b"mdat")
    if moov_offset < mdat_offset:
        return data  # already so
    moov = bytearray(data[moov_offset:moov_offset + moov_size])
    stco_offset, _ = mp4_box(data, *_STBL, b"stco")
    count = struct.unpack(">I", data[stco_offset + 12:stco_offset + 16])[0]
    for entry in range(count):
        at = stco_offset - moov_offset + 16 + 4 * entry
        moov[at:at + 4] = struct.pack(">I", struct.unpack(">I", moov[at:at + 4])[0] + moov_size)
    rest = data[mdat_offset:moov_offset] + data[moov_offset + moov_size:]
    return data[:mdat_offset] + bytes(moov) + rest


def mp4_claiming_frames(data: bytes, frames: int) -> bytes:
    """The MP4 (of one frame rate: one stts entry) with its time-to-sample table claiming `frames`."""
    offset, _ = mp4_box(data, *_STBL, b"stts")
    if struct.unpack(">I", data[offset + 12:offset + 16])[0] != 1:
        raise ValueError("the clip's stts has more than one entry")
    return data[:offset + 16] + struct.pack(">I", frames) + data[offset + 20:]


def mp4_with_size(data: bytes, width: int, height: int) -> bytes:
    """The H.264 MP4 with its track header (tkhd) and sample entry (avc1) saying width x height (< 65536)."""
    patched = bytearray(data)
    offset, _ = mp4_box(data, b"moov", b"trak", b"tkhd")
    patched[offset + 84:offset + 92] = struct.pack(">II", width << 16, height << 16)  # 16.16 fixed point
    offset, _ = mp4_box(data, *_STBL, b"stsd")
    entry = offset + 16  # the first sample entry, after the stsd's version, flags and count
    patched[entry + 32:entry + 36] = struct.pack(">HH", width, height)
    return bytes(patched)


# --- other files ----------------------------------------------------------------------------------

def _mux(container: str, streams: Sequence[tuple[str, dict[str, Any]]], write: Callable[..., None]) -> bytes:
    """A file of `container` with the streams (encoder, its settings), filled by `write(output, streams)`."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container, options={"fflags": "+bitexact"}) as output:
        added = []
        for codec, settings in streams:
            stream = output.add_stream(codec, rate=settings.get("rate"), options=ENCODER_OPTIONS.get(codec, {}))
            for name, value in settings.items():
                if name != "rate":
                    setattr(stream, name, value)
            added.append(stream)
        write(output, added)
    return buffer.getvalue()


def _write_audio(output: av.container.OutputContainer, stream: av.stream.Stream, frames: int = 10) -> None:
    samples = 960 if stream.codec_context.name == "libopus" else 1024
    for number in range(frames):
        tone = np.sin(np.arange(samples) * 0.05 + number).astype(np.float32)[None] * 0.1
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48000, number * samples
        for packet in stream.encode(frame):
            output.mux(packet)
    for packet in stream.encode():
        output.mux(packet)


def audio_only(container: str) -> bytes:
    """An MP4 of AAC or a WebM of Opus: sound, no video stream."""
    codec = "aac" if container == "mp4" else "libopus"
    return _mux(container, [(codec, {"rate": 48000})], lambda output, streams: _write_audio(output, streams[0]))


def video_track_without_frames() -> bytes:
    """A WebM with a VP8 video track that has no frames, and an Opus track that has sound."""
    return _mux("webm", [("libvpx", {"rate": 30, "width": 64, "height": 48}), ("libopus", {"rate": 48000})],
                lambda output, streams: _write_audio(output, streams[1]))


def other_container(container: str, codec: str, pix_fmt: str = "yuv420p", frames: int = 5) -> bytes:
    """A short clip in a container we do not take (AVI, FLV, MPEG-TS, GIF), or with a codec we do not
    take in one we do."""

    def write(output: av.container.OutputContainer, streams: list) -> None:
        for frame in clip_frames(frames, 64, 48):
            for packet in streams[0].encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                output.mux(packet)
        for packet in streams[0].encode():
            output.mux(packet)

    return _mux(container, [(codec, {"rate": 30, "width": 64, "height": 48, "pix_fmt": pix_fmt})], write)


def mp4_without_box(data: bytes, kind: bytes) -> bytes:
    """The MP4 with one top-level box (its index, moov, say) cut out."""
    offset, size = mp4_box(data, kind)
    return data[:offset] + data[offset + size:]


def mp4_cut_at_frame(data: bytes, frame: int) -> bytes:
    """A faststart MP4 (index first, one chunk) cut where its frame `frame` (in decoding order) starts:
    the index still promises every frame."""
    offset, _ = mp4_box(data, *_STBL, b"stsz")
    sample_size, count = struct.unpack(">II", data[offset + 12:offset + 20])
    table = data[offset + 20:offset + 20 + 4 * count]  # one size a frame, unless they all share sample_size
    sizes = [sample_size] * count if sample_size else struct.unpack(f">{count}I", table)
    stco, _ = mp4_box(data, *_STBL, b"stco")
    chunks, first = struct.unpack(">II", data[stco + 12:stco + 20])
    if chunks != 1 or first < offset:
        raise ValueError("mp4_cut_at_frame needs a faststart MP4 of one chunk")
    return data[:first + sum(sizes[:frame])]


# --- the corpus -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostileVideo:
    """A video built to hurt the server, and the answer it must get.

    `expect`: a regex the refusal's message must match (`re.search`), from `probe_video` or, for
    what only decoding finds, from `decode_frames` of 8 frames sampled uniformly (`DECODE_FRAMES`);
    None: the video is valid and decodes. `limit`: the ServingConfig field the message names.
    """

    name: str
    data: bytes
    expect: str | None
    limit: str | None = None


DECODE_FRAMES = 8  # frames the corpus's decoding refusals are found with (they reach past frame 26 of 30)


def hostile_videos(serving: ServingConfig | None = None) -> list[HostileVideo]:
    """Every case, for a server with `serving`'s limits (the defaults unless given)."""
    serving = serving or ServingConfig()
    clip = make_clip()  # H.264 MP4, 64x48, 30 frames at 30 fps, its index (moov) at the end
    faststart = make_clip(faststart=True)
    webm = make_clip(codec="libvpx", container="webm")
    vp8, _ = encode_packets("libvpx", list(clip_frames(30, 64, 48)))
    vp8_small, _ = encode_packets("libvpx", list(clip_frames(30, 32, 32, seed=1)))
    # Many frames cheaply: a 16x16 keyframe, then the same still P-frame (a few bytes) over and over.
    still = next(clip_frames(1, 16, 16))
    vp8_still, _ = encode_packets("libvpx", [still, still])
    too_many = serving.max_video_frames + 1
    noise = np.random.default_rng(5)
    hours = 3_600_000  # ms
    cannot_read = "video 0: {} data cannot be read"
    unsupported = "video 0: unsupported format {}; send MP4, QuickTime, WebM or Matroska"
    ended = r"video 0: ended after \d+ frames, frame \d+ was to be sampled \(truncated, or a header that claims {}\)"
    duration_limit = rf"more than the limit of {serving.max_video_duration_s:g} s \(max_video_duration_s\)"
    return [
        # Not videos, or not in a container we take: refused from the leading bytes, FFmpeg never sees them.
        HostileVideo("empty", b"", r"video 0: empty \(0 bytes\)"),
        HostileVideo("random bytes", np.random.default_rng(7).bytes(4096), r"video 0: not a video"),
        HostileVideo("html", b"<html><video src='x.mp4'></video></html>", r"video 0: not a video"),
        HostileVideo("a PNG image", _png(), unsupported.format("PNG image")),
        HostileVideo("an AVIF image (ISO BMFF like MP4)", b"\x00\x00\x00\x1cftypavif" + b"\x00" * 64,
                     unsupported.format("AVIF image")),
        HostileVideo("AVI", other_container("avi", "mpeg4"), unsupported.format("AVI")),
        HostileVideo("FLV", other_container("flv", "libx264"), unsupported.format("FLV")),
        HostileVideo("MPEG-TS", other_container("mpegts", "libx264"), unsupported.format("MPEG transport stream")),
        HostileVideo("animated GIF", other_container("gif", "gif", pix_fmt="rgb8"), unsupported.format("GIF")),
        HostileVideo("one byte over max_video_bytes", clip + b"\x00" * (serving.max_video_bytes + 1 - len(clip)),
                     rf"video 0: {serving.max_video_bytes + 1} bytes is more than the limit of "
                     rf"{serving.max_video_bytes} bytes \(max_video_bytes\)", "max_video_bytes"),
        # Broken files: FFmpeg's refusal, named.
        HostileVideo("MP4 cut in the middle of its frames (index at the end: lost)", clip[:len(clip) // 2],
                     cannot_read.format("MP4")),
        HostileVideo("MP4 without its index (moov)", mp4_without_box(clip, b"moov"), cannot_read.format("MP4")),
        HostileVideo("WebM cut inside its header", webm[:120], cannot_read.format("WebM")),
        HostileVideo("WebM cut inside its first frame", webm[:len(webm) // 10],
                     r"video 0: its video stream has no frames"),
        HostileVideo("Matroska header with a 0x0 frame size", matroska(vp8, width=0, height=0),
                     cannot_read.format("WebM")),
        # No video to speak of.
        HostileVideo("audio-only MP4 (AAC)", audio_only("mp4"), r"video 0: the MP4 file has no video stream "
                     r"\(streams: audio\)"),
        HostileVideo("audio-only WebM (Opus)", audio_only("webm"), r"video 0: the WebM file has no video stream"),
        HostileVideo("WebM with a video track of no frames (and sound)", video_track_without_frames(),
                     r"video 0: its video stream has no frames"),
        HostileVideo("MJPEG in Matroska", other_container("matroska", "mjpeg", pix_fmt="yuvj420p"),
                     r"video 0: unsupported codec mjpeg; send H\.264, HEVC, VP8, VP9, AV1, MPEG-4 video"),
        HostileVideo("FFV1 in Matroska", other_container("matroska", "ffv1"), r"video 0: unsupported codec ffv1"),
        # Lying headers, refused from the header before decoding.
        # FFmpeg takes the size from the frames' own headers where it can read them (a keyframe's, an
        # SPS), else from the container's; one past its own limit (about 46000x46000) it drops.
        HostileVideo("header and VP8 keyframe claiming 16383x16383",
                     matroska([vp8_with_size(vp8[0], 16383, 16383), *vp8[1:]], width=16383, height=16383),
                     rf"video 0: 16383x16383 = 268402689 pixels a frame is more than the limit of "
                     rf"{serving.max_video_pixels} pixels \(max_video_pixels\)", "max_video_pixels"),
        HostileVideo("header claiming 100000x100000 over frames that are noise", matroska(
            [Packet(noise.bytes(200), number == 0) for number in range(10)], width=100_000, height=100_000),
            r"video 0: no frame size in its header \(0x0\)"),
        HostileVideo("10 hours: 3 frames 5 hours apart", matroska(
            vp8[:3], width=64, height=48, timestamps_ms=[0, 5 * hours, 10 * hours],
            default_duration_ns=5 * hours * 1_000_000, duration_ms=10 * hours + 1000.0),
            rf"video 0: 36001\.000 s long, {duration_limit}", "max_video_duration_s"),
        HostileVideo("a frame an hour, no duration in the header", matroska(
            vp8[:11], width=64, height=48, timestamps_ms=[hours * i for i in range(11)],
            default_duration_ns=hours * 1_000_000), rf"video 0: 11 frames at 0\.000277778 fps last 39600\.000 s, "
            rf"{duration_limit}", "max_video_duration_s"),
        HostileVideo("frame rate 0 (every frame at time 0)", matroska(vp8, width=64, height=48, timestamps_ms=[0] * 30),
                     r"video 0: frame rate 0 fps from its header is not in \(0, 1000\]"),
        HostileVideo("frame rate 10000 (DefaultDuration 100 us)",
                     matroska(vp8, width=64, height=48, default_duration_ns=100_000),
                     r"video 0: frame rate 10000 fps from its header is not in \(0, 1000\]"),
        HostileVideo(f"{too_many} frames, counted from the packets (WebM)", matroska(
            vp8_still[:1] + vp8_still[1:] * (too_many - 1), width=16, height=16,
            default_duration_ns=33_333_333, timestamps_ms=[33 * i for i in range(too_many)]),
            rf"video 0: more than the limit of {serving.max_video_frames} frames \(max_video_frames\)",
            "max_video_frames"),
        HostileVideo(f"MP4 header claiming {too_many} frames", mp4_claiming_frames(clip, too_many),
                     rf"video 0: {too_many} frames is more than the limit of {serving.max_video_frames} frames "
                     r"\(max_video_frames\)", "max_video_frames"),
        # What only decoding finds.
        HostileVideo("MP4 header claiming 50 frames over 30", mp4_claiming_frames(clip, 50), ended.format(50)),
        HostileVideo("faststart MP4 cut after 15 frames", mp4_cut_at_frame(faststart, 15), ended.format(30)),
        HostileVideo("faststart MP4 cut inside a frame", faststart[:len(faststart) // 2],
                     r"video 0: MP4 data cannot be decoded after \d+ frames"),
        HostileVideo("frames that change size mid-stream (64x48, then 32x32)",
                     matroska(vp8[:15] + vp8_small[:15], width=64, height=48),
                     r"video 0: frame 15 is 32x32, its header says 64x48 \(frames that change size are not "
                     r"supported\)"),
        HostileVideo("VP8 keyframe claiming 8000x8000 under a 64x48 header",
                     matroska([vp8_with_size(vp8[0], 8000, 8000), *vp8[1:]], width=64, height=48),
                     r"video 0: WebM data cannot be decoded after 0 frames: .*a frame much larger than the "
                     r"header's 64x48"),
        # Hostile-looking but valid.
        HostileVideo("MP4 with garbage appended (valid)", clip + np.random.default_rng(8).bytes(3000), None),
        HostileVideo("WebM with garbage appended (valid)", webm + np.random.default_rng(9).bytes(3000), None),
        HostileVideo("MP4 whose boxes say 65535x65535 over 64x48 H.264 (valid: the stream's size is used)",
                     mp4_with_size(clip, 65535, 65535), None),
        HostileVideo("header claiming 100000x100000 over 64x48 VP8 (valid: the keyframes' size is used)",
                     matroska(vp8, width=100_000, height=100_000), None),
        HostileVideo("Matroska title that is not UTF-8 (valid)",
                     matroska(vp8, width=64, height=48, title=b"\xff\xfe\x00not utf-8"), None),
        HostileVideo("WebM cut in half (valid: the frames before the cut)", webm[:len(webm) // 2], None),
    ]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()
