"""End to end: a real tritonserver serving the exported embedded default, called over gRPC.

The served greedy output must equal transformers' `LlavaForConditionalGeneration.generate`
on the same checkpoint, token for token.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from client import LlavaClient, LlavaError
from client.perf_data import write_perf_input
from llava_triton.perf_analyzer import perf_analyzer_command, perf_analyzer_env
from llava_triton.server import TritonServer
from llava_triton.testing.reference import hf_generate, make_test_images, varied_image

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
IMAGES = make_test_images()


CASES = {
    "one jpeg, no tag": ([IMAGES["jpeg"]], "What is in the picture?"),
    "one png at a tag": ([IMAGES["png"]], "Look: <image>\nDescribe the colours."),
    "two images": ([IMAGES["jpeg"], IMAGES["webp"]], "<image>\n<image>\nWhat differs between these two?"),
    "no image": ([], "Tell me a short story about the sea."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_output_equals_transformers(llava_client, tiny_checkpoint, case):
    images, prompt = CASES[case]
    expected = hf_generate(tiny_checkpoint, images, prompt, MAX_TOKENS)
    result = llava_client.generate(prompt, images, max_tokens=MAX_TOKENS, temperature=0.0, stream=False)
    assert result.token_ids == expected
    assert result.completion_tokens == len(expected)
    assert result.finish_reason == ("length" if len(expected) == MAX_TOKENS else "stop")
    assert result.prompt_tokens > 0


def test_streamed_text_joined_equals_non_streamed(llava_client, tiny_checkpoint):
    images, prompt = CASES["one jpeg, no tag"]
    whole = llava_client.generate(prompt, images, max_tokens=24, ignore_eos=True, stream=False)
    chunks = list(llava_client.stream(prompt, images, max_tokens=24, ignore_eos=True, stream=True))
    # A response per generated token, or fewer carrying several when the server's sender fell behind
    # (spec.INPUTS' `stream`): every response carries tokens, only the last one finishes.
    assert 1 <= len(chunks) <= 24 and all(c.token_ids for c in chunks)
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids and len(whole.token_ids) == 24
    assert [c.finish_reason for c in chunks] == [""] * (len(chunks) - 1) + ["length"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert whole.text == tokenizer.decode(whole.token_ids, skip_special_tokens=True)


def test_sixteen_concurrent_requests_get_their_own_answers(triton_server, tiny_checkpoint):
    images = [varied_image(seed) for seed in range(16)]
    prompt = "What is in the picture?"
    expected = [hf_generate(tiny_checkpoint, [image], prompt, 8) for image in images]
    assert len({tuple(e) for e in expected}) > 1, "the images should lead to different answers"

    def ask(image: bytes) -> list[int]:
        with LlavaClient(triton_server.url_grpc) as client:
            return client.generate(prompt, [image], max_tokens=8, stream=True).token_ids

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, images))
    assert answers == expected


def _truncated_jpeg() -> bytes:
    data = IMAGES["jpeg"]
    return data[: len(data) // 2]


BAD_REQUESTS = {
    "truncated image": (dict(images=[_truncated_jpeg()]), r"image 0.*(truncated|corrupt)"),
    "not an image": (dict(images=[b"this is plain text, not an image" * 4]), r"image 0.*not .*image"),
    "zero bytes": (dict(images=[b""]), r"image 0.*empty"),
    "more tags than images": (dict(images=[IMAGES["jpeg"]], prompt="<image> and <image>?"), r"2 .*1|1 .*2"),
    "tags but no image": (dict(images=[], prompt="<image>\nWhat is it?"), r"1 .*0|0 .*1"),
    "empty prompt": (dict(prompt="   "), r"prompt.*empty"),
    "max_tokens 0": (dict(max_tokens=0), r"max_tokens must be at least 1, got 0"),
    "max_tokens past the context": (dict(max_tokens=100_000), r"max_tokens 100000.*context length of 4096"),
    "negative temperature": (dict(temperature=-1.0), r"temperature must be"),
    "top_p above 1": (dict(top_p=1.5), r"top_p must be in"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(llava_client, tiny_checkpoint, case):
    overrides, message = BAD_REQUESTS[case]
    request = dict(prompt="What is it?", images=[IMAGES["png"]], max_tokens=4)
    request.update(overrides)
    with pytest.raises(LlavaError, match=message):
        llava_client.generate(request.pop("prompt"), request.pop("images"), **request)
    images, prompt = CASES["one png at a tag"]
    assert (llava_client.generate(prompt, images, max_tokens=6).token_ids
            == hf_generate(tiny_checkpoint, images, prompt, 6))


def test_early_close_does_not_disturb_other_requests(triton_server, tiny_checkpoint):
    images, prompt = CASES["one jpeg, no tag"]
    with LlavaClient(triton_server.url_grpc) as client:
        stream = client.stream(prompt, images, max_tokens=200, ignore_eos=True)
        next(stream)
        stream.close()
        assert (client.generate(prompt, images, max_tokens=8).token_ids
                == hf_generate(tiny_checkpoint, images, prompt, 8))


def test_perf_analyzer_runs_against_the_ensemble_with_real_images(triton_server, tmp_path):
    input_data = tmp_path / "input.json"
    write_perf_input(input_data, [IMAGES["jpeg"]], "What is in the picture?", max_tokens=8, ignore_eos=True)
    report = tmp_path / "perf.csv"
    command = [*perf_analyzer_command(), "-m", "llava", "-u", triton_server.url_grpc, "-i", "grpc", "--streaming",
               "--input-data", str(input_data), "--concurrency-range", "2",
               "--request-count", "10",  # one fixed window: a loaded CI machine need not give steady windows
               "-f", str(report)]
    run = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = list(csv.DictReader(report.open()))
    assert rows and float(rows[0]["Inferences/Second"]) > 0
    (tmp_path / "perf_stdout.txt").write_text(run.stdout)


def test_bench_vision_measurement_falls_back_to_one_fixed_window_when_windows_disagree(
        triton_server, tiny_checkpoint, tmp_path):
    # A 0.001 % stability criterion is never met by real windows, as on a noisy machine: the figure is
    # still measured, from one fixed window, and marked unstable rather than lost.
    from bench import vision
    from bench.workload import w1_pixel_values
    from llava_triton.spec import VISION_ENCODER, read_spec

    model_spec, serving = read_spec(triton_server.model_repository / VISION_ENCODER / "1")
    input_data = vision.write_input_data(tmp_path / "vision_input.json", w1_pixel_values(tiny_checkpoint), serving)
    entry = vision.measure(triton_server.url_grpc, 1, input_data, tmp_path, stability=0.001, max_trials=3,
                           measurement_requests=3, shared_memory="none",
                           output_item_bytes=vision.output_item_bytes(model_spec, serving))
    assert "error" not in entry, entry
    assert entry["stable"] is False and entry["images_per_s"] > 0
    first, fixed = entry["attempts"]
    assert vision.STABLE_FAILURE in first["output_tail"]
    assert ("--request-count" in fixed["command"]
            and "9" == fixed["command"][fixed["command"].index("--request-count") + 1])


def test_bfloat16_export_streams_an_answer_with_fp16_between_the_steps(tiny_checkpoint, tmp_path):
    # A GPU deployment's settings (bfloat16 models, FP16 tensors between the ensemble's steps) served
    # on the CPU. Its tokens may differ from float32's, so the answer is checked for form, not content.
    from tritonclient.grpc import model_config_pb2 as mc

    from export.__main__ import main as export_main
    from export.repository import read_config
    from llava_triton import spec

    repository = tmp_path / "repository"
    assert export_main(["--model", str(tiny_checkpoint), "--output", str(repository), "--work-dir",
                        str(tmp_path / "work"), "--engine", "pytorch", "--device", "cpu", "--dtype", "bfloat16",
                        "--no-onnx", "--set", "preprocess_instances=1"]) == 0
    encoder = read_config(repository / spec.VISION_ENCODER / "config.pbtxt")
    assert [t.data_type for t in (*encoder.input, *encoder.output)] == [mc.TYPE_FP16, mc.TYPE_FP16]
    log_path = Path(__file__).resolve().parent.parent / "build" / "test-logs" / "tritonserver-bfloat16.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    images, prompt = CASES["one jpeg, no tag"]
    with TritonServer(repository, log_path=log_path, ready_timeout_s=300) as server, \
            LlavaClient(server.url_grpc) as client:
        chunks = list(client.stream(prompt, images, max_tokens=8, ignore_eos=True))
        again = client.generate(prompt, images, max_tokens=8, ignore_eos=True, stream=False)
    # One response per token, or fewer carrying several when the sender fell behind (see above).
    assert 1 <= len(chunks) <= 8 and [c.finish_reason for c in chunks] == [""] * (len(chunks) - 1) + ["length"]
    token_ids = [t for c in chunks for t in c.token_ids]
    assert len(token_ids) == 8
    assert again.token_ids == token_ids and again.text == "".join(c.text for c in chunks)  # greedy: the same
    assert chunks[-1].prompt_tokens > 576  # the image's tokens are in the prompt


def test_projector_in_the_language_model_equals_transformers(tiny_checkpoint, tmp_path):
    """projector_placement "language_model": the ensemble is preprocess -> vision_encoder ->
    language_model, which projects the features itself; the tokens still equal transformers'."""
    from export.__main__ import main as export_main
    from llava_triton import spec

    repository = tmp_path / "repository"
    common = ["--model", str(tiny_checkpoint), "--output", str(repository), "--work-dir", str(tmp_path / "work"),
              "--engine", "pytorch", "--device", "cpu", "--no-onnx", "--set", "preprocess_instances=1"]
    assert export_main(common) == 0  # first as usual, then again into the same directory
    assert (repository / spec.PROJECTOR / "config.pbtxt").exists()
    assert export_main([*common, "--set", "projector_placement=language_model"]) == 0
    assert not (repository / spec.PROJECTOR).exists()  # no stale projector model left to load
    assert (repository / spec.LANGUAGE_MODEL / "1" / spec.LANGUAGE_MODEL_PROJECTOR_DIR / "model.safetensors").exists()
    log_path = Path(__file__).resolve().parent.parent / "build" / "test-logs" / "tritonserver-projector-in-lm.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(repository, log_path=log_path, ready_timeout_s=300) as server, \
            LlavaClient(server.url_grpc) as client:
        index = urllib.request.Request(f"http://{server.url_http}/v2/repository/index", data=b"{}", method="POST")
        loaded = {model["name"] for model in json.loads(urllib.request.urlopen(index, timeout=10).read())}
        assert loaded == {spec.PREPROCESS, spec.VISION_ENCODER, spec.LANGUAGE_MODEL, spec.ENSEMBLE}
        for case in ("one png at a tag", "two images", "no image"):
            images, prompt = CASES[case]
            expected = hf_generate(tiny_checkpoint, images, prompt, MAX_TOKENS)
            assert client.generate(prompt, images, max_tokens=MAX_TOKENS, stream=True).token_ids == expected, case
