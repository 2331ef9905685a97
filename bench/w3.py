"""Workload W3 with the prefix and embedding caches on and off, in one run: `python -m bench.w3`.

    python -m bench.w3                                   # the tiny preset on the CPU (LLaVA-1.5)
    python -m bench.w3 --preset tiny-next                # LLaVA-NeXT: W2's 1024x768 pictures
    python -m bench.w3 --checkpoint build/llava-1.5-7b-llava --export-arg=--device=cuda \\
        --export-arg=--dtype=bfloat16 --concurrency 1 8  # a GPU run

W3 (bench.workload): chats of --turns turns (4) about one picture, each turn the whole history (the
earlier questions and answers, the picture in the first user turn) and a new question, streamed,
the next turn sent when the answer ends; then --streams one-turn requests (32), all sent together,
asking different questions about --images pictures (4). Every picture is one the server has not seen
(the warm-up chat is about W1's picture), so turn 1 misses both caches and turns 2 to N find their
picture and history cached.

The checkpoint is exported twice, with the caches on (the serving defaults) and off (`--set
prefix_caching=false --set embedding_cache_bytes=0`); each repository is served in turn (tritonserver
started, warmed up, the chats at each --concurrency, the streams, stopped) and the cache counters read
from Triton's metrics around each scenario. Reported: per scenario and turn, TTFT p50 and p99 and
output tokens/s on against off, and the cached turns' TTFT p50 on / off against the target of 1/3.
Writes <out>/results.json and results.md.

Exit status: 0 when every check holds and the target is met; 1 when a request failed, a count is off
or the cache counters contradict the settings; 3 when only the TTFT target was missed (expected on a
CPU, and before the server has its caches).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import math
import os
import platform
import shlex
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bench.__main__ import (
    ROOT,
    Clock,
    cpu_model,
    export_repository,
    git_commit,
    gpu_name,
    print_report,
    serving_with,
    take_checkpoint,
)
from bench.report import NA, _fmt
from llava_triton import spec

DEFAULT_CONCURRENCY = (1,)
# The issue's target: a turn whose picture and history are cached starts (TTFT p50) at most a third as
# late as the same turn without the caches.
TARGET_CACHED_TTFT_RATIO = 1 / 3
TARGET_MISSED = 3  # the exit status when the target alone was missed
CACHES = {"on": [], "off": ["--set", "prefix_caching=false", "--set", "embedding_cache_bytes=0"]}
CACHE_COUNTERS = (spec.METRIC_PREFIX_QUERY_TOKENS, spec.METRIC_PREFIX_HIT_TOKENS, spec.METRIC_EMBEDDING_CACHE_HITS,
                  spec.METRIC_EMBEDDING_CACHE_MISSES, spec.METRIC_EMBEDDING_CACHE_EVICTIONS)
CACHE_GAUGES = (spec.METRIC_KV_CACHE_CACHED_BLOCKS, spec.METRIC_EMBEDDING_CACHE_BYTES)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from bench.workload import W3_INDEX_BITS, W3_MAX_TURNS

    parser = argparse.ArgumentParser(prog="python -m bench.w3", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Hugging Face LLaVA checkpoint; default: build --preset into build/<preset>-llava")
    parser.add_argument("--preset", default="tiny",
                        help="preset built when --checkpoint is not given (tiny-next: LLaVA-NeXT)")
    parser.add_argument("--export-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `python -m export`, both exports, repeatable "
                             "(--export-arg=--device=cuda); W3's last turn needs a max_seq_len of about the first "
                             "turn's prompt + turns x (output tokens + 50): 1,330 for LLaVA-1.5 with 4 turns of 128")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY),
                        help="chats run side by side, each level with pictures of its own")
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds of chats at each concurrency, one after the other, each with pictures of its "
                             "own; the turns of every round pooled (a p99 of fewer than 100 samples is about the "
                             "largest)")
    parser.add_argument("--turns", type=int, default=W3_MAX_TURNS, choices=range(2, W3_MAX_TURNS + 1),
                        help="turns a chat")
    parser.add_argument("--output-tokens", type=int, default=128, help="tokens generated a turn (ignore_eos)")
    parser.add_argument("--streams", type=int, default=32, help="one-turn requests sent together (0: none)")
    parser.add_argument("--images", type=int, default=4, help="pictures the streams ask about")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up chats about W1's picture (not reported)")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--server-timeout-s", type=float, default=900.0, help="wait this long for the server to load")
    parser.add_argument("--server-pythonpath", default=os.environ.get("STUB_PYTHONPATH"),
                        help="PYTHONPATH of the server alone (as python -m bench)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="with the caches on, start no new chat concurrency level once this much time has "
                             "passed since the start; the caches-off server runs the levels that ran, and both "
                             "run the streams")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench-w3",
                        help="output directory (the two model repositories too)")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be positive")
    args.concurrency = list(dict.fromkeys(args.concurrency))
    if args.output_tokens < 1 or args.rounds < 1 or args.images < 1 or args.warmup < 0 or args.streams < 0:
        parser.error("--output-tokens, --rounds and --images must be positive, --warmup and --streams at least 0")
    if sum(args.concurrency) * args.rounds + args.images > 2**W3_INDEX_BITS - 1:
        parser.error(f"W3 draws at most {2**W3_INDEX_BITS - 1} pictures: the chats' and the streams' together")
    return args


# --- the cache counters ------------------------------------------------------------------------------

def cache_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float | None]:
    """The caches' counters and gauges from Triton's metrics endpoint (`parse_cache_metrics`)."""
    return parse_cache_metrics(urllib.request.urlopen(url, timeout=timeout_s).read().decode())


def parse_cache_metrics(text: str) -> dict[str, float | None]:
    """The caches' counters and gauges in Prometheus text, each summed over its labels; None for one
    the text does not have (a server without the caches)."""
    from bench import server_stats

    values = server_stats.series(text, "llava_")
    result: dict[str, float | None] = {}
    for metric in (*CACHE_COUNTERS, *CACHE_GAUGES):
        found = [value for key, value in values.items() if key == metric.name or key.startswith(metric.name + "{")]
        result[metric.name] = sum(found) if found else None
    return result


def metric_deltas(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
    """The counters' increase over a scenario and the gauges at its end (None where absent)."""
    deltas = {metric.name: None if before[metric.name] is None or after[metric.name] is None
              else after[metric.name] - before[metric.name] for metric in CACHE_COUNTERS}
    deltas.update({metric.name: after[metric.name] for metric in CACHE_GAUGES})
    return deltas


