# syntax=docker/dockerfile:1
# One multi-stage build for every image the project ships. Build a target with
#   docker build --target api .          -> llm-api         (uvicorn, CPU torch)
#   docker build --target worker .       -> llm-worker      (celery, CPU torch)
#   docker build --target worker-gpu .   -> llm-worker-gpu  (celery, CUDA torch)
#   docker build --target trainer .      -> llm-trainer     (torchrun, CUDA torch)
#   docker build --target trainer-cpu .  -> llm-trainer-cpu (torchrun, CPU torch; laptop/compose)
#   docker build --target mlflow .       -> llm-mlflow      (tracking server, SQLite or Postgres)
# Layer order: OS -> torch -> the project's dependencies (from pyproject.toml only) -> source,
# so editing code rebuilds only the last, small layers.

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
# The CUDA runtime base and the torch wheel index must name the same CUDA major.minor.
ARG CUDA_VERSION=12.8.1
ARG CUDA_BASE_OS=ubuntu24.04
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG MLFLOW_VERSION=3.17.2
ARG APP_UID=10001

# ---------------------------------------------------------------------------------------------
# Bases: a venv at /opt/venv owned by root, an unprivileged user, /app as the working dir.
# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu-base
ARG APP_UID
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install "setuptools>=68" wheel \
    && groupadd --gid ${APP_UID} app \
    && useradd --uid ${APP_UID} --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app /checkpoints /workspace \
    && chown ${APP_UID}:${APP_UID} /app /checkpoints /workspace
WORKDIR /app

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_BASE_OS} AS gpu-base
ARG APP_UID
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# gcc and the Python headers: Triton builds its CUDA launcher with them the first time
# torch.compile runs (train=gpu compiles; the worker's CUDA-graph decode step too).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install "setuptools>=68" wheel \
    && groupadd --gid ${APP_UID} app \
    && useradd --uid ${APP_UID} --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app /checkpoints /workspace \
    && chown ${APP_UID}:${APP_UID} /app /checkpoints /workspace
WORKDIR /app

# torch first, pinned, from the index that matches the base (never a surprise CUDA build on CPU).
FROM cpu-base AS cpu-torch
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"

FROM gpu-base AS gpu-torch
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX}"

# ---------------------------------------------------------------------------------------------
# Dependency layers: install the extras of a stub package built from pyproject.toml alone, then
# drop the stub. Rebuilt only when pyproject.toml changes.
# ---------------------------------------------------------------------------------------------
FROM cpu-torch AS serve-deps-cpu
COPY pyproject.toml ./
# The worker resolves models:/ URIs through the MLflow client; the skinny client is enough.
# Every MLflow client is pinned to the server image's release (MLFLOW_VERSION).
ARG MLFLOW_VERSION
RUN mkdir -p lmcore services && touch README.md lmcore/__init__.py services/__init__.py \
    && pip install --no-build-isolation ".[serve]" "mlflow-skinny==${MLFLOW_VERSION}" \
    && pip uninstall -y llm-pipeline \
    && rm -rf lmcore services README.md build *.egg-info

FROM gpu-torch AS serve-deps-gpu
ARG MLFLOW_VERSION
COPY pyproject.toml ./
RUN mkdir -p lmcore services && touch README.md lmcore/__init__.py services/__init__.py \
    && pip install --no-build-isolation ".[serve]" "mlflow-skinny==${MLFLOW_VERSION}" \
    && pip uninstall -y llm-pipeline \
    && rm -rf lmcore services README.md build *.egg-info

FROM cpu-torch AS train-deps-cpu
ARG MLFLOW_VERSION
COPY pyproject.toml ./
RUN mkdir -p lmcore services && touch README.md lmcore/__init__.py services/__init__.py \
    && pip install --no-build-isolation ".[train,cli]" "mlflow==${MLFLOW_VERSION}" \
    && pip uninstall -y llm-pipeline \
    && rm -rf lmcore services README.md build *.egg-info

FROM gpu-torch AS train-deps-gpu
ARG MLFLOW_VERSION
COPY pyproject.toml ./
RUN mkdir -p lmcore services && touch README.md lmcore/__init__.py services/__init__.py \
    && pip install --no-build-isolation ".[train,cli]" "mlflow==${MLFLOW_VERSION}" \
    && pip uninstall -y llm-pipeline \
    && rm -rf lmcore services README.md build *.egg-info

