"""How much KV-cache memory a per-slot cache leaves unused on a mix of prompt lengths, against the
block cache (issue #17). Computed, not measured: arithmetic over the mix, no model runs.

    python -m bench.kv_waste                      # the table of docs/performance.md
    python -m bench.kv_waste --kv-gib 100 --block-size 16 --min-prompt 50 --max-prompt 3000 --output 128

The mix: prompts of every length from --min-prompt to --max-prompt tokens, equally likely (so the
figures are exact expectations, not samples), each generating --output tokens. A request's keys
and values take prompt + output - 1 positions (the last token is never fed back).

* Per-slot cache (before): every request holds a slot of `slot` positions, the context length
  unless max_seq_len is set. Unused share = 1 - mean(positions used) / slot.
* Block cache (now): every request holds whole blocks for its positions (reserved at admission),
  so only the last block's tail is unused (internal fragmentation).
  Unused share = 1 - mean(positions used) / mean(positions in its blocks).

Requests that fit at once in --kv-gib of KV cache: before, the number of slots; now, the pool's
blocks over the mean blocks a request holds (a steady-state average; a batch of the longest
prompts only fits `at_most_longest`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from llava_triton.kv_blocks import blocks_needed


@dataclass(frozen=True)
class Architecture:
    """What sizes a language model's KV cache (the text_config fields)."""

    name: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int

    def bytes_per_position(self, element_size: int = 2) -> int:
        """Keys and values of one token position in every layer."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * element_size


# From the checkpoints' text_config: llava-hf/llava-1.5-7b-hf (Vicuna-7B, multi-head attention) and
# llava-hf/llava-v1.6-mistral-7b-hf (Mistral-7B, 8 key/value heads).
LLAVA_15_7B = Architecture("LLaVA-1.5-7B (Vicuna-7B)", 32, 32, 128, 4096)
MISTRAL_7B = Architecture("LLaVA-NeXT-Mistral-7B (Mistral-7B)", 32, 8, 128, 32768)


@dataclass(frozen=True)
class Waste:
    architecture: str
    slot: int  # positions per slot of the per-slot cache
    block_size: int
    mean_used: float  # positions a request's keys and values take, on average
    slot_unused: float  # share of the per-slot cache's memory unused
    block_unused: float  # share of the block cache's memory unused (the blocks' tails)
    slots_that_fit: int  # requests at once in kv_bytes, per-slot cache
    blocks_mean_fit: float  # requests at once in kv_bytes, block cache, on average over the mix
    blocks_longest_fit: int  # requests at once in kv_bytes, block cache, if every prompt is the longest


def kv_waste(architecture: Architecture, kv_bytes: int, slot: int | None = None, block_size: int = 16,
             min_prompt: int = 50, max_prompt: int = 3000, output: int = 128, element_size: int = 2) -> Waste:
    """The figures for one architecture; `slot` None: the context length (max_seq_len unset)."""
    slot = slot or architecture.max_position_embeddings
    if max_prompt + output > slot:
        raise ValueError(f"prompts of {max_prompt} tokens and {output} output tokens do not fit a slot of {slot}")
    used = [prompt + output - 1 for prompt in range(min_prompt, max_prompt + 1)]
    held = [blocks_needed(n, block_size) * block_size for n in used]
    mean_used, mean_held = sum(used) / len(used), sum(held) / len(held)
    per_position = architecture.bytes_per_position(element_size)
    pool_positions = kv_bytes // per_position
    return Waste(
        architecture=architecture.name, slot=slot, block_size=block_size, mean_used=mean_used,
        slot_unused=1 - mean_used / slot, block_unused=1 - mean_used / mean_held,
        slots_that_fit=kv_bytes // (slot * per_position),
        blocks_mean_fit=(pool_positions // block_size) / (mean_held / block_size),
        blocks_longest_fit=(pool_positions // block_size) // blocks_needed(max_prompt + output - 1, block_size))


def table(rows: list[Waste], kv_gib: float) -> str:
    lines = [f"| model | slot (positions) | KV memory unused, per-slot cache | KV memory unused, blocks of "
             f"{rows[0].block_size} | requests in {kv_gib:g} GiB, per-slot | requests in {kv_gib:g} GiB, "
             "blocks (mean mix / all longest) |",
             "|---|---:|---:|---:|---:|---:|"]
    for w in rows:
        lines.append(f"| {w.architecture} | {w.slot:,} | {w.slot_unused:.1%} | {w.block_unused:.2%} | "
                     f"{w.slots_that_fit:,} | {w.blocks_mean_fit:,.0f} / {w.blocks_longest_fit:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_waste", description=__doc__.split("\n")[0])
    parser.add_argument("--kv-gib", type=float, default=100.0, help="KV-cache memory")
    parser.add_argument("--block-size", type=int, default=16, help="positions per block (kv_block_size)")
    parser.add_argument("--min-prompt", type=int, default=50)
    parser.add_argument("--max-prompt", type=int, default=3000)
    parser.add_argument("--output", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--element-size", type=int, default=2, help="bytes per value: 2 bfloat16, 1 FP8")
    args = parser.parse_args(argv)
    kv_bytes = int(args.kv_gib * 2**30)
    common = dict(block_size=args.block_size, min_prompt=args.min_prompt, max_prompt=args.max_prompt,
                  output=args.output, element_size=args.element_size)
    # max_seq_len set to the smallest that holds the mix's longest request, for both models.
    shortest_slot = args.max_prompt + args.output
    rows = [kv_waste(arch, kv_bytes, slot, **common) for arch in (LLAVA_15_7B, MISTRAL_7B)
            for slot in (None, shortest_slot)]
    print(f"Prompts {args.min_prompt}..{args.max_prompt} tokens (uniform), {args.output} output tokens; "
          f"{args.element_size}-byte values; {args.kv_gib:g} GiB of KV cache. Mean positions a request "
          f"takes: {rows[0].mean_used:,.1f}.\n")
    print(table(rows, args.kv_gib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
