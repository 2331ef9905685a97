"""The language model's metrics on Triton's metrics endpoint move as requests run."""

from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from bench.soak import scrape_metrics as scrape
from client import LlavaClient
from llava_triton import spec
from llava_triton.testing.reference import make_test_images

pytestmark = pytest.mark.e2e

IMAGE = make_test_images()["jpeg"]


def test_counters_and_histograms_follow_a_request(triton_server):
    before = scrape(triton_server.url_metrics)
    with LlavaClient(triton_server.url_grpc) as client:
        result = client.generate("What is in the picture?", [IMAGE], max_tokens=10, ignore_eos=True)
    after = scrape(triton_server.url_metrics)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    ttft, itl = spec.METRIC_TIME_TO_FIRST_TOKEN.name, spec.METRIC_INTER_TOKEN_LATENCY.name
    assert delta(spec.METRIC_GENERATION_TOKENS.name) == result.completion_tokens == 10
    assert delta(spec.METRIC_PROMPT_TOKENS.name) == result.prompt_tokens
    assert delta(f"{ttft}_count") == 1
    assert delta(f"{itl}_count") == 9
    assert delta(f"{ttft}_sum") > 0
    assert after[spec.METRIC_REQUESTS_RUNNING.name] == 0 and after[spec.METRIC_KV_CACHE_USAGE.name] == 0


def test_gauges_show_a_running_request(triton_server):
    seen = []
    with LlavaClient(triton_server.url_grpc) as client:
        stream = client.stream("Tell me everything.", [IMAGE], max_tokens=400, ignore_eos=True)
        next(stream)  # generating now
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            values = scrape(triton_server.url_metrics)
            if values.get(spec.METRIC_REQUESTS_RUNNING.name, 0) >= 1:
                seen.append(values)
            time.sleep(0.05)
        for _ in stream:
            pass
    assert seen, f"{spec.METRIC_REQUESTS_RUNNING.name} never showed the running request"
    assert seen[0][spec.METRIC_KV_CACHE_USAGE.name] > 0


def test_refusals_are_counted_by_reason(triton_server):
    refused = spec.METRIC_REQUESTS_REFUSED
    key = f'{refused.name}{{{refused.label}="invalid"}}'
    before = scrape(triton_server.url_metrics).get(key, 0.0)
    # Straight to the language model with an id outside the vocabulary: refused there.
    client = grpcclient.InferenceServerClient(triton_server.url_grpc)
    errors = []
    done = threading.Event()

    def callback(result, error):
        if error is not None:
            errors.append(str(error))
        done.set()

    ids = grpcclient.InferInput(spec.INPUT_IDS, [2], "INT64")
    ids.set_data_from_numpy(np.array([1, 10**9], dtype=np.int64))
    client.start_stream(callback=callback)
    client.async_stream_infer(spec.LANGUAGE_MODEL, [ids])
    assert done.wait(30)
    client.stop_stream()
    assert errors and "outside the vocabulary" in errors[0]
    # The refusal is counted from the outbox's thread, the error sent from Triton's: it may land just after.
    deadline = time.monotonic() + 10
    while scrape(triton_server.url_metrics).get(key, 0.0) != before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scrape(triton_server.url_metrics).get(key, 0.0) == before + 1
    # Every family is published (the refusals' once one is counted), with its help text and kind.
    text = urllib.request.urlopen(triton_server.url_metrics, timeout=10).read().decode()
    for metric in spec.METRICS:
        assert f"# HELP {metric.name} {metric.help}\n# TYPE {metric.name} {metric.kind}\n" in text, metric.name
