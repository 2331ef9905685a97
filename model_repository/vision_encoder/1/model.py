import os, sys; sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
# ^ the stub ignores PYTHONPATH
# Triton Python-backend adapter of the vision encoder: pixel_values -> image_features.
#
# Only used when the export chose the PyTorch engine (otherwise the model is a TensorRT plan with the
# same name and tensors). The logic lives in `llava_triton.vision_serving`.

import triton_python_backend_utils as pb_utils

from llava_triton.triton_utils import batched_model
from llava_triton.vision_serving import serve_encoder

TritonPythonModel = batched_model(pb_utils, serve_encoder)
