"""`python -m bench.w4` end to end on the tiny-next-video preset (CPU): every reported field written, counts
that add up; and W4's pure helpers (limits, targets, exit status, the server's PYTHONPATH, the requests).

Speed is never asserted: on a CPU the figures only have to exist, be positive and add up.
"""

from __future__ import annotations

import datetime
import json
import math

import pytest

from bench import loadgen, w4
from bench.limits import throughput_ceiling, vision_flops
from bench.workload import W4_QUESTION, W4Clip, Workload
from llava_triton import spec

CONCURRENCY, REQUESTS, MAX_TOKENS, NUM_FRAMES = (1, 2), 3, 4, 4
CLIP = W4Clip(width=96, height=64, fps=10, seconds=2)  # 20 frames: a few KB, encoded in milliseconds


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def video_checkpoint():
    from llava_triton.testing.reference import VIDEO_PRESET, preset_checkpoint

    return preset_checkpoint(VIDEO_PRESET)


@pytest.mark.e2e
def test_w4_writes_every_reported_field_for_the_tiny_video_checkpoint(video_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from llava_triton.video import probe_video, sample_frame_indices

    out = tmp_path / "w4"
    argv = ["--checkpoint", str(video_checkpoint), "--concurrency", *map(str, CONCURRENCY),
            "--requests", str(REQUESTS), "--max-tokens", str(MAX_TOKENS), "--num-frames", str(NUM_FRAMES),
            "--width", str(CLIP.width), "--height", str(CLIP.height), "--fps", str(CLIP.fps),
            "--seconds", str(CLIP.seconds), "--warmup", "1", "--decode-repeats", "2",
            "--vision-batch-sizes", "2", "64", "--vision-requests", "5", "--baseline-batch-sizes", "1",
            "--export-arg=--set=preprocess_instances=1", "--out", str(out)]  # a Python process less to start
    status = w4.main(argv)
    results = json.loads((out / "results.json").read_text())
    # 0, or only a target missed: never a failed request, a count that does not add up or a failed baseline.
    assert results["checks"] == {"no_failed_requests": True, "completion_tokens_equal_requests_x_max_tokens": True,
                                 "server_prompt_tokens_equal_workload": True, "baseline_ran": True,
                                 "baseline_prompt_tokens_equal_workload": True}
    assert status == w4.exit_status(results["checks"], results["targets"]) in (0, w4.TARGET_MISSED)

    assert results["command"].startswith("python -m bench.w4 --checkpoint")
    assert datetime.datetime.fromisoformat(results["created"]).tzinfo is not None
    machine = results["machine"]
    assert machine["gpu"] is None and machine["cpu"] and machine["cpu_count"] >= 1
    assert machine["torch"] and machine["transformers"] and machine["av"] and "git_commit" in machine
    assert machine["triton_server"] == "2.51.0"
    assert results["repository"]["engine"] == "pytorch"
    assert results["repository"]["serving"]["preprocess_instances"] == 1  # --export-arg reached the export

    # The workload: the clip as asked, its frames and tokens as the checkpoint counts them.
    workload = results["workload"]
    tokenizer = AutoTokenizer.from_pretrained(video_checkpoint)
    assert workload["question"] == W4_QUESTION
    assert workload["question_tokens"] == len(tokenizer(W4_QUESTION, add_special_tokens=False)["input_ids"])
    assert (workload["num_frames"], workload["frames_sampled"], workload["frame_tokens"]) == (NUM_FRAMES, NUM_FRAMES,
                                                                                            16)
    assert workload["video_tokens"] == NUM_FRAMES * 16
    assert workload["prompt_tokens"] > workload["video_tokens"] + workload["question_tokens"]
    assert workload["max_tokens"] == MAX_TOKENS and workload["ignore_eos"] and workload["stream"]
    clip = (out / workload["clip"]["file"]).read_bytes()
    assert workload["clip"]["bytes"] == len(clip) and clip == CLIP.encode()
    info = probe_video(clip, spec.ServingConfig())
    assert (info.width, info.height, info.total_frames) == (CLIP.width, CLIP.height, CLIP.frames)

    # Decoding here: the frames the server samples, each figure a median of the repeats.
    decode = results["decode"]
    assert decode["frame_indices"] == sample_frame_indices(CLIP.frames, CLIP.fps, NUM_FRAMES).tolist()
    assert decode["frames_decoded"] == decode["frame_indices"][-1] + 1 and decode["total_frames"] == CLIP.frames
    for name in ("decode_ms", "decode_cpu_ms", "preprocess_ms"):
        assert _positive(decode[name]["median"]) and decode[name]["repeats"] == 2

    # Every request streamed exactly MAX_TOKENS tokens (ignore_eos) with the workload's prompt.
    assert [level["concurrency"] for level in results["levels"]] == list(CONCURRENCY)
    for level in results["levels"]:
        assert (level["requests"], level["completed"], level["errors"]) == (REQUESTS, REQUESTS, 0)
        assert level["completion_tokens"] == REQUESTS * MAX_TOKENS == level["reported_completion_tokens"]
        assert level["prompt_tokens"] == [workload["prompt_tokens"]] and level["finish_reasons"] == ["length"]
        assert _positive(level["ttft_ms"]["p50"]) and level["ttft_ms"]["p99"] >= level["ttft_ms"]["p50"]
        for model in ("llava", "preprocess", "vision_encoder"):  # the language model projects: no projector step
            assert level["server"]["models"][model]["requests"] == REQUESTS
        assert "projector" not in level["server"]["models"]
    assert results["skipped_levels"] == []

    # The comparison: every reported field, the transformers baseline at c=1 only (its one batch size).
    rows = results["comparison"]
    assert [row["concurrency"] for row in rows] == list(CONCURRENCY)
    for row in rows:
        assert {"ttft_ms", "itl_ms", "output_tokens_per_s", "ceiling_tokens_per_s", "percent_of_ceiling",
                "transformers_tokens_per_s", "transformers_ttft_ms", "speedup_over_transformers",
                "server_preprocess_ms", "server_vision_encoder_ms"} <= set(row)
        assert _positive(row["server_preprocess_ms"]) and _positive(row["server_vision_encoder_ms"])
        assert row["ceiling_tokens_per_s"] is None  # no GPU: no GEMM rate, no bandwidth
    first, second = rows
    assert _positive(first["transformers_tokens_per_s"]) and second["transformers_tokens_per_s"] is None
    assert math.isclose(first["speedup_over_transformers"],
                        first["output_tokens_per_s"] / first["transformers_tokens_per_s"], rel_tol=1e-2)
    assert _positive(first["decode_tokens_per_s"]) and first["decode_limit_tokens_per_s"] is None
    assert "ttft_ms_at_least" in first and "decode_tokens_per_s" not in second

    targets = results["targets"]
    assert set(targets) == {w4.TARGET_TTFT, w4.TARGET_THROUGHPUT}
    assert targets[w4.TARGET_TTFT]["value"] == first["ttft_ms"]["p50"]
    assert targets[w4.TARGET_TTFT]["met"] == (first["ttft_ms"]["p50"] <= w4.TARGET_TTFT_P50_MS)
    assert targets[w4.TARGET_THROUGHPUT]["met"] is None  # c=32 not run

    (run,) = results["baseline"]["runs"]
    assert run["batch_size"] == 1 and run["prompt_tokens"] == workload["prompt_tokens"]
    assert _positive(run["output_tokens_per_s"]) and _positive(results["baseline"]["preprocess_ms_per_clip"]["median"])
    assert results["baseline"]["num_frames"] == NUM_FRAMES and results["baseline"]["gemm_tflops"] is None

    # perf_analyzer at batch 2; 64 is past the export's vision_max_batch_size, said in a note.
    (vision,) = results["vision"]
    assert "error" not in vision, vision
    # The tiny encoder's rate rounds to 0.00 TFLOP/s on a slow CPU: only present, not positive.
    assert vision["batch_size"] == 2 and _positive(vision["images_per_s"]) and vision["achieved_tflops"] >= 0
    assert results["settings"]["vision_batch_sizes"] == [2]
    assert any("vision_max_batch_size" in note for note in results["notes"])

    limits, video = results["limits"], results["video_limits"]
    assert limits["measured_gemm_tflops"] is None and limits["single_stream_decode_limit_tokens_per_s"] is None
    assert video["frames_per_request"] == NUM_FRAMES and video["video_tokens_per_request"] == NUM_FRAMES * 16
    assert video["prefill_tokens"] == workload["prompt_tokens"] and _positive(video["prefill_flops"])
    assert all(_positive(video["frame_flops"][name]) for name in ("vision_encoder", "projector", "total"))
    assert video["ceilings"] == [] and video["ttft_ms_at_least_c1"] is None
    assert _positive(video["decode_cpu_bound_tokens_per_s"])

    table = (out / "results.md").read_text()
    assert "| c | requests | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | tokens/s | GPU-time ceiling" in table
    assert f"| 1 | {REQUESTS} |" in table and f"| 2 | {REQUESTS} |" in table
    assert w4.TARGET_TTFT in table and w4.TARGET_THROUGHPUT in table and "**not evaluated**" in table
    assert "decoding the clip, this process" in table and "vision encoder at batch 2 (frames/s" in table
    assert "`LlavaNextVideoForConditionalGeneration.generate`" in table and "Inside the server" in table
    assert f"({workload['question_tokens']} tokens with this checkpoint's tokenizer)" in table
    assert (out / "tritonserver.log").stat().st_size > 0 and (out / "baseline.log").is_file()


def test_w4_question_has_33_tokens_with_the_7b_presets_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from llava_triton.checkpoint import load_preset
    from llava_triton.preset_tokenizers import write_tokenizer

    write_tokenizer(load_preset("llava-next-video-7b"), tmp_path, "LlavaNextVideoProcessor")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer(W4_QUESTION, add_special_tokens=False)["input_ids"]) == 33


