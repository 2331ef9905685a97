"""End to end with each tokenizer style real checkpoints ship (byte-level BPE, Llama/SentencePiece
with byte fallback), each exported and served by a real tritonserver and called over gRPC:

- greedy ids and `prompt_tokens` equal transformers' for prompts with other scripts, emoji,
  accents, spaces, newlines and `<image>` tags anywhere;
- streamed text joined, the non-streamed text and `decode(ids)` are equal for every request,
  including answers with byte runs that are not valid UTF-8;
- stop strings end the text exactly before their first occurrence in the decoded text.
"""

from __future__ import annotations

import concurrent.futures
import functools

import pytest

from client import LlavaClient
from llava_triton.detokenize import BYTE_FALLBACK_TOKENS
from llava_triton.testing.reference import (
    IMAGES_FOR_PROMPTS,
    TOKENIZER_PRESETS,
    TOKENIZER_PROMPTS,
    hf_generate,
    hf_inputs,
    hf_processor,
    preset_checkpoint,
    varied_image,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16
LONG_ANSWER = 48  # tokens: long enough that most answers of the random models hold byte runs
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module", params=TOKENIZER_PRESETS)
def served(request):
    """(preset, its checkpoint, the gRPC URL of a server serving its export)."""
    server = request.getfixturevalue("triton_server" if request.param == "tiny" else "sentencepiece_server")
    return request.param, preset_checkpoint(request.param), server.url_grpc


@functools.cache
def tokenizer_of(checkpoint):
    return hf_processor(checkpoint).tokenizer


def decode(checkpoint, ids: list[int]) -> str:
    return tokenizer_of(checkpoint).decode(ids, skip_special_tokens=True)


def ask(url: str, prompt: str, images: list[bytes], **options):
    """(non-streamed completion, streamed chunks) of one request sent both ways."""
    with LlavaClient(url) as client:
        whole = client.generate(prompt, images, stream=False, **options)
        chunks = list(client.stream(prompt, images, stream=True, **options))
    return whole, chunks


def assert_text_consistent(checkpoint, whole, chunks) -> None:
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text == decode(checkpoint, whole.token_ids)


def invalid_byte_run(checkpoint, ids: list[int]) -> bool:
    """Whether the ids hold a run of byte-fallback tokens that is not valid UTF-8."""
    tokens = tokenizer_of(checkpoint).convert_ids_to_tokens(ids)
    runs, run = [], b""
    for token in tokens:
        if token in BYTE_FALLBACK_TOKENS:
            run += bytes([BYTE_FALLBACK_TOKENS.index(token)])
        elif token is not None and token not in tokenizer_of(checkpoint).all_special_tokens:
            runs.append(run)
            run = b""
    runs.append(run)
    for data in runs:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return True
    return False


@pytest.mark.parametrize("case", list(TOKENIZER_PROMPTS))
def test_greedy_ids_and_prompt_tokens_equal_transformers(served, case):
    _, checkpoint, url = served
    prompt, num_images = TOKENIZER_PROMPTS[case]
    images = IMAGES_FOR_PROMPTS[:num_images]
    expected = hf_generate(checkpoint, images, prompt, MAX_TOKENS)
    whole, chunks = ask(url, prompt, images, max_tokens=MAX_TOKENS, temperature=0.0)
    assert whole.token_ids == expected
    assert whole.prompt_tokens == len(hf_inputs(checkpoint, images, prompt)[0])
    assert_text_consistent(checkpoint, whole, chunks)


def test_streamed_text_is_final_with_invalid_byte_runs(served):
    """Twelve long answers, concurrently: the issue saw 5 of 12 streams rewritten with the
    Llama-style tokenizer. Each request's three texts must be equal."""
    preset, checkpoint, url = served

    def one(seed: int):
        return ask(url, QUESTION, [varied_image(seed)], max_tokens=LONG_ANSWER, ignore_eos=True)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(12)))
    for whole, chunks in results:
        assert len(whole.token_ids) == LONG_ANSWER
        assert_text_consistent(checkpoint, whole, chunks)
    if preset == "tiny-sentencepiece":  # the case the test is for must occur
        assert sum(invalid_byte_run(checkpoint, whole.token_ids) for whole, _ in results) >= 3


def _two_token_stop(checkpoint, ids: list[int], text: str) -> str:
    """The last character of one token's text and the first of the next one's."""
    for k in range(len(ids) // 2, len(ids)):
        head = decode(checkpoint, ids[:k])
        if text.startswith(head) and 0 < len(head) < len(text) and not head[-1].isspace() and head[-1] != "\ufffd":
            return text[len(head) - 1: len(head) + 1]
    raise AssertionError("no two-token boundary found")


def test_stop_strings_end_the_text_before_their_first_occurrence(served):
    """Stop strings taken from the unconstrained answer: one starting with a space, one spanning
    two tokens, and non-Latin ones (U+FFFD, which undecodable byte runs give, and one that never
    occurs)."""
    _, checkpoint, url = served
    images = [varied_image(3)]
    full, _ = ask(url, QUESTION, images, max_tokens=LONG_ANSWER, ignore_eos=True)
    text = full.text
    space_word = text[text.index(" ", 1): text.index(" ", 1) + 4]
    stops = {
        "starts with a space": [space_word],
        "spans two tokens": [_two_token_stop(checkpoint, full.token_ids, text)],
        "non-Latin, occurs": ["\ufffd"],
        "non-Latin, never occurs": ["世界", "Привет"],
    }
    assert space_word.startswith(" ") and len(space_word.strip()) > 0
    assert "\ufffd" in text, "the seeded answer should hold an undecodable byte"
    for name, stop in stops.items():
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        expected = text[: min(hits)] if hits else text
        whole, chunks = ask(url, QUESTION, images, max_tokens=LONG_ANSWER, ignore_eos=True, stop=stop)
        assert whole.text == expected, name
        assert "".join(c.text for c in chunks) == expected, name
        assert whole.token_ids == full.token_ids[: len(whole.token_ids)], name
        assert whole.finish_reason == ("stop" if hits else "length"), name
