"""The vision encoder's forward as its Triton instance runs it, without Triton: where a batch's time goes.

    python -m bench.vision_forward --repository REPO --out DIR

Loads REPO/vision_encoder/1 as its Triton adapter does (`vision_serving.serve_encoder`: weights in
their final form, compiled, CUDA graphs) and times, on random images in the wire dtype:

- the module alone (its graph replay on a GPU) at each --batch-sizes, on inputs already on the device;
- `BatchedModule.forward` at the largest batch size, for each --pipeline-rows: the same pinned
  staging, uploads, forward, downloads and splitting that `execute` does, in chunks of that many rows
  (0: the batch in one piece). Also as requests of --request-images each, as dynamic batching hands
  several requests to one execute. On the CPU a batch always runs in one piece.

What it leaves out is Triton: the request's tensors crossing shared memory to the stub and the
outputs crossing back (`python -m bench`'s perf_analyzer step measures the whole). GPU times come
from CUDA events; host times, and everything on the CPU, from the wall clock (p50 and min over
--repeats calls).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vision_forward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="an exported model repository")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--pipeline-rows", type=int, nargs="+", default=[0, 8, 16],
                        help="rows per pipelined chunk of BatchedModule.forward (0: one piece)")
    parser.add_argument("--request-images", type=int, default=4,
                        help="images per request for the run that splits the batch into requests")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or min(args.pipeline_rows) < 0 or args.request_images < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --request-images and --repeats must be positive, --pipeline-rows not negative")
    return args


def _times(call, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from llava_triton import spec
    from llava_triton.vision_serving import serve_encoder

    cuda = torch.cuda.is_available()
    runner = serve_encoder(args.repository / spec.VISION_ENCODER / "1", "GPU" if cuda else "CPU", 0)
    largest = max(args.batch_sizes)
    images = np.random.default_rng(0).standard_normal((largest, *runner.item_shape)).astype(runner.wire_dtype)

    module = []
    with torch.inference_mode():
        on_device = torch.from_numpy(images).to(runner.device).to(runner.dtype)
        for batch in args.batch_sizes:
            if cuda:
                for _ in range(args.warmup):
                    runner.module(on_device[:batch])
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.repeats):
                    runner.module(on_device[:batch])
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end) / args.repeats
            else:
                ms = _times(lambda batch=batch: runner.module(on_device[:batch]), args.warmup, args.repeats)["p50_ms"]
            module.append({"batch_size": batch, "ms": round(ms, 3), "images_per_s": round(batch / ms * 1e3, 1)})
            print(f"[vision_forward] module, batch {batch}: {ms:.2f} ms", flush=True)

    forward = []
    default_rows = type(runner).PIPELINE_ROWS
    requests = [images[i: i + args.request_images] for i in range(0, largest, args.request_images)]
    try:
        for rows in args.pipeline_rows:
            runner.PIPELINE_ROWS = rows or largest  # a batch of at most PIPELINE_ROWS rows runs in one piece
            whole = _times(lambda: runner.forward([images]), args.warmup, args.repeats)
            split = _times(lambda: runner.forward(requests), args.warmup, args.repeats)
            forward.append({"pipeline_rows": rows, "one_request": whole, "requests": split,
                            "images_per_s": round(largest / whole["p50_ms"] * 1e3, 1)})
            print(f"[vision_forward] forward, batch {largest}, pipeline rows {rows or 'none'}: p50 "
                  f"{whole['p50_ms']:.2f} ms ({len(requests)} requests: {split['p50_ms']:.2f} ms)", flush=True)
    finally:
        runner.PIPELINE_ROWS = default_rows

    results = {
        "command": "python -m bench.vision_forward " + " ".join(sys.argv[1:] if argv is None else argv),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__},
        "encoder": {"dtype": str(runner.dtype).removeprefix("torch."), "wire_dtype": str(runner.wire_dtype),
                    "item_shape": list(runner.item_shape), "output_item_shape": list(runner.output_item_shape)},
        "module": module,
        "forward": {"batch_size": largest, "request_images": args.request_images, "runs": forward},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vision_forward.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "vision_forward.md").write_text(render(results))
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    forward = results["forward"]
    lines = [f"Command: `{results['command']}` ({results['created']}, {results['machine']['gpu'] or 'CPU'}); "
             f"the encoder in {results['encoder']['dtype']}, {results['encoder']['wire_dtype']} on the wire.", "",
             "| module alone, batch | ms | images/s |", "|---:|---:|---:|"]
    lines += [f"| {entry['batch_size']} | {entry['ms']:.2f} | {entry['images_per_s']:,.1f} |"
              for entry in results["module"]]
    lines += ["", f"| forward, batch {forward['batch_size']}, pipeline rows | p50 ms | min ms | images/s | "
              f"as requests of {forward['request_images']}, p50 ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {run['pipeline_rows'] or 'one piece'} | {run['one_request']['p50_ms']:.2f} | "
              f"{run['one_request']['min_ms']:.2f} | {run['images_per_s']:,.1f} | {run['requests']['p50_ms']:.2f} |"
              for run in forward["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
