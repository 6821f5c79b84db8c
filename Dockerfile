# semilla in a container: `semilla serve` on $PORT (8000), models and data as volumes.
#   docker build -t semilla .                                        # CPU PyTorch (the default)
#   docker build -t semilla:cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA PyTorch (its wheels bring
#                                                                    # the CUDA libraries; the host
#                                                                    # needs the NVIDIA driver and
#                                                                    # container toolkit: --gpus all)
#   docker run -p 8000:8000 -v $PWD/models:/models:ro -v semilla-data:/data semilla

# --- build: a virtual environment with PyTorch and semilla ----------------------------------
FROM python:3.11-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
RUN python -m venv /opt/semilla
ENV PATH=/opt/semilla/bin:$PATH
# the pinned torch first, from PyTorch's own index: no resolver ever picks another build
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/${TORCH_VARIANT}
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install --no-cache-dir '/src[replicas,grpc]'

# --- run: the environment, a C++ compiler for semilla's CPU kernels, a user that is not root -
FROM python:3.11-slim-bookworm AS run
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 semilla \
    && mkdir -p /models /data && chown semilla /models /data
COPY --from=build /opt/semilla /opt/semilla
# HOST/PORT: what Render and Heroku-style platforms set; the kernels' build cache lives in /data
ENV PATH=/opt/semilla/bin:$PATH \
    HOST=0.0.0.0 PORT=8000 \
    SEMILLA_MODELS_DIR=/models SEMILLA_DATA_DIR=/data \
    SEMILLA_ENVIRONMENT=production \
    XDG_CACHE_HOME=/data/cache
USER semilla
WORKDIR /home/semilla
VOLUME ["/models", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=4)"]
CMD ["semilla", "serve"]
