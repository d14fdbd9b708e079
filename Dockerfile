# syntax=docker/dockerfile:1
# m2fp-service CPU image (docs/deploy.md). Stages:
#   wheel     the project wheel; its dependencies are exactly pyproject's runtime set
#   exporter  torch + ModelScope + the exporter (`--target exporter`: the init-container image
#             that exports a model inside the cluster, deploy/k8s/components/model-export-init)
#   model     runs the exporter once, at build time, as MODEL_SOURCE says
#   runtime   the server only (no torch, no ModelScope), the model, a non-root user
#
#   docker build -t m2fp-service .                                          # real model from the hub
#   docker build --build-arg MODEL_SOURCE=checkpoint -t m2fp-service .      # ./models/checkpoint/
#   docker build --build-arg MODEL_SOURCE=demo -t m2fp-service:demo .       # UNTRAINED demo weights
#   docker build --build-arg MODEL_SOURCE=none -t m2fp-service:nomodel .    # model from a volume
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The native kernels (native/build.py: the fused deformable attention, with ONNX Runtime's headers
# from the Debian archive, SHA-256 pinned; post-processing's per-pixel loops, plain C) go into the
# wheel beside the package; only this stage has a compiler. g++ (which brings gcc) pinned to
# bookworm's (the PYTHON_IMAGE above); a newer base image needs its own version here.
RUN apt-get update -q && apt-get install -y -q --no-install-recommends g++=4:12.2.0-3 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY native/ native/
COPY src/ src/
COPY export/ export/
RUN python native/build.py && pip wheel --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE} AS exporter
# CPU-only torch wheels: the default PyPI torch pulls several GB of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp MODELSCOPE_CACHE=/tmp/modelscope
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --extra-index-url "${TORCH_INDEX_URL}" "$(ls /dist/m2fp_service-*.whl)[export]"
USER 10001:10001
ENTRYPOINT ["m2fp", "export"]

FROM exporter AS model
# hub: ModelScope MODEL_ID (needs the hub at build time) | checkpoint: CHECKPOINT_DIR, a copy of the
# ModelScope model repository (configuration.json + pytorch_model.pt) inside the build context |
# demo: the same architecture, UNTRAINED (meaningless labels; the server says so) | none: no model
ARG MODEL_SOURCE=hub
ARG MODEL_ID=damo/cv_resnet101_image-multiple-human-parsing
ARG CHECKPOINT_DIR=models/checkpoint
# Still the unprivileged exporter user: the model goes to a folder it owns.
RUN --mount=type=bind,target=/context \
    mkdir -p /tmp/model && \
    case "${MODEL_SOURCE}" in \
      hub) m2fp export --model-id "${MODEL_ID}" -o /tmp/model/m2fp.onnx ;; \
      checkpoint) m2fp export --checkpoint "/context/${CHECKPOINT_DIR}" -o /tmp/model/m2fp.onnx ;; \
      demo) m2fp export --random-init --confident -o /tmp/model/m2fp.onnx ;; \
      none) echo "MODEL_SOURCE=none: no model in the image; mount one and set M2FP_MODEL" ;; \
      *) echo "MODEL_SOURCE must be hub, checkpoint, demo or none, got '${MODEL_SOURCE}'" >&2; exit 2 ;; \
    esac
# The light person segmenter (video, live; Apache-2.0): both variants, from the mediapipe wheel on
# PyPI (needs PyPI at build time). Without mediapipe installed here the parity check is skipped and
# the card says so; the converter itself is checked by the project's tests.
RUN m2fp export-light --variant general -o /tmp/model/light.onnx && \
    m2fp export-light --variant landscape -o /tmp/model/light-landscape.onnx
# The runtime stage copies all of /tmp/model/.

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG SOURCE_URL=""
ARG MODEL_SOURCE=hub
LABEL org.opencontainers.image.title="m2fp-service" \
      org.opencontainers.image.description="CPU multi-person human parsing (M2FP on ONNX Runtime): REST API, WebUI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0 AND CC-BY-NC-4.0" \
      io.m2fp.service.license="Apache-2.0" \
      io.m2fp.model.license="CC-BY-NC-4.0" \
      io.m2fp.light-model.license="Apache-2.0" \
      io.m2fp.model.source="${MODEL_SOURCE}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    M2FP_HOST=0.0.0.0 M2FP_PORT=8000 M2FP_MODEL=/opt/m2fp/models/m2fp.onnx \
    M2FP_LIGHT_MODEL=/opt/m2fp/models/light.onnx M2FP_LIGHT_MODEL_LANDSCAPE=/opt/m2fp/models/light-landscape.onnx \
    M2FP_ORT_CACHE_DIR=/var/cache/m2fp
# The wheel without extras: exactly the server's dependencies from pyproject.toml. The optimised-graph cache's
# folder belongs to the server's user (an empty Docker volume mounted there takes that owner; a host folder
# mounted there must be writable by uid 10001: docs/deploy.md).
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install /dist/m2fp_service-*.whl && \
    groupadd --system --gid 10001 m2fp && \
    useradd --system --uid 10001 --gid m2fp --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin m2fp && \
    mkdir -p /var/cache/m2fp && chown 10001:10001 /var/cache/m2fp
# Owned by root, readable by all: the server cannot change its model. A volume mounted over
# /opt/m2fp/models (or M2FP_MODEL pointing elsewhere) replaces it.
COPY --from=model /tmp/model/ /opt/m2fp/models/
WORKDIR /opt/m2fp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('M2FP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["m2fp", "serve"]
