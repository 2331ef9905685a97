"""The benchmark's outputs: results.json, results.md (a Markdown table) and
throughput_vs_ttft.png (drawn with PIL alone: the GPU machine has no matplotlib)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

NA = "n/a"


def json_safe(value: Any) -> Any:
    """NaN and infinities become null (JSON has neither); paths become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, results: dict[str, Any]) -> Path:
    path.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
    return path


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NA
    if isinstance(value, int):
        return str(value)
    return f"{value:,.{digits}f}"


def _gb(value: float | None) -> str:
    if value is None:
        return NA
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.2f} MB"


SERVER_MODELS = ("preprocess", "vision_encoder", "projector")  # the ensemble steps before the language model


def server_table(levels: list[dict[str, Any]]) -> list[str]:
    """Per level, each ensemble step's mean queue + compute time per request, and the language
    model's own TTFT and ITL (Triton's metrics; see bench/server_stats.py)."""
    levels = [level for level in levels if level.get("server")]
    if not levels:
        return []
    header = "| concurrency | " + " | ".join(f"{m} queue / compute (ms)" for m in SERVER_MODELS)
    lines = ["", "Inside the server (Triton's metrics over each level, means per request; the ensemble steps "
             "batch dynamically, so mean batch is requests / executions; the language model's TTFT runs from "
             "its receiving the request to its first token):", "",
             header + " | mean vision batch | language model TTFT (ms) | language model ITL (ms) |",
             "|---:|" + "---:|" * (len(SERVER_MODELS) + 3)]
    for level in levels:
        server = level["server"]
        cells = []
        for model in SERVER_MODELS:
            entry = server["models"].get(model)
            cells.append(f"{_fmt(entry['queue_ms'], 2)} / {_fmt(entry['compute_ms'], 2)}" if entry else NA)
        vision = server["models"].get("vision_encoder")
        lines.append(f"| {level['concurrency']} | " + " | ".join(cells) +
                     f" | {_fmt(vision['mean_batch'], 2) if vision else NA} | "
                     f"{_fmt(server['language_model_ttft_ms'], 2)} | {_fmt(server['language_model_itl_ms'], 2)} |")
    return lines


def perf_rows(entries: list[dict[str, Any]], with_peak: bool) -> list[str]:
    """One table row per perf_analyzer batch size: images/s, latency p50, model execute (and % of peak)."""
    rows = []
    for entry in entries:
        if "error" in entry:
            rows.append(f"| {entry['batch_size']} | {entry['error']} | | |" + (" |" if with_peak else ""))
            continue
        flag = "" if entry.get("stable", True) else " (not stable: one fixed window)"
        rows.append(f"| {entry['batch_size']} | {_fmt(entry['images_per_s'])}{flag} | "
                    f"{_fmt(entry['latency_p50_ms'], 2)} | {_fmt(entry['server_compute_infer_ms'], 2)} |"
                    + (f" {_fmt(entry.get('percent_of_peak'), 1)} |" if with_peak else ""))
    return rows


def _fp8_note(dtype: str | None, what: str) -> str:
    return f", {what} in {dtype}" if dtype not in (None, "auto") else ""