def test_w4_limits_of_the_7b_config():
    from llava_triton.checkpoint import load_preset

    config = load_preset("llava-next-video-7b")["config"]
    image = vision_flops(config)
    frame = w4.frame_flops(config, 144, 576)
    # The whole tile through the encoder; the projector on the pooled quarter of its tokens.
    assert frame["vision_encoder"] == image["vision_encoder"] and frame["projector"] == image["projector"] // 4
    assert frame["total"] == frame["vision_encoder"] + frame["projector"]
    # With an image tile's FLOPs a frame, the ceiling is bench.limits' for as many tiles.
    for concurrency in (1, 32):
        ours = w4.video_ceiling(config, "bfloat16", concurrency, 2364, 128, 16, image["total"], 700.0, 4800.0)
        theirs = throughput_ceiling(config, "bfloat16", concurrency, 2364, 128, 16, 700.0, 4800.0)
        assert math.isclose(ours["tokens_per_s"], theirs["tokens_per_s"], rel_tol=1e-3)
        assert math.isclose(ours["ttft_ms_at_least"], theirs["ttft_ms_at_least"], rel_tol=1e-3)
        assert math.isclose(ours["vision_ms_per_request"] + ours["prefill_ms_per_request"],
                            theirs["prefill_and_vision_ms_per_request"], rel_tol=1e-3)
    assert w4.video_ceiling(config, "bfloat16", 1, 2364, 128, 16, frame["total"], None, 4800.0) is None


