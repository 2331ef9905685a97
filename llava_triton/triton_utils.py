"""Small pieces every Triton adapter (`model_repository/*/1/model.py`) shares.

Plain Python: `triton_python_backend_utils` exists only inside the server, so the adapters
pass it in where it is needed and the tests call these functions without a server.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidRequestError, ServerBusyError
from .spec import ModelSpec, ServingConfig, read_spec


def version_dir(args: dict[str, Any]) -> Path:
    """The model version directory Triton loaded (holds the weights and the spec file)."""
    return Path(args["model_repository"]) / str(args["model_version"])


def load_spec(args: dict[str, Any]) -> tuple[ModelSpec, ServingConfig]:
    return read_spec(version_dir(args))


def instance_device(args: dict[str, Any]) -> str:
    """The torch device of this model instance: the GPU Triton assigned it, or the CPU."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args['model_instance_device_id'])}"
    return "cpu"


def is_decoupled(args: dict[str, Any]) -> bool:
    config = json.loads(args["model_config"])
    return bool(config.get("model_transaction_policy", {}).get("decoupled", False))


def optional_inputs(pb_utils, request, names: Iterable[str]) -> dict[str, np.ndarray | None]:
    """The request's tensors by name; None for an optional input the client did not send."""
    values = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        values[name] = None if tensor is None else tensor.as_numpy()
    return values


def cache_salt(tensor: Any) -> bytes:
    """A request's cache_salt input (a Triton tensor, or None when not sent) as bytes; b"" when absent.
    Its length is checked against max_cache_salt_bytes by preprocess."""
    if tensor is None:
        return b""
    values = tensor.as_numpy().reshape(-1)
    if values.dtype != np.object_ or len(values) != 1:
        raise InvalidRequestError(f"cache_salt must be one BYTES element, got {values.dtype} [{len(values)}]")
    value = values[0]
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def freeze_loaded_objects() -> None:
    """Call at the end of `initialize`: move every object alive after loading out of the garbage
    collector's reach. torch.compile, transformers and the tokenizer leave a few hundred thousand
    long-lived objects, and a full collection walks all of them (about 0.2 s on the CI machine), a
    stall of every stream that happens to hit a decode step or a request. Collections then scan
    only what serving allocates."""
    gc.collect()
    gc.freeze()


def triton_error(pb_utils, exc: BaseException):
    """A TritonError whose code says whose fault it was: the client's, a full queue, or ours."""
    if isinstance(exc, InvalidRequestError):
        code, message = "INVALID_ARG", str(exc)
    elif isinstance(exc, ServerBusyError):
        code, message = "UNAVAILABLE", str(exc)
    else:
        code, message = "INTERNAL", f"internal error: {type(exc).__name__}: {exc}"
    code = getattr(pb_utils.TritonError, code, None)  # error codes exist from Triton 23.10 on
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def batched_model(pb_utils, serve):
    """A `TritonPythonModel` class for a model served by a `llava_triton.batching.BatchedModule`.

    `serve(version_dir, instance_kind, device_id)` builds the module once per instance; every
    request Triton's dynamic batcher hands over goes through one forward pass, and a request
    that fails validation gets its own error response while the others succeed.
    """

    class TritonPythonModel:
        def initialize(self, args):
            self.runner = serve(version_dir(args), args["model_instance_kind"], args["model_instance_device_id"])
            freeze_loaded_objects()

        def execute(self, requests):
            arrays = []
            for request in requests:
                tensor = pb_utils.get_input_tensor_by_name(request, self.runner.input_name)
                arrays.append(None if tensor is None else tensor.as_numpy())
            responses = []
            for result in self.runner.run_requests(arrays):
                if isinstance(result, Exception):
                    responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                                error=triton_error(pb_utils, result)))
                else:
                    responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.runner.output_name, result)]))
            return responses

    return TritonPythonModel
