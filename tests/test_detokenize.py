"""Incremental detokenization and stop strings, with each tokenizer style (byte-level BPE and
Llama/SentencePiece with byte fallback): every delta is final, and the deltas joined equal
`tokenizer.decode(ids, skip_special_tokens=True)` for any id sequence."""

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_triton.detokenize import BYTE_FALLBACK_TOKENS, Detokenizer, TextStream
from llava_triton.spec import IMAGE_TOKEN
from llava_triton.testing.reference import TOKENIZER_PRESETS, hf_processor, preset_checkpoint

MODEL_VOCAB_SIZE = 1024  # the tiny presets' text_config.vocab_size: ids the model can emit


@functools.cache
def tokenizer_of(preset: str):
    return hf_processor(preset_checkpoint(preset)).tokenizer


@functools.cache
def detokenizer_of(preset: str) -> Detokenizer:
    return Detokenizer(tokenizer_of(preset))


def reference(preset: str, ids: list[int]) -> str:
    return tokenizer_of(preset).decode(ids, skip_special_tokens=True)


def stream(preset: str, ids: list[int], stop=()) -> tuple[list[str], TextStream]:
    text = TextStream(detokenizer_of(preset), stop)
    deltas = []
    for token_id in ids:
        deltas.append(text.push(token_id))
        if text.stopped:
            break
    deltas.append(text.finish())
    return deltas, text


def byte_ids(preset: str, data: bytes) -> list[int]:
    tokenizer = tokenizer_of(preset)
    return tokenizer.convert_tokens_to_ids([BYTE_FALLBACK_TOKENS[b] for b in data])


def word_id(preset: str, token: str) -> int:
    token_id = tokenizer_of(preset).convert_tokens_to_ids(token)
    assert token_id != tokenizer_of(preset).unk_token_id, token
    return token_id


def cut_at_stop(text: str, stop) -> str:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


@pytest.fixture(params=TOKENIZER_PRESETS)
def preset(request) -> str:
    return request.param


@pytest.mark.parametrize("text", ["hello world, how are you?", "héllo wörld — 世界 🙂 ok",
                                  "  spaces   and\nnewlines\t!", "日本語のテキスト", " leading and trailing  "])
def test_deltas_join_to_the_full_decode(preset, text):
    ids = tokenizer_of(preset)(text, add_special_tokens=False)["input_ids"]
    deltas, _ = stream(preset, ids)
    assert "".join(deltas) == reference(preset, ids)
    assert all("\ufffd" not in d for d in deltas)


def test_the_sentencepiece_preset_falls_back_to_bytes():
    """The constructed cases below need byte tokens in the vocabulary and text made of them."""
    tokenizer = tokenizer_of("tiny-sentencepiece")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("世界", add_special_tokens=False)["input_ids"])
    assert set(tokens) - {"▁"} <= set(BYTE_FALLBACK_TOKENS) and len(tokens) >= 6
    assert len(detokenizer_of("tiny-sentencepiece").byte_ids) == 256
    assert not detokenizer_of("tiny").byte_ids  # byte-level BPE: bytes are ordinary symbols


@pytest.mark.parametrize("run", [b"a\xe4", b"ab\xe4\xb8", b"\xe4\xb8\xadx\xff", b"\xf0\x9f\x99", b"\xe4\xb8\xad",
                                 b"ok\xc3\xa9"])
def test_byte_runs_are_held_until_they_end(run):
    """A valid run streamed at once would be rewritten when a later byte makes the run invalid
    (`<0x61>` is "a" alone, U+FFFD once `<0xE4>` follows)."""
    preset = "tiny-sentencepiece"
    word = word_id(preset, "▁the")
    pad = tokenizer_of(preset).convert_tokens_to_ids("<pad>")
    for ids in (byte_ids(preset, run) + [word], [word] + byte_ids(preset, run), byte_ids(preset, run),
                [word] + byte_ids(preset, run[:1]) + [pad, MODEL_VOCAB_SIZE - 1] + byte_ids(preset, run[1:]) + [word]):
        deltas, _ = stream(preset, ids)
        assert "".join(deltas) == reference(preset, ids), ids


def test_a_run_interrupted_by_a_skipped_id_is_still_one_run():
    preset = "tiny-sentencepiece"
    tokenizer = tokenizer_of(preset)
    ids = byte_ids(preset, b"a") + [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] + byte_ids(preset, b"\xe4") \
        + [word_id(preset, "▁the")]
    assert reference(preset, ids) == "\ufffd\ufffd the"
    text = TextStream(detokenizer_of(preset))
    assert [text.push(i) for i in ids] == ["", "", "", "\ufffd\ufffd the"]


def test_stop_string_is_cut_and_never_shown(preset):
    text = "the cat sat on the mat and the dog barked"
    ids = tokenizer_of(preset)(text, add_special_tokens=False)["input_ids"]
    deltas, result = stream(preset, ids, stop=["on the m", "zzz"])
    assert "".join(deltas) == "the cat sat "
    assert result.stopped and result.text == "the cat sat "
    assert all("on the" not in d for d in deltas)


@pytest.mark.parametrize("stop", [" sat", "t s", "世界", "é"])
def test_stop_strings_end_the_text_before_their_first_occurrence(preset, stop):
    """A stop string starting with a space, one spanning two tokens, and ones in other scripts."""
    text = "the cat sat, é 世界 and the cat sat 世界 é again"
    ids = tokenizer_of(preset)(text, add_special_tokens=False)["input_ids"]
    deltas, result = stream(preset, ids, stop=[stop])
    decoded = reference(preset, ids)
    assert "".join(deltas) == result.text == decoded[: decoded.index(stop)]


def test_text_that_only_looks_like_a_stop_string_is_released(preset):
    text = "abc ab abd"
    ids = tokenizer_of(preset)(text, add_special_tokens=False)["input_ids"]
    deltas, result = stream(preset, ids, stop=["abx"])
    assert "".join(deltas) == text and not result.stopped


def _id_sequences(preset: str):
    """Ids a model may emit, weighted toward the ones that break naive streaming: byte tokens,
    special tokens, ids past the tokenizer's vocabulary, and words."""
    tokenizer = tokenizer_of(preset)
    detokenizer = detokenizer_of(preset)
    specials = sorted(set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)})
    pools = [st.integers(0, MODEL_VOCAB_SIZE - 1), st.sampled_from(specials),
             st.sampled_from(tokenizer("the cat 世界 é ok\n", add_special_tokens=False)["input_ids"])]
    if detokenizer.byte_ids:
        pools.append(st.sampled_from(sorted(detokenizer.byte_ids)))
        pools.append(st.sampled_from(byte_ids(preset, "aé世🙂".encode())))
    return st.lists(st.one_of(*pools), max_size=24)


@pytest.mark.parametrize("preset_name", TOKENIZER_PRESETS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_id_sequence_streams_to_its_decode(preset_name, data):
    """Property: for every prefix of a random id sequence the deltas joined equal its decode, so no
    delta is ever taken back; with stop strings, the decode cut before the first occurrence."""
    ids = data.draw(_id_sequences(preset_name), label="ids")
    for end in range(len(ids) + 1):
        deltas, _ = stream(preset_name, ids[:end])
        assert "".join(deltas) == reference(preset_name, ids[:end])
    decoded = reference(preset_name, ids)
    if decoded:
        start = data.draw(st.integers(0, len(decoded) - 1), label="stop start")
        stop = [decoded[start: start + data.draw(st.integers(1, 4), label="stop length")], "\x00never"]
        deltas, _ = stream(preset_name, ids, stop)
        assert "".join(deltas) == cut_at_stop(decoded, stop)