def _row(concurrency: int, ttft_p50: float, speedup: float | None) -> dict:
    return {"concurrency": concurrency, "ttft_ms": {"p50": ttft_p50}, "speedup_over_transformers": speedup,
            "transformers_tokens_per_s": None if speedup is None else 100.0, "ceiling_tokens_per_s": 1000.0,
            "ttft_ms_at_least": 80.0}


def test_w4_targets_and_exit_status():
    ok = {"no_failed_requests": True}
    met = w4.targets([_row(1, 200.0, None), _row(32, 900.0, 6.0)])
    assert met[w4.TARGET_TTFT]["met"] is True and met[w4.TARGET_THROUGHPUT]["met"] is True
    assert met[w4.TARGET_THROUGHPUT]["tokens_per_s_needed"] == 500.0
    assert met[w4.TARGET_THROUGHPUT]["limit_ceiling_tokens_per_s"] == 1000.0
    assert met[w4.TARGET_TTFT]["limit_ttft_ms_at_least"] == 80.0
    assert w4.exit_status(ok, met) == 0
    missed = w4.targets([_row(1, 300.0, None), _row(32, 900.0, 4.0)])
    assert missed[w4.TARGET_TTFT]["met"] is False and missed[w4.TARGET_THROUGHPUT]["met"] is False
    assert w4.exit_status(ok, missed) == w4.TARGET_MISSED
    assert w4.exit_status({**ok, "baseline_ran": False}, missed) == 1  # a failed check comes first
    # Levels not run (or all failed: a NaN TTFT): not evaluated, not missed.
    unrun = w4.targets([_row(1, math.nan, None)])
    assert unrun[w4.TARGET_TTFT]["met"] is None and unrun[w4.TARGET_THROUGHPUT]["met"] is None
    assert w4.exit_status(ok, unrun) == 0


