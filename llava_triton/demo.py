"""The newcomer's demo: serve an exported model repository and stream one answer.

    python -m llava_triton.demo --model-repository model_repository

Starts `tritonserver` on free ports, asks the `llava` ensemble about a picture through the
gRPC client (`python -m client`), prints the answer as it streams, then asks again through the
OpenAI-compatible endpoint (the frontend the launcher runs, on a free port) and prints its
answer, and stops both.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from llava_triton.frontend_process import FrontendProcess
from llava_triton.server import TritonServer, free_port
from llava_triton.triton_install import PROJECT_ROOT


def demo_image(path: Path) -> Path:
    """A small picture drawn here (no downloads): a red square and a blue ball on a gradient."""
    width, height = 336, 252
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 40, 140, 150), fill=(210, 40, 40))
    draw.ellipse((180, 80, 300, 200), fill=(40, 80, 220))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_triton.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--image", type=Path, default=None, help="default: a picture drawn by the demo")
    parser.add_argument("--prompt", default="What is in the picture?")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    from llava_triton.client import main as client_main

    image = args.image or demo_image(PROJECT_ROOT / "build" / "demo.jpg")
    log = PROJECT_ROOT / "build" / "demo-tritonserver.log"
    print(f"starting tritonserver on {args.model_repository} (log: {log}) ...", flush=True)
    with TritonServer(args.model_repository, log_path=log, ready_timeout_s=600) as server:
        print(f"server ready: gRPC {server.url_grpc}, HTTP {server.url_http}, metrics {server.url_metrics}")
        print(f"$ python -m client --image {image} --prompt {args.prompt!r} --url {server.url_grpc} "
              f"--max-tokens {args.max_tokens}", flush=True)
        code = client_main(["--image", str(image), "--prompt", args.prompt, "--url", server.url_grpc,
                            "--max-tokens", str(args.max_tokens)])
        with FrontendProcess(server.url_grpc, port=free_port(), host="127.0.0.1",
                             model_repository=args.model_repository,
                             log_path=PROJECT_ROOT / "build" / "demo-openai.log") as frontend:
            code = code or ask_openai(frontend.url, image, args.prompt, args.max_tokens)
    print("server stopped.")
    return code


def ask_openai(base_url: str, image: Path, prompt: str, max_tokens: int) -> int:
    """One chat completion through the OpenAI-compatible endpoint, the image as a data URL; printed as
    `curl` would show it."""
    import httpx

    body = {"model": "llava", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                   + base64.b64encode(image.read_bytes()).decode()}},
        {"type": "text", "text": prompt}]}]}
    print(f"$ curl {base_url}/chat/completions -d '{{\"model\": \"llava\", \"max_tokens\": {max_tokens}, "
          f"\"messages\": [{{\"role\": \"user\", \"content\": [{{\"type\": \"image_url\", ...}}, "
          f"{{\"type\": \"text\", \"text\": {json.dumps(prompt)}}}]}}]}}'", flush=True)
    response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=600)
    print(response.text, flush=True)
    return 0 if response.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
