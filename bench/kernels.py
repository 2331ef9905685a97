"""The project's Triton kernels swept over their tilings at a model's decode shapes, on this GPU.

    python -m bench.kernels --out DIR [--preset llava-1.5-7b] [--jobs 12] [--quick] [--kernels attention gemv]

The two kernels a decode step spends its time in besides cuBLAS's GEMMs:
- decode attention (llava_triton.decode_attention) over one layer's block-pooled KV cache, in
  bfloat16 and FP8, at batch 1, 8, 32 and 128, each row's context drawn between --context-min and
  --max-seq-len (W1's: a 640-token prompt and 128 tokens out), for each tiling: positions per
  tile, warps, pipeline stages, the programs per SM that set the number of splits, and a softmax
  state per lane merged after the loop or one reduced at every tile (Tiling.deferred);
- the batch-1 GEMV (llava_triton.gemv) over one layer's fused projections and the lm_head,
  with FP8 weights (row scales) and bfloat16 ones, beside cuBLAS (F.linear) in bfloat16.

Each case is timed by triton.testing.do_bench, which flushes the L2 cache before every call, so a
layer's bytes come from HBM as they do in a decode step; its bytes over its time are set against
the HBM bandwidth (bench.limits). Each output is checked against a float32 reference. On a GPU,
--jobs worker processes compile every kernel first (into Triton's on-disk cache), so the timing
finds them built. results.json holds every case; results.md the fastest tilings, per shape and
summed over a decode step (the GEMVs weighted by how often a step runs each shape).

On the CPU (the tests) the kernels run in Triton's interpreter and the times are wall-clock times
of that interpreter: the sweep's mechanics, not figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

KERNELS = ("attention", "gemv")
BLOCK_SIZE = 16  # the KV cache's positions per block (ServingConfig.kv_block_size's default)
DTYPES = ("bfloat16", "fp8_e4m3")
BATCHES = (1, 8, 32, 128)
# Tilings swept. Full: what a decode step at 7B shapes could want; quick: one or two each (tests).
# (Tiles of 128 positions and 2 programs an SM were the slowest in every earlier sweep on the H200.)
ATTENTION_GRID = {"block": (16, 32, 64), "num_warps": (1, 2, 4), "num_stages": (1, 2, 3),
                  "programs_per_sm": (4, 8, 16), "deferred": (False, True)}
GEMV_GRID = {"block_n": (1, 2, 4, 8, 16), "block_k": (1024, 2048, 4096), "num_warps": (4, 8, 16),
             "num_stages": (2, 3, 4)}
QUICK_ATTENTION_GRID = {"block": (16, 32), "num_warps": (4,), "num_stages": (1,), "programs_per_sm": (4,),
                        "deferred": (False, True)}
QUICK_GEMV_GRID = {"block_n": (32,), "block_k": (64, 128), "num_warps": (2,), "num_stages": (1,)}
# Past this many float32 accumulators a program (BLOCK_N x BLOCK_K) spills registers: not swept.
GEMV_MAX_TILE = 32768
REFERENCE_TOLERANCE = 2e-2
ROTATION_BYTES = 256 * 2**20  # at least this many bytes between two reads of the same input
MAX_COPIES = 32  # largest |error| / largest |reference| a tiling may have


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llava-1.5-7b", help="the checkpoint preset whose shapes to use")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--max-seq-len", type=int, default=768)
    parser.add_argument("--context-min", type=int, default=640)
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                        help="processes compiling the kernels before the timing (GPU only; 0: none)")
    parser.add_argument("--quick", action="store_true", help="one or two tilings each (a check of the sweep)")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="which kernels to sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or not 1 <= args.context_min <= args.max_seq_len:
        parser.error("--batches must be positive and --context-min between 1 and --max-seq-len")
    return args


# --- cases ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttentionCase:
    cache_dtype: str
    batch: int
    block: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    deferred: bool = False

    def tiling(self) -> tuple:
        return (self.block, self.num_warps, self.num_stages, self.programs_per_sm, self.deferred)

    def kernel_tiling(self):
        from llava_triton.decode_attention import Tiling
        return Tiling(*self.tiling())


@dataclasses.dataclass(frozen=True)
class GemvCase:
    weight_dtype: str  # bfloat16 or fp8_e4m3 (the Triton GEMV), or cublas (F.linear in bfloat16)
    shape: str
    n: int
    k: int
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 0
    num_stages: int = 0

    def tiling(self) -> tuple:
        return (self.block_n, self.block_k, self.num_warps, self.num_stages)

    def kernel_tiling(self):
        from llava_triton.gemv import Tiling
        return Tiling(*self.tiling())


def text_shapes(text: dict[str, Any]) -> dict[str, Any]:
    """The decode-step shapes of a Llama-family text config: attention heads and each GEMV's (N, K)
    with how many times a step runs it."""
    from llava_triton.llama import LlamaConfig

    c = LlamaConfig.from_hf(text)  # the fields as the served model reads them (head_dim, GQA defaults)
    hidden, heads, kv_heads, head_dim = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    inter, layers = c.intermediate_size, c.num_hidden_layers
    return {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "gemv": {"qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden, layers),
                     "o_proj": (hidden, heads * head_dim, layers),
                     "gate_up_proj": (2 * inter, hidden, layers),
                     "down_proj": (hidden, inter, layers),
                     "lm_head": (c.vocab_size, hidden, 1)}}


def grid(values: dict[str, tuple]) -> list[dict[str, Any]]:
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def attention_cases(batches: list[int], tilings: dict[str, tuple]) -> list[AttentionCase]:
    return [AttentionCase(dtype, batch, **tiling) for dtype in DTYPES for tiling in grid(tilings) for batch in batches]


def gemv_cases(shapes: dict[str, tuple[int, int, int]], tilings: dict[str, tuple]) -> list[GemvCase]:
    cases = [GemvCase("cublas", name, n, k) for name, (n, k, _) in shapes.items()]
    for dtype, tiling, (name, (n, k, _)) in itertools.product(("bfloat16", "fp8_e4m3"), grid(tilings),
                                                              shapes.items()):
        if tiling["block_n"] * tiling["block_k"] <= GEMV_MAX_TILE:
            cases.append(GemvCase(dtype, name, n, k, **tiling))
    return cases


# --- inputs and runs ------------------------------------------------------------------------------

class Bench:
    """The inputs (built once per dtype and batch or shape) and a way to run and check each case.

    Each input holds `copies` of the bytes a call reads (a layer's KV cache, a weight), as many as
    make 256 MiB or more, and a timed call is one of each copy in turn, replayed from a CUDA graph:
    as in a decode step, every call's bytes come from HBM, not the L2 cache (50 MiB on an H200),
    and no launch gap sits between calls."""

    def __init__(self, shapes: dict[str, Any], max_seq_len: int, context_min: int, device, seed: int,
                 rotate: bool = True):
        import torch
        self.torch, self.shapes, self.device = torch, shapes, torch.device(device)
        self.max_seq_len, self.context_min, self.seed = max_seq_len, context_min, seed
        self.on_gpu = self.device.type == "cuda"
        self.rotate = rotate and self.on_gpu  # copies of each input (timing on a GPU), or one
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.on_gpu else 1
        self._inputs: dict[tuple, Any] = {}

    def _generator(self, *key: int):
        generator = self.torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 1_000_003 + hash(key) % 1_000_003)
        return generator

    def _copies(self, nbytes: int) -> int:
        return min(MAX_COPIES, max(1, math.ceil(ROTATION_BYTES / nbytes))) if self.rotate else 1

    def attention_inputs(self, cache_dtype: str, batch: int):
        key = ("attention", cache_dtype, batch)
        if key not in self._inputs:
            from llava_triton.kv_blocks import blocks_needed
            torch, s = self.torch, self.shapes
            g = self._generator(batch, DTYPES.index(cache_dtype))
            per_row = blocks_needed(self.max_seq_len, BLOCK_SIZE)
            pool = (batch * per_row + 1, s["num_kv_heads"], BLOCK_SIZE, s["head_dim"])
            dtype = torch.float8_e4m3fn if cache_dtype == "fp8_e4m3" else torch.bfloat16
            caches = [(torch.randn(pool, generator=g, device=self.device).to(dtype),
                       torch.randn(pool, generator=g, device=self.device).to(dtype))
                      for _ in range(self._copies(2 * math.prod(pool) * dtype.itemsize))]
            tables = torch.randperm(batch * per_row, generator=g, device=self.device)
            tables = tables.reshape(batch, per_row).to(torch.int32)
            lengths = torch.randint(self.context_min, self.max_seq_len + 1, (batch,), generator=g, device=self.device)
            q = torch.randn((batch, s["num_heads"], s["head_dim"]), generator=g, device=self.device).to(torch.bfloat16)
            reference = self._attention_reference(q, *caches[0], tables, lengths)
            cached_bytes = int(lengths.sum()) * s["num_kv_heads"] * s["head_dim"] * dtype.itemsize * 2
            self._inputs[key] = (q, caches, tables, lengths, reference, cached_bytes)
        return self._inputs[key]

    def _attention_reference(self, q, k_cache, v_cache, tables, lengths):
        """Float32 SDPA over each row's positions, gathered through its table, a few rows at a time."""
        import torch.nn.functional as F

        from llava_triton.llama import gather_blocks
        torch, out = self.torch, []
        for rows in torch.arange(q.shape[0], device=self.device).split(16):
            keys = gather_blocks(k_cache, tables[rows]).float()
            values = gather_blocks(v_cache, tables[rows]).float()
            mask = (torch.arange(keys.shape[2], device=self.device)[None] < lengths[rows][:, None])[:, None, None]
            out.append(F.scaled_dot_product_attention(q[rows].float()[:, :, None], keys, values, attn_mask=mask,
                                                      enable_gqa=q.shape[1] != k_cache.shape[1])[:, :, 0])
        return torch.cat(out)

    def gemv_inputs(self, weight_dtype: str, n: int, k: int):
        key = ("gemv", weight_dtype, n, k)
        if key not in self._inputs:
            from llava_triton.fp8 import quantize_rows
            torch = self.torch
            g = self._generator(n, k)
            x = torch.randn((1, k), generator=g, device=self.device).to(torch.bfloat16)
            weights = []
            for _ in range(self._copies(n * k * (1 if weight_dtype == "fp8_e4m3" else 2))):
                weight = (torch.randn((n, k), generator=g, device=self.device) * 0.02).to(torch.bfloat16)
                weights.append(quantize_rows(weight) if weight_dtype == "fp8_e4m3" else (weight, None))
            weight, scale = weights[0]
            dequantized = weight.float() * (1 if scale is None else scale[:, None])
            reference = x.float() @ dequantized.t()
            weight_bytes = weight.numel() * weight.element_size() + (0 if scale is None else scale.numel() * 4)
            self._inputs[key] = (x, weights, reference, weight_bytes)
        return self._inputs[key]

    def splits(self, case: AttentionCase) -> int:
        from llava_triton.decode_attention import num_splits
        return num_splits(case.batch, self.shapes["num_heads"], self.max_seq_len, self.num_sms, case.kernel_tiling())

    def runner(self, case):
        """(a call running the case on copy i of its inputs, the number of copies, copy 0's
        reference, the bytes a call reads)."""
        if isinstance(case, AttentionCase):
            from llava_triton.decode_attention import decode_attention
            q, caches, tables, lengths, reference, cached_bytes = self.attention_inputs(case.cache_dtype, case.batch)
            splits = self.splits(case)
            tiling = case.kernel_tiling()
            return (lambda i: decode_attention(q, *caches[i], tables, lengths, splits, tiling),
                    len(caches), reference, cached_bytes)
        dtype = "bfloat16" if case.weight_dtype == "cublas" else case.weight_dtype
        x, weights, reference, weight_bytes = self.gemv_inputs(dtype, case.n, case.k)
        if case.weight_dtype == "cublas":
            import torch.nn.functional as F
            return (lambda i: F.linear(x, weights[i][0])), len(weights), reference, weight_bytes
        from llava_triton.gemv import gemv
        tiling = case.kernel_tiling()
        return (lambda i: gemv(x, *weights[i], tiling)), len(weights), reference, weight_bytes

    def measure(self, case) -> dict[str, Any]:
        run, copies, reference, read_bytes = self.runner(case)
        try:
            out = run(0)
        except Exception as error:  # a tiling the compiler refuses (e.g. out of shared memory)
            return {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        error = float((out.float() - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
        us = self._time(run, copies) * 1e3
        return {"us": round(us, 2), "bytes": read_bytes, "gb_per_s": round(read_bytes / us / 1e3, 1),
                "relative_error": error}

    def _time(self, run, copies: int) -> float:
        """Median milliseconds a call."""
        if not self.on_gpu:
            start = time.perf_counter()  # the interpreter: one call, a time of no meaning but the mechanics'
            run(0)
            return (time.perf_counter() - start) * 1e3
        import triton.testing
        torch = self.torch
        for i in range(copies):  # outside the graph: allocator and any lazy set-up settle
            run(i)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(copies):
                run(i)
        return triton.testing.do_bench(graph.replay, warmup=5, rep=25, return_mode="median") / copies


def _compile(payload: tuple) -> int:
    """A worker: run each case once on small inputs of the same specialisation (Triton compiles it
    into its on-disk cache) → how many compiled."""
    shapes, max_seq_len, context_min, cases = payload
    bench = Bench(shapes, max_seq_len, context_min, "cuda", 0, rotate=False)  # compiling needs one copy
    done = 0
    for case in cases:
        try:
            if isinstance(case, AttentionCase):
                # Two rows: the same kernel (its split count is the case's batch's) on less memory.
                from llava_triton.decode_attention import decode_attention
                q, caches, tables, lengths, _, _ = bench.attention_inputs(case.cache_dtype, 2)
                decode_attention(q, *caches[0], tables, lengths, bench.splits(case), case.kernel_tiling())
            else:
                bench.runner(case)[0](0)
            done += 1
        except Exception:  # measured (and reported) by the timing process
            pass
    return done


def compile_all(bench: Bench, cases: list, jobs: int) -> None:
    """One case per distinct kernel specialisation, spread over `jobs` processes."""
    distinct: dict[tuple, Any] = {}
    for case in cases:
        if isinstance(case, AttentionCase):
            tiling = case.kernel_tiling()  # programs_per_sm only sets the splits
            distinct.setdefault(("attention", case.cache_dtype, bench.splits(case), tiling.block, tiling.num_warps,
                                 tiling.num_stages, tiling.deferred), case)
        elif case.weight_dtype != "cublas":
            distinct.setdefault(("gemv", case.weight_dtype, *case.tiling()), case)
    todo = list(distinct.values())
    chunks = [todo[i::jobs] for i in range(jobs)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs) as pool:
        pool.map(_compile, [(bench.shapes, bench.max_seq_len, bench.context_min, chunk) for chunk in chunks if chunk])


# --- summary --------------------------------------------------------------------------------------

def summarize(rows: list[dict[str, Any]], shapes: dict[str, Any], bandwidth_gbs: float | None) -> dict[str, Any]:
    """Per kernel and dtype, every tiling that ran correctly at every shape, fastest first: its
    time per shape and its total (attention: summed over the batches; GEMV: a decode step's, each
    shape times its count)."""
    counts = {name: count for name, (_, _, count) in shapes["gemv"].items()}
    by_tiling: dict[tuple, dict[Any, dict]] = defaultdict(dict)
    failed: set[tuple] = set()
    for row in rows:
        kind = row["kernel"]
        dtype = row["cache_dtype"] if kind == "attention" else row["weight_dtype"]
        key = (kind, dtype, tuple(row["tiling"]))
        if "us" not in row or row["relative_error"] > REFERENCE_TOLERANCE:
            failed.add(key)
            continue
        by_tiling[key][row["batch"] if kind == "attention" else row["shape"]] = row
    summary: dict[str, list] = defaultdict(list)
    for (kind, dtype, tiling), per_shape in by_tiling.items():
        if (kind, dtype, tiling) in failed:
            continue
        weights = {shape: counts[shape] if kind == "gemv" else 1 for shape in per_shape}
        total_us = sum(row["us"] * weights[shape] for shape, row in per_shape.items())
        total_bytes = sum(row["bytes"] * weights[shape] for shape, row in per_shape.items())
        gb_per_s = total_bytes / total_us / 1e3
        summary[f"{kind} {dtype}"].append({
            "tiling": list(tiling), "total_us": round(total_us, 1), "gb_per_s": round(gb_per_s, 1),
            "share_of_bandwidth": round(gb_per_s / bandwidth_gbs, 3) if bandwidth_gbs else None,
            "per_shape": {str(shape): {"us": row["us"], "gb_per_s": row["gb_per_s"]}
                          for shape, row in sorted(per_shape.items(), key=lambda item: (str(type(item[0])), item[0]))}})
    for entries in summary.values():
        entries.sort(key=lambda entry: entry["total_us"])
    return dict(summary)


TILING_NAMES = {"attention": "block, warps, stages, programs/SM, deferred", "gemv": "block_n, block_k, warps, stages"}


def markdown(result: dict[str, Any], current: dict[str, list]) -> str:
    lines = [f"# Kernel sweep: {result['device_name']}", "",
             f"{result['date']}, preset {result['preset']}, `{result['command']}`; HBM "
             f"{result['bandwidth_gbs']} GB/s. µs a call: medians of CUDA-graph replays, each call on its own copy "
             "of the inputs (256 MiB or more between two reads of one copy).", ""]
    for name, entries in result["summary"].items():
        kind = name.split()[0]
        shapes = list(entries[0]["per_shape"]) if entries else []
        lines += [f"## {name}", "", f"| tiling ({TILING_NAMES['gemv' if kind != 'attention' else kind]}) | "
                  + " | ".join(shapes) + " | total µs | GB/s | share of HBM |",
                  "|---|" + "---:|" * (len(shapes) + 3)]
        shown = entries[:8] + [e for e in entries[8:] if e["tiling"] == current.get(name)]
        for entry in shown:
            mark = " (current)" if entry["tiling"] == current.get(name) else ""
            share = entry["share_of_bandwidth"]
            lines.append(f"| {', '.join(map(str, entry['tiling']))}{mark} | "
                         + " | ".join(str(entry["per_shape"][s]["us"]) for s in shapes)
                         + f" | {entry['total_us']} | {entry['gb_per_s']} | "
                         + ("n/a" if share is None else f"{share:.0%}") + " |")
        lines.append("")
    return "\n".join(lines)


def current_tilings() -> dict[str, list]:
    """The tilings the kernels take by default (TILINGS, by bytes per value), as the sweep lists them."""
    from llava_triton import decode_attention, gemv
    current = {}
    for dtype, size in (("bfloat16", 2), ("fp8_e4m3", 1)):
        current[f"attention {dtype}"] = list(dataclasses.astuple(decode_attention.TILINGS[size]))
        current[f"gemv {dtype}"] = list(dataclasses.astuple(gemv.TILINGS[size]))
    return current


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.limits import GPU_BANDWIDTH_GBS, lookup
    from llava_triton.checkpoint import load_preset
    on_gpu = torch.cuda.is_available()
    shapes = text_shapes(load_preset(args.preset)["config"]["text_config"])
    bench = Bench(shapes, args.max_seq_len, args.context_min, "cuda" if on_gpu else "cpu", args.seed)
    cases = []
    if "attention" in args.kernels:
        cases += attention_cases(args.batches, QUICK_ATTENTION_GRID if args.quick else ATTENTION_GRID)
    if "gemv" in args.kernels:
        cases += gemv_cases(shapes["gemv"], QUICK_GEMV_GRID if args.quick else GEMV_GRID)
    started = time.time()
    if on_gpu and args.jobs > 0:
        compile_all(bench, cases, args.jobs)
    compiled_s = time.time() - started
    rows = []
    for case in cases:
        kind = "attention" if isinstance(case, AttentionCase) else "gemv"
        row = {"kernel": kind, **dataclasses.asdict(case), "tiling": list(case.tiling())}
        if kind == "attention":
            row["splits"] = bench.splits(case)
        rows.append({**row, **bench.measure(case)})
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (Triton's interpreter)"
    bandwidth = lookup(GPU_BANDWIDTH_GBS, device_name) if on_gpu else None
    result = {"device_name": device_name, "date": datetime.date.today().isoformat(), "preset": args.preset,
              "command": "python -m bench.kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
              "bandwidth_gbs": bandwidth, "compile_s": round(compiled_s, 1),
              "time_s": round(time.time() - started, 1), "shapes": shapes,
              "summary": summarize(rows, shapes, bandwidth), "cases": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(result, current_tilings()))
    for name, entries in result["summary"].items():
        best = entries[0] if entries else None
        print(f"{name}: fastest {best and best['tiling']} {best and best['total_us']} µs "
              f"({best and best['gb_per_s']} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
