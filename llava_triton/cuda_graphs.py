"""Every CUDA-graph runner: a call of a served model captured once per static shape and replayed.

The language model's decode steps (`DecodeGraphs`) and lone first prefill chunks (`PrefillGraphs`),
and the vision encoder's and projector's forward passes (`GraphedModule`), with the batch buckets
and the capture they share. Each runner takes a model that is ready to run (weights in their final
form, caches allocated, layers compiled: see llava_triton.torch_compile) and leaves its weights and
layers as they are; capturing runs the model, which writes the null KV-cache block only (the block
tables are all null blocks until the engine admits a request).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .llama import LlamaForCausalLM

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


# --- the language model ---------------------------------------------------------------------------

class DecodeGraphs:
    """`LlamaForCausalLM.decode` replayed from CUDA graphs, one per (batch, length) bucket.

    A decode step of a 7B model is a few hundred small kernels; launching them from Python
    costs about as much as running them. Captured once, a step is one graph launch. Shapes are
    static inside a graph, so the batch is padded to a bucket and attention spans a length bucket
    (keys past a row's position are masked, so the result does not depend on the bucket). The
    inputs are fixed tensors updated in place before each replay: the tokens, their positions and
    each row's block-table row (the tables themselves are the model's `block_tables`, written at
    admission). Padding rows are token 0 at position 0 of `padding_row`, whose table is all null
    blocks: their keys and values land in the null block, and they read one position.
    """

    def __init__(self, model: LlamaForCausalLM, max_batch: int, length_step: int = 256):
        self.model = model
        device = model.lm_head.weight.device
        self.batch_buckets = batch_buckets(max_batch)
        self.length_buckets = sorted({min(length_step * i, model.max_seq_len)
                                      for i in range(1, -(-model.max_seq_len // length_step) + 1)})
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.rows = torch.full((max_batch,), model.padding_row, dtype=torch.long, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture_all(self) -> None:
        for batch in self.batch_buckets:
            for length in self.length_buckets:
                self._capture(batch, length)

    def _capture(self, batch: int, length: int) -> None:
        ids, positions, rows = self.input_ids[:batch], self.positions[:batch], self.rows[:batch]
        self.graphs[(batch, length)] = capture(lambda: self.model.decode(ids, positions, rows, length), self.pool)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                 length: int) -> torch.Tensor:
        n = input_ids.shape[0]
        batch = bucket(n, self.batch_buckets)
        key = (batch, bucket(length, self.length_buckets))
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:batch].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:batch].zero_()
        self.rows[:n].copy_(rows)
        self.rows[n:batch].fill_(self.model.padding_row)
        if key not in self.graphs:
            self._capture(*key)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]


class PrefillGraphs:
    """`LlamaForCausalLM.prefill` replayed from CUDA graphs when the chunk is the first of a single
    sequence (a lone prompt: what time to first token waits for at low load), one graph per
    length bucket; any other chunk runs `prefill` as it is.

    Why: prefill launches a few kernels per layer from Python, and for a prompt of ~600 tokens
    that host time is as long as the GPU's (on the H100 a 7B prefill of 608 tokens took 14.7 ms
    on the GPU and 16.4 ms in all; with FP8 weights 11.1 against 21.0 ms). The chunk is padded
    with zeros to its bucket (see `prefill_first_chunk` for why padding is harmless); buckets are
    `step` tokens apart, so padding costs at most step - 1 tokens of GPU time. Chunks longer than
    MAX_TOKENS run eagerly: their GPU time exceeds the host's, which then stays ahead anyway, and
    each larger bucket would cost load time and graph memory for nothing.
    """

    MAX_TOKENS = 1024

    def __init__(self, model: LlamaForCausalLM, max_tokens: int, step: int = 64):
        self.model = model
        weight = model.lm_head.weight
        largest = min(max_tokens, model.max_seq_len, self.MAX_TOKENS)
        self.buckets = sorted({min(step * i, largest) for i in range(1, -(-largest // step) + 1)})
        self.embeds = torch.zeros(1, largest, model.config.hidden_size, device=weight.device, dtype=weight.dtype)
        self.row = torch.zeros(1, dtype=torch.long, device=weight.device)  # the sequence's block-table row
        self.last = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture_all(self) -> None:
        """Largest first, so the smaller graphs reuse its memory in the shared pool. The captures
        write through block-table row 0, all null blocks before serving (as the compile warm-up):
        call before serving."""
        for tokens in reversed(self.buckets):
            embeds = self.embeds[:, :tokens]
            self.graphs[tokens] = capture(
                lambda embeds=embeds: self.model.prefill_first_chunk(embeds, self.row, self.last), self.pool)

    def __call__(self, inputs_embeds: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        if len(segments) == 1 and segments[0][1] == 0:
            row, _, n = segments[0]
            tokens = bucket(n, self.buckets)
            if tokens is not None and n == inputs_embeds.shape[1]:
                self.embeds[:, :n].copy_(inputs_embeds)
                self.embeds[:, n:tokens].zero_()
                self.row.fill_(row)
                self.last.fill_(n - 1)
                graph, logits = self.graphs[tokens]
                graph.replay()
                return logits.clone()  # the graph's output is overwritten by its next replay
        return self.model.prefill(inputs_embeds, segments)


# --- the vision encoder and the projector ---------------------------------------------------------

class GraphedModule:
    """A module replayed from CUDA graphs, one per batch bucket (1, 2, 4, ... max_batch).

    CLIP ViT-L is ~25 kernels a layer; launched one by one from Python they cost more than they
    run at small batches (the H100 host took ~14 ms for one image eagerly). Captured once at
    load, a forward is one graph launch. The batch is padded up to its bucket: every row of the
    vision tower and the projector is computed independently of the others, so the padding
    rows (whatever an earlier batch left there) change nothing in the real ones.
    """

    def __init__(self, module: nn.Module, item_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 max_batch: int):
        self.module = module
        self.buckets = batch_buckets(max_batch)
        self.inputs = torch.zeros((max_batch, *item_shape), dtype=dtype, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        with torch.inference_mode():
            for batch in reversed(self.buckets):  # largest first: the smaller ones reuse its pool memory
                x = self.inputs[:batch]
                self.graphs[batch] = capture(lambda x=x: self.module(x), self.pool)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, *item_shape) on the device, in the module's dtype -> the module's output (n, ...), a view
        of the graph's output buffer (valid until the next call)."""
        n = x.shape[0]
        batch = bucket(n, self.buckets)
        if batch is None:
            return self.module(x)
        self.inputs[:n].copy_(x)
        graph, out = self.graphs[batch]
        graph.replay()
        return out[:n]


def maybe_graphed(module: nn.Module, item_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  max_batch: int, enabled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`GraphedModule` on a GPU when enabled; the module itself otherwise, or if capture fails."""
    if not enabled or device.type != "cuda":
        return module
    try:
        return GraphedModule(module, item_shape, dtype, device, max_batch)
    except Exception:  # noqa: BLE001 - eager is slower but correct: serve rather than fail to load
        log.exception("CUDA graph capture of %s failed; running it eagerly", type(module).__name__)
        torch.cuda.synchronize(device)
        return module
