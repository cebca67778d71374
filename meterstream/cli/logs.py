"""Logging for every command, configured once, here in the face; the stages only log.

Two formats on stderr:

- ``text`` (default): ``2026-12-04 12:00:00,000 INFO reporters.service report cycle: ...``
- ``json``: one JSON object per line with ``time`` (ISO-8601 UTC, ``Z``), ``level``, ``logger``
  and ``message``; plus ``customer_id``, ``meter``, ``identifier`` and ``event_id`` when the log
  call passes them with ``extra=``, and ``exception`` when it carries one.

Lines of librdkafka (logger ``librdkafka``, see meterstream/kafka.py) and Python's warnings
(``py.warnings``) take the same format, not plain text of their own.
"""

from __future__ import annotations

import logging
import logging.config
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import orjson

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)

# The names every stage uses for what a log line is about (see STYLE.md, Naming); a log call
# passes them as ``extra={"customer_id": ..., "meter": ...}`` so JSON lines can be filtered.
STRUCTURED_FIELDS = ("customer_id", "meter", "identifier", "event_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


@dataclass(frozen=True)
class LogOptions:
    """The command group's logging options, kept in the click context for commands that start
    something with logging of its own (faust's worker)."""

    level: LogLevel = "info"
    log_format: LogFormat = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in STRUCTURED_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                document[name] = str(value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(document).decode()


def logging_config(level: LogLevel, log_format: LogFormat) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document: the root logger at ``level`` writing
    ``log_format`` lines to stderr. faust's worker is handed the same document, so its lines
    share the format."""
    quiet = "DEBUG" if level == "debug" else "WARNING"
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"meterstream": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "meterstream",
                "stream": "ext://sys.stderr",
            }
        },
        # Alembic says "Context impl ..." at info on every command that checks the schema, and
        # the stripe SDK two lines per API call: only a debugging reader wants those.
        "loggers": {name: {"level": quiet} for name in ("alembic", "stripe")},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def configure_logging(level: LogLevel, log_format: LogFormat) -> None:
    """Configure the process's logging; call once, before any command runs."""
    logging.config.dictConfig(logging_config(level, log_format))
    # A warning (Python's or a library's) is printed to stderr past logging, as two lines of
    # plain text, unless logging takes it: then it is one line in the chosen format.
    logging.captureWarnings(True)
