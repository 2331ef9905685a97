"""perf_analyzer on the `vision_encoder` model with the W1 image's real pixel values, and on the
`projector` with the encoder's output for that image.

The input-data file holds one (3, H, W) `pixel_values` item in the served repository's wire dtype
(`spec.wire_dtype`: FP32, or FP16 for half-precision models), base64 of its raw bytes
(perf_analyzer's docs/input_data.md); with `-b B` perf_analyzer sends it B times per request.
perf_analyzer's "Inferences/Second" already counts every batch item (request rate x B: with
`-b 4` at concurrency 1 it reports about 4 / latency), so images/s = inferences/s.

By default the tensors go through system shared memory (`--shared-memory system`), so the figure
is the model's and not that of copying B x 1.35 MB in and B x 576 x 1024 x 4 bytes out over
gRPC (FP32; half of each with an FP16 wire); in the `llava` ensemble these tensors never leave
the server either. If perf_analyzer fails with shared memory, it is run again without, and the
result says which was used.
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from llava_triton import spec
from llava_triton.preprocess import pixel_values_to_wire
from llava_triton.spec import ModelSpec, ServingConfig

STABLE_FAILURE = "Failed to obtain stable measurement"


def write_input_data(path: Path | str, pixel_values: np.ndarray, serving: ServingConfig) -> Path:
    """perf_analyzer `--input-data` JSON with one `pixel_values` item: the image processor's FP32
    (3, H, W) values, converted to the wire dtype of `serving` as the `preprocess` model sends them."""
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    if pixel_values.ndim != 3:
        raise ValueError(f"pixel_values must be one image (3, H, W), got shape {pixel_values.shape}")
    return write_item(path, spec.PIXEL_VALUES, pixel_values_to_wire(pixel_values, serving))


def write_item(path: Path | str, name: str, item: np.ndarray) -> Path:
    """perf_analyzer `--input-data` JSON with one item of input `name` (batch axis excluded), its raw bytes."""
    item = np.ascontiguousarray(item)
    entry = {"content": {"b64": base64.b64encode(item.tobytes()).decode("ascii")}, "shape": list(item.shape)}
    path = Path(path)
    path.write_text(json.dumps({"data": [{name: entry}]}) + "\n")
    return path


def encoder_features(url: str, pixel_values: np.ndarray, serving: ServingConfig) -> np.ndarray:
    """The served vision encoder's `image_features` (576, 1024 on LLaVA-1.5) for one image's FP32
    pixel values: the projector's perf_analyzer input, real values rather than random or zero ones
    (zeros draw less power from the tensor cores, and random FP16 bits include NaNs)."""
    import tritonclient.grpc as grpcclient

    pixels = np.ascontiguousarray(pixel_values_to_wire(np.asarray(pixel_values, np.float32), serving)[None])
    with grpcclient.InferenceServerClient(url) as client:
        request = grpcclient.InferInput(spec.PIXEL_VALUES, list(pixels.shape), spec.TRITON_TYPE_NAMES[pixels.dtype])
        request.set_data_from_numpy(pixels)
        result = client.infer(spec.VISION_ENCODER, [request], outputs=[grpcclient.InferRequestedOutput(
            spec.IMAGE_FEATURES)])
    return result.as_numpy(spec.IMAGE_FEATURES)[0]


def output_item_bytes(model: ModelSpec, serving: ServingConfig, name: str = spec.VISION_ENCODER) -> int:
    """Bytes of one image's output of the vision encoder (`image_features`) or of the projector
    (`image_embeds`), in the wire dtype."""
    width = model.vision_hidden_size if name == spec.VISION_ENCODER else model.text_hidden_size
    return model.num_image_tokens * width * spec.wire_dtype(serving).itemsize


def perf_analyzer_args(url: str, batch_size: int, input_data: Path, csv_path: Path, *, model: str,
                       measurement_requests: int, stability: float | None, max_trials: int, concurrency: int,
                       shared_memory: str, output_bytes: int) -> list[str]:
    """`stability=None`: one window of `max_trials x measurement_requests` requests, no stability search."""
    args = ["-m", model, "-u", url, "-i", "grpc", "-b", str(batch_size), "--input-data", str(input_data),
            "--concurrency-range", str(concurrency), "-f", str(csv_path)]
    if stability is None:
        args += ["--request-count", str(max_trials * measurement_requests)]
    else:
        args += ["--measurement-mode", "count_windows", "--measurement-request-count", str(measurement_requests),
                 "--stability-percentage", f"{stability:g}", "--max-trials", str(max_trials)]
    if shared_memory != "none":
        args += ["--shared-memory", shared_memory, "--output-shared-memory-size", str(output_bytes)]
    return args


def _parse_csv(path: Path, batch_size: int) -> dict[str, Any]:
    rows = list(csv.DictReader(path.open()))
    if not rows:
        raise ValueError(f"{path} has no rows")
    row = rows[-1]
    inferences_per_s = float(row["Inferences/Second"])
    compute_infer_us = float(row["Server Compute Infer"])
    return {
        "images_per_s": round(inferences_per_s, 3),  # already batch x requests/s
        "requests_per_s": round(inferences_per_s / batch_size, 3),
        "latency_p50_ms": round(float(row["p50 latency"]) / 1e3, 3),
        "latency_p99_ms": round(float(row["p99 latency"]) / 1e3, 3),
        "server_compute_infer_ms": round(compute_infer_us / 1e3, 3),  # the model's execute() alone
        "server_queue_ms": round(float(row["Server Queue"]) / 1e3, 3),
    }


def measure(url: str, batch_size: int, input_data: Path, work_dir: Path, *, model: str = spec.VISION_ENCODER,
            output_item_bytes: int, measurement_requests: int = 50, stability: float = 100.0, max_trials: int = 3,
            concurrency: int = 1, shared_memory: str = "system", timeout_s: float = 300.0) -> dict[str, Any]:
    """perf_analyzer at one batch size; a dict with the figures, or with `error` when it failed.

    When the windows do not agree within `stability` % in `max_trials` windows (a noisy machine,
    e.g. CI with other tests on its cores), it is run once more as one fixed window of the same
    number of requests (`--request-count`, no stability search) and the result is marked
    `"stable": false`; when shared memory is refused, once more without it.
    """
    from llava_triton.perf_analyzer import perf_analyzer_command, perf_analyzer_env

    attempts: list[dict[str, Any]] = []
    plan: list[tuple[str, float | None]] = [(shared_memory, stability)]
    while plan:
        memory, criterion = plan.pop(0)
        name = f"perf_{model}_b{batch_size}_{memory}_" + ("fixed" if criterion is None else f"s{criterion:g}")
        csv_path, log_path = Path(work_dir) / f"{name}.csv", Path(work_dir) / f"{name}.log"
        csv_path.unlink(missing_ok=True)
        command = [*perf_analyzer_command(),
                   *perf_analyzer_args(url, batch_size, input_data, csv_path, model=model,
                                       measurement_requests=measurement_requests, stability=criterion,
                                       max_trials=max_trials, concurrency=concurrency, shared_memory=memory,
                                       output_bytes=batch_size * output_item_bytes)]
        started = time.perf_counter()
        try:
            run = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=timeout_s)
            output, code = run.stdout + run.stderr, run.returncode
        except subprocess.TimeoutExpired as error:
            output, code = f"timed out after {timeout_s:.0f} s: {error.stdout or ''}", -1
        log_path.write_text(output)
        attempt = {"command": command, "shared_memory": memory, "stability_percentage": criterion,
                   "returncode": code, "seconds": round(time.perf_counter() - started, 2), "log": str(log_path)}
        attempts.append(attempt)
        if code == 0 and csv_path.is_file():
            return {"batch_size": batch_size, "concurrency": concurrency, "shared_memory": memory,
                    "measurement_requests": measurement_requests, "stability_percentage": criterion,
                    "stable": criterion == stability, **_parse_csv(csv_path, batch_size), "attempts": attempts}
        attempt["output_tail"] = output.strip()[-600:]
        if STABLE_FAILURE in output:
            if criterion == stability:
                plan.append((memory, None))  # noisy machine: keep a fixed-count figure, marked unstable
        elif memory != "none":
            plan.append(("none", stability))  # shared memory refused here: tensors in the gRPC messages
    last = attempts[-1]
    reason = "no stable measurement" if STABLE_FAILURE in last["output_tail"] else f"exit {last['returncode']}"
    return {"batch_size": batch_size, "concurrency": concurrency, "error": f"perf_analyzer failed ({reason}); "
            f"see {last['log']}", "attempts": attempts}