def markdown(results: dict[str, Any]) -> str:
    machine, workload, limits = results["machine"], results["workload"], results["limits"]
    roofline = results["roofline"]
    device = machine.get("gpu") or f"CPU ({machine.get('cpu')})"
    projector_place = ("in the language model's step"
                       if results['repository']['serving'].get('projector_placement') == "language_model"
                       else "as its own step")
    lines = [
        f"### {workload.get('name', 'W1')} on {device}",
        "",
        f"`{results['command']}`  ",
        f"checkpoint `{results['checkpoint']['path']}` ({results['checkpoint'].get('description')}); "
        f"served by Triton {machine.get('triton_server') or NA} with the {results['repository']['engine']} engine, "
        f"{results['repository']['serving'].get('dtype')} on {results['repository']['serving'].get('device')}, "
        f"language-model weights {results['repository']['serving'].get('lm_weight_dtype', 'auto')}, "
        f"KV cache {results['repository']['serving'].get('kv_cache_dtype', 'auto')}, "
        f"vision weights {results['repository']['serving'].get('vision_weight_dtype', 'auto')} "
        f"(auto = the model's dtype), "
        f"the projector {projector_place}, "
        f"decode attention {results['repository']['serving'].get('decode_attention', 'auto')}; "
        f"torch {machine.get('torch')}, transformers {machine.get('transformers')}.",
        "",
        f"{workload['description']}. Closed loop: c streams, each sends its next request when the last one "
        f"ends; {results['settings']['warmup']} warm-up request(s) excluded.",
        "",
        "| concurrency | requests | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | output tokens/s | requests/s "
        "| GPU-time ceiling (tokens/s) | % of ceiling |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ceilings = {c["concurrency"]: c for c in limits.get("ceilings") or []}
    for level in results["levels"]:
        errors = f" ({level['errors']} failed)" if level["errors"] else ""
        ceiling = ceilings.get(level["concurrency"], {}).get("tokens_per_s")
        share = 100.0 * level["output_tokens_per_s"] / ceiling if ceiling else None
        lines.append(f"| {level['concurrency']} | {level['requests']}{errors} | {_fmt(level['ttft_ms']['p50'])} | "
                     f"{_fmt(level['ttft_ms']['p99'])} | {_fmt(level['itl_ms']['p50'], 2)} | "
                     f"{_fmt(level['output_tokens_per_s'])} | {_fmt(level['requests_per_s'], 2)} | "
                     f"{_fmt(ceiling)} | {_fmt(share)} |")
    for skipped in results.get("skipped_levels", []):
        lines.append(f"| {skipped} | not run: time budget of {results['settings']['time_budget_s']} s spent "
                     f"| | | | | | | |")

    lines += server_table(results["levels"])

    baseline = results.get("baseline")
    if baseline and baseline.get("runs"):
        by_concurrency = {level["concurrency"]: level for level in results["levels"]}
        lines += ["", f"transformers `generate` on the same {workload.get('name', 'W1')} ({baseline['dtype']}, SDPA, "
                      f"{baseline['device']}; "
                      "a batch of B identical requests, left padding, greedy, exactly the same number of new tokens):",
                  "", "| batch | latency (s) | TTFT (ms) | ITL (ms) | output tokens/s | Triton at c = batch |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for run in baseline["runs"]:
            level = by_concurrency.get(run["batch_size"])
            ratio = (f"{level['output_tokens_per_s'] / run['output_tokens_per_s']:.2f}x"
                     if level and run["output_tokens_per_s"] else NA)
            lines.append(f"| {run['batch_size']} | {_fmt(run['latency_s'], 2)} | {_fmt(run['ttft_ms'])} | "
                         f"{_fmt(run['itl_ms'], 2)} | {_fmt(run['output_tokens_per_s'])} | {ratio} |")
    elif baseline and baseline.get("error"):
        lines += ["", f"transformers baseline failed: {baseline['error']}"]

    vision = results.get("vision") or []
    if vision:
        memory = sorted({v.get("shared_memory", NA) for v in vision if "error" not in v})
        concurrency = sorted({str(v.get("concurrency", NA)) for v in vision})
        lines += ["", f"`vision_encoder` alone (perf_analyzer, gRPC, {', '.join(memory) or NA} shared memory, "
                      f"concurrency {', '.join(concurrency)}, a tile of the workload's image: images/s are tiles/s):",
                  "", "| batch | images/s | latency p50 (ms) | model execute (ms) | % of peak |",
                  "|---:|---:|---:|---:|---:|"]
        lines += perf_rows(vision, with_peak=True)
    projector = results.get("projector") or []
    if projector:
        lines += ["", "`projector` alone (perf_analyzer as above, the encoder's output for the W1 image):", "",
                  "| batch | images/s | latency p50 (ms) | model execute (ms) |", "|---:|---:|---:|---:|"]
        lines += perf_rows(projector, with_peak=False)
        roof = results.get("roofline") or {}
        if roof.get("vision_and_projector_images_per_s"):
            lines += ["", f"Encoder then projector, each image through both on one GPU, at batch "
                          f"{roof['vision_and_projector_batch_size']}: at least "
                          f"{_fmt(roof['vision_and_projector_images_per_s'])} images/s (their times per image "
                          f"added) and at most {_fmt(roof['vision_and_projector_at_most_images_per_s'])} (the "
                          f"slower of the two, were their work to overlap fully)."]

    step = limits["decode_bytes_per_step"]
    flops = limits["vision_flops_per_image"]
    lines += [
        "",
        "Limits (from the checkpoint's config):",
        f"- language model: {limits['language_model_params'] / 1e9:.3f} B parameters = "
        f"{_gb(limits['language_model_bytes'])} in {limits['serving_dtype']}; a batch-1 decode step reads "
        f"{_gb(step['total'])} "
        f"(weights {_gb(step['weights'])}{_fp8_note(limits.get('lm_weight_dtype'), 'projections')} "
        f"+ KV cache of {limits['decode_context_tokens']} tokens {_gb(step['kv_cache'])}"
        f"{_fp8_note(limits.get('kv_cache_dtype'), 'values')})",
        f"- single-stream decode limit at {_fmt(limits['gpu_bandwidth_gbs'], 0)} GB/s: "
        f"{_fmt(limits['single_stream_decode_limit_tokens_per_s'])} tokens/s; c=1 measured "
        f"{_fmt(roofline.get('c1_output_tokens_per_s'))} tokens/s = {_fmt(roofline.get('c1_percent_of_limit'))} % "
        f"(decode alone, 1000 / ITL p50: {_fmt(roofline.get('c1_decode_tokens_per_s'))} tokens/s = "
        f"{_fmt(roofline.get('c1_decode_percent_of_limit'))} %, "
        f"{_fmt(roofline.get('c1_decode_achieved_gbs'), 0)} GB/s)",
        f"- prefill and vision per request: {_fmt((limits.get('prefill_flops_per_request') or 0) / 1e12, 2)} TFLOP "
        f"of prefill ({workload.get('prompt_tokens')} tokens) and "
        f"{_fmt((limits.get('vision_flops_per_request') or 0) / 1e12, 2)} TFLOP of vision "
        f"({limits.get('tiles_per_request', 1)} tile(s)), at the measured bf16 GEMM rate of "
        f"{_fmt(limits.get('measured_gemm_tflops'))} TFLOP/s (8192^3 matmuls on the same GPU); the GPU-time ceiling "
        "of each concurrency above adds the decode steps the streams share, bytes at the memory bandwidth",
        f"- vision encoder: {flops['vision_encoder'] / 1e9:.1f} GFLOP per image ({flops['layers_run']} layers, "
        f"{flops['tokens']} tokens; projector {flops['projector'] / 1e9:.1f} GFLOP more); at "
        f"{_fmt(limits['gpu_peak_tflops'], 0)} TFLOP/s dense bf16: "
        f"{_fmt(limits['vision_encoder_limit_images_per_s'])} images/s; best measured "
        f"{_fmt(roofline.get('vision_best_images_per_s'))} images/s = {_fmt(roofline.get('vision_percent_of_peak'))} %"
        + (" of the bf16 peak (with FP8 weights its GEMMs run on FP8 tensor cores, twice that rate)"
           if results['repository']['serving'].get('vision_weight_dtype', 'auto') != "auto" else ""),
    ]
    notes = results.get("notes") or []
    if notes:
        lines += ["", *[f"Note: {note}" for note in notes]]
    return "\n".join(lines) + "\n"


# --- the plot --------------------------------------------------------------------------------------

def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, anchor: str = "la", **options) -> None:
    """draw.text with a two-letter anchor (l/m/r, t/m/s), placed by the text's bounding box so that
    it also works with Pillow's bitmap default font (which refuses `anchor`)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    dx = {"l": 0, "m": width / 2, "r": width}[anchor[0]]
    dy = {"t": 0, "m": height / 2, "s": height, "a": 0}[anchor[1]]
    draw.text((xy[0] - dx - left, xy[1] - dy - top), text, font=font, **options)


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def linear_ticks(low: float, high: float) -> tuple[float, float, list[float]]:
    """(axis low, axis high, ticks) with round tick values covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    step = _nice_step(high - low)
    start, end = math.floor(low / step) * step, math.ceil(high / step) * step
    ticks = [start + i * step for i in range(int(round((end - start) / step)) + 1)]
    return start, end, ticks


def log_ticks(low: float, high: float) -> tuple[float, float, list[float]]:
    """(low, high, ticks) on a log scale: the 1-2-5 values in [low, high], only the decades when
    that range spans more than three of them."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    multipliers = (1, 2, 5) if last - first <= 3 else (1,)
    ticks = [m * 10 ** e for e in range(first, last + 1) for m in multipliers if low <= m * 10 ** e <= high]
    return low, high, ticks


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:g}"
    return f"{value:.3g}"


def plot_throughput_vs_ttft(path: Path, series: list[dict[str, Any]], title: str, *,
                            width: int = 960, height: int = 640) -> Path:
    """Scatter-with-lines of output tokens/s (y) against TTFT p50 in ms (x), one labelled point per
    concurrency (or batch). `series`: [{"name", "color", "points": [(x, y, label), ...]}]."""
    points = [(x, y) for s in series for x, y, _ in s["points"] if x and y and x > 0 and y > 0]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small, big = _font(15), _font(13), _font(17)
    left, right, top, bottom = 90, 30, 66, 70
    x0, x1, y0, y1 = left, width - right, height - bottom, top  # pixel box (y grows downwards)
    _text(draw, (width // 2, 18), title, fill="black", font=big, anchor="mt")
    if not points:
        _text(draw, (width // 2, height // 2), "no data", fill="black", font=font, anchor="mm")
        image.save(path)
        return path
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    use_log = max(xs) / min(xs) > 20
    if use_log:
        xlo, xhi, xticks = log_ticks(min(xs) / 1.3, max(xs) * 1.3)  # room around the end points

        def to_x(v):
            return x0 + (math.log10(v) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo)) * (x1 - x0)
    else:
        xlo, xhi, xticks = linear_ticks(0.0, max(xs) * 1.05)

        def to_x(v):
            return x0 + (v - xlo) / (xhi - xlo) * (x1 - x0)
    ylo, yhi, yticks = linear_ticks(0.0, max(ys) * 1.08)

    def to_y(v):
        return y0 - (v - ylo) / (yhi - ylo) * (y0 - y1)

    for tick in yticks:  # grid, ticks, labels
        y = to_y(tick)
        draw.line((x0, y, x1, y), fill=(228, 228, 228))
        draw.line((x0 - 5, y, x0, y), fill="black")
        _text(draw, (x0 - 8, y), _tick_label(tick), fill="black", font=small, anchor="rm")
    for tick in xticks:
        x = to_x(tick)
        draw.line((x, y0, x, y1), fill=(228, 228, 228))
        draw.line((x, y0, x, y0 + 5), fill="black")
        _text(draw, (x, y0 + 8), _tick_label(tick), fill="black", font=small, anchor="mt")
    draw.rectangle((x0, y1, x1, y0), outline="black")
    _text(draw, ((x0 + x1) // 2, height - 22), "TTFT p50 (ms)" + (", log scale" if use_log else ""), fill="black",
              font=font, anchor="mm")
    label = Image.new("RGB", (260, 24), "white")
    _text(ImageDraw.Draw(label), (130, 12), "output tokens/s", font, "mm", fill="black")
    label = label.rotate(90, expand=True)
    image.paste(label, (8, (y0 + y1) // 2 - label.height // 2))

    drawn = []
    for s in series:
        pixels = [(to_x(x), to_y(y), text) for x, y, text in s["points"] if x and y and x > 0 and y > 0]
        if len(pixels) > 1:
            draw.line([(px, py) for px, py, _ in pixels], fill=s["color"], width=2)
        drawn.append((s, pixels))
    legend_x = x0
    for s, pixels in drawn:  # points and labels over every line; the legend in a row above the plot
        for px, py, text in pixels:
            draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=s["color"], outline="black")
            right_side = px + 8 + draw.textlength(text, font=small) < x1 - 4  # else left of the point
            _text(draw, (px + 8 if right_side else px - 8, py - 8), text, small, "ls" if right_side else "rs",
                  fill=s["color"], stroke_width=2, stroke_fill="white")
        if pixels:
            draw.rectangle((legend_x, 40, legend_x + 12, 52), fill=s["color"], outline="black")
            _text(draw, (legend_x + 18, 46), s["name"], fill="black", font=small, anchor="lm")
            legend_x += 30 + int(draw.textlength(s["name"], font=small))
    image.save(path)
    return path
