"""python -m bench.kernels: the sweep's cases, its summary, and a whole quick run on the tiny
preset, the kernels in Triton's interpreter (the times there mean nothing; the mechanics do)."""

import json

import pytest

from bench import kernels
from llava_triton import decode_attention, gemv
from llava_triton.checkpoint import load_preset

pytestmark = [
    pytest.mark.skipif(not decode_attention.available(), reason="the triton package is not installed"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


def test_shapes_of_a_7b_decode_step():
    shapes = kernels.text_shapes(load_preset("llava-1.5-7b")["config"]["text_config"])
    assert (shapes["num_heads"], shapes["num_kv_heads"], shapes["head_dim"]) == (32, 32, 128)
    assert shapes["gemv"] == {"qkv_proj": (12288, 4096, 32), "o_proj": (4096, 4096, 32),
                              "gate_up_proj": (22016, 4096, 32), "down_proj": (4096, 11008, 32),
                              "lm_head": (32064, 4096, 1)}


def test_cases_cover_the_grid_but_no_tile_that_spills():
    shapes = {"a": (64, 32, 2), "b": (16, 64, 1)}
    cases = kernels.gemv_cases(shapes, {"block_n": (8, 64), "block_k": (512, 1024), "num_warps": (4,),
                                        "num_stages": (2,)})
    tilings = {case.tiling() for case in cases if case.weight_dtype == "bfloat16"}
    assert tilings == {(8, 512, 4, 2), (8, 1024, 4, 2), (64, 512, 4, 2)}  # 64 x 1024 > GEMV_MAX_TILE
    assert [case.shape for case in cases if case.weight_dtype == "cublas"] == ["a", "b"]
    assert len(cases) == 2 + 2 * 3 * 2
    attention = kernels.attention_cases([1, 8], kernels.QUICK_ATTENTION_GRID)
    assert len(attention) == 2 * 2 * 2 * 2 and {case.cache_dtype for case in attention} == set(kernels.DTYPES)
    assert {case.kernel_tiling().deferred for case in attention} == {False, True}


def row(kernel, dtype, tiling, shape, us, error=0.0):
    base = {"kernel": kernel, "tiling": list(tiling), "bytes": 1000 * us, "gb_per_s": 1.0, "us": us,
            "relative_error": error}
    if kernel == "attention":
        return {**base, "cache_dtype": dtype, "batch": shape}
    return {**base, "weight_dtype": dtype, "shape": shape}


def test_summary_weights_gemvs_by_their_count_and_drops_tilings_that_failed_anywhere():
    shapes = {"gemv": {"qkv_proj": (8, 8, 32), "lm_head": (8, 8, 1)}}
    rows = [row("gemv", "bfloat16", (1,), "qkv_proj", 2.0), row("gemv", "bfloat16", (1,), "lm_head", 10.0),
            row("gemv", "bfloat16", (2,), "qkv_proj", 1.0), row("gemv", "bfloat16", (2,), "lm_head", 50.0),
            row("gemv", "bfloat16", (3,), "qkv_proj", 0.5), row("gemv", "bfloat16", (3,), "lm_head", 1.0, error=0.5),
            row("gemv", "bfloat16", (4,), "qkv_proj", 0.5), {"kernel": "gemv", "weight_dtype": "bfloat16",
                                                             "tiling": [4], "shape": "lm_head", "error": "refused"},
            row("attention", "fp8_e4m3", (5,), 1, 3.0), row("attention", "fp8_e4m3", (5,), 128, 30.0)]
    summary = kernels.summarize(rows, shapes, bandwidth_gbs=4.0)
    # 32 x 2 + 10 = 74 against 32 x 1 + 50 = 82; tiling 3 was wrong at one shape, 4 refused at one.
    assert [(entry["tiling"], entry["total_us"]) for entry in summary["gemv bfloat16"]] == [([1], 74.0), ([2], 82.0)]
    assert summary["gemv bfloat16"][0]["share_of_bandwidth"] == 0.25  # 1000 bytes a µs = 1 GB/s... of 4
    assert summary["attention fp8_e4m3"][0]["total_us"] == 33.0


def test_the_sweep_can_leave_a_kernel_out(tmp_path):
    out = tmp_path / "sweep"
    assert kernels.main(["--preset", "tiny", "--quick", "--kernels", "attention", "--batches", "1",
                         "--max-seq-len", "32", "--context-min", "20", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert {case["kernel"] for case in result["cases"]} == {"attention"}
    assert set(result["summary"]) == {"attention bfloat16", "attention fp8_e4m3"}


def test_a_quick_sweep_on_the_cpu_writes_every_case_and_marks_the_current_tilings(tmp_path):
    out = tmp_path / "sweep"
    assert kernels.main(["--preset", "tiny", "--quick", "--batches", "1", "3", "--max-seq-len", "32",
                         "--context-min", "20", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    shapes = kernels.text_shapes(load_preset("tiny")["config"]["text_config"])
    expected = (kernels.attention_cases([1, 3], kernels.QUICK_ATTENTION_GRID)
                + kernels.gemv_cases(shapes["gemv"], kernels.QUICK_GEMV_GRID))
    assert len(result["cases"]) == len(expected)
    assert all("us" in case and case["relative_error"] < kernels.REFERENCE_TOLERANCE for case in result["cases"])
    assert set(result["summary"]) == {"attention bfloat16", "attention fp8_e4m3", "gemv cublas", "gemv bfloat16",
                                      "gemv fp8_e4m3"}
    for entries in result["summary"].values():
        assert [entry["total_us"] for entry in entries] == sorted(entry["total_us"] for entry in entries)
    current = list(kernels.dataclasses.astuple(decode_attention.TILINGS[2]))
    assert current in [entry["tiling"] for entry in result["summary"]["attention bfloat16"]]
    report = (out / "results.md").read_text()
    assert f"| {', '.join(map(str, current))} (current) |" in report
    assert "## gemv cublas" in report and gemv.TILINGS[2].block_k == 4096
