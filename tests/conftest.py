"""Shared fixtures: the embedded default checkpoint, an exported model repository, a real server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (llava_triton.decode_attention) run in Triton's interpreter on the
# CPU. Set before the kernels are defined: triton.jit reads it when it decorates them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BUILD = Path(__file__).resolve().parent.parent / "build"


@pytest.fixture
def fresh_dynamo():
    """Forget what torch.compile compiled in earlier tests. Every test compiles the same layer
    functions (for other models, devices and settings), and past torch._dynamo's recompile limit
    (8 per function) a fullgraph compile fails, which compile_model turns into eager layers."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The embedded default checkpoint, built once (reused across runs by its preset stamp)."""
    from llava_triton.testing.reference import tiny_checkpoint as build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def model_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    """The embedded default exported by the same code path as `make export` (PyTorch engine)."""
    from export.__main__ import main as export_main

    output = tmp_path_factory.mktemp("model_repository")
    work = tmp_path_factory.mktemp("export_work")
    assert export_main(["--model", str(tiny_checkpoint), "--output", str(output), "--work-dir", str(work),
                        "--engine", "pytorch", "--device", "cpu"]) == 0
    return output


@pytest.fixture(scope="session")
def triton_server(model_repository):
    """A real tritonserver on free ports serving the exported repository."""
    from llava_triton.server import TritonServer

    log_path = BUILD / "test-logs" / "tritonserver.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(model_repository, log_path=log_path, ready_timeout_s=300) as server:
        yield server


@pytest.fixture(scope="session")
def sentencepiece_checkpoint() -> Path:
    """The tiny model with the Llama/SentencePiece tokenizer of llava-hf's checkpoints."""
    from llava_triton.testing.reference import preset_checkpoint

    return preset_checkpoint("tiny-sentencepiece")


@pytest.fixture(scope="session")
def sentencepiece_server(sentencepiece_checkpoint, tmp_path_factory):
    """A second real tritonserver, serving `tiny-sentencepiece` exported by `make export`'s code path
    (without the ONNX copy of the vision models, which the first server's export already checks)."""
    from export.__main__ import main as export_main
    from llava_triton.server import TritonServer

    output = tmp_path_factory.mktemp("sentencepiece_repository")
    assert export_main(["--model", str(sentencepiece_checkpoint), "--output", str(output), "--work-dir",
                        str(tmp_path_factory.mktemp("sentencepiece_export_work")), "--engine", "pytorch",
                        "--device", "cpu", "--no-onnx"]) == 0
    log_path = BUILD / "test-logs" / "tritonserver-sentencepiece.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(output, log_path=log_path, ready_timeout_s=300) as server:
        yield server


@pytest.fixture()
def llava_client(triton_server):
    from client import LlavaClient

    with LlavaClient(triton_server.url_grpc) as client:
        yield client
