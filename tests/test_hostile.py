"""Hostile input end to end: every case of `tests/corpus.py` against a real tritonserver.

Each case is sent the way a client would send it: through `LlavaClient` when it can express the
request, otherwise with the raw `tritonclient.grpc` streaming API (bytes LlavaClient would not
send, wrong dtypes and shapes, unknown inputs and request parameters, the composing models
called directly). A refusal must carry a message that names the problem (and the
`ServingConfig` field, for a limit of ours); a valid case must get exactly transformers'
answer. After every case the server is still ready and a valid request still gets exactly
transformers' answer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import re

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from client import LlavaClient, LlavaError, build_inputs
from export.repository import read_config
from llava_triton import spec
from llava_triton.spec import ModelSpec, ServingConfig, read_spec
from llava_triton.testing.corpus import MAX_TOKENS, HostileCase, hostile_cases, raw_inputs, request_bytes_case
from llava_triton.testing.reference import hf_generate, make_test_images
from llava_triton.testing.reference import tiny_checkpoint as build_tiny_checkpoint
from llava_triton.triton_install import MALLOC_MMAP_THRESHOLD

pytestmark = pytest.mark.e2e

CASES = hostile_cases(ModelSpec.from_pretrained(build_tiny_checkpoint()))
VALID_IMAGES = [make_test_images()["png"]]
VALID_PROMPT = "Look: <image>\nDescribe the colours."
TIMEOUT_S = 120.0  # per request: a hung server fails the case instead of the whole run
LIMIT_FIELDS = {f.name for f in dataclasses.fields(ServingConfig)}


class Refused(Exception):
    """The server (or Triton in front of it) refused the request with `message`."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@pytest.fixture(scope="module")
def valid_answer(tiny_checkpoint) -> list[int]:
    return hf_generate(tiny_checkpoint, VALID_IMAGES, VALID_PROMPT, MAX_TOKENS)


def stream_raw(url: str, model: str, inputs: list[grpcclient.InferInput], parameters=None) -> list[int]:
    """The generated ids of one request over the gRPC stream; raises Refused on an error."""
    connection = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    connection.start_stream(callback=lambda result, error: responses.put((result, error)))
    token_ids: list[int] = []
    try:
        connection.async_stream_infer(model, inputs, parameters=parameters, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=TIMEOUT_S)
            if error is not None:
                raise Refused(error.message())
            ids = result.as_numpy(spec.OUT_TOKEN_IDS)
            token_ids += [] if ids is None else ids.reshape(-1).tolist()
            final = result.get_response().parameters.get("triton_final_response")
            if final is None or final.bool_param:  # a non-decoupled model answers once
                return token_ids
    except InferenceServerException as error:
        raise Refused(error.message()) from error
    finally:
        connection.stop_stream(cancel_requests=True)
        connection.close()


def send(case: HostileCase, url: str, llava_client: LlavaClient) -> list[int]:
    if case.needs_raw_client:
        return stream_raw(url, case.model, raw_inputs(case, build_inputs), case.parameters)
    try:
        return llava_client.generate(case.prompt, list(case.images), timeout=TIMEOUT_S,
                                     **{"max_tokens": MAX_TOKENS, **case.options}).token_ids
    except LlavaError as error:
        raise Refused(error.message) from error


def assert_refused_clearly(case: HostileCase, message: str) -> None:
    assert re.search(case.expect, message), f"{case.name}: unexpected message {message!r}"
    assert "internal error" not in message, f"{case.name}: refused as a crash: {message!r}"
    if case.limit is not None:
        assert case.limit in LIMIT_FIELDS, f"{case.limit} is not a ServingConfig field"
        assert case.limit in message, f"{case.name}: the message does not name {case.limit}: {message!r}"


def assert_still_serving(triton_server, llava_client: LlavaClient, valid_answer: list[int]) -> None:
    assert triton_server.is_ready(), "the server is no longer ready"
    answer = llava_client.generate(VALID_PROMPT, VALID_IMAGES, max_tokens=MAX_TOKENS, timeout=TIMEOUT_S)
    assert answer.token_ids == valid_answer


