"""Logging set-up for entry points; the library itself never configures logging."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from .redact import redact_event_dict

__all__ = ["configure_logging"]


def configure_logging(
    fmt: str = "auto", level: str = "info", *, stream: TextIO | None = None
) -> None:
    """structlog to stderr: a console renderer on a terminal, JSON lines otherwise.

    `fmt` is SUDO_QUEUE_LOG_FORMAT (auto, console, json). Records of standard-library loggers
    (arq's, redis-py's) go through the same renderer, so a JSON log holds nothing but JSON lines.
    Every line, ours or theirs, carries what is bound with `structlog.contextvars`: a worker binds
    `request_id` and `job_id` around each job, so all lines about one request can be found.
    Calling it again replaces the previous set-up.
    """
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_event_dict,  # secrets never reach a log line, ours or a library's
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Other libraries' info lines (arq's per-job chatter) are noise next to ours.
    root.setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_event_dict,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
