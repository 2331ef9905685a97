"""Export a Hugging Face LLaVA checkpoint into a Triton model repository.

    python -m export                                   # the embedded default checkpoint
    python -m export --model /path/to/llava-1.5-7b-hf  # a real one (safetensors)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from llava_triton import spec
from llava_triton.spec import RENAMED_OPTIONS, ModelSpec, ServingConfig

ROOT = Path(__file__).resolve().parent.parent


def serving_config(device: str, dtype: str, overrides: dict, gpu_memory_bytes: int = 0) -> ServingConfig:
    """The serving options of an export for `device`: where its instances run, and on a GPU of
    `gpu_memory_bytes` how many vision instances (spec.GPU_VISION_INSTANCES on one of at least
    spec.GPU_VISION_INSTANCES_MIN_BYTES), unless `overrides` (--set) says otherwise."""
    defaults: dict = {"device": device, "dtype": dtype, "instance_kind": "KIND_CPU"}
    if device == "cuda":
        defaults["instance_kind"] = "KIND_GPU"
        if gpu_memory_bytes >= spec.GPU_VISION_INSTANCES_MIN_BYTES:
            defaults["vision_instances"] = spec.GPU_VISION_INSTANCES
    return ServingConfig.from_dict({**defaults, **overrides})


def parse_set(items: list[str]) -> dict:
    """`--set key=value` pairs for ServingConfig fields, values parsed as JSON when possible."""
    fields = {f.name: f for f in dataclasses.fields(ServingConfig)}
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key in RENAMED_OPTIONS:
            raise SystemExit(f"--set {item!r}: {key} is now {RENAMED_OPTIONS[key]}")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="Hugging Face LLaVA checkpoint directory (LlavaForConditionalGeneration, "
                             "LlavaNextForConditionalGeneration or LlavaNextVideoForConditionalGeneration, "
                             "safetensors, "
                             "tokenizer with chat template). Default: build the embedded default checkpoint.")
    parser.add_argument("--preset", default="tiny",
                        help="preset of the checkpoint built when --model is not given (default: tiny; tiny-next "
                             "and tiny-next-mistral are LLaVA-NeXT, tiny-next-video LLaVA-NeXT-Video; llava-1.5-7b, "
                             "llava-v1.6-mistral-7b and llava-next-video-7b build the full architectures with random "
                             "weights)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where the built checkpoint goes (default: build/<preset>-llava)")
    parser.add_argument("--output", type=Path, default=ROOT / "model_repository",
                        help="model repository to write (default: model_repository)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "export",
                        help="intermediate files such as ONNX (default: build/export)")
    parser.add_argument("--engine", choices=("auto", "pytorch", "tensorrt"), default="pytorch",
                        help="vision encoder and projector engine: pytorch (the Python backend; the default, and "
                             "what auto means) or tensorrt (FP16 TensorRT plans, opt-in only). The TensorRT path "
                             "has never been run: no TensorRT builder was available on any machine of ours")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the PyTorch-served models run (auto = cuda if available)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="compute dtype of the PyTorch-served models (auto = bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--no-onnx", action="store_true",
                        help="with the PyTorch engine, skip the ONNX export and its onnxruntime check")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a serving option, e.g. --set max_num_seqs=64 (see llava_triton/spec.py)")
    args = parser.parse_args(argv)

    import torch

    from export.language_model import export_language_model
    from export.onnx_export import export_vision
    from export.processor_check import ProcessorMismatchError, check_prompt_ids
    from export.repository import write_configs
    from llava_triton.processor import copy_processor_files

    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[export {time.monotonic() - started:6.1f}s] {message}", flush=True)

    if args.model is None:
        from llava_triton.checkpoint import build_checkpoint

        target = args.checkpoint_dir or ROOT / "build" / f"{args.preset}-llava"
        progress(f"building the embedded {args.preset} checkpoint in {target}")
        checkpoint = build_checkpoint(args.preset, target)
    else:
        checkpoint = args.model
    model = ModelSpec.from_pretrained(checkpoint)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    engine = "pytorch" if args.engine == "auto" else args.engine  # tensorrt only when asked for: never run
    overrides = parse_set(args.set)
    if model.videos and "projector_placement" not in overrides:
        # LLaVA-NeXT-Video pools each frame's features before the projector: the language model does both.
        overrides["projector_placement"] = "language_model"
    memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0
    try:
        serving = serving_config(device, dtype, overrides, memory)
    except ValueError as error:  # a value out of range: the message names the field
        raise SystemExit(f"--set: {error}") from None
    tiles = f"LLaVA-NeXT tiles on {len(model.image_grid_pinpoints)} pinpoints, " if model.anyres else ""
    if model.videos:
        tiles += f"videos at {model.num_frame_tokens} tokens a frame (projector in the language model), "
    progress(f"checkpoint {checkpoint}: {tiles}{model.num_image_tokens} image tokens per tile, context "
             f"{model.max_position_embeddings}; engine {engine}, device {device}, dtype {dtype}")

    repo = args.output
    progress("writing config.pbtxt files")
    try:
        write_configs(repo, model, serving, engine)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    progress("copying the processor's files (tokenizer, chat template, image processor, config.json)")
    for name in (spec.PREPROCESS, spec.LANGUAGE_MODEL):
        copy_processor_files(checkpoint, repo / name / "1" / spec.PROCESSOR_DIR)
    try:
        checked = check_prompt_ids(checkpoint, repo / spec.PREPROCESS / "1" / spec.PROCESSOR_DIR, model, serving)
    except ProcessorMismatchError as error:
        raise SystemExit(f"export stopped: {error}") from None
    progress(f"prompt ids equal the checkpoint processor's for {checked} probe prompts")
    progress("exporting the vision encoder and projector"
             + ("" if args.no_onnx else " (ONNX, checked with onnxruntime)"))
    report = export_vision(checkpoint, repo, args.work_dir, model, serving, engine, onnx=not args.no_onnx)
    progress(f"vision export: {report}")
    progress("writing the language model's weights (safetensors)")
    export_language_model(checkpoint, repo / spec.LANGUAGE_MODEL / "1")
    progress(f"done: serve with `tritonserver --model-repository {repo}` or `make serve`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
