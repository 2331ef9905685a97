"""What the local server and the Kubernetes deployment must agree on: ports, probe paths, flags.

`llava_triton.server` starts `tritonserver` with `server_args`; the Helm chart in
`helm/llava-triton` runs the same launcher inside the serving image (`Dockerfile`), with the same
ports and probe paths. `tests/test_helm.py` renders the chart and checks it against these
values, and starts the real `tritonserver` with the rendered arguments.
"""

from __future__ import annotations

from pathlib import PurePosixPath

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
OPENAI_PORT = 9000  # the OpenAI-compatible frontend (llava_triton.openai_frontend); the launcher's --openai-port
PORTS = {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}  # Service/container port names

LIVE_PATH = "/v2/health/live"  # 200 once the endpoints are up (after the models loaded)
READY_PATH = "/v2/health/ready"  # 200 while every model is ready (--strict-readiness=true)
METRICS_PATH = "/metrics"
# The OpenAI frontend's probes, on its own port: live while its process serves HTTP, ready while Triton's
# `llava` ensemble is ready (asked over gRPC at each probe).
OPENAI_LIVE_PATH = "/health/live"
OPENAI_READY_PATH = "/health/ready"

EXIT_TIMEOUT_S = 10  # how long tritonserver lets in-flight requests finish after SIGTERM

# tritonserver's gRPC frontend keeps this many finished calls' states for reuse (default 8), each
# with the request protobuf of the call it served, whose input buffers keep their largest size
# (a 20 MB image, a 1 MB prompt). Triton 2.51 also never frees the state of some cancelled streams
# (about 1 abandoned stream in 10 under the soak): from the pool, such a state takes those buffers
# with it (in the soak's heap profile, request buffers of 3 MB on average piled up, where an
# abandoned request carries at most 43 KB). 0: a state per call, freed with it, so a leaked one
# holds only its own request.
GRPC_INFER_ALLOCATION_POOL_SIZE = 0

# Layout of the serving image (Dockerfile): NVIDIA's Triton image plus this project.
IMAGE_BACKEND_DIRECTORY = PurePosixPath("/opt/tritonserver/backends")
IMAGE_PROJECT_ROOT = PurePosixPath("/opt/llava-triton")  # the project tree, first on PYTHONPATH
IMAGE_SITE_PACKAGES = IMAGE_PROJECT_ROOT / "site-packages"  # pyproject's serving and export groups, pip --target
IMAGE_UID = 1000  # `triton-server`, the non-root user of NVIDIA's image


def server_args(model_repository: str | PurePosixPath, backend_directory: str | PurePosixPath,
                http_port: int = HTTP_PORT, grpc_port: int = GRPC_PORT, metrics_port: int = METRICS_PORT,
                exit_timeout_s: int = EXIT_TIMEOUT_S) -> list[str]:
    """The `tritonserver` flags every deployment of this project starts with (binary excluded)."""
    return [f"--model-repository={model_repository}",
            f"--backend-directory={backend_directory}",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}",
            f"--exit-timeout-secs={exit_timeout_s}",
            "--strict-readiness=true",
            f"--grpc-infer-allocation-pool-size={GRPC_INFER_ALLOCATION_POOL_SIZE}"]
