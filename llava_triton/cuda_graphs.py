"""What the language model and the vision models share on a GPU: batch buckets and capturing one
static-shape call as a CUDA graph (llama.DecodeGraphs, vision.GraphedModule), and compiling their
layers with an eager fallback."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (included even when it is not a power of two)."""
    return sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})


def bucket(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `value`; None past the largest."""
    return next((b for b in buckets if b >= value), None)


def capture(fn: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run `fn` twice on a side stream (allocator and kernel selection settle outside the graph),
    then capture it into `pool`: the graph and its static output tensor."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def compile_or_eager(module: Any, what: str, warm_up: Callable[[], Any]) -> bool:
    """`module.compile_layers()`, then `warm_up()` (in inference mode) to make the calls that compile
    them, before any CUDA graph capture. If that fails, `module.uncompile_layers()`: eager layers are
    slower but correct, so serve rather than fail to load. Returns whether compiled layers are used."""
    started = time.monotonic()
    module.compile_layers()
    try:
        with torch.inference_mode():
            warm_up()
    except Exception:  # noqa: BLE001
        log.exception("torch.compile of %s failed; running it eagerly", what)
        module.uncompile_layers()
        return False
    log.info("compiled %s in %.1f s", what, time.monotonic() - started)
    return True
