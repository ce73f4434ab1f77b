# syntax=docker/dockerfile:1
#
# qbo-token-broker: `qbo-broker serve` on a slim Python 3.11, as a numeric non-root user,
# ready for a read-only root filesystem (only /tmp needs to be writable).
#
#   docker build -t qbo-token-broker:0.3.0 \
#       --build-arg VERSION=0.3.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#       --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#
# Both stages use the same base image, so the virtualenv built in the first one finds its
# interpreter at the same path in the second. Pin it by digest for reproducible builds:
#   --build-arg PYTHON_IMAGE=python:3.11-slim-trixie@sha256:<digest>
# The install steps live in docker/install.sh, which tests/test_image.py runs too.

ARG PYTHON_IMAGE=python:3.11-slim-trixie

# -- build: the locked dependencies, then the broker's wheel, into /opt/venv --------------
FROM ${PYTHON_IMAGE} AS build

ARG UV_VERSION=0.13.9
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /src
COPY docker/install.sh /usr/local/bin/qbo-install

# Dependencies first: this layer is rebuilt only when pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock ./
RUN qbo-install deps /src /opt/venv

COPY README.md LICENSE ./
COPY broker ./broker
RUN qbo-install app /src /opt/venv

# -- runtime: the interpreter, the virtualenv and nothing else ----------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG VERSION=0.3.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="qbo-token-broker" \
      org.opencontainers.image.description="The one place that holds and refreshes QuickBooks Online OAuth credentials, over gRPC." \
      org.opencontainers.image.source="https://github.com/qbo-token-broker/qbo-token-broker" \
      org.opencontainers.image.url="https://github.com/qbo-token-broker/qbo-token-broker" \
      org.opencontainers.image.documentation="https://github.com/qbo-token-broker/qbo-token-broker/blob/main/docs/deploy.md" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}"

# A named user for ps and logs; Kubernetes runs it by number (runAsUser 10001).
RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin broker

COPY --from=build /opt/venv /opt/venv

# The only writable place the broker may need (an emptyDir in the Helm chart). The listen
# addresses keep the broker's loopback defaults: set BROKER_GRPC_ADDR and BROKER_HTTP_ADDR
# (with TLS and a policy, or BROKER_INSECURE=true) to serve beyond the container.
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 8080
STOPSIGNAL SIGTERM

# Exec form: SIGTERM goes to the broker itself, which drains and exits within its budget.
ENTRYPOINT ["qbo-broker"]
CMD ["serve"]
