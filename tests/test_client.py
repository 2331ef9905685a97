"""The client against a real tritonserver serving an echo stand-in for the `llava` ensemble.

The stand-in is a real ensemble with the public contract of llava_triton.spec, whose one step is
a decoupled Python model that streams back a JSON description of what it received.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from client import Chunk, LlavaClient, LlavaError, build_inputs
from client.perf_data import perf_input_entry, serialize_bytes_tensor, write_perf_input
from llava_triton import spec
from llava_triton.client import add_input_arguments, input_arrays
from llava_triton.perf_analyzer import perf_analyzer_command, perf_analyzer_env
from llava_triton.server import TritonServer
from llava_triton.triton_install import PROJECT_ROOT

ECHO = "echo"
CHUNK_CHARS = 16
IMAGE_PROMPT_TOKENS = 10  # the echo model's pretend cost of an image
SLOW_STEPS = 100  # a "slow" prompt streams this many chunks, 20 ms apart

# The echo model's default for an absent `stream` input: the server's (spec.INPUTS).
STREAM_DEFAULT = spec.INPUTS_BY_NAME[spec.IN_STREAM].default

ECHO_MODEL = f'''
import os, sys; sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CHUNK_CHARS = {CHUNK_CHARS}
IMAGE_PROMPT_TOKENS = {IMAGE_PROMPT_TOKENS}
SLOW_STEPS = {SLOW_STEPS}
STREAM_DEFAULT = {STREAM_DEFAULT}


class EchoError(ValueError):
    pass


def describe(request):
    """Everything the request carried, by input name: value, dtype and shape."""
    received = {{}}
    for tensor in request.inputs():
        array = tensor.as_numpy()
        if array.dtype == np.object_:
            values = [bytes(v) for v in array.reshape(-1)]
            if tensor.name() in ("images", "videos"):
                value = [[len(v), hashlib.sha256(v).hexdigest()] for v in values]
            else:
                value = [v.decode() for v in values]
        else:
            value = array.reshape(-1).tolist()
        received[tensor.name()] = {{"value": value, "dtype": str(array.dtype), "shape": list(array.shape)}}
    return received


def outputs(text, token_ids, prompt_tokens, completion_tokens, finish_reason):
    return [pb_utils.Tensor("text", np.array([text.encode()], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.array(token_ids, dtype=np.int64)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_))]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the echo model must be decoupled")
        self.record_dir = Path(config["parameters"]["record_dir"]["string_value"])
        self.threads = []

    def execute(self, requests):
        # One thread per request: slow streams must not hold up the others.
        for request in requests:
            thread = threading.Thread(target=self.respond, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.threads = [t for t in self.threads if t.is_alive()]
        return None

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=5)

    def respond(self, request):
        sender = request.get_response_sender()
        try:
            self.answer(request, sender)
        except EchoError as error:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))), flags=FINAL)

    def answer(self, request, sender):
        received = describe(request)
        prompt = received["prompt"]["value"][0]
        value = lambda name, default=None: received[name]["value"][0] if name in received else default
        if prompt.startswith("record:"):
            (self.record_dir / (prompt[len("record:"):] + ".json")).write_text(json.dumps(received))
        if value("temperature", 0.0) < 0:
            raise EchoError(f"temperature must be >= 0, got {{value('temperature')}}")
        prompt_tokens = len(prompt) + IMAGE_PROMPT_TOKENS * len(received.get("images", {{}}).get("value", []))
        if prompt.startswith("slow"):
            for step in range(SLOW_STEPS):
                if sender.is_cancelled():
                    (self.record_dir / ("cancelled-" + prompt)).write_text(str(step))
                    # Still close the request: without FINAL, Triton waits for it when unloading.
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        "cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
                    return
                sender.send(pb_utils.InferenceResponse(outputs("x", [120], prompt_tokens, step + 1, "")))
                time.sleep(0.02)
            sender.send(flags=FINAL)
            return
        if prompt.startswith("fail midway"):
            sender.send(pb_utils.InferenceResponse(outputs("partial", [1], prompt_tokens, 1, "")))
            raise EchoError("failed midway on purpose")
        answer = json.dumps(received, sort_keys=True)
        finish_reason = "stop"
        max_tokens = value("max_tokens")
        if max_tokens is not None and max_tokens < len(answer):
            answer, finish_reason = answer[:max_tokens], "length"
        if not value("stream", STREAM_DEFAULT):
            sender.send(pb_utils.InferenceResponse(outputs(answer, [ord(c) for c in answer], prompt_tokens,
                                                           len(answer), finish_reason)), flags=FINAL)
            return
        for start in range(0, len(answer), CHUNK_CHARS):
            piece = answer[start:start + CHUNK_CHARS]
            done = start + CHUNK_CHARS >= len(answer)
            sender.send(pb_utils.InferenceResponse(outputs(piece, [ord(c) for c in piece], prompt_tokens,
                                                           start + len(piece), finish_reason if done else "")))
        sender.send(flags=FINAL)
'''


def write_echo_repository(root: Path, record_dir: Path) -> Path:
    """The echo model and an ensemble in front of it, both with the inputs and outputs export writes."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from export.repository import contract_inputs, contract_outputs

    echo = mc.ModelConfig(name=ECHO, backend="python", max_batch_size=0, input=contract_inputs(),
                          output=contract_outputs(), model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
                          instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
                          parameters={"record_dir": mc.ModelParameter(string_value=str(record_dir))})
    step = mc.ModelEnsembling.Step(model_name=ECHO, model_version=-1,
                                   input_map={t.name: t.name for t in spec.INPUTS},
                                   output_map={t.name: t.name for t in spec.OUTPUTS})
    ensemble = mc.ModelConfig(name=spec.ENSEMBLE, platform="ensemble", max_batch_size=0, input=contract_inputs(),
                              output=contract_outputs(), ensemble_scheduling=mc.ModelEnsembling(step=[step]))
    for config in (echo, ensemble):
        (root / config.name / "1").mkdir(parents=True)
        (root / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    (root / ECHO / "1" / "model.py").write_text(ECHO_MODEL)
    return root


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("records")


@pytest.fixture(scope="module")
def server(tmp_path_factory, record_dir):
    repository = write_echo_repository(tmp_path_factory.mktemp("repository"), record_dir)
    with TritonServer(repository, log_path=tmp_path_factory.mktemp("log") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with LlavaClient(server.url_grpc) as llava:
        yield llava


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    # Not real images: the echo model only hashes them. A NUL byte checks the BYTES framing.
    return [b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3, b"\xff\xd8\xff\x00jpeg-ish"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def received_by_model(completion_text: str) -> dict:
    return json.loads(completion_text)


@pytest.mark.e2e
def test_generate_sends_every_option_with_its_dtype(client, images, tmp_path):
    image_path = tmp_path / "second.jpg"
    image_path.write_bytes(images[1])
    videos = [b"\x00\x00\x00\x18ftypmp42 first", b"\x1a\x45\xdf\xa3 second"]
    video_path = tmp_path / "second.webm"
    video_path.write_bytes(videos[1])
    completion = client.generate("<image><image> Describe.", [images[0], image_path], max_tokens=100_000,
                                 temperature=0.5, top_p=0.9, top_k=40, seed=1234, stop=["\n\n", "END"],
                                 stream=True, ignore_eos=True, cache_salt="tenant-é", videos=[videos[0], video_path],
                                 num_frames=8, fps=1.5)
    received = received_by_model(completion.text)
    assert set(received) == {t.name for t in spec.INPUTS} - {spec.IN_MESSAGES}  # a prompt, so no messages
    assert received[spec.IN_PROMPT] == {"value": ["<image><image> Describe."], "dtype": "object", "shape": [1]}
    assert received[spec.IN_IMAGES]["value"] == [[len(i), sha(i)] for i in images]
    assert received[spec.IN_IMAGES]["shape"] == [2]
    assert received[spec.IN_MAX_TOKENS] == {"value": [100_000], "dtype": "int32", "shape": [1]}
    assert received[spec.IN_TEMPERATURE]["value"] == [pytest.approx(0.5)]
    assert received[spec.IN_TEMPERATURE]["dtype"] == "float32"
    assert received[spec.IN_TOP_P]["value"] == [pytest.approx(0.9)]
    assert received[spec.IN_TOP_K] == {"value": [40], "dtype": "int32", "shape": [1]}
    assert received[spec.IN_SEED] == {"value": [1234], "dtype": "int64", "shape": [1]}
    assert received[spec.IN_STOP] == {"value": ["\n\n", "END"], "dtype": "object", "shape": [2]}
    assert received[spec.IN_STREAM] == {"value": [True], "dtype": "bool", "shape": [1]}
    assert received[spec.IN_IGNORE_EOS] == {"value": [True], "dtype": "bool", "shape": [1]}
    assert received[spec.IN_CACHE_SALT] == {"value": ["tenant-é"], "dtype": "object", "shape": [1]}
    assert received[spec.IN_VIDEOS] == {"value": [[len(v), sha(v)] for v in videos], "dtype": "object", "shape": [2]}
    assert received[spec.IN_NUM_FRAMES] == {"value": [8], "dtype": "int32", "shape": [1]}
    assert received[spec.IN_FPS] == {"value": [1.5], "dtype": "float32", "shape": [1]}
    assert completion.prompt_tokens == len("<image><image> Describe.") + 2 * IMAGE_PROMPT_TOKENS
    assert completion.completion_tokens == len(completion.text)
    assert completion.token_ids == [ord(c) for c in completion.text]
    assert completion.finish_reason == "stop"


@pytest.mark.e2e
def test_unset_options_are_not_sent(client, images):
    # generate leaves every option to the server, `stream` too: one response, as the server defaults to.
    received = received_by_model(client.generate("Hello").text)
    assert set(received) == {spec.IN_PROMPT}
    # stream() asks for streaming, which is what it is for, and nothing else.
    chunks = list(client.stream("Hello"))
    assert len(chunks) > 1
    assert set(received_by_model("".join(chunk.text for chunk in chunks))) == {spec.IN_PROMPT, spec.IN_STREAM}
    # A lone string or bytes is one stop string / one image, not a sequence of characters.
    received = received_by_model(client.generate("Hello", images[1], stop="one stop string").text)
    assert received[spec.IN_STOP]["value"] == ["one stop string"]
    assert received[spec.IN_IMAGES]["value"] == [[len(images[1]), sha(images[1])]]


@pytest.mark.e2e
def test_stream_yields_deltas_then_joins(client):
    chunks = list(client.stream("stream me, a longer prompt so the answer has many chunks"))
    assert len(chunks) > 3
    assert all(isinstance(chunk, Chunk) for chunk in chunks)
    assert all(len(chunk.text) <= CHUNK_CHARS for chunk in chunks)
    assert [chunk.finish_reason for chunk in chunks] == [""] * (len(chunks) - 1) + ["stop"]
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == sum(len(chunk.text) for chunk in chunks)
    completion = client.generate("stream me, a longer prompt so the answer has many chunks", stream=True)
    assert completion.text == "".join(chunk.text for chunk in chunks)
    assert completion.token_ids == [t for chunk in chunks for t in chunk.token_ids]


@pytest.mark.e2e
def test_no_stream_gives_one_chunk(client):
    chunks = list(client.stream("whole answer at once", stream=False))
    assert len(chunks) == 1
    assert chunks[0].finish_reason == "stop"
    assert received_by_model(chunks[0].text)[spec.IN_STREAM]["value"] == [False]


@pytest.mark.e2e
def test_max_tokens_reports_length(client):
    completion = client.generate("cut short", max_tokens=20)
    assert len(completion.text) == 20
    assert completion.completion_tokens == 20
    assert completion.finish_reason == "length"


@pytest.mark.e2e
def test_server_error_raises_with_its_message(client):
    with pytest.raises(LlavaError, match="temperature must be >= 0") as raised:
        client.generate("refuse me", temperature=-1.0)
    assert "temperature must be >= 0, got -1.0" in raised.value.message
    # An error after some output: the chunks came, then the error.
    seen = []
    with pytest.raises(LlavaError, match="failed midway on purpose"):
        for chunk in client.stream("fail midway"):
            seen.append(chunk.text)
    assert seen == ["partial"]
    # The client is still usable afterwards.
    assert client.generate("after the errors").finish_reason == "stop"


def wait_for(path: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


@pytest.mark.e2e
def test_closing_the_stream_early_cancels_the_request(server, record_dir):
    # Straight to the decoupled model: Triton 2.51's ensemble scheduler passes a cancellation on
    # only to steps not yet started (core PR #263, server issue #6739), so through `llava` a running
    # step never sees it. The client's part, cancelling the gRPC stream, is the same either way.
    with LlavaClient(server.url_grpc, model=ECHO) as direct:
        prompt = f"slow-{time.monotonic_ns()}"
        stream = direct.stream(prompt)
        first = [next(stream) for _ in range(3)]
        assert [chunk.completion_tokens for chunk in first] == [1, 2, 3]
        stream.close()
        marker = record_dir / f"cancelled-{prompt}"
        assert wait_for(marker), "the model never saw the cancellation"
        assert int(marker.read_text()) < SLOW_STEPS // 2  # stopped early, not after all its steps
        assert direct.generate("after the cancel").finish_reason == "stop"


@pytest.mark.e2e
def test_closing_an_ensemble_stream_early_returns_at_once(client):
    stream = client.stream(f"slow-{time.monotonic_ns()}")
    next(stream)
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 1.0
    assert client.generate("after the cancel").finish_reason == "stop"


@pytest.mark.e2e
def test_timeout_raises_and_cancels(server, record_dir):
    with LlavaClient(server.url_grpc, model=ECHO) as direct:
        prompt = f"slow-{time.monotonic_ns()}"
        with pytest.raises(LlavaError, match="(?i)deadline"):
            direct.generate(prompt, timeout=0.5)
        assert wait_for(record_dir / f"cancelled-{prompt}")


@pytest.mark.e2e
def test_sixteen_threads_at_once(client):
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def ask(index: int) -> None:
        try:
            barrier.wait()
            results[index] = client.generate(f"thread {index}", seed=index).text
        except BaseException as error:  # collected, re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for index in range(16):
        received = received_by_model(results[index])
        assert received[spec.IN_PROMPT]["value"] == [f"thread {index}"]
        assert received[spec.IN_SEED]["value"] == [index]


@pytest.mark.e2e
def test_unreachable_server_raises():
    with LlavaClient("localhost:1") as unreachable:
        with pytest.raises(LlavaError):
            unreachable.generate("anyone there?", timeout=5)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.e2e
def test_cli_streams_and_summarizes(server, images, tmp_path):
    image_path = tmp_path / "cat.jpg"
    image_path.write_bytes(images[0])
    result = run_cli("--image", str(image_path), "--prompt", "<image> What is in the picture?",
                     "--url", server.url_grpc, "--max-tokens", "5000", "--stop", "a", "--stop", "b",
                     "--temperature", "0.2", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    received = received_by_model(result.stdout)
    assert received[spec.IN_IMAGES]["value"] == [[len(images[0]), sha(images[0])]]
    assert received[spec.IN_STOP]["value"] == ["a", "b"]
    assert received[spec.IN_IGNORE_EOS]["value"] == [True]
    assert spec.IN_TOP_P not in received
    assert received[spec.IN_STREAM]["value"] == [True]  # the CLI streams unless told not to
    assert "finish_reason=stop" in result.stderr and "time_to_first_token=" in result.stderr
    whole = run_cli("--prompt", "at once", "--url", server.url_grpc, "--no-stream", "--seed", "3")
    assert whole.returncode == 0, whole.stderr
    assert received_by_model(whole.stdout) == {
        spec.IN_PROMPT: {"value": ["at once"], "dtype": "object", "shape": [1]},
        spec.IN_STREAM: {"value": [False], "dtype": "bool", "shape": [1]},
        spec.IN_SEED: {"value": [3], "dtype": "int64", "shape": [1]}}


@pytest.mark.e2e
def test_cli_exit_codes(server, tmp_path):
    refused = run_cli("--prompt", "refuse me", "--temperature", "-1", "--url", server.url_grpc)
    assert refused.returncode == 1
    assert "temperature must be >= 0" in refused.stderr
    missing = run_cli("--prompt", "hi", "--image", str(tmp_path / "missing.jpg"), "--url", server.url_grpc)
    assert missing.returncode == 2
    assert "missing.jpg" in missing.stderr


def test_serialize_bytes_tensor():
    assert serialize_bytes_tensor([b"ab", b""]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def test_perf_input_entry_leaves_unset_options_out():
    entry = perf_input_entry([], "hi", None)
    assert set(entry) == {spec.IN_PROMPT}
    with pytest.raises(ValueError, match="unknown options"):
        perf_input_entry([], "hi", 4, temprature=0.5)
    with pytest.raises(ValueError, match="unknown options"):
        build_inputs("hi", maxtokens=4)


def test_inputs_follow_the_contract(images):
    arrays = input_arrays("hi", images, max_tokens=4, temperature=0.5, top_p=0.9, top_k=3, seed=7, stop="END",
                          stream=False, ignore_eos=True, cache_salt="t", videos=[b"clip"], num_frames=4, fps=2.0)
    assert list(arrays) == [t.name for t in spec.INPUTS if t.name != spec.IN_MESSAGES]
    # messages instead of a prompt: a list of turns goes as its JSON, a string as it is.
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "é?"}]}]
    arrays |= input_arrays(None, images, messages=turns)
    assert json.loads(arrays[spec.IN_MESSAGES][0].decode()) == turns
    assert input_arrays(None, messages='[{"x": 1}]')[spec.IN_MESSAGES].tolist() == [b'[{"x": 1}]']
    with pytest.raises(ValueError, match="either a prompt or messages="):
        input_arrays("hi", messages=turns)
    with pytest.raises(ValueError, match="either a prompt or messages="):
        input_arrays(None)
    for tensor in spec.INPUTS:
        assert arrays[tensor.name].dtype == spec.NUMPY_DTYPES[tensor.datatype], tensor.name
        assert arrays[tensor.name].ndim == 1 and (tensor.repeated or arrays[tensor.name].shape == (1,)), tensor.name
    assert arrays[spec.IN_STOP].tolist() == [b"END"] and arrays[spec.IN_IMAGES].tolist() == images
    assert arrays[spec.IN_VIDEOS].tolist() == [b"clip"]
    # Empty lists, like None, are left out: the server's defaults apply.
    assert list(input_arrays("hi", [], stop=[], seed=None)) == [spec.IN_PROMPT]


def input_flags() -> dict:
    import argparse

    parser = argparse.ArgumentParser()
    add_input_arguments(parser)
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def test_every_input_has_one_flag_with_its_meaning():
    flags = input_flags()
    assert set(flags) == {t.name for t in spec.INPUTS}
    for tensor in spec.INPUTS:
        assert flags[tensor.name].help.startswith(tensor.meaning.replace("`", "")), tensor.name
        assert flags[tensor.name].required == tensor.required


def test_prompt_and_messages_flags_are_a_required_pair():
    import argparse

    parser = argparse.ArgumentParser()
    add_input_arguments(parser)
    assert parser.parse_args(["--prompt", "hi"]).prompt == "hi"
    assert parser.parse_args(["--messages", "[]"]).messages == "[]"
    for argv in ([], ["--prompt", "hi", "--messages", "[]"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


@pytest.mark.parametrize("prog", ["client", "client.perf_data"])
def test_both_command_lines_have_the_input_flags(prog):
    help_text = subprocess.run([sys.executable, "-m", prog, "--help"], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, check=True, timeout=60).stdout
    for action in input_flags().values():
        assert action.option_strings[0] in help_text, (prog, action.option_strings)


def test_perf_data_cli_writes_only_the_options_given(images, tmp_path):
    from client.perf_data import main as perf_data_main

    image = tmp_path / "cat.jpg"
    image.write_bytes(images[0])
    assert perf_data_main(["--image", str(image), "--prompt", "hi", "--max-tokens", "8", "--ignore-eos",
                           "-o", str(tmp_path / "a.json")]) == 0
    entry = json.loads((tmp_path / "a.json").read_text())["data"][0]
    assert entry == perf_input_entry([images[0]], "hi", 8, ignore_eos=True)
    # No stream: the server's default applies.
    assert set(entry) == {spec.IN_PROMPT, spec.IN_IMAGES, spec.IN_MAX_TOKENS, spec.IN_IGNORE_EOS}
    assert entry[spec.IN_MAX_TOKENS] == {"content": [8], "shape": [1]}
    assert perf_data_main(["--prompt", "hi", "--stream", "--stop", "a", "--stop", "b",
                           "-o", str(tmp_path / "b.json")]) == 0
    entry = json.loads((tmp_path / "b.json").read_text())["data"][0]
    assert entry[spec.IN_STREAM] == {"content": [True], "shape": [1]}
    assert entry[spec.IN_STOP]["shape"] == [2]
    assert base64.b64decode(entry[spec.IN_STOP]["content"]["b64"]) == serialize_bytes_tensor([b"a", b"b"])


@pytest.mark.e2e
def test_perf_analyzer_streams_perf_data(server, images, record_dir, tmp_path):
    input_data = write_perf_input(tmp_path / "input.json", images, "record:perf", 64, temperature=0.0, top_k=5,
                                  seed=7, stop=["###"], stream=True, ignore_eos=True)
    report = tmp_path / "perf.csv"
    command = [*perf_analyzer_command(), "-m", spec.ENSEMBLE, "-u", server.url_grpc, "-i", "grpc", "--streaming",
               "--input-data", str(input_data), "--concurrency-range", "2",
               "--request-count", "20",  # one fixed window: this checks what arrives, not how steady a busy CI is
               "-f", str(report)]
    result = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader(report.open()))
    assert len(rows) == 1 and float(rows[0]["Inferences/Second"]) > 0
    # What the model received from perf_analyzer is what the JSON describes.
    received = json.loads((record_dir / "perf.json").read_text())
    assert received[spec.IN_IMAGES]["value"] == [[len(i), sha(i)] for i in images]
    assert received[spec.IN_PROMPT]["value"] == ["record:perf"]
    assert received[spec.IN_MAX_TOKENS]["value"] == [64]
    assert received[spec.IN_TOP_K]["value"] == [5]
    assert received[spec.IN_SEED]["value"] == [7]
    assert received[spec.IN_STOP]["value"] == ["###"]
    assert received[spec.IN_STREAM]["value"] == [True]
    assert received[spec.IN_IGNORE_EOS]["value"] == [True]
    assert set(received) == {spec.IN_PROMPT, spec.IN_IMAGES, spec.IN_MAX_TOKENS, spec.IN_TEMPERATURE,
                             spec.IN_TOP_K, spec.IN_SEED, spec.IN_STOP, spec.IN_STREAM, spec.IN_IGNORE_EOS}


class _RefusingConnection:
    """Stands in for a tritonclient gRPC connection whose one request gets `error`; records stop_stream."""

    def __init__(self, error):
        self.error = error
        self.cancel_requests = None

    def start_stream(self, callback, stream_timeout=None):
        self.callback = callback

    def async_stream_infer(self, model, inputs, **options):
        self.callback(None, self.error)

    def stop_stream(self, cancel_requests=False):
        self.cancel_requests = cancel_requests


@pytest.mark.parametrize("status, cancelled", [(None, False), ("StatusCode.UNAVAILABLE", True)])
def test_an_error_response_ends_the_call_without_cancelling_it(status, cancelled):
    # An error response is the request's last: cancelling the call after it leaks the call's state,
    # with the request's bytes, in Triton 2.51. A gRPC error (a status) ended the call already.
    from tritonclient.utils import InferenceServerException

    connection = _RefusingConnection(InferenceServerException(msg="temperature must be >= 0", status=status))
    client = LlavaClient("localhost:1")
    client._acquire = lambda: connection
    with pytest.raises(LlavaError, match="temperature must be >= 0"):
        client.generate("refuse me", temperature=-1.0)
    assert connection.cancel_requests is cancelled
