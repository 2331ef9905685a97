"""What the decode graphs (llama.DecodeGraphs) and the vision graphs (vision.GraphedModule) share:
batch buckets, and capturing one static-shape call as a CUDA graph."""

from __future__ import annotations

from typing import Callable

import torch


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