def run_case(case: HostileCase, triton_server, llava_client, tiny_checkpoint, valid_answer) -> None:
    if case.expect is None:
        expected = hf_generate(tiny_checkpoint, list(case.images), case.prompt, MAX_TOKENS)
        assert send(case, triton_server.url_grpc, llava_client) == expected
    else:
        with pytest.raises(Refused) as refused:
            send(case, triton_server.url_grpc, llava_client)
        assert_refused_clearly(case, refused.value.message)
    assert_still_serving(triton_server, llava_client, valid_answer)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_request_is_refused_clearly_and_the_server_keeps_serving(triton_server, llava_client, tiny_checkpoint,
                                                                         valid_answer, case):
    run_case(case, triton_server, llava_client, tiny_checkpoint, valid_answer)


def test_images_over_the_request_byte_limit_are_refused(triton_server, llava_client, tiny_checkpoint, valid_answer):
    run_case(request_bytes_case(ServingConfig()), triton_server, llava_client, tiny_checkpoint, valid_answer)


LIMIT_CASES = [case for case in CASES if case.limit is not None and case.model == spec.ENSEMBLE]


def _rss_anon_mib(pid: int) -> float:
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(status["RssAnon"].split()[0]) / 1024


def test_refused_large_requests_do_not_pile_up_in_the_servers_heap(triton_server, llava_client, valid_answer):
    """Requests of 20 MiB, refused, must not leave their buffers in tritonserver's heap.

    Without a fixed malloc mmap threshold (server_env sets MALLOC_MMAP_THRESHOLD_), glibc kept
    about 16 MiB of each in tritonserver (3.2 GB after 192 of them, still growing): the growth the
    30-minute soak failed on.
    """
    pid = triton_server.process.pid
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert f"MALLOC_MMAP_THRESHOLD_={MALLOC_MMAP_THRESHOLD}".encode() in environ
    case = next(c for c in CASES if c.name == "image one byte over max_image_bytes")

    def refuse_all(count: int) -> None:
        def one(_):
            with pytest.raises(Refused):
                send(case, triton_server.url_grpc, llava_client)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))

    refuse_all(16)  # the first ones size the server's buffers and thread caches
    before = _rss_anon_mib(pid)
    refuse_all(64)
    grown = _rss_anon_mib(pid) - before
    # Measured for 64 such requests: about 1,000 MiB without the threshold, 150 to 180 MiB with it.
    assert grown < 64 * 6, f"tritonserver's RssAnon grew by {grown:.0f} MiB for 64 refused 20 MiB requests"
    assert_still_serving(triton_server, llava_client, valid_answer)


@pytest.mark.parametrize("case", LIMIT_CASES, ids=[case.name for case in LIMIT_CASES])
def test_a_limit_refusal_is_invalid_argument_and_names_the_limit(triton_server, case):
    """The status code, which the stream does not carry: from a plain call to `preprocess`, the
    ensemble step that checks every limit (it takes the same inputs)."""
    with grpcclient.InferenceServerClient(triton_server.url_grpc) as connection:
        with pytest.raises(InferenceServerException) as refused:
            connection.infer(spec.PREPROCESS, raw_inputs(case, build_inputs), client_timeout=TIMEOUT_S)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value
    assert_refused_clearly(case, refused.value.message())


def test_every_queue_is_bounded_in_size_and_time(model_repository):
    """Each model with a Triton queue refuses past max_queue_size and after queue_timeout_us."""
    for name in (spec.VISION_ENCODER, spec.PROJECTOR):
        config = read_config(model_repository / name / "config.pbtxt")
        _, serving = read_spec(model_repository / name / "1")
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == serving.max_queue_size, name
        assert policy.default_timeout_microseconds == serving.queue_timeout_us, name
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT, name


def test_corpus_is_large_and_named_uniquely():
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)
    assert all(case.limit is None or case.limit in LIMIT_FIELDS for case in CASES)
