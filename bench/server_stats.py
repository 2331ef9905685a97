"""Where a request's time goes inside the server, from Triton's metrics endpoint.

Scraped before and after a load level, Triton's per-model counters give each model's mean queue
and compute time per request (the ensemble's steps: preprocess, vision_encoder, projector); the
language model is decoupled, so its execute() returns at once and its own time to first token
histogram (llava_time_to_first_token_seconds) tells its part of TTFT instead.
"""

from __future__ import annotations

import math
import re
import urllib.request
from typing import Any, Iterator

_LINE = re.compile(r'^(nv_inference_[a-z_]+|llava_[a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+|nan|NaN)$')
_MODEL = re.compile(r'model="([^"]*)"')
COUNTERS = ("nv_inference_request_success", "nv_inference_exec_count", "nv_inference_queue_duration_us",
            "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_compute_output_duration_us")
LM_SERIES = ("llava_time_to_first_token_seconds_sum", "llava_time_to_first_token_seconds_count",
             "llava_inter_token_latency_seconds_sum", "llava_inter_token_latency_seconds_count")


def samples(text: str) -> Iterator[tuple[str, str, float]]:
    """(name, labels, value) of each nv_inference_* and llava_* sample in Prometheus text."""
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            yield match.group(1), match.group(2) or "", float(match.group(3))


def parse(text: str) -> dict[str, Any]:
    """Prometheus text -> {"models": {model: {counter: value}}, "llava": {series: value}} (summed over instances)."""
    models: dict[str, dict[str, float]] = {}
    llava: dict[str, float] = {}
    for name, labels, value in samples(text):
        if name in COUNTERS:
            model = _MODEL.search(labels)
            if model:
                per_model = models.setdefault(model.group(1), {})
                per_model[name] = per_model.get(name, 0.0) + value
        elif name in LM_SERIES:
            llava[name] = llava.get(name, 0.0) + value
    return {"models": models, "llava": llava}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    return parse(urllib.request.urlopen(url, timeout=timeout_s).read().decode())


def breakdown(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per model, over the interval: requests, executions, mean batch, mean queue/compute ms per request."""
    models = {}
    for model, end in after["models"].items():
        start = before["models"].get(model, {})

        def delta(name: str) -> float:
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
            "language_model_ttft_ms": mean_ms("llava_time_to_first_token_seconds"),
            "language_model_itl_ms": mean_ms("llava_inter_token_latency_seconds")}
