"""Log output of the balancer process: human text or one JSON object per line.

JSON lines carry `ts` (UTC, ISO 8601 with milliseconds), `level`, `msg` (the
formatted message, so text tools and readiness checks still find it),
`logger`, the message's arguments as `args` when it has any, any `extra=`
fields given at the call site, and `exc` when an exception is logged.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import IO, Any

from balancer.observe.stamps import utc_timestamp

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"

# attributes every LogRecord has; anything else was passed with `extra=`
_STANDARD = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


def _plain(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        if isinstance(record.args, tuple) and record.args:
            doc["args"] = _plain(record.args)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = _plain(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send the process's logs to stderr (or `stream`) as text or JSON lines."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    from balancer.observe.accesslog import AccessLog

    AccessLog.default_format = fmt