def test_w4_gives_the_server_the_stub_numpy_first_and_this_pythonpath_after_it():
    assert w4.default_server_pythonpath({}) is None
    assert w4.default_server_pythonpath({"PYTHONPATH": "/opt/av"}) is None  # the server inherits it
    assert w4.default_server_pythonpath({"STUB_PYTHONPATH": "/stub", "PYTHONPATH": "/opt/av::/stub"}) == \
        "/stub:/opt/av"
    assert w4.default_server_pythonpath({"STUB_PYTHONPATH": "/stub"}) == "/stub"


def test_w4_arguments():
    args = w4.parse_args([])
    assert args.concurrency == [1, 8, 32] and args.max_tokens == 128 and args.num_frames == 16
    assert args.clip == W4Clip() and (args.clip.width, args.clip.height, args.clip.frames) == (640, 360, 300)
    assert args.baseline and not w4.parse_args(["--no-baseline"]).baseline
    assert w4.parse_args(["--export-arg=--device=cuda", "--export-arg=--dtype=bfloat16"]).export_arg == [
        "--device=cuda", "--dtype=bfloat16"]
    for bad in (["--width", "641"], ["--concurrency", "0"], ["--num-frames", "0"], ["--no-export"]):
        with pytest.raises(SystemExit):
            w4.parse_args(bad)


def test_w4_clip():
    assert W4Clip().describe() == "a 10-second 640x360 H.264 MP4 clip at 30 fps (300 frames)"
    assert W4Clip(fps=29.97, seconds=2).frames == 60
    for bad in ({"width": 95}, {"height": 0}, {"fps": 0}, {"seconds": -1}):
        with pytest.raises(ValueError):
            W4Clip(**bad)


def test_loadgen_sends_a_workloads_video_and_num_frames_and_nothing_more_for_images():
    image = Workload(name="W1", prompt="What is this?", images=(b"jpeg",), max_tokens=4)
    names = {tensor.name() for tensor in loadgen._inputs(image)}
    assert spec.IN_VIDEOS not in names and spec.IN_NUM_FRAMES not in names and spec.IN_IMAGES in names
    video = Workload(name="W4", prompt="What is this?", images=(), videos=(b"mp4",), num_frames=16, max_tokens=4)
    tensors = {tensor.name(): tensor for tensor in loadgen._inputs(video)}
    assert spec.IN_IMAGES not in tensors and tensors[spec.IN_VIDEOS].shape() == [1]
    assert tensors[spec.IN_NUM_FRAMES].datatype() == "INT32"
    assert loadgen._video_options(video) == {spec.IN_VIDEOS: [b"mp4"], spec.IN_NUM_FRAMES: 16}
    with pytest.raises(ValueError, match="videos"):
        loadgen.openai_body(video)
