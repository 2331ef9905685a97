"""Export the vision encoder and projector: ONNX (always, checked against PyTorch), then serving artifacts.

`export_vision` is the one entry point: it loads both modules from the checkpoint
(`export.vision_weights`), exports and checks ONNX in a work directory, then writes what Triton
serves, either the PyTorch weights for the Python-backend adapters (`engine="pytorch"`,
`llava_triton.vision_artifacts`) or a TensorRT engine per model (`engine="tensorrt"`). It writes no
`config.pbtxt`: those come from `export.repository`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.vision_weights import load_from_checkpoint
from llava_triton import vision, vision_artifacts
from llava_triton.dtypes import resolve_dtype
from llava_triton.spec import (
    IMAGE_EMBEDS,
    IMAGE_FEATURES,
    LANGUAGE_MODEL,
    LANGUAGE_MODEL_PROJECTOR_DIR,
    PIXEL_VALUES,
    PROJECTOR,
    VISION_ENCODER,
    ModelSpec,
    ServingConfig,
    wire_dtype,
)

ONNX_OPSET = 18  # LayerNormalization (>= 17) parses into TensorRT's normalization layer
# ONNX Runtime (CPU, FP32) against PyTorch (CPU, FP32): the largest absolute difference may be at
# most this fraction of the largest absolute reference value. Only summation order differs, so
# what we see is ~1e-6 of it; a wrong graph is off by far more.
ONNX_REL_TOLERANCE = 1e-4
CHECK_BATCH_SIZES = (1, 3)  # batch 1 and a batch > 1, through the dynamic batch axis
_EXAMPLE_BATCH_SIZE = 2  # torch.export treats sizes 0 and 1 as constants, so trace with 2
_ARTIFACTS = {"pytorch": (vision_artifacts.WEIGHTS_FILE, vision_artifacts.MODULE_CONFIG_FILE),
              "tensorrt": ("model.plan",)}


class OnnxMismatchError(RuntimeError):
    """The exported ONNX model does not compute what the PyTorch module computes."""


def _log(message: str) -> None:
    print(f"[export vision] {message}", flush=True)


def check_error(name: str, max_abs_error: float, reference_peak: float,
                rel_tolerance: float = ONNX_REL_TOLERANCE) -> float:
    """The bound for `name`'s error; raises OnnxMismatchError if the error exceeds it."""
    bound = rel_tolerance * max(1.0, reference_peak)
    if not max_abs_error <= bound:  # also catches NaN
        raise OnnxMismatchError(f"{name}: ONNX Runtime differs from PyTorch by {max_abs_error:.3g} "
                                f"(bound {bound:.3g} = {rel_tolerance:g} x max(1, peak |reference| "
                                f"{reference_peak:.3g}))")
    return bound


def _export_one(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    started = time.perf_counter()
    _log(f"exporting {path.name} (this traces the whole module; large towers take a minute) ...")
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=[input_name],
                      output_names=[output_name], dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET,
                      external_data=True, verbose=False)
    _log(f"exported {path.name} in {time.perf_counter() - started:.1f} s")


def _check_one(name: str, path: Path, module: nn.Module, inputs: list[torch.Tensor], input_name: str,
               rel_tolerance: float) -> dict[str, Any]:
    import onnxruntime  # only the export needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    max_abs_error, reference_peak = 0.0, 0.0
    for batch in inputs:
        with torch.inference_mode():
            reference = module(batch).numpy()
        (got,) = session.run(None, {input_name: batch.numpy()})
        if got.shape != reference.shape:
            raise OnnxMismatchError(f"{name}: ONNX output shape {got.shape} != PyTorch {reference.shape}")
        max_abs_error = max(max_abs_error, float(np.abs(got - reference).max()))
        reference_peak = max(reference_peak, float(np.abs(reference).max()))
    bound = check_error(name, max_abs_error, reference_peak, rel_tolerance)
    _log(f"{name}: ONNX vs PyTorch max abs error {max_abs_error:.3g} at batch sizes {list(CHECK_BATCH_SIZES)} "
         f"(bound {bound:.3g})")
    return {"onnx": path, "max_abs_error": max_abs_error, "bound": bound, "batch_sizes": list(CHECK_BATCH_SIZES)}


