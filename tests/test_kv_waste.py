"""bench.kv_waste: the figures of the per-slot cache's waste (issue #17) add up."""

import pytest

from bench.kv_waste import LLAVA_15_7B, MISTRAL_7B, kv_waste, main

GIB = 2**30


def test_a_single_length_gives_the_figures_by_hand():
    # 100 prompt + 29 output tokens: 128 positions; slots of 4,096; blocks of 16 hold it exactly.
    w = kv_waste(LLAVA_15_7B, 64 * GIB, min_prompt=100, max_prompt=100, output=29)
    assert LLAVA_15_7B.bytes_per_position() == 512 * 1024  # 0.5 MiB a token in bfloat16
    assert (w.mean_used, w.slot_unused, w.block_unused) == (128, 1 - 128 / 4096, 0.0)
    assert w.slots_that_fit == 32 and w.blocks_mean_fit == w.blocks_longest_fit == 1024
    # One position more: a block of 16 holding 1.
    w = kv_waste(LLAVA_15_7B, 64 * GIB, min_prompt=101, max_prompt=101, output=29)
    assert w.block_unused == pytest.approx(1 - 129 / 144)


def test_the_mix_of_issue_17():
    mistral = kv_waste(MISTRAL_7B, 100 * GIB)
    assert MISTRAL_7B.bytes_per_position() * 32768 == 4 * GIB  # a slot of the whole context
    assert mistral.slot_unused > 0.9 and mistral.block_unused < 0.01
    assert mistral.slots_that_fit == 25 and mistral.blocks_mean_fit > 15 * mistral.slots_that_fit
    with pytest.raises(ValueError, match="do not fit a slot of 3000"):
        kv_waste(MISTRAL_7B, GIB, slot=3000)


def test_the_command_prints_the_table(capsys):
    assert main(["--kv-gib", "10"]) == 0
    out = capsys.readouterr().out
    assert "| LLaVA-NeXT-Mistral-7B (Mistral-7B) | 32,768 | 95.0% | 0.45% |" in out
