# The sudo-queue image: the CLI with the policy worker and the Slack app (`sudo-queue[slack]`).
# docker-compose.yml builds it once and runs it twice: `sudo-queue worker` and `sudo-queue slack`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package first (a non-editable install: the wheel maps workers/ and adapters/ into
# sudo_queue.workers and sudo_queue.adapters), then the data it reads at run time.
COPY pyproject.toml README.md ./
COPY sudo_queue ./sudo_queue
COPY workers ./workers
COPY adapters ./adapters
RUN pip install ".[slack]" && sudo-queue --help > /dev/null

COPY config ./config

# No root at run time; the app needs no write access to /app.
RUN useradd --system --uid 10001 --no-create-home sudoqueue
USER sudoqueue

# JSON logs for a log collector; the policy path the worker reloads when the file changes.
ENV SUDO_QUEUE_LOG_FORMAT=json \
    SUDO_QUEUE_POLICY=/app/config/policy.yaml

EXPOSE 3000
ENTRYPOINT ["sudo-queue"]
CMD ["worker"]
