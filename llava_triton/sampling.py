"""Sampling parameters (parsed and validated from request tensors) and the batched sampler."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from . import spec
from .errors import InvalidRequestError
from .spec import ServingConfig

_MAX_TEMPERATURE = 100.0
_KIND_NAMES = {np.integer: "an integer type (INT32/INT64)", np.floating: "a float type (FP32)", np.bool_: "BOOL"}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None  # None: as many as the context allows, capped at default_max_tokens
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    ignore_eos: bool

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, np.ndarray | None], serving: ServingConfig) -> SamplingParams:
        """Build from the request's optional tensors (missing ones are None), refusing absurd values."""
        # Left out: None, which resolve_max_tokens turns into default_max_tokens or the room left, whichever
        # is less (an explicit value past the room is refused instead).
        max_tokens = scalar_input(inputs, spec.IN_MAX_TOKENS, np.integer)
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}")
        temperature = scalar_input(inputs, spec.IN_TEMPERATURE, np.floating,
                                   input_default(spec.IN_TEMPERATURE, serving))
        if not math.isfinite(temperature) or not 0.0 <= temperature <= _MAX_TEMPERATURE:
            raise InvalidRequestError(
                f"temperature must be a finite number in [0, {_MAX_TEMPERATURE:g}], got {temperature}")
        top_p = scalar_input(inputs, spec.IN_TOP_P, np.floating, input_default(spec.IN_TOP_P, serving))
        if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
        top_k = scalar_input(inputs, spec.IN_TOP_K, np.integer, input_default(spec.IN_TOP_K, serving))
        if top_k < 0:
            raise InvalidRequestError(f"top_k must be 0 (off) or positive, got {top_k}")
        seed = scalar_input(inputs, spec.IN_SEED, np.integer, input_default(spec.IN_SEED, serving))
        if seed is not None and seed < 0:
            raise InvalidRequestError(f"seed must be non-negative, got {seed}")
        return cls(
            max_tokens=None if max_tokens is None else int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            seed=None if seed is None else int(seed),
            stop=_stop_strings(inputs.get(spec.IN_STOP), serving),
            stream=bool(scalar_input(inputs, spec.IN_STREAM, np.bool_, input_default(spec.IN_STREAM, serving))),
            ignore_eos=bool(scalar_input(inputs, spec.IN_IGNORE_EOS, np.bool_,
                                         input_default(spec.IN_IGNORE_EOS, serving))),
        )

    def resolve_max_tokens(self, prompt_tokens: int, context_length: int, serving: ServingConfig) -> int:
        """The number of tokens to generate; refuses a request that cannot fit the context."""
        room = context_length - prompt_tokens
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {prompt_tokens} tokens, which leaves no room in the context length of "
                f"{context_length} (max_seq_len)")
        if self.max_tokens is None:
            return min(serving.default_max_tokens, room)
        if self.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens {self.max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the context length "
                f"of {context_length} (at most {room} new tokens fit), the limit set by max_seq_len")
        return self.max_tokens


def input_default(name: str, serving: ServingConfig):
    """What a request that leaves the input out gets (spec.INPUTS says)."""
    return spec.INPUTS_BY_NAME[name].default_value(serving)


def scalar_input(inputs, name, kind, default=None):
    value = inputs.get(name)
    if value is None:
        return default
    array = np.asarray(value)
    if array.size != 1:
        raise InvalidRequestError(f"{name} must hold exactly one value, got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, kind):
        raise InvalidRequestError(f"{name} has dtype {array.dtype}, expected {_KIND_NAMES[kind]}")
    return array.reshape(()).item()


def _stop_strings(value, serving: ServingConfig) -> tuple[str, ...]:
    if value is None:
        return ()
    items = np.asarray(value, dtype=object).reshape(-1)
    if len(items) > serving.max_stop_strings:
        raise InvalidRequestError(f"at most {serving.max_stop_strings} stop strings are allowed, got {len(items)} "
                                  "(max_stop_strings)")
    stops = []
    for i, item in enumerate(items):
        raw = item if isinstance(item, bytes) else str(item).encode()
        if not raw:
            raise InvalidRequestError(f"stop string {i} is empty")
        if len(raw) > serving.max_stop_string_bytes:
            raise InvalidRequestError(f"stop string {i} has {len(raw)} bytes, more than the limit of "
                                      f"{serving.max_stop_string_bytes} (max_stop_string_bytes)")
        try:
            stops.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequestError(f"stop string {i} is not valid UTF-8") from None
    return tuple(stops)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so a seeded request samples the same tokens whatever runs beside it."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits (B, V) float32 → next token ids (B,). Greedy rows take the argmax."""
    tokens = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        # (V,) in float64: a tiny temperature (1e-40 passes validation) must not overflow to inf,
        # which would make the probabilities NaN and fail every request of the batch.
        scores = logits[row].double() / p.temperature
        if p.top_k and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # Keep the smallest prefix whose probability reaches top_p (always the first token).
            drop = cumulative - sorted_scores.softmax(dim=-1) >= p.top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probs = scores.softmax(dim=-1)
        # NaN logits (a model fed non-finite embeddings) leave nothing to sample from: take the argmax
        # rather than fail the batch in torch.multinomial (chosen on the device: no host sync).
        greedy = torch.nn.functional.one_hot(tokens[row], probs.numel()).to(probs.dtype)
        probs = torch.where(torch.isfinite(probs).all(), probs, greedy)
        tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens
