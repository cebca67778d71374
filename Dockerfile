# meterstream: one image for every stage; the compose services pick the subcommand
# (`migrate`, `aggregate`, `report`, ...). Settings come from METERSTREAM_* variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY meterstream ./meterstream
COPY ingest ./ingest
COPY aggregators ./aggregators
COPY reporters ./reporters
# The stages' extras only: production runs Apache Kafka, not the embedded broker.
RUN pip install '.[aggregators,reporter]' && rm -rf /src

# Not root: the workers only need their working directory, where faust keeps its local state
# (<app id>-data/), and the meters catalogue the compose file mounts read-only.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin meterstream \
    && mkdir -p /app && chown meterstream:meterstream /app
USER meterstream
WORKDIR /app
COPY --chown=meterstream:meterstream examples/meters.toml /app/examples/meters.toml

ENV METERSTREAM_METERS_FILE=/app/examples/meters.toml \
    METERSTREAM_METRICS_PORT=9464
EXPOSE 9464

ENTRYPOINT ["meterstream"]
CMD ["--help"]
