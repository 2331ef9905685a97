"""Where a request's time goes inside the server, from Triton's metrics endpoint.

Scraped before and after a load level, Triton's per-model counters give each model's mean queue
and compute time per request (the ensemble's steps: preprocess, vision_encoder, projector); the
language model is decoupled, so its execute() returns at once and its own time to first token
histogram (llava_time_to_first_token_seconds) tells its part of TTFT instead.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from llava_triton import spec

PREFIXES = ("nv_inference_", "llava_")
COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_exec_count",
            "nv_inference_queue_duration_us",
            "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_compute_output_duration_us")
LM_SERIES = tuple(f"{metric.name}_{part}"
                  for metric in (spec.METRIC_TIME_TO_FIRST_TOKEN, spec.METRIC_INTER_TOKEN_LATENCY)
                  for part in ("sum", "count"))


def samples(text: str) -> Iterator[tuple[str, Sample]]:
    """(family name, sample) of each nv_inference_* and llava_* sample in Prometheus text.

    prometheus_client names a counter as OpenMetrics does: the family without `_total`, its samples
    with it, whichever the text wrote. Triton writes its counters without it (so the family name is
    the name as written), this project's language model with it (so the sample name is).
    """
    for family in text_string_to_metric_families(text):
        if family.name.startswith(PREFIXES):
            for sample in family.samples:
                yield family.name, sample


def _label_value(value: str) -> str:
    """A label value escaped as the text format writes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def series(text: str, prefix: str) -> dict[str, float]:
    """{'name{labels}': value} of the samples whose name starts with `prefix`, keyed as the text writes them."""
    values = {}
    for _, sample in samples(text):
        if sample.name.startswith(prefix):
            labels = ",".join(f'{key}="{_label_value(value)}"' for key, value in sample.labels.items())
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return values


def parse(text: str) -> dict[str, Any]:
    """Prometheus text -> {"models": {model: {counter: value}}, "llava": {series: value}} (summed over instances)."""
    models: dict[str, dict[str, float]] = {}
    llava: dict[str, float] = {}
    for family, sample in samples(text):
        if family in COUNTERS:
            model = sample.labels.get("model")
            if model is not None:
                per_model = models.setdefault(model, {})
                per_model[family] = per_model.get(family, 0.0) + sample.value
        elif sample.name in LM_SERIES:
            llava[sample.name] = llava.get(sample.name, 0.0) + sample.value
    return {"models": models, "llava": llava}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    return parse(urllib.request.urlopen(url, timeout=timeout_s).read().decode())


def finished(stats: dict[str, Any], model: str) -> int:
    """Requests `model` has finished, succeeded or failed, by Triton's counters."""
    counters = stats["models"].get(model, {})
    return int(counters.get("nv_inference_request_success", 0.0) + counters.get("nv_inference_request_failure", 0.0))


def scrape_settled(url: str, model: str, requests: int, timeout_s: float = 10.0,
                   poll_s: float = 0.02) -> dict[str, Any]:
    """A scrape taken once `model` has counted `requests` finished requests and no counter still moves.

    Triton counts a request when it releases it, which can come just after the client has its last
    response: a scrape taken the moment a load level ends can miss its last requests (and the next
    level's delta then has them). Gives the last scrape at the timeout, settled or not.
    """
    deadline = time.monotonic() + timeout_s
    last = scrape(url)
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = scrape(url)
        if finished(now, model) >= requests and now == last:
            return now
        last = now
    return last


def breakdown(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per model, over the interval: requests, executions, mean batch, mean queue/compute ms per request."""
    models = {}
    for model, end in after["models"].items():
        start = before["models"].get(model, {})

        def delta(name: str, end: dict[str, float] = end, start: dict[str, float] = start) -> float:
            return end.get(name, 0.0) - start.get(name, 0.0)

        requests = delta("nv_inference_request_success")
        executions = delta("nv_inference_exec_count")
        if requests <= 0:
            continue
        compute = sum(delta(name) for name in ("nv_inference_compute_input_duration_us",
                                               "nv_inference_compute_infer_duration_us",
                                               "nv_inference_compute_output_duration_us"))
        models[model] = {
            "requests": int(requests),
            "executions": int(executions),
            "mean_batch": round(requests / executions, 2) if executions else math.nan,
            "queue_ms": round(delta("nv_inference_queue_duration_us") / requests / 1e3, 3),
            "compute_ms": round(compute / requests / 1e3, 3),
        }

    def mean_ms(prefix: str) -> float:
        count = after["llava"].get(prefix + "_count", 0.0) - before["llava"].get(prefix + "_count", 0.0)
        total = after["llava"].get(prefix + "_sum", 0.0) - before["llava"].get(prefix + "_sum", 0.0)
        return round(total / count * 1e3, 3) if count > 0 else math.nan

    return {"models": models,
            "language_model_ttft_ms": mean_ms(spec.METRIC_TIME_TO_FIRST_TOKEN.name),
            "language_model_itl_ms": mean_ms(spec.METRIC_INTER_TOKEN_LATENCY.name)}
