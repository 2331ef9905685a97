import os, sys; sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # the stub ignores PYTHONPATH
# Triton Python-backend adapter of the projector: image_features -> image_embeds.
#
# Only used when the export chose the PyTorch engine (otherwise the model is a TensorRT plan with the
# same name and tensors). The logic lives in `llava_triton.vision`.

from pathlib import Path

import triton_python_backend_utils as pb_utils

from llava_triton.errors import InvalidRequestError
from llava_triton.vision import serve_projector


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.runner = serve_projector(version_dir, args["model_instance_kind"], args["model_instance_device_id"])

    def execute(self, requests):
        arrays = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.runner.input_name)
            arrays.append(None if tensor is None else tensor.as_numpy())
        responses = []
        for result in self.runner.run_requests(arrays):  # one forward pass for every valid request
            if isinstance(result, InvalidRequestError):
                error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.runner.output_name, result)]))
        return responses
