"""`python -m bench.host_profile` on the tiny export (CPU): both schedules run every request, and the
per-phase host times add up to the steps' time. Speed is never asserted."""

from __future__ import annotations

import json

import pytest

from bench.host_profile import main as host_profile_main
from llava_triton.step_profile import PHASES

REQUESTS, MAX_TOKENS = 3, 5


def test_host_profile_measures_both_schedules_on_the_tiny_export(model_repository, tmp_path):
    out = tmp_path / "hp"
    argv = ["--repository", str(model_repository), "--concurrency", "1", "2", "--requests", str(REQUESTS),
            "--prompt-tokens", "12", "--max-tokens", str(MAX_TOKENS), "--warmup", "1", "--set", "max_num_seqs=2",
            "--out", str(out)]
    assert host_profile_main(argv) == 0

    results = json.loads((out / "host_profile.json").read_text())
    assert results["command"].startswith("python -m bench.host_profile --repository")
    assert results["workload"] == {"prompt_tokens": 12, "max_tokens": MAX_TOKENS}
    assert results["serving"]["max_num_seqs"] == 2  # --set parsed as the export parses it (an int)
    levels = results["levels"]
    assert [(level["concurrency"], level["overlap_decode"]) for level in levels] == [
        (1, False), (1, True), (2, False), (2, True)]
    for level in levels:
        assert level["requests"] == REQUESTS
        # ignore_eos: every request runs to max_tokens, its first token from prefill and the rest decoded.
        assert level["output_tokens"] == REQUESTS * MAX_TOKENS
        profile = level["profile"]
        assert profile["decode_steps"] >= MAX_TOKENS - 1
        # No row runs past max_tokens, overlapped or not.
        assert profile["decode_rows"] == REQUESTS * (MAX_TOKENS - 1)
        assert set(profile["host_ms"]) == set(PHASES)
        assert profile["host_ms_total"] == pytest.approx(sum(profile["host_ms"].values()), abs=0.01)
        assert profile["host_ms"]["decode_launch"] > 0 and profile["host_ms"]["prefill"] > 0
        assert profile["gpu_decode_ms_per_step"] is None  # no GPU here
        assert level["itl_ms"]["p50"] > 0 and level["ttft_ms"]["p50"] > 0
    table = (out / "host_profile.md").read_text()
    assert table.count("\n| 1 |") == 2 and table.count("\n| 2 |") == 2
