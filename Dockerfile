# The serving image: NVIDIA's Triton Inference Server with llava-triton and its pinned
# dependencies, for the Helm chart in helm/llava-triton (docs/kubernetes.md). Not built in CI
# (no container engine there); tests/test_helm.py lints it with hadolint.
#
#   docker build -t registry.example.com/llava-triton:0.1.0 .
#
# TRITON_VERSION names the Triton release, here and nowhere else. 24.12 is Triton 2.53.0 on
# Ubuntu 24.04 with Python 3.12 (NVIDIA's release notes): llava-triton needs Python >= 3.11, which
# is why this is not the Triton 2.51 that the tests run locally (nvidia-pytriton).
ARG TRITON_VERSION=24.12
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

# Empty: no TensorRT Python package, so `export --engine tensorrt` is refused (the default engine
# is pytorch). Set it to the TensorRT of the Triton release above (10.7.0 for 24.12) to build plans
# in the export Job: a plan only loads in the TensorRT that built it.
ARG TENSORRT_VERSION=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/llava-triton

# The pinned dependencies go beside the system Python (pip --target, so Ubuntu's Python stays
# untouched); every model.py puts PYTHONPATH on sys.path, since the Python backend's stub ignores it.
# pyproject.toml's base dependencies (serving) and its `export` group (the export Job runs in this
# image), installed before the code is copied so that a code change does not reinstall them.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(project["dependencies"] + project["optional-dependencies"]["export"]))' \
        > /tmp/requirements-image.txt \
    && if [ -n "${TENSORRT_VERSION}" ]; then echo "tensorrt-cu12==${TENSORRT_VERSION}" >> /tmp/requirements-image.txt; fi \
    && python3 -m pip install --no-cache-dir --target /opt/llava-triton/site-packages -r /tmp/requirements-image.txt \
    && rm /tmp/requirements-image.txt

# The project itself: the package the adapters import, the export, the client, the adapters.
COPY llava_triton ./llava_triton
COPY export ./export
COPY client ./client
COPY model_repository ./model_repository

ENV PYTHONPATH=/opt/llava-triton:/opt/llava-triton/site-packages \
    PATH=/opt/llava-triton/site-packages/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/tmp

# triton-server, the unprivileged user of NVIDIA's image (the chart's runAsUser).
USER 1000:1000

EXPOSE 8000 8001 8002 9000
# (9000: the OpenAI-compatible frontend, llava_triton.openai_frontend, which the launcher starts.)
# `docker run --gpus all -v $PWD/model_repository:/models/model_repository IMAGE` serves with the
# flags of `make serve` (llava_triton.server, which restarts tritonserver when a backend stub dies);
# the chart runs the same launcher with --on-backend-exit=exit, so the kubelet restarts the container.
CMD ["python3", "-m", "llava_triton.server", "--model-repository", "/models/model_repository"]
