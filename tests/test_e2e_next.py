"""LLaVA-NeXT end to end: each tiny LLaVA-NeXT preset (a Llama and a Mistral decoder) exported by
`make export`'s code path, served by a real tritonserver and called over gRPC.

- Greedy ids and `prompt_tokens` equal `LlavaNextForConditionalGeneration.generate`'s and the
  processor's for images of every shape (square, landscape, portrait, a very wide strip, smaller than
  a tile, larger than the largest pinpoint), two images in one prompt, and no image.
- Concurrent requests whose images make different tile counts (batched together through the vision
  models) each still equal their reference.
- A request past a limit is refused by name and the server goes on serving.
"""

from __future__ import annotations

import concurrent.futures
import functools

import pytest

from client import LlavaClient
from llava_triton.anyres import tile_layout
from llava_triton.client import LlavaError
from llava_triton.spec import ModelSpec
from llava_triton.testing.reference import NEXT_PRESETS, REPO_ROOT, hf_generate, hf_inputs, preset_checkpoint
from tests.test_anyres import SHAPES, png

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
# Set on the served export, to check a limit end to end: one image makes at most 336 tokens here, and
# the largest shape 268 (so four of them, the most a request may send, are past it).
MAX_IMAGE_TOKENS = 900


@pytest.fixture(scope="module", params=NEXT_PRESETS)
def served(request, tmp_path_factory):
    """(its checkpoint, the gRPC URL of a server serving its export)."""
    from export.__main__ import main as export_main
    from llava_triton.server import TritonServer

    preset = request.param
    checkpoint = preset_checkpoint(preset)
    output = tmp_path_factory.mktemp(f"{preset}_repository")
    # The first preset with the vision models' ONNX copy (checked with onnxruntime) and the projector as its
    # own model; the second with the projector in the language model's step (it then packs the tiles of
    # the vision encoder's features, projected on its side).
    options = ["--set", "projector_placement=language_model", "--no-onnx"] if preset != NEXT_PRESETS[0] else []
    assert export_main(["--model", str(checkpoint), "--output", str(output), "--work-dir",
                        str(tmp_path_factory.mktemp(f"{preset}_work")), "--engine", "pytorch", "--device", "cpu",
                        "--set", f"max_image_tokens={MAX_IMAGE_TOKENS}", *options]) == 0
    log_path = REPO_ROOT / "build" / "test-logs" / f"tritonserver-{preset}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(output, log_path=log_path, ready_timeout_s=300) as server:
        yield checkpoint, server.url_grpc


@functools.cache
def image(shape: str, seed: int = 0) -> bytes:
    return png(*SHAPES[shape], seed)


CASES = {
    **{shape: ([shape], "What is in the picture?") for shape in SHAPES},
    "two images": (["landscape 4:3", "portrait"], "Compare <image> with <image>: which is brighter?"),
    "no image": ([], "Tell me a story about the sea."),
}


def ask(url: str, images: list[bytes], prompt: str, **options):
    with LlavaClient(url) as client:
        return client.generate(prompt, images, max_tokens=MAX_TOKENS, temperature=0.0, **options)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_ids_equal_transformers(served, case):
    checkpoint, url = served
    shapes, prompt = CASES[case]
    images = [image(shape, seed) for seed, shape in enumerate(shapes)]
    completion = ask(url, images, prompt)
    assert completion.token_ids == hf_generate(checkpoint, images, prompt, MAX_TOKENS)
    assert completion.prompt_tokens == len(hf_inputs(checkpoint, images, prompt)[0])


def test_concurrent_requests_with_different_tile_counts(served):
    checkpoint, url = served
    spec = ModelSpec.from_pretrained(checkpoint)
    requests = [([image(shape, seed)], f"Question {seed}: what do you see?")
                for seed, shape in enumerate(list(SHAPES) * 2)]
    tile_counts = {tile_layout(*reversed(SHAPES[shape]), spec).num_tiles for shape in SHAPES}
    assert len(tile_counts) >= 2  # the batches mix images of different tile counts
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        completions = list(pool.map(lambda r: ask(url, *r), requests))
    for (images, prompt), completion in zip(requests, completions):
        assert completion.token_ids == hf_generate(checkpoint, images, prompt, MAX_TOKENS)


def test_past_max_image_tokens_is_refused_and_the_server_goes_on(served):
    checkpoint, url = served
    images = [image("larger than the largest pinpoint", seed) for seed in range(4)]
    with pytest.raises(LlavaError, match=f"the limit of {MAX_IMAGE_TOKENS} per request "
                                                       r"\(max_image_tokens\)"):
        ask(url, images, "What are these?")
    shapes, prompt = CASES["square"]
    assert ask(url, [image(shapes[0])], prompt).token_ids == hf_generate(checkpoint, [image(shapes[0])], prompt,
                                                                         MAX_TOKENS)
