"""LLaVA-NeXT-Video end to end: the tiny-next-video preset exported by `make export`'s code path, served by
a real tritonserver and called over gRPC.

- Greedy ids and `prompt_tokens` equal `LlavaNextVideoForConditionalGeneration.generate`'s, given the
  frames transformers samples from the same file (its PyAV reader at its video processor's indices), for
  clips of different lengths, frame rates, sizes, codecs and containers, sampled by count and by rate;
  for a request with an image and a video; and for a conversation (`messages`) with a video part.
- Concurrent video and image requests (batched together through the vision encoder) each still equal
  their reference.
- The hostile-video corpus: each file refused by name (and the limit it breaks), and the server goes on
  serving.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import pytest

from client import LlavaClient
from llava_triton.client import LlavaError
from llava_triton.spec import ModelSpec, ServingConfig
from llava_triton.testing.reference import (
    REPO_ROOT,
    VIDEO_PRESET,
    hf_video_frames,
    hf_video_generate,
    hf_video_inputs,
    preset_checkpoint,
)
from llava_triton.testing.video_corpus import DECODE_FRAMES, hostile_videos, make_clip
from llava_triton.video import probe_video
from tests.test_anyres import SHAPES, png

pytestmark = pytest.mark.e2e

MAX_TOKENS = 8
# The served export's video limits, small enough that the corpus's files break them cheaply.
LIMITS = {"max_video_bytes": 2 * 1024 * 1024, "max_video_duration_s": 120.0, "max_video_frames": 2000,
          "max_video_pixels": 1920 * 1080, "max_frames_per_request": 12, "max_video_tokens": 12 * 16,
          "default_num_frames": 8}
SERVING = dataclasses.replace(ServingConfig(), **LIMITS)


@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    """(the checkpoint, a server serving its export, the model repository)."""
    from export.__main__ import main as export_main
    from llava_triton.server import TritonServer

    checkpoint = preset_checkpoint(VIDEO_PRESET)
    output = tmp_path_factory.mktemp("video_repository")
    settings = [item for name, value in LIMITS.items() for item in ("--set", f"{name}={value}")]
    assert export_main(["--model", str(checkpoint), "--output", str(output), "--work-dir",
                        str(tmp_path_factory.mktemp("video_work")), "--engine", "pytorch", "--device", "cpu",
                        "--no-onnx", *settings]) == 0
    log_path = REPO_ROOT / "build" / "test-logs" / "tritonserver-video.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(output, log_path=log_path, ready_timeout_s=300) as server:
        yield checkpoint, server, output


@pytest.fixture(scope="module")
def served(video_server):
    """(the checkpoint, the gRPC URL of a server serving its export)."""
    checkpoint, server, _ = video_server
    return checkpoint, server.url_grpc


# name: (make_clip options, sampling options)
CLIPS = {
    "h264 mp4, 4 of 30 frames": (dict(frames=30, fps=30, width=160, height=90), dict(num_frames=4)),
    "h264 mp4, 8 of 29 frames, portrait": (dict(frames=29, fps=25, width=90, height=160, seed=1),
                                          dict(num_frames=8)),
    "mpeg4 mp4, 5 of 47 frames": (dict(frames=47, fps=24, width=128, height=128, codec="mpeg4", seed=2),
                                  dict(num_frames=5)),
    "vp9 webm, 6 of 40 frames": (dict(frames=40, fps=20, width=112, height=64, codec="libvpx-vp9",
                                      container="webm", seed=3), dict(num_frames=6)),
    "h264 mkv, 3 of 12 frames": (dict(frames=12, fps=12, width=96, height=72, container="mkv", seed=4),
                                 dict(num_frames=3)),
    "fps 2 of a 3 s clip at 10 fps": (dict(frames=30, fps=10, width=80, height=60, seed=5), dict(fps=2.0)),
    "a clip shorter than num_frames": (dict(frames=3, fps=30, width=64, height=48, seed=6), dict(num_frames=8)),
}


@functools.cache
def clip(name: str) -> bytes:
    return make_clip(**CLIPS[name][0])


@functools.cache
def reference_frames(name: str):
    """The frames transformers samples from the clip (for a clip shorter than num_frames, which its
    sampler refuses, every frame: what the server samples then)."""
    data, sampling = clip(name), CLIPS[name][1]
    info = probe_video(data, SERVING)
    num_frames = sampling.get("num_frames")
    if num_frames is not None and num_frames > info.total_frames:
        num_frames = info.total_frames
    return hf_video_frames(data, num_frames=num_frames, fps=sampling.get("fps"), total_frames=info.total_frames)


def ask(url: str, prompt: str | None, images: list[bytes] = (), **options):
    with LlavaClient(url) as client:
        return client.generate(prompt, list(images), max_tokens=MAX_TOKENS, temperature=0.0, **options)


@pytest.mark.parametrize("name", list(CLIPS))
def test_greedy_ids_equal_transformers(served, name):
    checkpoint, url = served
    prompt = "What happens in the video?"
    completion = ask(url, prompt, videos=[clip(name)], **CLIPS[name][1])
    frames = reference_frames(name)
    assert completion.token_ids == hf_video_generate(checkpoint, [], frames, prompt, MAX_TOKENS)
    input_ids, _, _ = hf_video_inputs(checkpoint, [], frames, prompt)
    assert completion.prompt_tokens == len(input_ids)
    spec = ModelSpec.from_pretrained(checkpoint)
    assert completion.prompt_tokens > len(frames) * spec.num_frame_tokens


def test_an_image_and_a_video(served):
    checkpoint, url = served
    image = png(*SHAPES["landscape 4:3"], 0)
    name = "h264 mp4, 4 of 30 frames"
    prompt = "Is the picture in the video?"
    completion = ask(url, prompt, [image], videos=[clip(name)], num_frames=4)
    assert completion.token_ids == hf_video_generate(checkpoint, [image], reference_frames(name), prompt,
                                                     MAX_TOKENS)


def test_messages_with_a_video_part(served):
    checkpoint, url = served
    name = "vp9 webm, 6 of 40 frames"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": "A square moves."},
                {"role": "user", "content": [{"type": "text", "text": "Which way?"}]}]
    completion = ask(url, None, videos=[clip(name)], num_frames=6, messages=messages)
    assert completion.token_ids == hf_video_generate(checkpoint, [], reference_frames(name), None, MAX_TOKENS,
                                                     messages=messages)


def test_concurrent_videos_and_images_each_equal_their_reference(served):
    checkpoint, url = served
    names = ["h264 mp4, 4 of 30 frames", "mpeg4 mp4, 5 of 47 frames", "h264 mkv, 3 of 12 frames"]
    image = png(*SHAPES["portrait"], 1)
    jobs = [("video", name) for name in names] + [("image", None)] * 2
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(ask, url, "Describe it.", videos=[clip(name)], **CLIPS[name][1])
                   if kind == "video" else pool.submit(ask, url, "Describe it.", [image]) for kind, name in jobs]
        results = [future.result() for future in futures]
    for (kind, name), completion in zip(jobs, results):
        if kind == "video":
            expected = hf_video_generate(checkpoint, [], reference_frames(name), "Describe it.", MAX_TOKENS)
        else:
            expected = hf_video_generate(checkpoint, [image], None, "Describe it.", MAX_TOKENS)
        assert completion.token_ids == expected, kind


@pytest.mark.parametrize("case", hostile_videos(SERVING), ids=lambda case: case.name)
def test_hostile_videos_are_refused_by_name(served, case):
    _, url = served
    if case.expect is None:
        assert ask(url, "Describe it.", videos=[case.data], num_frames=DECODE_FRAMES).completion_tokens > 0
        return
    with pytest.raises(LlavaError, match=case.expect) as refused:
        ask(url, "Describe it.", videos=[case.data], num_frames=DECODE_FRAMES)
    if case.limit:
        assert case.limit in str(refused.value)
    # The server goes on serving.
    assert ask(url, "Describe it.", videos=[clip("h264 mkv, 3 of 12 frames")], num_frames=3).completion_tokens > 0


@pytest.mark.parametrize("options, expect", [
    (dict(num_frames=13), r"num_frames.*max_frames_per_request"),
    (dict(num_frames=0), r"num_frames"),
    (dict(fps=-1.0), r"fps"),
    (dict(fps=61.0), r"fps"),
    (dict(fps=30.0), r"max_frames_per_request"),  # 30 frames of a 1 s clip: more than 12
    (dict(num_frames=4, fps=2.0), r"num_frames \(4\) or fps \(2\), not both"),
], ids=["num_frames past the limit", "num_frames 0", "negative fps", "fps past 60", "fps giving too many frames",
        "both num_frames and fps"])
def test_sampling_values_are_refused_by_name(served, options, expect):
    _, url = served
    with pytest.raises(LlavaError, match=expect):
        ask(url, "Describe it.", videos=[clip("h264 mp4, 4 of 30 frames")], **options)


def test_more_videos_than_allowed_and_video_tags(served):
    _, url = served
    data = clip("h264 mkv, 3 of 12 frames")
    with pytest.raises(LlavaError, match=r"max_videos_per_request"):
        ask(url, "Describe them.", videos=[data, data], num_frames=2)
    with pytest.raises(LlavaError, match=r"<video> tags but 0 videos"):
        ask(url, "What is in <video>?")
    # A prompt's <video> tag places the video.
    assert ask(url, "First <video> then a question: what moves?", videos=[data], num_frames=2).completion_tokens


def test_a_video_through_the_openai_endpoint(video_server):
    """The official openai client, a video as vLLM's video_url part (a data URL): the answer is
    transformers' text, and a file that is not a video is refused naming the part that held it."""
    import base64

    import httpx
    import openai

    from llava_triton.frontend_process import FrontendProcess
    from llava_triton.server import free_port
    from llava_triton.spec import FrontendConfig
    from llava_triton.testing.reference import hf_processor

    checkpoint, server, repository = video_server
    name = "h264 mp4, 4 of 30 frames"
    url = "data:video/mp4;base64," + base64.b64encode(clip(name)).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens in the video?"}]}]
    log = REPO_ROOT / "build" / "test-logs" / "openai-video.log"
    with FrontendProcess(server.url_grpc, port=free_port(), host="127.0.0.1", model_repository=repository,
                         config=FrontendConfig(), log_path=log) as frontend:
        with openai.OpenAI(base_url=frontend.url, api_key="unused", max_retries=0, timeout=300) as client:
            answer = client.chat.completions.create(model="llava", messages=messages, max_tokens=MAX_TOKENS,
                                                    temperature=0.0, extra_body={"num_frames": 4})
        expected = hf_video_generate(checkpoint, [], reference_frames(name), "What happens in the video?",
                                     MAX_TOKENS)
        tokenizer = hf_processor(checkpoint).tokenizer
        assert answer.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.usage.completion_tokens == len(expected)
        not_a_video = "data:video/mp4;base64," + base64.b64encode(b"x" * 64).decode()
        bad = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": not_a_video}},
                                            {"type": "text", "text": "Describe it."}]}]
        response = httpx.post(f"{frontend.url}/chat/completions", timeout=120,
                              json={"model": "llava", "messages": bad, "max_tokens": 2})
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith("messages[0].content[0].video_url.url: not a video")
