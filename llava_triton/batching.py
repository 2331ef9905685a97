"""Batching across requests for a model served as one module (the vision encoder, the projector): each
request's input checked on its own, every accepted one run in one forward pass, the output split back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from .errors import InvalidRequestError
from .spec import TRITON_TYPE_NAMES

_WIRE_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def concat_batches(batches: list[np.ndarray], out: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """Stack every request's batch along axis 0 (into `out` if given), with the sizes `split_batch` needs."""
    if not batches:
        raise ValueError("no batches to concatenate")
    return np.concatenate(batches, axis=0, out=out), [len(batch) for batch in batches]


def copy_rows(batches: list[np.ndarray], start: int, end: int, out: np.ndarray) -> None:
    """Rows start..end-1 of the batches stacked along axis 0 into `out` (end - start rows), without
    stacking the rest."""
    if not 0 <= start <= end <= sum(len(batch) for batch in batches) or len(out) != end - start:
        raise ValueError(f"rows {start}..{end} do not fit the batches or the {len(out)} rows of out")
    offset = filled = 0
    for batch in batches:
        low, high = max(start - offset, 0), min(end - offset, len(batch))
        if low < high:
            out[filled: filled + high - low] = batch[low:high]
            filled += high - low
        offset += len(batch)


def split_batch(batch: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Split a stacked batch back into one array per request (inverse of `concat_batches`)."""
    if sum(sizes) != len(batch):
        raise ValueError(f"sizes {sizes} do not add up to the batch of {len(batch)}")
    return [np.ascontiguousarray(part) for part in np.split(batch, np.cumsum(sizes)[:-1], axis=0)]


@dataclass
class BatchedModule:
    """One module behind a Triton model: checks each request's batch, runs them all in one forward.

    Inputs and outputs are in `wire_dtype` (`spec.wire_dtype`). Inputs holding NaN or infinities are
    refused per request: with an FP32 wire by numpy on the host; with an FP16 wire on the device
    after the upload, since numpy has no fast float16 path (isfinite on 32 images of pixel values:
    ~18 ms in float16 against ~2 ms in float32, on the 2-core CI machine).

    On a GPU a batch of more than PIPELINE_ROWS rows runs in chunks of that many, so that the host's
    copies overlap the GPU's work (`_forward_gpu`).
    """

    # Rows per chunk of a pipelined GPU batch: a power of two, so that each chunk replays a CUDA-graph
    # bucket (cuda_graphs.batch_buckets), and large enough that a chunk of CLIP images keeps the GPU's
    # GEMMs as full as a whole batch does (16 x 577 rows; at 8 the FP8 encoder's chunks ran less full
    # and its batch of 32 took longer pipelined than in one piece).
    PIPELINE_ROWS: ClassVar[int] = 16

    module: Callable[[torch.Tensor], torch.Tensor]  # the nn.Module, or its cuda_graphs.GraphedModule
    input_name: str
    output_name: str
    item_shape: tuple[int, ...]  # one item's input shape, batch axis excluded
    output_item_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype  # the module's compute dtype
    wire_dtype: np.dtype  # of the input and the output
    # On a GPU: the streams that upload a pipelined batch's chunks and download their outputs.
    _streams: tuple | None = field(default=None, init=False, repr=False)

    def check_input(self, array: np.ndarray | None) -> np.ndarray:
        """The request's input (n, *item_shape) in the wire dtype, or InvalidRequestError naming the problem.

        With an FP16 wire, NaN and infinities are refused later, by `forward`, on the device.
        """
        if array is None:
            raise InvalidRequestError(f"missing input {self.input_name!r}")
        if array.dtype != self.wire_dtype:
            raise InvalidRequestError(f"{self.input_name} must be {TRITON_TYPE_NAMES[self.wire_dtype]}, "
                                      f"got {array.dtype}")
        if array.ndim != len(self.item_shape) + 1 or tuple(array.shape[1:]) != self.item_shape:
            raise InvalidRequestError(f"{self.input_name} must have shape [n, {', '.join(map(str, self.item_shape))}], "
                                      f"got {list(array.shape)}")
        if self.wire_dtype == np.float32 and not np.isfinite(array).all():
            raise InvalidRequestError(self._not_finite_message())
        return array

    def _not_finite_message(self) -> str:
        return f"{self.input_name} contains NaN or infinite values"

    def forward(self, batches: list[np.ndarray]) -> list[np.ndarray | InvalidRequestError]:
        """One forward pass over every batch `check_input` passed: per batch, its output in the wire
        dtype, or (FP16 wire) InvalidRequestError if its input holds NaN or infinite values."""
        total = sum(len(batch) for batch in batches)
        if total == 0:
            return [np.zeros((0, *self.output_item_shape), self.wire_dtype) for _ in batches]
        sizes = [len(batch) for batch in batches]
        if self.device.type == "cuda" and total > self.PIPELINE_ROWS:
            host_outputs, finite_rows = self._forward_gpu(batches, total)
        else:
            host_outputs, finite_rows = self._forward_whole(batches, total)
        results: list[np.ndarray | InvalidRequestError] = split_batch(host_outputs.numpy(), sizes)  # views
        if finite_rows is not None:
            for index, rows in enumerate(split_batch(finite_rows, sizes)):
                if not rows.all():
                    results[index] = InvalidRequestError(self._not_finite_message())
        return results

    def _forward_whole(self, batches: list[np.ndarray], total: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """The batch in one forward: its outputs on the host in the wire dtype, and (FP16 wire) whether
        each row's input was finite."""
        wire = _WIRE_TORCH_DTYPES[self.wire_dtype]
        # On a GPU, stage through pinned host memory (PyTorch caches the blocks, so it is touched
        # memory): copying into fresh pageable memory costs more than the forward pass itself.
        pinned = self.device.type == "cuda"
        host_inputs = torch.empty((total, *self.item_shape), dtype=wire, pin_memory=pinned)
        concat_batches(batches, out=host_inputs.numpy())
        with torch.inference_mode():
            inputs = host_inputs.to(self.device, non_blocking=pinned)
            # FP16 wire: one finiteness flag per row, computed on the device and read after the
            # forward, so checking adds no sync. Non-finite rows go through the forward with the
            # others: every row is computed on its own (see cuda_graphs.GraphedModule), so they
            # change nothing in the others' outputs, and their requests are refused below.
            finite_rows = None if self.wire_dtype == np.float32 else torch.isfinite(inputs).flatten(1).all(1)
            # The upload stays in the wire dtype; the cast to the compute dtype runs on the device
            # (exact from FP16 to bfloat16 within FP16's range, see spec.wire_dtype).
            outputs = self.module(inputs.to(self.dtype))
            if pinned:
                host_outputs = torch.empty(outputs.shape, dtype=wire, pin_memory=True)
                # Cast to the wire dtype on the GPU, since a copy that also converts goes through
                # pageable memory. The copy waits for the GPU.
                host_outputs.copy_(outputs.to(wire))
            else:
                host_outputs = outputs.to(wire)
            if finite_rows is not None:
                finite_rows = finite_rows.cpu().numpy()  # (total,) bool: one small copy
        return host_outputs, finite_rows

    def _forward_gpu(self, batches: list[np.ndarray], total: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """`_forward_whole` in chunks of PIPELINE_ROWS rows on three streams: while the GPU computes
        chunk i, the host stages chunk i+1's rows into pinned memory and the copy engines upload it
        and bring chunk i-1's outputs back. In one piece, those host and bus copies of a batch of
        32 CLIP images (22 MB in, 38 MB out in FP16) come before and after its forward."""
        wire = _WIRE_TORCH_DTYPES[self.wire_dtype]
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        uploads, downloads = self._streams
        compute = torch.cuda.current_stream(self.device)
        host_inputs = torch.empty((total, *self.item_shape), dtype=wire, pin_memory=True)
        host_outputs = torch.empty((total, *self.output_item_shape), dtype=wire, pin_memory=True)
        staged = host_inputs.numpy()
        check = self.wire_dtype != np.float32  # FP16 wire: finiteness per row on the device (see forward)
        with torch.inference_mode():
            outputs = torch.empty((total, *self.output_item_shape), dtype=wire, device=self.device)
            finite = torch.ones(total, dtype=torch.bool, device=self.device)
            outputs.record_stream(downloads)  # read there after the last chunk; freed here at the end
            for start in range(0, total, self.PIPELINE_ROWS):
                end = min(start + self.PIPELINE_ROWS, total)
                copy_rows(batches, start, end, staged[start:end])
                with torch.cuda.stream(uploads):
                    inputs = host_inputs[start:end].to(self.device, non_blocking=True)
                compute.wait_stream(uploads)
                inputs.record_stream(compute)  # allocated on the upload stream, read on this one
                if check:
                    finite[start:end] = torch.isfinite(inputs).flatten(1).all(1)
                # Into this batch's own buffer: a graph's output is overwritten by its next replay.
                outputs[start:end].copy_(self.module(inputs.to(self.dtype)))
                downloads.wait_stream(compute)
                with torch.cuda.stream(downloads):
                    host_outputs[start:end].copy_(outputs[start:end], non_blocking=True)
            host_finite = None
            if check:
                host_finite = torch.empty(total, dtype=torch.bool, pin_memory=True)
                with torch.cuda.stream(downloads):
                    host_finite.copy_(finite, non_blocking=True)
            downloads.synchronize()
        return host_outputs, None if host_finite is None else host_finite.numpy()

    def run_requests(self, arrays: list[np.ndarray | None]) -> list[np.ndarray | InvalidRequestError]:
        """Per request, its output or the error that refused it; refused requests don't stop the others."""
        results: list[np.ndarray | InvalidRequestError] = []
        accepted: list[int] = []
        for index, array in enumerate(arrays):
            try:
                results.append(self.check_input(array))
                accepted.append(index)
            except InvalidRequestError as error:
                results.append(error)
        if accepted:
            outputs = self.forward([results[index] for index in accepted])
            for index, output in zip(accepted, outputs):
                results[index] = output
        return results