# --- one server: warm-up, chats, streams ---------------------------------------------------------------

def turns_summary(rounds: list, turns: range) -> dict[str, Any]:
    """`summarize` of turns `turns` (1 = the first) of every chat of every round (ConversationsResults),
    its wall time (for tokens/s and requests/s) the time those turns took: in each round and for each of
    the turns, from the first of them sent to the last one ended, added up."""
    from bench.loadgen import LevelResult, summarize

    records, wall = [], 0.0
    for result in rounds:
        for turn in turns:
            level = result.level(turn)
            records += level.records
            wall += level.wall_s
    summary = summarize(LevelResult(len(rounds[0].conversations), "aio", records, 0.0, wall, 0.0))
    summary.pop("generator_cpu_percent")  # the rounds' CPU time is not these turns'
    return summary


def expected_prompt_tokens(checkpoint: Path, conversations: list, results: list) -> bool:
    """Whether the server's prompt count of every answered turn of `conversations` (run as `results`, one
    after the other) is what the server's preprocessing makes of its messages here (the whole history
    sent each turn, the answers as streamed)."""
    from bench.workload import prompt_tokens

    for conversation, record in zip(conversations, [c for result in results for c in result.conversations]):
        for turn, request in enumerate(record.turns):
            if request.error is None and request.prompt_tokens != prompt_tokens(checkpoint, conversation,
                                                                                 record.answers[:turn]):
                return False
    return True


