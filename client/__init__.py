"""gRPC client for the `llava` ensemble: `LlavaClient`, and `python -m client` on the command line."""

from client.api import DEFAULT_URL, Chunk, Completion, LlavaClient, LlavaError, build_inputs

__all__ = ["DEFAULT_URL", "Chunk", "Completion", "LlavaClient", "LlavaError", "build_inputs"]
