"""Where the language model's engine spends the host's time, phase by phase, and the GPU's time per decode step.

`Engine(..., profile=StepProfile(device))` times each phase of every step with `time.perf_counter`
and brackets each decode launch with CUDA events. The host phases of a step add up to its wall
time; with overlap_decode the GPU's decode work runs during them, so `decode_wait` (the host
blocked on the GPU's tokens) is the part of the step the host had nothing left to do. The default
`NullProfile` costs one attribute lookup and an empty `with` per phase.
"""

from __future__ import annotations

import contextlib
import time

import torch

PHASES = (
    "cancel",  # dropping cancelled and timed-out requests
    "admit",  # taking waiting requests into block-table rows
    "prefill",  # embedding prompts, the prefill chunk, its first tokens read back and handed out
    "decode_launch",  # a decode step's inputs, graph replay, sampling and the tokens' copy queued
    "decode_wait",  # the host blocked until a decode step's tokens are on the host
    "decode_emit",  # the tokens appended, detokenized, stop checks, responses handed to the outbox
    "occupancy",  # the occupancy gauges
)


class _Phase:
    __slots__ = ("profile", "name", "start")

    def __init__(self, profile: StepProfile, name: str):
        self.profile, self.name, self.start = profile, name, 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.profile.seconds[self.name] += time.perf_counter() - self.start


class NullProfile:
    """Profiling off."""

    _NOTHING = contextlib.nullcontext()

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return self._NOTHING

    def step(self) -> None:
        pass

    def decode_begin(self) -> None:
        return None

    def decode_end(self, begin, rows: int) -> None:
        pass


class StepProfile(NullProfile):
    """Host seconds per phase summed over steps; decode steps, their rows and their GPU time."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._phases = {name: _Phase(self, name) for name in PHASES}
        self.steps = 0
        self.decode_steps = 0
        self.decode_rows = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def phase(self, name: str) -> _Phase:
        return self._phases[name]

    def step(self) -> None:
        self.steps += 1

    def decode_begin(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def decode_end(self, begin: torch.cuda.Event | None, rows: int) -> None:
        self.decode_steps += 1
        self.decode_rows += rows
        if begin is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((begin, end))

    def gpu_decode_seconds(self) -> float | None:
        """The GPU's time from each decode launch's first queued work to its tokens' copy, summed
        (None on the CPU). Waits for the GPU."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return sum(begin.elapsed_time(end) for begin, end in self._events) / 1e3

    def summary(self) -> dict:
        """Per step and per decode step, in milliseconds."""
        host = sum(self.seconds.values())
        gpu = self.gpu_decode_seconds()
        per_decode = (lambda seconds: round(seconds / self.decode_steps * 1e3, 4)) if self.decode_steps else (
            lambda seconds: None)
        return {
            "steps": self.steps,
            "decode_steps": self.decode_steps,
            "decode_rows": self.decode_rows,
            "mean_decode_batch": round(self.decode_rows / self.decode_steps, 2) if self.decode_steps else None,
            "host_ms": {name: round(value * 1e3, 3) for name, value in self.seconds.items()},
            "host_ms_per_decode_step": {name: per_decode(value) for name, value in self.seconds.items()},
            "host_ms_total": round(host * 1e3, 3),
            "gpu_decode_ms_per_step": None if gpu is None else per_decode(gpu),
        }
