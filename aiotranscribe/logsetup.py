"""structlog configuration: JSON lines off a TTY, a readable console on one.

aiohttp's (and everything else's) stdlib loggers go through the same ``ProcessorFormatter``
so every line has one shape, and context bound with ``bind_contextvars`` (``request_id``,
``job_id``) appears on each line logged while it is bound.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog


def configure_logging(fmt: str | None = None, level: str = "info") -> None:
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if fmt == "json" else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(redact_keys)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # NeMo configures its own handlers; keep its chatter out of ours unless it matters.
    for noisy in ("nemo_logger", "nemo", "lightning", "pytorch_lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# API keys that clients put in a query string (download links, ``?api_key=``) or a
# WebSocket subprotocol (``key.<key>``) stay out of the logs, aiohttp's included.
KEY_PATTERN = re.compile(r"(api_key=|\bkey\.)[^&\s\"',\]]+")


def redact_keys(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "api_key=" in message or "key." in message:
        record.msg, record.args = KEY_PATTERN.sub(r"\1REDACTED", message), ()
    return True


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event
