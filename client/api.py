"""Moved to `llava_triton.client`. Kept only for bench/loadgen.py and bench/soak.py, which import
`client.api` until they import `llava_triton.client`; delete this file then."""

from llava_triton.client import LlavaClient, LlavaError, build_inputs

__all__ = ["LlavaClient", "LlavaError", "build_inputs"]