def export_onnx(encoder: vision.VisionEncoder, projector: vision.Projector, out_dir: Path, spec: ModelSpec,
                serving: ServingConfig, rel_tolerance: float = ONNX_REL_TOLERANCE) -> dict[str, dict[str, Any]]:
    """Write `vision_encoder.onnx` and `projector.onnx` (dynamic batch axis) and check each with ONNX Runtime.

    Both modules must be FP32 on the CPU (FP16 is TensorRT's job). Returns, per model name, the
    ONNX path, the max abs error against PyTorch, and its bound; raises OnnxMismatchError when an
    error exceeds its bound.
    """
    for module in (encoder, projector):
        parameter = next(module.parameters())
        if parameter.dtype != torch.float32 or parameter.device.type != "cpu":
            raise ValueError(f"export ONNX from FP32 CPU modules, got {parameter.dtype} on {parameter.device}")
    if (encoder.num_image_tokens, encoder.hidden_size) != vision.image_features_shape(spec):
        raise ValueError(f"the encoder gives {(encoder.num_image_tokens, encoder.hidden_size)} features per image, "
                         f"the spec says {vision.image_features_shape(spec)}")
    if serving.vision_max_batch_size < 1:
        raise ValueError("vision_max_batch_size must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.eval()
    projector.eval()

    generator = torch.Generator().manual_seed(0)
    pixel_batches = [torch.randn(size, *vision.pixel_values_shape(spec), generator=generator)
                     for size in (_EXAMPLE_BATCH_SIZE, *CHECK_BATCH_SIZES)]
    with torch.inference_mode():
        # The projector is checked on the encoder's real output rather than on noise.
        feature_batches = [encoder(batch) for batch in pixel_batches]

    encoder_path, projector_path = out_dir / f"{VISION_ENCODER}.onnx", out_dir / f"{PROJECTOR}.onnx"
    _export_one(encoder, pixel_batches[0], encoder_path, PIXEL_VALUES, IMAGE_FEATURES)
    _export_one(projector, feature_batches[0].clone(), projector_path, IMAGE_FEATURES, IMAGE_EMBEDS)
    _log("checking the ONNX models with ONNX Runtime (CPU) ...")
    return {
        VISION_ENCODER: _check_one(VISION_ENCODER, encoder_path, encoder, pixel_batches[1:], PIXEL_VALUES,
                                   rel_tolerance),
        PROJECTOR: _check_one(PROJECTOR, projector_path, projector, feature_batches[1:], IMAGE_FEATURES,
                              rel_tolerance),
    }


def _remove_other_engine(version_dir: Path, engine: str) -> None:
    """Drop this exporter's artifacts of the other engine, so a version directory holds one kind only."""
    for other, names in _ARTIFACTS.items():
        if other != engine:
            for name in names:
                (version_dir / name).unlink(missing_ok=True)


def export_vision(checkpoint_dir: Path, repo_dir: Path, work_dir: Path, spec: ModelSpec, serving: ServingConfig,
                  engine: str, onnx: bool = True) -> dict[str, Any]:
    """Export the vision encoder and projector of `checkpoint_dir` into the model repository `repo_dir`.

    Exports and checks ONNX in `work_dir` (the TensorRT engine needs it; `onnx=False` skips it for
    the PyTorch engine, e.g. to save minutes on a 7B checkpoint). Then `engine="pytorch"` writes each model's
    weights (in the checkpoint's dtype) and module config into `<repo_dir>/<name>/1/`, and
    `engine="tensorrt"` builds `<repo_dir>/<name>/1/model.plan` (FP16, inputs and outputs in the wire dtype).
    With projector_placement "language_model" the projector's weights and module config go to
    `<repo_dir>/language_model/1/projector/` instead, for either engine (the language model runs it).
    Returns the ONNX check results and the written artifacts per model.
    """
    from export import tensorrt  # lazy inside: it imports the `tensorrt` package only when building

    if engine not in _ARTIFACTS:
        raise ValueError(f"engine must be one of {sorted(_ARTIFACTS)}, got {engine!r}")
    if engine == "tensorrt" and not onnx:
        raise ValueError("the TensorRT engine is built from the ONNX export: onnx must be True")
    if engine == "tensorrt" and not tensorrt.tensorrt_available():
        raise tensorrt.TensorRTUnavailableError(tensorrt.UNAVAILABLE_MESSAGE)  # before the slow part
    repo_dir, work_dir = Path(repo_dir), Path(work_dir)
    started = time.perf_counter()
    _log(f"loading the vision tower and projector from {checkpoint_dir} ...")
    encoder, projector = load_from_checkpoint(checkpoint_dir, "cpu", torch.float32)
    onnx_results = export_onnx(encoder, projector, work_dir, spec, serving) if onnx else {}

    # With projector_placement "language_model" the projector's weights go to the language model
    # (PyTorch there, whatever the engine) and there is no projector model.
    in_language_model = serving.projector_in_language_model
    encoder_dir = repo_dir / VISION_ENCODER / "1"
    projector_dir = (repo_dir / LANGUAGE_MODEL / "1" / LANGUAGE_MODEL_PROJECTOR_DIR if in_language_model
                     else repo_dir / PROJECTOR / "1")
    for version_dir in (encoder_dir, projector_dir):
        version_dir.mkdir(parents=True, exist_ok=True)
    for version_dir in (encoder_dir,) if in_language_model else (encoder_dir, projector_dir):
        _remove_other_engine(version_dir, engine)
    # Stored as the checkpoint has them (FP16 for llava-1.5) and cast to serving.dtype at load.
    try:
        storage_dtype = resolve_dtype(spec.torch_dtype)
    except ValueError:
        storage_dtype = torch.float32
    if engine == "pytorch":
        _log(f"writing PyTorch serving weights ({storage_dtype}) ...")
        written = vision_artifacts.save_for_serving(encoder.to(storage_dtype), projector.to(storage_dtype),
                                                    encoder_dir, projector_dir)
        artifacts = {VISION_ENCODER: [p for p in written if p.parent == encoder_dir],
                     PROJECTOR: [p for p in written if p.parent == projector_dir]}
    else:
        opt_batch_size = max(serving.vision_preferred_batch_sizes, default=serving.vision_max_batch_size)
        artifacts = {}
        plans = [(VISION_ENCODER, PIXEL_VALUES, vision.pixel_values_shape(spec), encoder_dir)]
        if in_language_model:
            artifacts[PROJECTOR] = vision_artifacts.save_module(projector.to(storage_dtype), projector_dir)
        else:
            plans.append((PROJECTOR, IMAGE_FEATURES, vision.image_features_shape(spec), projector_dir))
        for name, input_name, item_shape, version_dir in plans:
            plan = tensorrt.build_engine(onnx_results[name]["onnx"], version_dir / "model.plan", input_name,
                                         item_shape, serving.vision_max_batch_size, fp16=True,
                                         opt_batch_size=opt_batch_size, io_dtype=wire_dtype(serving).name)
            artifacts[name] = [plan]
    _log(f"done in {time.perf_counter() - started:.1f} s ({engine})")
    return {"engine": engine, "onnx": onnx_results, "artifacts": artifacts}
