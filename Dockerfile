# crmhooks image: `docker build -t crmhooks .` then `docker run crmhooks run --config ...`.
# The compose.yaml beside this file runs it with a Kafka broker and the demo receiver.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/crmhooks
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/crmhooks/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/crmhooks/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRMHOOKS_STORE_PATH=/var/lib/crmhooks/crmhooks.db
COPY --from=build /opt/crmhooks /opt/crmhooks
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/crmhooks --no-create-home crmhooks \
    && mkdir -p /var/lib/crmhooks /etc/crmhooks \
    && chown crmhooks:crmhooks /var/lib/crmhooks
USER crmhooks
WORKDIR /var/lib/crmhooks
VOLUME ["/var/lib/crmhooks"]
ENTRYPOINT ["crmhooks"]
CMD ["--help"]