# ---------------------------------------------------------------------------------------------
# Source: one stage holding the code and the Hydra config, copied into every runtime image.
# Owned by the app user so `skaffold dev` can sync files into a running container; Kubernetes
# still mounts the root filesystem read-only in production (see charts/llm values).
# ---------------------------------------------------------------------------------------------
FROM scratch AS source
COPY pyproject.toml /app/pyproject.toml
COPY lmcore/ /app/lmcore/
COPY services/ /app/services/
COPY config/ /app/config/

# The project itself, editable over /app: `lmctl` on PATH, and Hydra finds /app/config relative
# to services/trainer whatever the working directory. README.md is only packaging metadata.
FROM serve-deps-cpu AS app-cpu
ARG APP_UID
COPY --from=source --chown=${APP_UID}:${APP_UID} /app /app
RUN touch README.md && pip install --no-build-isolation --no-deps -e . && rm -rf build
ENV PYTHONPATH=/app HOME=/tmp

FROM serve-deps-gpu AS app-gpu
ARG APP_UID
COPY --from=source --chown=${APP_UID}:${APP_UID} /app /app
RUN touch README.md && pip install --no-build-isolation --no-deps -e . && rm -rf build
ENV PYTHONPATH=/app HOME=/tmp

# ---------------------------------------------------------------------------------------------
# Runtime targets.
# ---------------------------------------------------------------------------------------------
FROM app-cpu AS api
ARG APP_UID
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["uvicorn", "services.api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

# Thread pool: CUDA is never initialised before a fork. No --concurrency: the settings give
# LLM_WORKER_CONCURRENCY, by default 2 x LLM_MAX_BATCH, so every engine slot can fill.
FROM app-cpu AS worker
ARG APP_UID
ENV LLM_DEVICE=cpu
USER ${APP_UID}:${APP_UID}
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "services.worker.healthcheck"]
CMD ["celery", "-A", "services.worker.celery_app:app", "worker", "--pool", "threads", "--loglevel", "INFO"]

FROM app-gpu AS worker-gpu
ARG APP_UID
ENV LLM_DEVICE=cuda
USER ${APP_UID}:${APP_UID}
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "services.worker.healthcheck"]
CMD ["celery", "-A", "services.worker.celery_app:app", "worker", "--pool", "threads", "--loglevel", "INFO"]

# torchrun reads PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT as its defaults:
# under a PyTorchJob the training operator sets them, so the command needs no cluster flags.
FROM train-deps-gpu AS trainer
ARG APP_UID
COPY --from=source --chown=${APP_UID}:${APP_UID} /app /app
RUN touch README.md && pip install --no-build-isolation --no-deps -e . && rm -rf build
ENV PYTHONPATH=/app HOME=/tmp
WORKDIR /workspace
USER ${APP_UID}:${APP_UID}
CMD ["torchrun", "--nproc-per-node=gpu", "-m", "services.trainer", "train=gpu", "train.checkpoint_dir=/checkpoints/${model.name}", "tracking.register_name=llm"]

FROM train-deps-cpu AS trainer-cpu
ARG APP_UID
COPY --from=source --chown=${APP_UID}:${APP_UID} /app /app
RUN touch README.md && pip install --no-build-isolation --no-deps -e . && rm -rf build
ENV PYTHONPATH=/app HOME=/tmp
WORKDIR /workspace
USER ${APP_UID}:${APP_UID}
CMD ["torchrun", "--nproc-per-node=1", "-m", "services.trainer", "train=cpu", "train.checkpoint_dir=/checkpoints/${model.name}", "tracking.register_name=llm"]

# ---------------------------------------------------------------------------------------------
# MLflow tracking server: the release the images' clients are pinned to, plus the Postgres driver.
# ---------------------------------------------------------------------------------------------
FROM cpu-base AS mlflow
ARG APP_UID
ARG MLFLOW_VERSION
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" \
    && mkdir -p /mlflow/artifacts \
    && chown -R ${APP_UID}:${APP_UID} /mlflow
ENV HOME=/tmp
WORKDIR /mlflow
USER ${APP_UID}:${APP_UID}
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=2)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1", "--backend-store-uri", "sqlite:////mlflow/mlflow.db", "--artifacts-destination", "/mlflow/artifacts"]
