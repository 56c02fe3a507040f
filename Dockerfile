# syntax=docker/dockerfile:1
#
# Two images from one file (docs/kubernetes.md, "Images"):
#   docker build --target cpu -t cropi:cpu .   controller, operator, CPU workers (rollout, projector, trainer)
#   docker build --target gpu -t cropi:gpu .   trainer (DeepSpeed ZeRO-3) and rollout (vLLM) on NVIDIA GPUs
#
# Both run as uid 10001 with ENTRYPOINT `cropi`, so a pod says `args: [serve, controller]`.
# Both work under readOnlyRootFilesystem: every cache and scratch path points
# into /tmp, which the chart mounts as an emptyDir (and /dev/shm as a memory
# emptyDir for Ray and NCCL).

# The GPU stack is pinned as one unit: vLLM 0.33.0 requires torch==2.13.0
# exactly, and PyPI's torch 2.13.0 wheel is built for CUDA 13.0 (it requires
# cuda-toolkit==13.0.3), hence the 13.0 images. DeepSpeed only needs torch>=2.0.
# cropi itself pins torch==2.13.0 (pyproject), the same version, so the image
# installs cropi under a constraint on that torch: if a future bump makes the
# pins disagree, the build fails instead of swapping vLLM's CUDA torch.
ARG PYTHON_VERSION=3.11
ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=ubuntu24.04
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------- CPU image
FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

FROM base AS cpu-build
ARG TORCH_VERSION=2.13.0
# `pip` on PATH is the venv's (which also lets hadolint check every pip install).
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cropi ./cropi
COPY services ./services
COPY operators ./operators
# The CPU wheel comes from PyTorch's CPU index; PyPI's default build would pull
# gigabytes of CUDA libraries into an image that never sees a GPU. The
# constraint keeps any later resolution from replacing it.
RUN python -m venv /opt/venv \
 && echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir --constraint /opt/torch-constraint.txt ".[ray,operator,tracking]"

FROM base AS cpu
LABEL org.opencontainers.image.title="cropi (CPU)" \
      org.opencontainers.image.description="CROPI curriculum RL: controller, operator and CPU workers" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --no-create-home --home-dir /tmp/home --uid 10001 --user-group cropi
COPY --from=cpu-build /opt/venv /opt/venv
# Caches and scratch under /tmp (an emptyDir in the chart): the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache \
    CROPI_CACHE=/tmp/cache/cropi \
    HF_HOME=/tmp/cache/huggingface \
    NUMBA_CACHE_DIR=/tmp/cache/numba \
    MPLCONFIGDIR=/tmp/cache/matplotlib \
    TORCH_EXTENSIONS_DIR=/tmp/cache/torch_extensions \
    RAY_TRAIN_STORAGE=/tmp/ray-train
WORKDIR /tmp
USER 10001
ENTRYPOINT ["cropi"]
CMD ["--help"]

# ---------------------------------------------------------------- GPU image
# Built on the CUDA devel image: DeepSpeed's FusedAdam (the GPU optimizer of
# the ZeRO-3 trainer) is compiled here with nvcc, so pods never JIT-compile.
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_VERSION} AS gpu-build
ARG PYTHON_VERSION
ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.33.0
ARG DEEPSPEED_VERSION=0.19.8
# Datacenter GPUs CUDA 13 supports: A100 (8.0), L4/L40S (8.9), H100/H200 (9.0), B200 (10.0).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0;10.0"
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
# Ubuntu 24.04 ships Python 3.12; uv installs a standalone CPython of the
# version the CPU image uses, which the final stage copies as is.
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /src
# vLLM first, with its torch named: pip refuses to build the image if they disagree.
RUN pip install --no-cache-dir "vllm==${VLLM_VERSION}" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt
# --no-build-isolation: DeepSpeed's op builder needs the torch installed above.
RUN DS_BUILD_FUSED_ADAM=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    pip install --no-cache-dir --no-build-isolation \
        --constraint /opt/torch-constraint.txt "deepspeed==${DEEPSPEED_VERSION}"
COPY pyproject.toml README.md ./
COPY cropi ./cropi
COPY services ./services
COPY operators ./operators
RUN pip install --no-cache-dir --constraint /opt/torch-constraint.txt ".[ray,operator,tracking,gpu]"

# torch's wheels bring their own CUDA 13 libraries (cuBLAS, cuDNN, NCCL), so the
# final stage needs only the CUDA base image (driver hooks), not the runtime image.
FROM nvidia/cuda:${CUDA_VERSION}-base-${UBUNTU_VERSION} AS gpu
LABEL org.opencontainers.image.title="cropi (GPU)" \
      org.opencontainers.image.description="CROPI curriculum RL: DeepSpeed ZeRO-3 trainer and vLLM rollout on CUDA 13" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --no-create-home --home-dir /tmp/home --uid 10001 --user-group cropi
COPY --from=gpu-build /opt/python /opt/python
COPY --from=gpu-build /opt/venv /opt/venv
# As in the CPU image, plus the JIT caches of Triton, vLLM and FlashInfer.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache \
    CROPI_CACHE=/tmp/cache/cropi \
    HF_HOME=/tmp/cache/huggingface \
    NUMBA_CACHE_DIR=/tmp/cache/numba \
    MPLCONFIGDIR=/tmp/cache/matplotlib \
    TORCH_EXTENSIONS_DIR=/tmp/cache/torch_extensions \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    VLLM_CACHE_ROOT=/tmp/cache/vllm \
    FLASHINFER_WORKSPACE_BASE=/tmp/cache \
    RAY_TRAIN_STORAGE=/tmp/ray-train \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
USER 10001
ENTRYPOINT ["cropi"]
CMD ["--help"]
