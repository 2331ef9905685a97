"""Sampling parameters: parsing, validation and the sampler."""

import numpy as np
import pytest
import torch

from llava_triton import spec
from llava_triton.errors import InvalidRequestError
from llava_triton.sampling import SamplingParams, make_generator, sample
from llava_triton.spec import ServingConfig

SERVING = ServingConfig()


def parse(**inputs) -> SamplingParams:
    return SamplingParams.from_inputs(inputs, SERVING)


def test_defaults_come_from_serving_config():
    p = parse()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.stream, p.ignore_eos) == (
        None, SERVING.default_temperature, SERVING.default_top_p, SERVING.default_top_k, None, (), False, False)
    assert p.greedy


def test_defaults_are_the_contracts():
    """What a request that leaves an input out gets is what spec.INPUTS (and so docs/api.md) says."""
    serving = ServingConfig(default_temperature=0.7, default_top_p=0.5, default_top_k=9)
    p = SamplingParams.from_inputs({}, serving)
    default = {name: spec.INPUTS_BY_NAME[name].default_value(serving) for name in spec.SAMPLING_INPUTS}
    assert (p.temperature, p.top_k, p.seed, p.stop, p.stream, p.ignore_eos) == (
        default[spec.IN_TEMPERATURE], default[spec.IN_TOP_K], default[spec.IN_SEED], default[spec.IN_STOP],
        default[spec.IN_STREAM], default[spec.IN_IGNORE_EOS]) == (0.7, 9, None, (), False, False)
    assert p.top_p == default[spec.IN_TOP_P] == 0.5
    # max_tokens left out: default_max_tokens, cut to the room left in the context.
    assert default[spec.IN_MAX_TOKENS] == serving.default_max_tokens
    assert p.resolve_max_tokens(prompt_tokens=1, context_length=10_000, serving=serving) == serving.default_max_tokens
    assert p.resolve_max_tokens(prompt_tokens=90, context_length=100, serving=serving) == 10


def test_values_are_read():
    p = parse(max_tokens=np.array([7], np.int32), temperature=np.array([0.5], np.float32),
              top_p=np.array([0.9], np.float32), top_k=np.array([5], np.int32), seed=np.array([3], np.int64),
              stop=np.array([b"###", b"x"], dtype=object), stream=np.array([True]),
              ignore_eos=np.array([True]))
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop, p.stream, p.ignore_eos) == (
        7, 0.5, 5, 3, ("###", "x"), True, True)
    assert p.top_p == pytest.approx(0.9)


@pytest.mark.parametrize("inputs, message", [
    ({spec.IN_MAX_TOKENS: np.array([0], np.int32)}, "max_tokens must be at least 1, got 0"),
    ({spec.IN_MAX_TOKENS: np.array([-5], np.int32)}, "max_tokens must be at least 1"),
    ({spec.IN_MAX_TOKENS: np.array([1, 2], np.int32)}, "exactly one value"),
    ({spec.IN_MAX_TOKENS: np.array([1.5], np.float32)}, "max_tokens has dtype float32"),
    ({spec.IN_TEMPERATURE: np.array([-0.1], np.float32)}, "temperature must be"),
    ({spec.IN_TEMPERATURE: np.array([np.nan], np.float32)}, "temperature must be"),
    ({spec.IN_TEMPERATURE: np.array([np.inf], np.float32)}, "temperature must be"),
    ({spec.IN_TEMPERATURE: np.array([1e6], np.float32)}, "temperature must be"),
    ({spec.IN_TOP_P: np.array([1.5], np.float32)}, r"top_p must be in \(0, 1\]"),
    ({spec.IN_TOP_P: np.array([0.0], np.float32)}, r"top_p must be in \(0, 1\]"),
    ({spec.IN_TOP_K: np.array([-1], np.int32)}, "top_k must be 0"),
    ({spec.IN_SEED: np.array([-1], np.int64)}, "seed must be non-negative"),
    ({spec.IN_STOP: np.array([b""], dtype=object)}, "stop string 0 is empty"),
    ({spec.IN_STOP: np.array([b"\xff\xfe"], dtype=object)}, "not valid UTF-8"),
    ({spec.IN_STOP: np.array([b"x" * 1000], dtype=object)}, "more than the limit"),
    ({spec.IN_STOP: np.array([b"x"] * 100, dtype=object)}, "at most 16 stop strings"),
])
def test_absurd_values_are_refused_with_a_clear_message(inputs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams.from_inputs(inputs, SERVING)


def test_max_tokens_against_the_context():
    p = parse(max_tokens=np.array([10], np.int32))
    assert p.resolve_max_tokens(prompt_tokens=90, context_length=100, serving=SERVING) == 10
    with pytest.raises(InvalidRequestError, match="exceeds the context length of 100 \\(at most 9 new tokens fit\\)"):
        p.resolve_max_tokens(prompt_tokens=91, context_length=100, serving=SERVING)
    with pytest.raises(InvalidRequestError, match="leaves no room"):
        parse().resolve_max_tokens(prompt_tokens=100, context_length=100, serving=SERVING)
    assert parse().resolve_max_tokens(prompt_tokens=90, context_length=100, serving=SERVING) == 10
    assert parse().resolve_max_tokens(prompt_tokens=1, context_length=10_000,
                                      serving=SERVING) == SERVING.default_max_tokens


def test_sampler_greedy_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    greedy = parse()
    assert sample(logits, [greedy, greedy], [None, None]).tolist() == [1, 0]
    top1 = parse(temperature=np.array([1.0], np.float32), top_k=np.array([1], np.int32), seed=np.array([0]))
    assert sample(logits, [top1, top1], [make_generator(top1, torch.device("cpu"))] * 2).tolist() == [1, 0]
    # top_p small enough that only the most likely token survives.
    nucleus = parse(temperature=np.array([1.0], np.float32), top_p=np.array([0.01], np.float32), seed=np.array([0]))
    for _ in range(5):
        assert sample(logits, [nucleus, nucleus], [make_generator(nucleus, torch.device("cpu"))] * 2).tolist() == [1, 0]
    # Plain sampling reaches other tokens.
    hot = parse(temperature=np.array([5.0], np.float32), seed=np.array([1]))
    generator = make_generator(hot, torch.device("cpu"))
    seen = {sample(logits[:1], [hot], [generator]).item() for _ in range(50)}
    assert len(seen) > 1
