"""`python -m client`, the command line of the gRPC client for the `llava` ensemble, and
`python -m client.perf_data`. The client itself is `llava_triton.client`, re-exported here."""

from llava_triton.client import DEFAULT_URL, Chunk, Completion, LlavaClient, LlavaError, build_inputs

__all__ = ["DEFAULT_URL", "Chunk", "Completion", "LlavaClient", "LlavaError", "build_inputs"]