def serve_and_measure(caches: str, repository: Path, checkpoint: Path, workload, levels: list[int], args,
                      out: Path, clock: Clock) -> dict[str, Any]:
    """Serve `repository`, warm up, run the chats at each of `levels` (the budget may cut the list, with
    the caches on) and the streams; per scenario the loadgen summaries, the cache counters and the answers."""
    from bench.loadgen import LevelResult, run_conversations, summarize
    from bench.workload import W3_QUESTIONS, Conversation, w1_image, w3_chats, w3_streams
    from llava_triton.server import TritonServer

    run: dict[str, Any] = {"caches": caches, "chats": [], "streams": None, "skipped_levels": []}
    answers: dict[str, list[list[str]]] = {}
    log_path = out / f"tritonserver-caches-{caches}.log"
    server = TritonServer(repository, log_path=log_path, ready_timeout_s=args.server_timeout_s)
    with serving_with(server, args.server_pythonpath):
        clock.log(f"caches {caches}: server ready on gRPC {server.url_grpc} (log: {log_path})")
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(server.url_grpc) as metadata_client:
            run["triton_server"] = metadata_client.get_server_metadata().version

        def converse(conversations: list[Conversation]):
            return run_conversations(server.url_grpc, conversations, max_tokens=workload.max_tokens,
                                     temperature=workload.temperature, ignore_eos=workload.ignore_eos,
                                     timeout_s=args.request_timeout_s)

        if args.warmup:
            warm = summarize(converse([Conversation(w1_image(*workload.image_size), W3_QUESTIONS[:args.turns])
                                       for _ in range(args.warmup)]).level())
            clock.log(f"caches {caches}: warm-up: {args.warmup} chat(s) about W1's picture, {warm['errors']} of "
                      f"{warm['requests']} turns failed")
            if warm["errors"]:
                raise SystemExit(f"warm-up requests failed: {warm['error_messages']}; see {log_path}")
        run["metrics_start"] = cache_metrics(server.url_metrics)

        first_image = 0
        for concurrency in args.concurrency:
            # Every round of every level has pictures of its own.
            rounds = [w3_chats(concurrency, args.turns, workload.image_size, first_image + concurrency * index)
                      for index in range(args.rounds)]
            first_image += concurrency * args.rounds
            if concurrency not in levels or (caches == "on" and clock.over_budget()):
                run["skipped_levels"].append(concurrency)
                continue
            before = cache_metrics(server.url_metrics)
            results = [converse(chats) for chats in rounds]
            chats = [chat for chats in rounds for chat in chats]
            every = [conversation for result in results for conversation in result.conversations]
            scenario = {"concurrency": concurrency, "rounds": args.rounds,
                        "all": summarize(LevelResult(concurrency, "aio", [r for c in every for r in c.turns], 0.0,
                                                     sum(result.wall_s for result in results),
                                                     sum(result.cpu_s for result in results))),
                        "turns": [{"turn": turn, **turns_summary(results, range(turn, turn + 1))}
                                  for turn in range(1, args.turns + 1)],
                        "cached_turns": turns_summary(results, range(2, args.turns + 1)),
                        "prompt_tokens_as_expected": expected_prompt_tokens(checkpoint, chats, results),
                        "metrics": metric_deltas(before, cache_metrics(server.url_metrics))}
            run["chats"].append(scenario)
            answers[f"chats c={concurrency}"] = [conversation.answers for conversation in every]
            clock.log(f"caches {caches}: {args.rounds} x {concurrency} chat(s): " + ", ".join(
                f"turn {t['turn']} TTFT p50 {t['ttft_ms']['p50']:.1f} ms" for t in scenario["turns"])
                + f"; {scenario['all']['errors']} of {scenario['all']['requests']} turns failed")

        if args.streams:
            streams = w3_streams(args.streams, args.images, workload.image_size, first_image)
            before = cache_metrics(server.url_metrics)
            result = converse(streams)
            run["streams"] = {"streams": args.streams, "images": args.images, **summarize(result.level()),
                              "prompt_tokens_as_expected": expected_prompt_tokens(checkpoint, streams, [result]),
                              "metrics": metric_deltas(before, cache_metrics(server.url_metrics))}
            answers["streams"] = [record.answers for record in result.conversations]
            level = run["streams"]
            clock.log(f"caches {caches}: {args.streams} streams about {args.images} pictures: TTFT p50 "
                      f"{level['ttft_ms']['p50']:.1f} ms, p99 {level['ttft_ms']['p99']:.1f} ms, "
                      f"{level['output_tokens_per_s']:.1f} tokens/s, {level['errors']} failed")
        run["metrics_end"] = cache_metrics(server.url_metrics)
    clock.log(f"caches {caches}: server stopped")
    run["answers"] = answers
    return run


# --- comparison, checks, report ------------------------------------------------------------------------

def ratio(on: float | None, off: float | None) -> float | None:
    """on / off, None unless both are finite and off is positive."""
    if on is None or off is None or not (math.isfinite(on) and math.isfinite(off)) or off <= 0:
        return None
    return round(on / off, 4)


