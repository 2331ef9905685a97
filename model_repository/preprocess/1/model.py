import os, sys; sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
# ^ the stub ignores PYTHONPATH
# Triton adapter for preprocessing: image (and video) bytes + prompt or messages → input_ids + pixel_values
# (llava_triton.preprocess).

import numpy as np
import triton_python_backend_utils as pb_utils

from llava_triton import spec
from llava_triton.embedding_cache import directory_name
from llava_triton.preprocess import (ImageCacheClient, Preprocessor, cache_fingerprint, check_request_parameters,
                                     request_text, video_sampling)
from llava_triton.sampling import SamplingParams
from llava_triton.triton_utils import (cache_salt, freeze_loaded_objects, load_spec, optional_inputs, triton_error,
                                      version_dir)
from llava_triton.video import transform_threads


class TritonPythonModel:
    def initialize(self, args):
        self.model_spec, self.serving = load_spec(args)
        if self.model_spec.videos:
            import torch

            torch.set_num_threads(transform_threads(self.serving.preprocess_instances))
        processor_dir = version_dir(args) / spec.PROCESSOR_DIR
        self.preprocessor = Preprocessor.from_pretrained(processor_dir, self.model_spec, self.serving)
        # The language model's caches: image keys and the embedding cache's directory (the language
        # model, a sibling process of this server, creates it under a name both derive alike).
        self.cache = None
        if self.serving.prefix_caching or self.serving.embedding_cache_bytes:
            self.cache = ImageCacheClient(directory_name(version_dir(args).parent.parent, os.getppid()),
                                          cache_fingerprint(self.model_spec, self.serving, processor_dir))
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
        videos = [] if inputs[spec.IN_VIDEOS] is None else list(inputs[spec.IN_VIDEOS].reshape(-1))
        num_frames, fps = video_sampling(inputs)
        # Sampling values are checked here too, so a bad request is refused before any image work.
        params = SamplingParams.from_inputs(optional_inputs(pb_utils, request, spec.SAMPLING_INPUTS), self.serving)
        salt = pb_utils.get_input_tensor_by_name(request, spec.IN_CACHE_SALT)
        prepared = self.preprocessor.prepare(images, prompt, messages=messages, cache=self.cache,
                                             cache_salt=cache_salt(salt), videos=videos, num_frames=num_frames,
                                             fps=fps)
        params.resolve_max_tokens(len(prepared.input_ids), self.serving.token_limit(self.model_spec), self.serving)
        outputs = [
            pb_utils.Tensor(spec.INPUT_IDS, prepared.input_ids.astype(np.int64)),
            pb_utils.Tensor(spec.PIXEL_VALUES, prepared.pixel_values),  # already in spec.wire_dtype(self.serving)
            pb_utils.Tensor(spec.IMAGE_KEYS, prepared.image_keys),
            pb_utils.Tensor(spec.IMAGE_CACHED, prepared.image_cached),
        ]
        if self.model_spec.anyres:  # the language model packs each image's tiles by its size
            outputs.append(pb_utils.Tensor(spec.IMAGE_SIZES, prepared.image_sizes))
        if self.model_spec.videos:  # the language model pools and places each video's frames
            outputs.append(pb_utils.Tensor(spec.VIDEO_FRAMES, prepared.video_frames))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self):
        if self.cache is not None:
            self.cache.close()
