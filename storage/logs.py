"""Log lines that name their job: the job (and trace) a line concerns, and JSON output.

The API (around a submit, an event stream) and the worker (around an attempt) bind the
job id and trace id to the running task (`bind_job`); a filter on the root handler copies
them onto every record, so any logger's line carries them. `FERRY_LOG_FORMAT=json` turns
each line into one JSON object (stdlib only: no extra package for a few fields).
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(name)s %(message)s"

# (job id, trace id) of the job this task is handling; None outside one.
_job: ContextVar[tuple[str | None, str | None]] = ContextVar("ferry_job", default=(None, None))


def bind_job(job_id: str, trace_id: str | None) -> Token[tuple[str | None, str | None]]:
    """Lines logged from here on in this task (and tasks it starts) name this job."""
    return _job.set((job_id, trace_id))


def unbind_job(token: Token[tuple[str | None, str | None]]) -> None:
    _job.reset(token)


class JobContextFilter(logging.Filter):
    """Adds `job_id` and `trace_id` to every record (None outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id, trace_id = _job.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id
        if getattr(record, "trace_id", None) is None:
            record.trace_id = trace_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, job_id, trace_id (and the
    traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "trace_id": getattr(record, "trace_id", None),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def use_format(handler: logging.Handler, log_format: LogFormat) -> None:
    """Make a handler someone else set up (Celery's, uvicorn's) write our lines."""
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    if not any(isinstance(f, JobContextFilter) for f in handler.filters):
        handler.addFilter(JobContextFilter())


def configure(level: str, log_format: LogFormat) -> None:
    """The root logger's handler (as `logging.basicConfig` makes it), in this format."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        use_format(handler, log_format)


def uvicorn_config(level: str, log_format: LogFormat) -> dict[str, Any] | None:
    """uvicorn's `log_config`: None keeps uvicorn's own (text); json sends its loggers and
    the root logger through one JSON handler."""
    if log_format != "json":
        return None
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "json",
        "filters": ["job"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"job": {"()": JobContextFilter}},
        "handlers": {"json": handler},
        "root": {"handlers": ["json"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "level": level.upper(), "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
