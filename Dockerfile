# One image for everything upbit-broker runs: the broker (`run`), the operator commands
# (`status`, `leases`, `resubscribe`, `check`), the simulator (`simulate`) and the example
# consumers (`python -m consumers.examples.ticker_board`).
#
#   docker build -t upbit-broker .
#   docker run --rm upbit-broker --help
#   docker run --rm -e UPBIT_BROKER_REDIS_URL=redis://host:6379/0 upbit-broker run
#
# No HEALTHCHECK here: the same image runs consumers and the simulator, which must not inherit
# the broker's. docker-compose.yml gives each service its own (`upbit-broker check` for brokers).

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a virtualenv with the pinned runtime dependencies and the project ---------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, in their own layer: rebuilt only when they change. Every runtime package,
# transitive ones included, is pinned in requirements/runtime.txt (the runtime part of
# requirements/lock.txt, both written by `make lock`); --no-deps makes a missing pin fail
# `pip check` below instead of silently pulling an unpinned version.
COPY requirements/runtime.txt /tmp/requirements/runtime.txt
RUN pip install --no-deps -r /tmp/requirements/runtime.txt

# The build backend at its locked version, so the project is built as `make install` builds it.
COPY requirements/lock.txt /tmp/requirements/lock.txt
RUN pip install -c /tmp/requirements/lock.txt setuptools

# Then the project itself (only its packages; .dockerignore keeps tests, caches, .git out),
# built with that setuptools (no isolated build env fetching the newest one).
COPY pyproject.toml README.md /src/
COPY broker /src/broker
COPY cli /src/cli
COPY consumers /src/consumers
COPY simulator /src/simulator
COPY gateway /src/gateway
RUN pip install --no-deps --no-build-isolation /src \
    && pip check \
    && pip uninstall --yes setuptools pip

# -- runtime: the slim base, the virtualenv, a non-root user ---------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="upbit-broker" \
      org.opencontainers.image.description="Share one Upbit market-data WebSocket between many processes through Redis" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid broker --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin broker

COPY --from=build /opt/venv /opt/venv

USER 10001:10001

# 9464: Prometheus metrics of `run --metrics-port 9464`; 8765: `simulate --host 0.0.0.0`.
EXPOSE 9464 8765

ENTRYPOINT ["upbit-broker"]
CMD ["run"]
