"""Write a perf_analyzer `--input-data` JSON file for the `llava` ensemble.

The format (perf_analyzer's docs/input_data.md): `{"data": [entry, ...]}`, one entry per request,
used round-robin. Each entry maps an input name to `{"content": ..., "shape": [...]}`. BYTES
tensors are given as `{"b64": ...}` of their serialized form: each element a 4-byte little-endian
length followed by its bytes. Optional inputs that an entry leaves out are not sent.

    python -m client.perf_data --image cat.jpg --prompt "<image>\\nDescribe it." --max-tokens 64 \\
        --ignore-eos -o perf_input.json
    perf_analyzer -m llava -i grpc --streaming --input-data perf_input.json ...
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.api import SCALAR_DATATYPES
from llava_triton import spec

# Keyword names accepted in **sampling, mapped to the ensemble's input names.
SAMPLING_KEYS = {"temperature": spec.IN_TEMPERATURE, "top_p": spec.IN_TOP_P, "top_k": spec.IN_TOP_K,
                 "seed": spec.IN_SEED, "stream": spec.IN_STREAM, "ignore_eos": spec.IN_IGNORE_EOS}


def serialize_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """Triton's raw BYTES layout: <uint32 little-endian length><bytes> per element."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def _bytes_input(elements: Sequence[bytes]) -> dict[str, Any]:
    encoded = base64.b64encode(serialize_bytes_tensor(elements)).decode("ascii")
    return {"content": {"b64": encoded}, "shape": [len(elements)]}


def _scalar_input(name: str, value: Any) -> dict[str, Any]:
    datatype = SCALAR_DATATYPES[name]
    if datatype == "BOOL":
        value = bool(value)
    elif datatype.startswith("INT"):
        value = int(value)
    else:
        value = float(value)
    return {"content": [value], "shape": [1]}


def perf_input_entry(images: Sequence[bytes], prompt: str, max_tokens: int | None = None, *,
                     stop: Sequence[str] | str = (), **sampling: Any) -> dict[str, Any]:
    """One request: images (encoded bytes), the prompt, and only the options given."""
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling options {sorted(unknown)}; expected {sorted(SAMPLING_KEYS)}")
    entry: dict[str, Any] = {spec.IN_PROMPT: _bytes_input([prompt.encode("utf-8")])}
    if images:
        entry[spec.IN_IMAGES] = _bytes_input([bytes(image) for image in images])
    if max_tokens is not None:
        entry[spec.IN_MAX_TOKENS] = _scalar_input(spec.IN_MAX_TOKENS, max_tokens)
    for key, value in sampling.items():
        if value is not None:
            entry[SAMPLING_KEYS[key]] = _scalar_input(SAMPLING_KEYS[key], value)
    if isinstance(stop, str):
        stop = [stop]
    if stop:
        entry[spec.IN_STOP] = _bytes_input([s.encode("utf-8") for s in stop])
    return entry


def write_perf_entries(path: Path | str, entries: Sequence[dict[str, Any]]) -> Path:
    """Write several requests (from `perf_input_entry`), sent round-robin by perf_analyzer."""
    if not entries:
        raise ValueError("perf_analyzer needs at least one entry")
    path = Path(path)
    path.write_text(json.dumps({"data": list(entries)}) + "\n")
    return path


def write_perf_input(path: Path | str, images: Sequence[bytes], prompt: str, max_tokens: int | None = None,
                     **sampling: Any) -> Path:
    """Write an --input-data file with one request (sampling: temperature, top_p, top_k, seed, stop,
    stream, ignore_eos; unset ones are left to the server's defaults)."""
    return write_perf_entries(path, [perf_input_entry(images, prompt, max_tokens, **sampling)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.perf_data", description=__doc__.split("\n")[0])
    parser.add_argument("--image", action="append", default=[], type=Path, help="an image file (repeatable)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for one response per text chunk (default on)")
    parser.add_argument("--ignore-eos", action="store_true", default=None,
                        help="generate exactly --max-tokens tokens (fixed-length benchmarks)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    for image in args.image:
        if not image.is_file():
            parser.error(f"image file not found: {image}")
    path = write_perf_input(args.output, [image.read_bytes() for image in args.image], args.prompt,
                            args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, stop=args.stop, stream=args.stream, ignore_eos=args.ignore_eos)
    print(f"wrote {path} ({len(args.image)} image(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
