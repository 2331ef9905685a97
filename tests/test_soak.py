"""The soak, short (about a minute of load, as CI runs it): its verdict and a well-formed report.

`python -m bench.soak` runs in a subprocess exactly as `make soak` does; the verdict rules are
also checked alone, on made-up reports, so that each failure condition is known to fail it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import verdict
from llava_triton import spec

ROOT = Path(__file__).resolve().parent.parent
SOAK_S = 60
CONCURRENCY = 64
KINDS = ("valid", "sampled", "corpus", "abandoned")


@pytest.fixture(scope="module")
def soak(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--duration-s", str(SOAK_S), "--concurrency",
                          str(CONCURRENCY), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    report_path = out / "report.json"
    assert report_path.is_file(), f"no report (exit code {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run, json.loads(report_path.read_text()), out


@pytest.mark.e2e
def test_short_soak_passes(soak):
    run, report, _ = soak
    assert report["verdict"] == "pass", f"{report['failures']}\nfirst bad outcomes: {report['examples']}"
    assert run.returncode == 0, run.stdout[-3000:]
    assert report["failures"] == []


@pytest.mark.e2e
def test_soak_report_is_well_formed(soak):
    _, report, out = soak
    assert report["config"]["duration_s"] == SOAK_S and report["config"]["concurrency"] == CONCURRENCY
    assert 0 < report["warmup_s"] < SOAK_S and report["measured_s"] >= SOAK_S - report["warmup_s"]

    load = report["load"]
    assert set(load["by_kind"]) == set(KINDS), load["by_kind"]
    assert sum(sum(results.values()) for results in load["by_kind"].values()) == load["requests"] > 0
    assert sum(sum(results.values()) for results in load["by_case"].values()) == load["requests"]
    assert load["by_kind"]["valid"].get("ok", 0) > 0 and load["by_kind"]["sampled"].get("ok", 0) > 0
    assert load["by_kind"]["corpus"].get("refused_as_expected", 0) > 0
    assert load["requests_per_s"] > 0 and load["generated_tokens_per_s"] > 0
    latency = load["answer_latency_s"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]

    memory = report["memory"]
    assert memory["baseline_bytes"] > 0 and memory["final_bytes"] > 0
    assert memory["growth"] == pytest.approx(memory["final_bytes"] / memory["baseline_bytes"] - 1)
    assert memory["peak_bytes"] >= max(memory["baseline_bytes"], memory["final_bytes"]) * 0.9
    final = memory["final_processes"]
    assert {"tritonserver", spec.PREPROCESS, spec.VISION_ENCODER, spec.PROJECTOR, spec.LANGUAGE_MODEL} <= \
        {p["name"] for p in final}
    assert memory["final_shm_bytes"] > 0  # the stubs' regions were found (by the names in their argv)
    assert sum(p["rssanon_bytes"] + p["rssfile_bytes"] for p in final) + memory["final_shm_bytes"] == \
        memory["final_bytes"]
    assert sum(p["rss_bytes"] for p in final) == memory["final_rss_sum_bytes"]

    kv = report["kv_cache_after_load"]
    assert kv["returned"] and kv["running"] == kv["waiting"] == kv["kv_cache_usage_ratio"] == 0
    # The mix repeats its images: with the caches on (the default) both found them.
    caches = report["caches"]
    assert caches[spec.METRIC_PREFIX_HIT_TOKENS.name] > 0 and caches[spec.METRIC_EMBEDDING_CACHE_HITS.name] > 0
    assert report["after"] == {"ready": True, "answer_correct": True, "detail": ""}

    samples = report["samples"]
    assert {s["phase"] for s in samples} == {"warm-up", "load"}
    assert all(a["t"] < b["t"] for a, b in zip(samples, samples[1:]))
    assert all(s["memory_bytes"] > 0 and s["rss_bytes"] > 0 for s in samples)
    assert Path(report["server_log"]).is_file()
    assert (out / "report.md").read_text().startswith("# Soak: PASS")


def made_up_report(**changes) -> dict:
    report = {
        "load": {"wrong_answers": 0, "unexpected_errors": 0, "by_kind": {"valid": {"ok": 10}}},
        "memory": {"growth": 0.01},
        "kv_cache_after_load": {"returned": True},
        "after": {"ready": True, "answer_correct": True, "detail": ""},
        "caches": {spec.METRIC_PREFIX_QUERY_TOKENS.name: 100, spec.METRIC_PREFIX_HIT_TOKENS.name: 40,
                   spec.METRIC_EMBEDDING_CACHE_HITS.name: 3},
    }
    for path, value in changes.items():
        section, key = path.split("__", 1)
        report[section][key] = value
    return report


@pytest.mark.parametrize("changes, reason", [
    ({"load__wrong_answers": 1}, "1 wrong answers"),
    ({"load__unexpected_errors": 2}, "2 unexpected errors"),
    ({"load__by_kind": {"valid": {"unexpected_error": 3}}}, "no valid request was answered"),
    ({"memory__growth": 0.11}, "server memory grew by 11.0%"),
    ({"memory__growth": float("nan")}, "server memory grew"),
    ({"kv_cache_after_load__returned": False}, "KV-cache space not returned"),
    ({"after__ready": False}, "not ready after the load"),
    ({"after__answer_correct": False}, "not answered correctly"),
    ({"caches__llava_prefix_cache_hit_tokens_total": 0, "caches__llava_embedding_cache_hits_total": 0},
     "the caches found nothing"),
])
def test_soak_verdict_fails_on_each_condition(changes, reason):
    assert verdict(made_up_report(), 0.10) == []
    failures = verdict(made_up_report(**changes), 0.10)
    assert len(failures) == 1 and reason in failures[0], failures


# --- how the soak's client ends a call (no server: a stand-in for tritonclient's stream) ---------

class FakeStream:
    """Stands in for tritonclient.grpc.aio's stream_infer iterator: yields (result, error) pairs."""

    def __init__(self, items):
        self.items = list(items)
        self.cancelled = False
        self.ended = False  # read until the server ended the call

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled or not self.items:
            self.ended = not self.cancelled
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True
        return True