def compare(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """Rows of on against off: per chat level and turn, the cached turns pooled, and the streams."""
    rows = []
    off_levels = {level["concurrency"]: level for level in off["chats"]}
    for level in on["chats"]:
        other = off_levels.get(level["concurrency"])
        if other is None:
            continue
        pairs = [(str(a["turn"]), a, b) for a, b in zip(level["turns"], other["turns"])]
        if len(level["turns"]) > 2:
            pairs.append((f"2-{len(level['turns'])}", level["cached_turns"], other["cached_turns"]))
        for turn, a, b in pairs:
            rows.append({"scenario": "chats", "concurrency": level["concurrency"], "turn": turn,
                         "cached": turn != "1", "requests": a["requests"], "prompt_tokens": a["prompt_tokens"],
                         "ttft_ms_on": a["ttft_ms"], "ttft_ms_off": b["ttft_ms"],
                         "output_tokens_per_s_on": a["output_tokens_per_s"],
                         "output_tokens_per_s_off": b["output_tokens_per_s"],
                         "ttft_p50_ratio": ratio(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
                         "ttft_p99_ratio": ratio(a["ttft_ms"]["p99"], b["ttft_ms"]["p99"])})
    if on["streams"] and off["streams"]:
        a, b = on["streams"], off["streams"]
        rows.append({"scenario": "streams", "concurrency": a["streams"], "turn": "1", "cached": False,
                     "requests": a["requests"], "prompt_tokens": a["prompt_tokens"],
                     "ttft_ms_on": a["ttft_ms"], "ttft_ms_off": b["ttft_ms"],
                     "output_tokens_per_s_on": a["output_tokens_per_s"],
                     "output_tokens_per_s_off": b["output_tokens_per_s"],
                     "ttft_p50_ratio": ratio(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
                     "ttft_p99_ratio": ratio(a["ttft_ms"]["p99"], b["ttft_ms"]["p99"])})
    return {"rows": rows}


def same_answers(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """How many turns were answered the same with the caches on and off (greedy: all of them, unless
    cached keys and values compute differently from a full prefill)."""
    same = total = 0
    for name, conversations in on["answers"].items():
        for answers_on, answers_off in zip(conversations, off["answers"].get(name, [])):
            for answer_on, answer_off in zip(answers_on, answers_off):
                total += 1
                same += answer_on == answer_off
    return {"same": same, "compared": total}


def checks(runs: dict[str, dict[str, Any]], comparison: dict[str, Any],
           max_tokens: int) -> tuple[dict[str, bool], list[str]]:
    """(checks, the names of those that are targets): counts that must hold, the cache counters against
    the settings where the server publishes them, and the TTFT target at each chat level."""
    scenarios = [scenario for run in runs.values() for scenario in [*run["chats"], run["streams"]] if scenario]
    summaries = [scenario.get("all", scenario) for scenario in scenarios]  # a chat level's turns together
    result = {
        "no_failed_requests": all(s["errors"] == 0 for s in summaries),
        "completion_tokens_equal_requests_x_output_tokens": all(
            s["completion_tokens"] == s["requests"] * max_tokens == s["reported_completion_tokens"]
            for s in summaries),
        "server_prompt_tokens_equal_the_history_sent": all(s["prompt_tokens_as_expected"] for s in scenarios),
    }
    off_end = runs["off"]["metrics_end"]
    hits = (spec.METRIC_PREFIX_HIT_TOKENS.name, spec.METRIC_EMBEDDING_CACHE_HITS.name)
    if any(off_end[name] is not None for name in hits):
        result["caches_off_no_cache_hits"] = all(not off_end[name] for name in hits)
    on_hits = [level["metrics"][spec.METRIC_PREFIX_HIT_TOKENS.name] for level in runs["on"]["chats"]]
    if on_hits and all(value is not None for value in on_hits):
        result["caches_on_prefix_cache_hits_in_chats"] = all(value > 0 for value in on_hits)
    targets = []
    for concurrency in dict.fromkeys(row["concurrency"] for row in comparison["rows"] if row["scenario"] == "chats"):
        ratios = [row["ttft_p50_ratio"] for row in comparison["rows"] if row["scenario"] == "chats"
                  and row["concurrency"] == concurrency and row["cached"] and row["turn"].isdigit()]
        name = f"cached_turns_ttft_p50_at_most_a_third_c{concurrency}"
        result[name] = all(value is not None and value <= TARGET_CACHED_TTFT_RATIO for value in ratios)
        targets.append(name)
    return result, targets


def _tokens(values: list[int]) -> str:
    return NA if not values else str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def markdown(results: dict[str, Any]) -> str:
    machine, on, off = results["machine"], results["runs"]["on"], results["runs"]["off"]
    serving = {caches: results["runs"][caches]["serving"] for caches in CACHES}
    lines = [f"# {results['workload']['name']}: the prefix and embedding caches on and off ({results['created']})", "",
             f"Machine: {machine['gpu'] or 'no GPU'}, {machine['cpu']} ({machine['cpu_count']} cores); Triton "
             f"{machine['triton_server']}; commit {machine['git_commit']}. Command: `{results['command']}`.", "",
             f"Checkpoint `{results['checkpoint']['path']}` ({results['checkpoint']['description']}), served with "
             f"{serving['on']['dtype']} on {serving['on']['device']}. Caches on: prefix_caching="
             f"{str(serving['on']['prefix_caching']).lower()}, embedding_cache_bytes="
             f"{serving['on']['embedding_cache_bytes']}; off: prefix_caching="
             f"{str(serving['off']['prefix_caching']).lower()}, embedding_cache_bytes="
             f"{serving['off']['embedding_cache_bytes']}.", "",
             f"Workload: {results['workload']['description']}. Chats: c side by side, each about a picture of its "
             "own that the server has not seen (turn 1), then the same picture with the history (turns 2 on), in "
             f"{results['settings']['rounds']} rounds one after the other, each with new pictures; "
             f"{results['settings']['warmup']} warm-up chat(s) about W1's picture excluded. Streams: "
             f"{results['settings']['streams']} one-turn requests sent together, each a different question about "
             f"one of {results['settings']['images']} pictures, once. Tokens/s: a turn's output tokens over the "
             "time from its first request sent to its last one ended, in each round, the rounds added.", "",
             "| scenario | c | turn | requests | prompt tokens | TTFT p50 on (ms) | TTFT p50 off (ms) | "
             "TTFT p99 on (ms) | TTFT p99 off (ms) | tokens/s on | tokens/s off | TTFT p50 on / off |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["comparison"]["rows"]:
        turn = f"{row['turn']} (cached)" if row["cached"] else row["turn"]
        if row["scenario"] == "chats" and row["turn"] == "1":
            turn += " (new picture)"
        lines.append(f"| {row['scenario']} | {row['concurrency']} | {turn} | {row['requests']} | "
                     f"{_tokens(row['prompt_tokens'])} | {_fmt(row['ttft_ms_on']['p50'])} | "
                     f"{_fmt(row['ttft_ms_off']['p50'])} | {_fmt(row['ttft_ms_on']['p99'])} | "
                     f"{_fmt(row['ttft_ms_off']['p99'])} | {_fmt(row['output_tokens_per_s_on'])} | "
                     f"{_fmt(row['output_tokens_per_s_off'])} | {_fmt(row['ttft_p50_ratio'], 3)} |")
    for skipped in on["skipped_levels"]:
        lines.append(f"| chats | {skipped} | not run: time budget of {results['settings']['time_budget_s']} s "
                     "spent | | | | | | | | | |")
    lines += ["", f"Target: every cached turn's TTFT p50 with the caches on at most {TARGET_CACHED_TTFT_RATIO:.3f} "
              "of the same turn's without them (the last column, turns 2 on)."]

    short = {spec.METRIC_PREFIX_QUERY_TOKENS.name: "prefix query tokens",
             spec.METRIC_PREFIX_HIT_TOKENS.name: "prefix hit tokens",
             spec.METRIC_EMBEDDING_CACHE_HITS.name: "embedding hits",
             spec.METRIC_EMBEDDING_CACHE_MISSES.name: "embedding misses",
             spec.METRIC_EMBEDDING_CACHE_EVICTIONS.name: "embedding evictions",
             spec.METRIC_KV_CACHE_CACHED_BLOCKS.name: "cached KV blocks at the end",
             spec.METRIC_EMBEDDING_CACHE_BYTES.name: "embedding cache bytes at the end"}
    lines += ["", "The caches' counters over each scenario (Triton's metrics; n/a: the server does not publish it):",
              "", "| caches | scenario | " + " | ".join(short.values()) + " |", "|---|---|" + "---:|" * len(short)]
    for caches, run in (("on", on), ("off", off)):
        scenarios = [(f"chats c={level['concurrency']}", level["metrics"]) for level in run["chats"]]
        if run["streams"]:
            scenarios.append((f"streams {run['streams']['streams']}", run["streams"]["metrics"]))
        for name, metrics in scenarios:
            lines.append(f"| {caches} | {name} | " + " | ".join(_fmt(metrics[key], 0) for key in short) + " |")
    same = results["same_answers"]
    lines += ["", f"Answers the same with the caches on and off: {same['same']} of {same['compared']} turns "
              "(greedy; a cached prefix may round differently from a full prefill)."]
    if results["notes"]:
        lines += ["", *[f"Note: {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    clock = Clock(args.time_budget_s)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from bench import report
    from bench.workload import w3
    from llava_triton.spec import read_spec

    checkpoint, description = take_checkpoint(args.checkpoint, args.preset, clock)
    workload = w3(checkpoint, args.output_tokens)
    clock.log(workload.describe())

    repositories = {caches: out / f"caches-{caches}" / "model_repository" for caches in CACHES}
    with concurrent.futures.ThreadPoolExecutor(len(CACHES)) as pool:  # the two exports side by side
        exports = [pool.submit(export_repository, checkpoint, repositories[caches],
                               ["--no-onnx", *args.export_arg, *options], out / f"export-caches-{caches}.log", clock)
                   for caches, options in CACHES.items()]
        for export in exports:
            export.result()
    servings = {caches: read_spec(repositories[caches] / spec.LANGUAGE_MODEL / "1")[1] for caches in CACHES}
    if not (servings["on"].prefix_caching and servings["on"].embedding_cache_bytes > 0):
        raise SystemExit("the caches-on export has a cache turned off: drop the --export-arg that turns it off")

    runs: dict[str, dict[str, Any]] = {}
    levels = list(args.concurrency)
    for caches in CACHES:
        runs[caches] = serve_and_measure(caches, repositories[caches], checkpoint, workload, levels, args, out, clock)
        runs[caches]["serving"] = servings[caches].to_dict()
        levels = [level["concurrency"] for level in runs[caches]["chats"]]  # caches off: those that ran

    notes = []
    if runs["on"]["skipped_levels"]:
        notes.append(f"time budget of {args.time_budget_s:.0f} s spent: chats at concurrency "
                     f"{', '.join(map(str, runs['on']['skipped_levels']))} not run")
    if all(value is None for value in runs["on"]["metrics_end"].values()):
        notes.append("the server publishes none of the caches' metrics: it predates the caches, so the on and off "
                     "runs served the same code")
    comparison = compare(runs["on"], runs["off"])
    results: dict[str, Any] = {
        "benchmark": f"llava-triton {workload.name}, the caches on and off",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.w3", *argv]),
        "machine": {"gpu": gpu_name(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "triton_server": runs["on"].get("triton_server"),
                    "git_commit": git_commit()},
        "checkpoint": {"path": str(checkpoint), "description": description},
        "workload": {"name": workload.name, "description": workload.describe(), "image_size": workload.image_size,
                     "tiles_per_image": workload.tiles_per_image, "question_tokens": workload.question_tokens,
                     "first_turn_prompt_tokens": workload.first_turn_prompt_tokens,
                     "max_tokens": workload.max_tokens, "ignore_eos": workload.ignore_eos,
                     "temperature": workload.temperature, "stream": True},
        "settings": {"concurrency": args.concurrency, "rounds": args.rounds, "turns": args.turns,
                     "streams": args.streams, "images": args.images, "warmup": args.warmup,
                     "time_budget_s": args.time_budget_s,
                     "server_pythonpath": args.server_pythonpath, "export_args": args.export_arg},
        "target": {"cached_turn_ttft_p50_ratio_at_most": round(TARGET_CACHED_TTFT_RATIO, 4)},
        "runs": {caches: {key: value for key, value in run.items() if key != "answers"}
                 for caches, run in runs.items()},
        "comparison": comparison,
        "same_answers": same_answers(runs["on"], runs["off"]),
        "notes": notes,
    }
    results["checks"], targets = checks(runs, comparison, workload.max_tokens)
    results["targets"] = targets
    results["elapsed_s"] = round(clock.elapsed, 1)

    report.write_json(out / "results.json", results)
    table = markdown(results)
    (out / "results.md").write_text(table)
    clock.log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    status = print_report(table, results["checks"])
    failed = [name for name, ok in results["checks"].items() if not ok]
    if failed and all(name in targets for name in failed):
        print(f"target missed (exit {TARGET_MISSED}): cached turns' TTFT p50 on / off above "
              f"{TARGET_CACHED_TTFT_RATIO:.3f}", file=sys.stderr)
        return TARGET_MISSED
    return status


if __name__ == "__main__":
    sys.exit(main())
