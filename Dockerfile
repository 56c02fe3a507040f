# syntax=docker/dockerfile:1
# CPU image for the embedded runner and the services. Issue E adds the GPU
# target (CUDA base with vLLM + DeepSpeed) and hardens it further.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cropi ./cropi
COPY services ./services
COPY operators ./operators
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim AS cpu
RUN useradd --create-home --uid 10001 cropi
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    CROPI_CACHE=/home/cropi/.cache/cropi \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/cropi
ENTRYPOINT ["cropi"]
CMD ["--help"]
