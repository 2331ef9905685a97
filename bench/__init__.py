"""Benchmark harness for the served LLaVA model: `python -m bench` (`make bench`).

    workload.py     W1: one deterministic 336x336 JPEG, a ~32-token question, 128 tokens out
    loadgen.py      closed-loop streaming load generator (asyncio gRPC; a thread variant to compare)
    fake_server.py  a fake streaming Triton endpoint to check that the generator is not the bottleneck
    vision.py       perf_analyzer on `vision_encoder` with the W1 image's pixel values
    baseline.py     transformers `LlavaForConditionalGeneration.generate` on the same W1 (a subprocess)
    limits.py       roofline numbers from the checkpoint config and the GPU's datasheet figures
    report.py       results.json, results.md and throughput_vs_ttft.png (drawn with PIL)
"""
