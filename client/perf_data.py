"""Write a perf_analyzer `--input-data` JSON file for the `llava` ensemble.

The format (perf_analyzer's docs/input_data.md): `{"data": [entry, ...]}`, one entry per request,
used round-robin. Each entry maps an input name to `{"content": ..., "shape": [...]}`. BYTES
tensors are given as `{"b64": ...}` of their serialized form: each element a 4-byte little-endian
length followed by its bytes. Inputs that an entry leaves out are not sent, so the server's
defaults apply (`stream` too: pass --stream for a response per token).

    python -m client.perf_data --image cat.jpg --prompt "<image>\\nDescribe it." --max-tokens 64 \\
        --stream --ignore-eos -o perf_input.json
    perf_analyzer -m llava -i grpc --streaming --input-data perf_input.json ...

The flags are the client's (llava_triton.client.add_input_arguments): one per input.
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

import numpy as np

from llava_triton.client import add_input_arguments, input_arrays, request_from_args


def serialize_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """Triton's raw BYTES layout: <uint32 little-endian length><bytes> per element."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def _entry_input(array: np.ndarray) -> dict[str, Any]:
    if array.dtype == np.object_:
        content: Any = {"b64": base64.b64encode(serialize_bytes_tensor(list(array))).decode("ascii")}
    else:
        content = array.tolist()
    return {"content": content, "shape": list(array.shape)}


def perf_input_entry(images: Sequence[bytes], prompt: str, max_tokens: int | None = None,
                     **options: Any) -> dict[str, Any]:
    """One request: images (encoded bytes), the prompt, and only the options given (spec.INPUTS by name)."""
    arrays = input_arrays(prompt, [bytes(image) for image in images], max_tokens=max_tokens, **options)
    return {name: _entry_input(array) for name, array in arrays.items()}


def write_perf_entries(path: Path | str, entries: Sequence[dict[str, Any]]) -> Path:
    """Write several requests (from `perf_input_entry`), sent round-robin by perf_analyzer."""
    if not entries:
        raise ValueError("perf_analyzer needs at least one entry")
    path = Path(path)
    path.write_text(json.dumps({"data": list(entries)}) + "\n")
    return path


def write_perf_input(path: Path | str, images: Sequence[bytes], prompt: str, max_tokens: int | None = None,
                     **options: Any) -> Path:
    """Write an --input-data file with one request (options: temperature, top_p, top_k, seed, stop,
    stream, ignore_eos; unset ones are left to the server's defaults)."""
    return write_perf_entries(path, [perf_input_entry(images, prompt, max_tokens, **options)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.perf_data", description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    prompt, images, options = request_from_args(parser, args)
    path = write_perf_input(args.output, [image.read_bytes() for image in images], prompt, **options)
    print(f"wrote {path} ({len(images)} image(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
