import os, sys; sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
# ^ the stub ignores PYTHONPATH
# Triton adapter for preprocessing: image bytes + prompt or messages → input_ids + pixel_values
# (llava_triton.preprocess).

import numpy as np
import triton_python_backend_utils as pb_utils

from llava_triton import spec
from llava_triton.preprocess import Preprocessor, check_request_parameters, request_text
from llava_triton.sampling import SamplingParams
from llava_triton.triton_utils import freeze_loaded_objects, load_spec, optional_inputs, triton_error, version_dir


class TritonPythonModel:
    def initialize(self, args):
        self.model_spec, self.serving = load_spec(args)
        self.preprocessor = Preprocessor.from_pretrained(version_dir(args) / spec.PROCESSOR_DIR, self.model_spec,
                                                         self.serving)
        freeze_loaded_objects()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._preprocess(request))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
                responses.append(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)))
        return responses

    def _preprocess(self, request):
        check_request_parameters(request.parameters())
        inputs = optional_inputs(pb_utils, request, spec.REQUEST_INPUTS)
        prompt, messages = request_text(inputs[spec.IN_PROMPT], inputs[spec.IN_MESSAGES])
        images = [] if inputs[spec.IN_IMAGES] is None else list(inputs[spec.IN_IMAGES].reshape(-1))
        # Sampling values are checked here too, so a bad request is refused before any image work.
        params = SamplingParams.from_inputs(optional_inputs(pb_utils, request, spec.SAMPLING_INPUTS), self.serving)
        input_ids, pixel_values, image_sizes = self.preprocessor(images, prompt, messages=messages)
        params.resolve_max_tokens(len(input_ids), self.serving.token_limit(self.model_spec), self.serving)
        outputs = [
            pb_utils.Tensor(spec.INPUT_IDS, input_ids.astype(np.int64)),
            pb_utils.Tensor(spec.PIXEL_VALUES, pixel_values),  # already in spec.wire_dtype(self.serving)
        ]
        if self.model_spec.anyres:  # the language model packs each image's tiles by its size
            outputs.append(pb_utils.Tensor(spec.IMAGE_SIZES, image_sizes))
        return pb_utils.InferenceResponse(output_tensors=outputs)
