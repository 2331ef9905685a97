"""Incremental detokenization and stop strings."""

import pytest
from transformers import AutoTokenizer

from llava_triton.detokenize import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("text", ["hello world, how are you?", "héllo wörld — 世界 🙂 ok", "  spaces   and\nnewlines\t!"])
def test_deltas_join_to_the_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_cut_and_never_shown(tokenizer):
    text = "the cat sat on the mat and the dog barked"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["on the m", "zzz"])
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    assert "".join(deltas) == "the cat sat "
    assert stream.stopped
    assert all("on the" not in d for d in deltas)


def test_text_that_only_looks_like_a_stop_string_is_released(tokenizer):
    text = "abc ab abd"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["abx"])
    out = "".join(stream.push(i) for i in ids) + stream.finish()
    assert out == text and not stream.stopped
