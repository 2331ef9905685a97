"""`python -m bench` end to end on the tiny checkpoint (CPU): files written and consistent.

Speed is never asserted: the figures only have to exist, be positive and add up.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from PIL import Image

from bench import server_stats, vision
from bench.__main__ import main as bench_main
from bench.fake_server import check as fake_check
from bench.limits import decode_bytes_per_step, language_model_params
from llava_triton import spec
from llava_triton.spec import ModelSpec, ServingConfig, read_spec

REQUESTS, OUTPUT_TOKENS = 3, 8


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_writes_consistent_results_for_the_tiny_checkpoint(tiny_checkpoint, model_repository, tmp_path):
    out = tmp_path / "bench"
    argv = ["--checkpoint", str(tiny_checkpoint), "--repository", str(model_repository), "--no-export",
            "--concurrency", "1", "2", "--requests", str(REQUESTS), "--output-tokens", str(OUTPUT_TOKENS),
            "--warmup", "1", "--vision-batch-sizes", "1", "2", "--vision-requests", "5", "--vision-concurrency", "2",
            "--out", str(out)]
    assert bench_main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("python -m bench --checkpoint")
    assert results["machine"]["torch"] and results["machine"]["transformers"] and results["machine"]["cpu"]
    assert results["machine"]["triton_server"] == "2.51.0"
    workload = results["workload"]
    assert 24 <= workload["question_tokens"] <= 40  # "about 32", counted with the checkpoint's tokenizer
    assert workload["prompt_tokens"] > 576  # one image's tokens, the template and the question

    # Every request streamed exactly OUTPUT_TOKENS tokens (ignore_eos), so the counts add up.
    assert [level["concurrency"] for level in results["levels"]] == [1, 2]
    for level in results["levels"]:
        assert (level["requests"], level["completed"], level["errors"]) == (REQUESTS, REQUESTS, 0)
        assert level["completion_tokens"] == REQUESTS * OUTPUT_TOKENS == level["reported_completion_tokens"]
        assert level["prompt_tokens"] == [workload["prompt_tokens"]]
        assert level["finish_reasons"] == ["length"]
        for name in ("ttft_ms", "itl_ms"):
            assert _positive(level[name]["p50"]) and level[name]["p99"] >= level[name]["p50"]
        assert _positive(level["output_tokens_per_s"]) and _positive(level["requests_per_s"])
        assert math.isclose(level["output_tokens_per_s"], level["completion_tokens"] / level["wall_s"], rel_tol=1e-2)
        # Inside the server: every ensemble step saw each request (the warm-up is not counted).
        server = level["server"]
        for model in ("llava", "preprocess", "vision_encoder", "projector"):
            assert server["models"][model]["requests"] == REQUESTS, (model, server)
            assert server["models"][model]["compute_ms"] > 0
        assert 1 <= server["models"]["vision_encoder"]["mean_batch"] <= level["concurrency"]
        assert 0 < server["language_model_ttft_ms"] < level["ttft_ms"]["p99"]
        assert server["language_model_itl_ms"] > 0
    assert results["skipped_levels"] == []

    assert [entry["batch_size"] for entry in results["vision"]] == [1, 2]
    for entry in results["vision"]:
        assert "error" not in entry, entry
        assert entry["concurrency"] == 2
        assert _positive(entry["images_per_s"]) and _positive(entry["latency_p50_ms"])
        assert math.isclose(entry["requests_per_s"] * entry["batch_size"], entry["images_per_s"], rel_tol=1e-2)
    # The projector alone too, on the encoder's output for the W1 image; then the two combined.
    assert [entry["batch_size"] for entry in results["projector"]] == [1, 2]
    for entry in results["projector"]:
        assert "error" not in entry, entry
        assert _positive(entry["images_per_s"]) and entry["shared_memory"] == "system"
    inputs = json.loads((out / "projector_input.json").read_text())["data"][0]
    model_spec, _ = read_spec(model_repository / "vision_encoder" / "1")
    assert inputs["image_features"]["shape"] == [model_spec.num_image_tokens, model_spec.vision_hidden_size]
    combined = results["roofline"]["vision_and_projector_images_per_s"]
    by_batch = {entry["batch_size"]: entry["images_per_s"] for entry in results["vision"]}
    best = results["roofline"]["vision_and_projector_batch_size"]
    assert combined < results["roofline"]["vision_and_projector_at_most_images_per_s"] <= by_batch[best]
    assert math.isclose(
        1 / combined, 1 / by_batch[best] + 1 / {e["batch_size"]: e["images_per_s"] for e in results["projector"]}[best],
        rel_tol=1e-2)

    baseline = results["baseline"]
    assert [run["batch_size"] for run in baseline["runs"]] == [1, 2]
    for run in baseline["runs"]:
        assert run["prompt_tokens"] == workload["prompt_tokens"]
        assert _positive(run["latency_s"]) and _positive(run["ttft_ms"]) and _positive(run["output_tokens_per_s"])
    # The roofline's parameter count (from the config) is the loaded model's.
    assert baseline["language_model_params"] == results["limits"]["language_model_params"]

    limits = results["limits"]
    assert limits["device"] == "cpu" and limits["single_stream_decode_limit_tokens_per_s"] is None
    assert limits["vision_flops_per_image"]["vision_encoder"] > 0
    assert all(results["checks"].values()), results["checks"]

    table = (out / "results.md").read_text()
    assert "| concurrency | requests | TTFT p50 (ms)" in table and "n/a" in table
    assert "| concurrency | preprocess queue / compute (ms)" in table
    assert "system shared memory, concurrency 2, a tile of the workload's image" in table
    assert table.count("\n| 1 |") >= 4 and "\n| 2 |" in table  # levels, baseline, vision and projector rows
    assert "`projector` alone" in table and "Encoder then projector" in table
    with Image.open(out / "throughput_vs_ttft.png") as image:
        assert image.format == "PNG" and image.size == (960, 640)
    assert (out / "tritonserver.log").stat().st_size > 0
    assert (out / "w1.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


def test_load_generators_count_every_token_of_a_fake_server():
    summaries = fake_check(concurrency=8, num_requests=16, tokens=6, step_ms=5.0, ttft_ms=10.0,
                           modes=["aio", "threads"])
    for summary in summaries:
        assert (summary["requests"], summary["errors"]) == (16, 0)
        assert summary["completion_tokens"] == summary["reported_completion_tokens"] == 16 * 6
        assert summary["ttft_ms"]["p50"] >= 10.0  # the fake's delay is a floor
    assert "delivery_delay_ms" in summaries[0]  # aio reads the fake's send timestamps


def test_language_model_params_of_the_7b_config():
    # Llama-2-7B / LLaVA-1.5-7B: 6.74 B parameters (embedding, 32 layers, lm_head).
    text_config = {"hidden_size": 4096, "vocab_size": 32064, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "intermediate_size": 11008}
    params = language_model_params(text_config)
    assert params["total"] == 6_738_939_904
    assert params["projections"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    # FP8 decode projections read 1 byte each instead of 2; an FP8 KV cache half the bytes.
    full = decode_bytes_per_step(text_config, "bfloat16", 680)
    fp8 = decode_bytes_per_step(text_config, "bfloat16", 680, "fp8_e4m3", "fp8_e4m3")
    assert full["weights"] - fp8["weights"] == params["projections"]
    assert 2 * fp8["kv_cache"] == full["kv_cache"] == 2 * 32 * 4096 * 680 * 2


def test_server_stats_take_each_models_share_from_triton_counters():
    before = server_stats.parse(
        'nv_inference_request_success{model="vision_encoder",version="1"} 10\n'
        'nv_inference_exec_count{model="vision_encoder",version="1"} 5\n'
        'nv_inference_queue_duration_us{model="vision_encoder",version="1"} 1000\n'
        'nv_inference_compute_infer_duration_us{model="vision_encoder",version="1"} 50000\n'
        'nv_inference_request_success{model="idle",version="1"} 3\n'
        'llava_time_to_first_token_seconds_sum 1.0\nllava_time_to_first_token_seconds_count 10\n'
        '# HELP ignored\n')
    after = server_stats.parse(
        'nv_inference_request_success{model="vision_encoder",version="1"} 30\n'
        'nv_inference_exec_count{model="vision_encoder",version="1"} 10\n'
        'nv_inference_queue_duration_us{model="vision_encoder",version="1"} 5000\n'
        'nv_inference_compute_input_duration_us{model="vision_encoder",version="1"} 2000\n'
        'nv_inference_compute_infer_duration_us{model="vision_encoder",version="1"} 150000\n'
        'nv_inference_compute_output_duration_us{model="vision_encoder",version="1"} 8000\n'
        'nv_inference_request_success{model="idle",version="1"} 3\n'
        'llava_time_to_first_token_seconds_sum 3.0\nllava_time_to_first_token_seconds_count 20\n')
    stats = server_stats.breakdown(before, after)
    assert stats["models"] == {"vision_encoder": {"requests": 20, "executions": 5, "mean_batch": 4.0,
                                                  "queue_ms": 0.2, "compute_ms": 5.5}}
    assert stats["language_model_ttft_ms"] == 200.0 and math.isnan(stats["language_model_itl_ms"])


def test_scrape_settled_waits_for_triton_to_count_the_last_requests():
    """Triton counts a request when it releases it, after the client's last response: the scrape waits."""
    import http.server
    import threading
    import time

    started = time.monotonic()

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            late = time.monotonic() - started > 0.3  # the third request is counted 0.3 s late, as a failure
            body = ('nv_inference_request_success{model="llava",version="1"} 2\n'
                    f'nv_inference_request_failure{{model="llava",version="1"}} {1 if late else 0}\n').encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        assert server_stats.finished(server_stats.scrape(url), "llava") == 2
        assert server_stats.finished(server_stats.scrape_settled(url, "llava", 3), "llava") == 3
        assert time.monotonic() - started >= 0.3
        # Never settled: the last scrape, once the timeout is spent.
        stats = server_stats.scrape_settled(url, "llava", 4, timeout_s=0.2)
        assert server_stats.finished(stats, "llava") == 3 and server_stats.finished(stats, "other") == 0
    finally:
        server.shutdown()
        server.server_close()


