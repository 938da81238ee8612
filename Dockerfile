# syntax=docker/dockerfile:1.7
#
# headforge image, CPU or CUDA:
#   docker build -t headforge:cpu .
#   docker build -t headforge:cuda --build-arg VARIANT=cuda .
#
# Stages: os-<variant> (base OS + Python), web (browser app), builder (venv, package, models),
# runtime (venv + models + non-root user). Dependencies are installed from pyproject.toml alone,
# before the source is copied, so a code change rebuilds only the last few layers.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu and the `tensorrt-cu12` wheels on PyPI target CUDA 12 with cuDNN 9.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG NODE_IMAGE=node:22-bookworm-slim

# ---------------------------------------------------------------- base OS per variant
FROM ${PYTHON_IMAGE} AS os-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_IMAGE} AS os-cuda
# Ubuntu 24.04 ships Python 3.12, which headforge supports (requires-python >=3.11,<3.13).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.12 python3.12-venv tini ca-certificates curl \
 && ln -sf /usr/bin/python3.12 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/*
# The TensorRT libraries come from the `tensorrt-cu12` wheels; ONNX Runtime's TensorRT provider
# loads them by name, so put them on the loader path.
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/tensorrt_libs:${LD_LIBRARY_PATH}

# ---------------------------------------------------------------- browser app
FROM ${NODE_IMAGE} AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY web/ ./
# The build writes into ../headforge/service/static.
RUN mkdir -p /src/headforge/service/static && npm run build

# ---------------------------------------------------------------- builder
FROM os-${VARIANT} AS builder
ARG VARIANT
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv && pip install --upgrade pip setuptools wheel

# 1. torch, the largest dependency: the CPU wheel in both variants (inference runs on ONNX Runtime
#    or TensorRT; torch is used to convert and export the models at build time).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

# 2. Every other runtime dependency, read from pyproject.toml only (no source yet).
WORKDIR /src
COPY pyproject.toml ./
RUN python - <<'EOF' > /tmp/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["s3"]))
EOF
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt \
 && if [ "$VARIANT" = "cuda" ]; then \
      pip uninstall -y onnxruntime \
      && pip install "onnxruntime-gpu>=1.20" "tensorrt-cu12>=10,<11"; \
    fi

# 3. The package itself, without touching the dependencies installed above.
COPY README.md ./
COPY headforge/ headforge/
COPY --from=web /src/headforge/service/static/ headforge/service/static/
RUN pip install --no-deps --no-build-isolation . && rm -rf build

# 4. Models: fetched and converted at build time, so containers start without network.
ENV HEADFORGE_HOME=/opt/headforge
RUN --mount=type=cache,target=/root/.cache/pip \
    headforge models pull \
 && rm -rf /opt/headforge/downloads \
 && chmod -R a+rX /opt/headforge

# ---------------------------------------------------------------- runtime
FROM os-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="headforge" \
      org.opencontainers.image.description="Photos of people in, 3D head assets out" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.headforge.variant="${VARIANT}"

RUN groupadd --system --gid 10001 headforge \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/headforge --create-home headforge \
 && mkdir -p /var/lib/headforge \
 && chown headforge:headforge /var/lib/headforge

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/headforge /opt/headforge
# ONNX Runtime's TensorRT provider caches built engines under $HEADFORGE_HOME/trt_cache: the only
# writable place under the (otherwise read-only) model repository. Mount a volume there to keep them.
RUN mkdir -p /opt/headforge/trt_cache && chown headforge:headforge /opt/headforge/trt_cache

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEADFORGE_HOME=/opt/headforge \
    HEADFORGE_DATA_DIR=/var/lib/headforge \
    HEADFORGE_VARIANT=${VARIANT}

USER 10001:10001
WORKDIR /home/headforge
VOLUME ["/var/lib/headforge"]
EXPOSE 8000

# The API answers /healthz; worker containers override this check (see docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

# tini is PID 1: it forwards SIGTERM so Celery shuts down warm and uvicorn drains.
ENTRYPOINT ["tini", "--", "headforge"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