class FakeConnection:
    def __init__(self, items):
        self.stream = FakeStream(items)

    def stream_infer(self, inputs_iterator, stream_timeout=None):
        return self.stream


def _response(token_ids, final):
    import numpy as np
    from tritonclient.grpc import InferResult, service_pb2

    response = service_pb2.ModelInferResponse(model_name=spec.ENSEMBLE)
    output = response.outputs.add(name="token_ids", datatype="INT64", shape=[len(token_ids)])
    assert output.name == "token_ids"
    response.raw_output_contents.append(np.array(token_ids, dtype=np.int64).tobytes())
    response.parameters["triton_final_response"].bool_param = final
    return InferResult(response), None


def _send(items, *, abandon=False, expect_error=None):
    import asyncio

    from bench.soak import Case, send

    connection = FakeConnection(items)
    case = Case("corpus" if expect_error else "valid", "case", [], expected_ids=[1, 2], expect_error=expect_error)
    return asyncio.run(send(connection, case, abandon=abandon, timeout_s=5)), connection.stream


def test_send_reads_a_finished_stream_to_its_end_instead_of_cancelling_it():
    # Triton 2.51 leaks a stream's state (with the request's bytes) when the client cancels the
    # call after its final response, before the server has ended it.
    outcome, stream = _send([_response([1], False), _response([2], True)])
    assert outcome.result == "ok" and outcome.tokens == 2
    assert stream.ended and not stream.cancelled


def test_send_reads_a_refused_request_to_its_end_instead_of_cancelling_it():
    from tritonclient.utils import InferenceServerException

    outcome, stream = _send([(None, InferenceServerException(msg="top_p must be in (0, 1]"))],
                            expect_error=r"top_p must be")
    assert outcome.result == "refused_as_expected"
    assert stream.ended and not stream.cancelled


def test_send_cancels_an_abandoned_stream():
    outcome, stream = _send([_response([1], False), _response([2], True)], abandon=True)
    assert outcome.kind == "abandoned" and outcome.result == "ok" and outcome.tokens == 1
    assert stream.cancelled


def test_send_counts_a_response_after_the_final_one_as_an_error():
    outcome, stream = _send([_response([1, 2], True), _response([3], False)])
    assert outcome.result == "unexpected_error" and "after the final" in outcome.detail