# As Triton 2.51 writes its metrics: its own counters without `_total`, the language model's with it.
TRITON_METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="vision_encoder",version="1"} 30
nv_inference_request_success{model="projector",version="1"} 4
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-0"} 0.5
# HELP llava_requests_refused_total Requests the language model refused or dropped, by reason
# TYPE llava_requests_refused_total counter
llava_requests_refused_total{reason="invalid"} 2
llava_requests_refused_total{reason="say \\"no\\"\\\\"} 1
# HELP llava_requests_running Requests holding a KV-cache slot
# TYPE llava_requests_running gauge
llava_requests_running 0
# HELP llava_time_to_first_token_seconds Time from the language model receiving a request to its first token
# TYPE llava_time_to_first_token_seconds histogram
llava_time_to_first_token_seconds_count 20
llava_time_to_first_token_seconds_sum 3
llava_time_to_first_token_seconds_bucket{le="0.005"} 0
llava_time_to_first_token_seconds_bucket{le="+Inf"} 20
"""


def test_server_stats_name_each_series_as_triton_writes_it():
    stats = server_stats.parse(TRITON_METRICS)
    assert stats == {"models": {"vision_encoder": {"nv_inference_request_success": 30.0},
                                "projector": {"nv_inference_request_success": 4.0}},
                     "llava": {"llava_time_to_first_token_seconds_count": 20.0,
                               "llava_time_to_first_token_seconds_sum": 3.0}}
    series = server_stats.series(TRITON_METRICS, "llava_")
    assert series == {'llava_requests_refused_total{reason="invalid"}': 2.0,
                      'llava_requests_refused_total{reason="say \\"no\\"\\\\"}': 1.0,
                      "llava_requests_running": 0.0,
                      "llava_time_to_first_token_seconds_count": 20.0, "llava_time_to_first_token_seconds_sum": 3.0,
                      'llava_time_to_first_token_seconds_bucket{le="0.005"}': 0.0,
                      'llava_time_to_first_token_seconds_bucket{le="+Inf"}': 20.0}
    # Every key is the sample's line as written, less its value.
    lines = {line.rpartition(" ")[0] for line in TRITON_METRICS.splitlines() if line.startswith("llava_")}
    assert set(series) == lines and all(type(value) is float for value in series.values())


def test_vision_input_and_output_sizes_follow_the_wire_dtype(tmp_path):
    model = ModelSpec(image_size=28, patch_size=14, num_channels=3, vision_hidden_size=8, text_hidden_size=16,
                      vocab_size=64, image_token_index=32, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", max_position_embeddings=128, eos_token_id=(2,))
    pixel_values = np.linspace(-2, 2, 3 * 28 * 28, dtype=np.float32).reshape(3, 28, 28)
    for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
        serving = ServingConfig(dtype=dtype)
        path = vision.write_input_data(tmp_path / f"{dtype}.json", pixel_values, serving)
        (item,) = json.loads(path.read_text())["data"]
        raw = base64.b64decode(item[spec.PIXEL_VALUES]["content"]["b64"])
        assert item[spec.PIXEL_VALUES]["shape"] == [3, 28, 28] and len(raw) == pixel_values.size * itemsize
        np.testing.assert_allclose(np.frombuffer(raw, spec.wire_dtype(serving)).reshape(3, 28, 28), pixel_values,
                                   rtol=2**-8, atol=0)
        assert vision.output_item_bytes(model, serving) == 4 * 8 * itemsize  # 4 patches x vision hidden
        assert vision.output_item_bytes(model, serving, spec.PROJECTOR) == 4 * 16 * itemsize  # x text hidden
    with pytest.raises(ValueError, match="one image"):
        vision.write_input_data(tmp_path / "batch.json", pixel_values[None], ServingConfig())


def test_the_ceilings_take_the_baselines_gemm_rate_or_measure_one_without_it():
    from bench.__main__ import gemm_rate

    calls = []

    def measure(device, dtype):
        calls.append((str(device), dtype))
        return 661.5

    assert gemm_rate({"gemm_tflops": 670.2}, "cuda", "bfloat16", measure) == 670.2 and calls == []
    assert gemm_rate(None, "cpu", "float32", measure) is None and calls == []
    # --skip-baseline, or a baseline that failed before measuring: measured on the GPU anyway.
    assert gemm_rate(None, "cuda", "bfloat16", measure) == 661.5
    assert gemm_rate({"error": "out of memory"}, "cuda:0", "float16", measure) == 661.5
    import torch
    assert calls == [("cuda", torch.bfloat16), ("cuda:0", torch.float16)]


def test_perf_analyzer_keeps_one_request_in_flight_per_instance_unless_told():
    from bench.__main__ import perf_concurrency

    three = ServingConfig(vision_instances=3)
    assert perf_concurrency(None, ServingConfig(), spec.VISION_ENCODER) == 1
    assert perf_concurrency(None, three, spec.VISION_ENCODER) == perf_concurrency(None, three, spec.PROJECTOR) == 3
    assert perf_concurrency(None, ServingConfig(vision_instances=3, projector_instances=2), spec.PROJECTOR) == 2
    assert perf_concurrency(5, three, spec.VISION_ENCODER) == 5
