# syntax=docker/dockerfile:1
#
# tlq-farm GPU worker image. Build from the repository root:
#   docker build -f ops/worker.Dockerfile -t tlq-farm-worker:0.1.0 .
# (docker compose does this for the `worker` service.)
#
# CUDA_IMAGE and TORCH_INDEX_URL go together: the CUDA version of the base image and of the torch wheels
# must match, and the host driver must support it (CUDA 12.8 needs driver >= 570). For CUDA 12.6 use
# nvidia/cuda:12.6.3-base-ubuntu24.04 with https://download.pytorch.org/whl/cu126, and so on.
# The `base` flavour is enough: the torch wheels bring their own cuBLAS/cuDNN; the image only needs
# the driver hooks the NVIDIA container toolkit sets up.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The newest torch on that index by default; pin with e.g. TORCH_SPEC="torch==2.9.1 torchvision==0.24.1".
ARG TORCH_SPEC="torch torchvision"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/tlq-farm/venv \
    PATH=/opt/tlq-farm/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Ubuntu 24.04's own Python 3.12 (no third-party apt sources); tini forwards SIGTERM to the worker so that
# Celery's warm shutdown lets the running task finish, and reaps the pool's children.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

# torch first, from the index that matches the CUDA base: its own layer, so code changes do not
# re-download several GiB of wheels.
RUN pip install --index-url "$TORCH_INDEX_URL" $TORCH_SPEC

# The package itself; torch/torchvision are already satisfied, the rest comes from PyPI.
COPY . /src/tlq-farm
RUN pip install /src/tlq-farm \
 && rm -rf /src/tlq-farm \
 && python -c "import torch, tlq_farm; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# An unprivileged user with a fixed uid (not 1000, which the Ubuntu 24.04 base gives to `ubuntu`).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/tlq-farm --shell /usr/sbin/nologin tlq-farm
USER tlq-farm
WORKDIR /var/lib/tlq-farm
ENV HOME=/var/lib/tlq-farm \
    HF_HOME=/var/lib/tlq-farm/.cache/huggingface

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "tlq-farm", "worker"]
# Extra worker flags go here, e.g. `docker run ... tlq-farm-worker:0.1.0 --gpus 0,1 --max-memory 40GiB`.
CMD []
