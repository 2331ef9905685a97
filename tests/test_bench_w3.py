"""`python -m bench.w3` end to end on the tiny checkpoint (CPU): files written, counts that add up.

Speed is never asserted: on a CPU, and before the server has its caches, the TTFT target is missed,
which the run reports with its own exit status.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import w3
from llava_triton import spec

TURNS, STREAMS, IMAGES, OUTPUT_TOKENS = 2, 4, 2, 4
HITS = (spec.METRIC_PREFIX_HIT_TOKENS.name, spec.METRIC_EMBEDDING_CACHE_HITS.name)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.e2e
def test_w3_writes_consistent_results_for_the_tiny_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "w3"
    argv = ["--checkpoint", str(tiny_checkpoint), "--concurrency", "1", "--rounds", "1", "--turns", str(TURNS),
            "--streams", str(STREAMS), "--images", str(IMAGES), "--output-tokens", str(OUTPUT_TOKENS),
            "--export-arg=--set=preprocess_instances=1", "--out", str(out)]  # a Python process less to start
    status = w3.main(argv)
    results = json.loads((out / "results.json").read_text())
    failed = [name for name, ok in results["checks"].items() if not ok]
    # 0, or only the TTFT target missed: never a failed request or a count that does not add up.
    assert status in (0, w3.TARGET_MISSED), failed
    assert set(failed) <= set(results["targets"]) and (status == 0) == (not failed)
    assert results["targets"] == ["cached_turns_ttft_p50_at_most_a_third_c1"]

    assert results["command"].startswith("python -m bench.w3 --checkpoint")
    assert results["machine"]["cpu"] and results["machine"]["triton_server"] == "2.51.0"
    workload = results["workload"]
    assert len(workload["question_tokens"]) == 4 and all(24 <= n <= 40 for n in workload["question_tokens"])
    assert workload["first_turn_prompt_tokens"] > 576 and workload["max_tokens"] == OUTPUT_TOKENS

    # The two exports differ in the caches alone.
    on, off = results["runs"]["on"], results["runs"]["off"]
    assert on["serving"]["prefix_caching"] is True and on["serving"]["embedding_cache_bytes"] > 0
    assert off["serving"]["prefix_caching"] is False and off["serving"]["embedding_cache_bytes"] == 0
    assert {**on["serving"], "prefix_caching": False, "embedding_cache_bytes": 0} == off["serving"]
    assert on["serving"]["preprocess_instances"] == 1  # --export-arg goes to both

    for run in (on, off):
        (level,) = run["chats"]
        assert level["concurrency"] == 1 and [turn["turn"] for turn in level["turns"]] == [1, 2]
        for turn in level["turns"]:
            assert (turn["requests"], turn["completed"], turn["errors"]) == (1, 1, 0)
            assert turn["completion_tokens"] == OUTPUT_TOKENS == turn["reported_completion_tokens"]
            assert turn["finish_reasons"] == ["length"] and _positive(turn["ttft_ms"]["p50"])
            assert _positive(turn["output_tokens_per_s"])
        # Turn 2 sends the picture, turn 1's question and answer, and a new question.
        (first,), (second,) = level["turns"][0]["prompt_tokens"], level["turns"][1]["prompt_tokens"]
        assert first == workload["first_turn_prompt_tokens"]
        assert second > first + workload["question_tokens"][1]
        assert level["all"]["requests"] == TURNS and level["all"]["completion_tokens"] == TURNS * OUTPUT_TOKENS
        assert level["prompt_tokens_as_expected"]
        streams = run["streams"]
        assert (streams["requests"], streams["completed"], streams["errors"]) == (STREAMS, STREAMS, 0)
        assert streams["completion_tokens"] == STREAMS * OUTPUT_TOKENS == streams["reported_completion_tokens"]
        assert streams["prompt_tokens_as_expected"] and _positive(streams["ttft_ms"]["p99"])
        # The caches' counters where the server publishes them, None where it does not.
        for scenario in (level, streams):
            assert set(scenario["metrics"]) == {m.name for m in (*w3.CACHE_COUNTERS, *w3.CACHE_GAUGES)}
    if off["metrics_end"][HITS[0]] is None:
        assert any("publishes none of the caches' metrics" in note for note in results["notes"])
    else:
        assert all(off["metrics_end"][name] == 0 for name in HITS)

    rows = results["comparison"]["rows"]
    assert [(row["scenario"], row["turn"], row["cached"]) for row in rows] == [
        ("chats", "1", False), ("chats", "2", True), ("streams", "1", False)]
    assert all(_positive(row["ttft_p50_ratio"]) for row in rows)
    assert results["same_answers"]["compared"] == TURNS + STREAMS

    table = (out / "results.md").read_text()
    assert "| scenario | c | turn | requests | prompt tokens | TTFT p50 on (ms)" in table
    assert "| chats | 1 | 2 (cached) | 1 |" in table and f"| streams | {STREAMS} | 1 | {STREAMS} |" in table
    assert "Target: every cached turn's TTFT p50" in table
    assert (out / "tritonserver-caches-on.log").stat().st_size > 0
    assert (out / "tritonserver-caches-off.log").stat().st_size > 0


def test_w3_reads_the_cache_metrics_a_server_publishes_and_none_it_does_not():
    text = ("# TYPE llava_prefix_cache_hit_tokens_total counter\n"
            "llava_prefix_cache_hit_tokens_total 640\n"
            "# TYPE llava_embedding_cache_hits_total counter\n"
            'llava_embedding_cache_hits_total{model="language_model"} 3\n'
            'llava_embedding_cache_hits_total{model="other"} 1\n'
            "# TYPE llava_requests_running gauge\nllava_requests_running 0\n")
    before = w3.parse_cache_metrics(text)
    assert before[HITS[0]] == 640 and before[HITS[1]] == 4
    assert before[spec.METRIC_EMBEDDING_CACHE_MISSES.name] is None
    after = w3.parse_cache_metrics(text.replace(" 640", " 1000"))
    deltas = w3.metric_deltas(before, after)
    assert deltas[HITS[0]] == 360 and deltas[HITS[1]] == 0
    assert deltas[spec.METRIC_PREFIX_QUERY_TOKENS.name] is None
    assert w3.ratio(10.0, 40.0) == 0.25 and w3.ratio(10.0, math.nan) is None and w3.ratio(1.0, 0.0) is None
