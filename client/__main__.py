"""Ask the served model about images from the command line; tokens print as they arrive.

    python -m client --image cat.jpg --prompt "<image>\\nWhat is in the picture?" --url localhost:8001

Exit status: 0 on success, 1 when the server refuses or fails the request (its message on
stderr), 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from client.api import DEFAULT_URL, LlavaClient, LlavaError
from llava_triton import spec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", required=True, help=f"the user message; {spec.IMAGE_TOKEN} marks each image")
    parser.add_argument("--image", action="append", default=[], type=Path, help="an image file (repeatable)")
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's gRPC address (default %(default)s)")
    parser.add_argument("--model", default=spec.ENSEMBLE, help="the model to call (default %(default)s)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print text as it is generated (default on)")
    # Unset sampling options are not sent: the server's defaults apply.
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", default=None, help="generate past EOS")
    parser.add_argument("--timeout", type=float, help="seconds the whole request may take")
    args = parser.parse_args(argv)
    for image in args.image:
        if not image.is_file():
            parser.error(f"image file not found: {image}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    first_token_s = None
    completion = None
    with LlavaClient(args.url, args.model) as client:
        try:
            for chunk in client.stream(args.prompt, args.image, max_tokens=args.max_tokens,
                                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                       seed=args.seed, stop=args.stop, stream=args.stream,
                                       ignore_eos=args.ignore_eos, timeout=args.timeout):
                if first_token_s is None:
                    first_token_s = time.perf_counter() - start
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                completion = chunk
        except LlavaError as error:
            sys.stdout.write("\n" if completion is not None else "")
            print(f"error: {error.message}", file=sys.stderr)
            return 1
    total_s = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    if completion is None:
        print("error: the server sent no output", file=sys.stderr)
        return 1
    generated = completion.completion_tokens
    rate = f", {generated / total_s:.1f} tokens/s" if total_s > 0 else ""
    print(f"prompt_tokens={completion.prompt_tokens} completion_tokens={generated} "
          f"finish_reason={completion.finish_reason or '?'} time_to_first_token={first_token_s:.3f}s "
          f"total={total_s:.3f}s{rate}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
