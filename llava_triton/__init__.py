"""llava-triton: serve LLaVA-style vision-language models on NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
