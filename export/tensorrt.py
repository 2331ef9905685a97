"""Build a TensorRT engine (`model.plan`) from an ONNX model, for Triton's `tensorrt_plan` platform.

Written against TensorRT 10's Python API. `tensorrt` is imported only inside these functions, so
nothing else needs it. A plan only runs on the TensorRT version (and GPU architecture) that built
it, so build it where Triton's TensorRT backend has the same TensorRT, e.g. in the matching NGC
container.

Precision: with `fp16=True` the network stays weakly typed and TensorRT may run any layer in FP16.
The engine's input and output take `io_dtype`, the ensemble's wire dtype (`spec.wire_dtype`: FP32,
or FP16 when the language model computes in half precision), so they match Triton's config; TensorRT
converts between them and the layers' precision (as trtexec's `--inputIOFormats=fp16:chw`).
Normalization layers are pinned to FP32 compute, since CLIP's hidden states have
outliers large enough to overflow FP16 in a variance. Expect FP16-level differences from the FP32
PyTorch path.

Never run: no TensorRT builder was available on any machine of ours (PyPI's `tensorrt` stubs have
none), so no plan has been built, loaded or compared. `python -m export --engine tensorrt` is opt-in
only; the default engine (and `auto`) is pytorch.
"""

from __future__ import annotations

from pathlib import Path

UNAVAILABLE_MESSAGE = ("TensorRT is not available here: building a plan needs the `tensorrt` Python package "
                       "(TensorRT 10, with its libraries) and a CUDA GPU. Export with --engine pytorch, or "
                       "run this export on a GPU machine with TensorRT 10, e.g. inside the tritonserver "
                       "NGC container whose TensorRT backend will load the plan.")


class TensorRTUnavailableError(RuntimeError):
    """Asked for a TensorRT engine where TensorRT or a CUDA GPU is missing."""


def _import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the Python package is there but its libraries are not
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None  # PyPI's stub packages have no builder


def tensorrt_available() -> bool:
    """True when the TensorRT builder imports and a CUDA GPU is present."""
    if _import_tensorrt() is None:
        return False
    import torch

    return torch.cuda.is_available()


IO_DTYPES = ("float32", "float16")


def build_engine(onnx_path: str | Path, plan_path: str | Path, input_name: str,
                 input_shape_without_batch: tuple[int, ...], max_batch_size: int, fp16: bool = True,
                 opt_batch_size: int | None = None, io_dtype: str = "float32") -> Path:
    """Parse `onnx_path`, build an engine for batch sizes 1..max_batch_size, and write it to `plan_path`.

    The optimization profile on `input_name` is min 1, opt `opt_batch_size` (default the max), max
    `max_batch_size`; it must cover the config's max_batch_size. The network's inputs and outputs take
    `io_dtype` ("float32" or "float16"). Raises TensorRTUnavailableError without TensorRT or a GPU,
    RuntimeError if parsing or building fails.
    """
    if io_dtype not in IO_DTYPES:
        raise ValueError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    if not tensorrt_available():
        raise TensorRTUnavailableError(UNAVAILABLE_MESSAGE)
    trt = _import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    opt_batch_size = max_batch_size if opt_batch_size is None else opt_batch_size
    if not 1 <= opt_batch_size <= max_batch_size:
        raise ValueError(f"need 1 <= opt_batch_size ({opt_batch_size}) <= max_batch_size ({max_batch_size})")
    item_shape = tuple(int(size) for size in input_shape_without_batch)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: always explicit batch, no creation flags needed
    parser = trt.OnnxParser(network, logger)
    print(f"[tensorrt] parsing {onnx_path} ...", flush=True)
    if not parser.parse_from_file(str(onnx_path)):  # also reads the external weights beside the file
        errors = "\n".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    # The ONNX model's inputs and outputs are FP32; TensorRT inserts the conversions to io_dtype.
    inputs = [network.get_input(index) for index in range(network.num_inputs)]
    outputs = [network.get_output(index) for index in range(network.num_outputs)]
    for tensor in inputs + outputs:
        tensor.dtype = trt.float16 if io_dtype == "float16" else trt.float32

    config = builder.create_builder_config()
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):  # removed in TensorRT 11 (strong typing only)
            raise RuntimeError("this TensorRT has no BuilderFlag.FP16 (TensorRT 11+); build with TensorRT 10 "
                               "or pass fp16=False")
        config.set_flag(trt.BuilderFlag.FP16)
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.__class__ = trt.INormalizationLayer  # get_layer returns the base ILayer
                layer.compute_precision = trt.float32

    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, *item_shape), (opt_batch_size, *item_shape), (max_batch_size, *item_shape))
    config.add_optimization_profile(profile)

    print(f"[tensorrt] building {plan_path} (batch 1..{max_batch_size}, opt {opt_batch_size}, "
          f"{'FP16' if fp16 else 'FP32'}, {io_dtype} inputs and outputs); this takes minutes ...", flush=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan_path, "wb") as plan:
        plan.write(serialized)
    print(f"[tensorrt] wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return plan_path
