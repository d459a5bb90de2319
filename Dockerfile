# syntax=docker/dockerfile:1
# Kronos serving images, from one file:
#   docker build -t kronos-serving .                      # MLServer + runtime + registry CLI (default)
#   docker build --target gateway -t kronos-gateway .     # nginx gateway + access-log exporter
# CPU torch by default; for a CUDA build pass the matching PyTorch wheel index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# (run it with the NVIDIA container runtime; the CUDA libraries come with the wheels).

ARG PYTHON_IMAGE=python:3.11-slim

# ----------------------------------------------------------------------------- builder
# A virtual environment with torch (from the chosen index) and the project installed.
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extra pinned packages for development images (docker-compose.dev.yml adds watchfiles).
ARG EXTRA_PIP_PACKAGES=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model_package ./model_package
COPY registry_scripts ./registry_scripts
COPY serving ./serving
# The constraint keeps pip from replacing the torch build chosen above. The `serving` extra
# is the MLServer layer with its pins (pandas < 3, uvloop < 0.22).
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir -c /tmp/torch-constraint.txt "/src[serving]" \
    && if [ -n "${EXTRA_PIP_PACKAGES}" ]; then \
         read -ra extra <<< "${EXTRA_PIP_PACKAGES}" \
         && pip install --no-cache-dir -c /tmp/torch-constraint.txt "${extra[@]}"; \
       fi \
    && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

# ----------------------------------------------------------------------------- gateway
# nginx rendered from KRONOS_GATEWAY_* at start, and the access-log exporter. Only the
# standard library, pydantic-settings and prometheus-client are needed.
FROM ${PYTHON_IMAGE} AS gateway
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KRONOS_GATEWAY_PREFIX=/tmp/kronos-gateway \
    KRONOS_GATEWAY_ACCESS_LOG=/var/log/kronos-gateway/access.log \
    KRONOS_GATEWAY_EXPORTER_LOG=/var/log/kronos-gateway/access.log
# nginx comes from the base image's Debian release, which fixes its version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir "pydantic-settings==2.16.3" "prometheus-client==0.26.0" \
    && groupadd --system --gid 10002 gateway \
    && useradd --system --uid 10002 --gid gateway --no-create-home gateway \
    && install -d -o gateway -g gateway /var/log/kronos-gateway
COPY serving/gateway/render.py serving/gateway/log_exporter.py serving/gateway/nginx.conf.template /app/gateway/
USER 10002:10002
EXPOSE 8000 8001 9145
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8002/gateway/health', timeout=4)"]
CMD ["python", "/app/gateway/render.py", "--check", "--exec"]

# ----------------------------------------------------------------------------- runtime
# MLServer with the Kronos runtime (default target). The same image runs the registry CLI
# (`kronos-registry ...`) and the MLflow tracking server (`mlflow server ...`), and carries
# the trained demo model that `make serve` and the compose `register` job fall back to.
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/kronos/.cache/huggingface \
    KRONOS_MODEL_CACHE_DIR=/home/kronos/.cache/kronos-serving/models
RUN groupadd --system --gid 10001 kronos \
    && useradd --system --uid 10001 --gid kronos --create-home --home-dir /home/kronos kronos \
    && install -d -o kronos -g kronos /app /app/src /data/mlflow-artifacts \
         /home/kronos/.cache/huggingface /home/kronos/.cache/kronos-serving/models
COPY --from=builder /opt/venv /opt/venv
COPY --chown=kronos:kronos serving /app/serving
# MLServer ignores MLSERVER_* variables when settings.json exists, and the repository's
# file binds 127.0.0.1 (right for `make serve`): in a container, listen on all interfaces.
RUN python -c "import json, pathlib; p = pathlib.Path('/app/serving/settings.json'); \
s = json.loads(p.read_text()); s['host'] = '0.0.0.0'; p.write_text(json.dumps(s, indent=2))"
WORKDIR /app
USER 10001:10001
# The trained demo model (package data, model_package/demo_weights) is in the image and
# readable by the server's user: the compose `register` job logs it by default
# (`kronos-registry log --demo`). -I: the installed package, not one in the working dir.
RUN python -I -c "from model_package.demo import demo_checkpoints; \
[(d / n).read_bytes() for d in demo_checkpoints() for n in ('config.json', 'model.safetensors')]"
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=4)"]
CMD ["mlserver", "start", "/app/serving"]
