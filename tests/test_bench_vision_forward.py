"""`python -m bench.vision_forward` on the tiny export (CPU): every case measured and written. Speed is
never asserted."""

from __future__ import annotations

import json

from bench.vision_forward import main as vision_forward_main


def test_vision_forward_times_the_module_and_each_pipeline_setting(model_repository, tmp_path):
    out = tmp_path / "vf"
    argv = ["--repository", str(model_repository), "--batch-sizes", "1", "3", "--pipeline-rows", "0", "2",
            "--request-images", "2", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    assert vision_forward_main(argv) == 0
    results = json.loads((out / "vision_forward.json").read_text())
    assert results["command"].startswith("python -m bench.vision_forward --repository")
    assert results["machine"]["gpu"] is None
    assert [entry["batch_size"] for entry in results["module"]] == [1, 3]
    assert all(entry["ms"] > 0 and entry["images_per_s"] > 0 for entry in results["module"])
    forward = results["forward"]
    assert (forward["batch_size"], forward["request_images"]) == (3, 2)
    assert [run["pipeline_rows"] for run in forward["runs"]] == [0, 2]
    for run in forward["runs"]:
        for timing in (run["one_request"], run["requests"]):
            assert 0 < timing["min_ms"] <= timing["p50_ms"]
    table = (out / "vision_forward.md").read_text()
    assert "| one piece |" in table and "| 2 |" in table and "as requests of 2" in table
