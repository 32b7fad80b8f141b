"""logs: structured (JSON lines) logging for the service; every request's records carry its id.

Records of the ``adacorr_compile.serve`` logger are written one JSON object per line with
``time``, ``level``, ``logger``, ``message`` and the fields given as ``extra=`` (``request_id``,
``status``, ``seconds``, ...).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

# attributes every LogRecord has; anything else on a record came in through ``extra=``
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(level: int = logging.INFO) -> logging.Logger:
    """The ``adacorr_compile.serve`` logger with one JSON-lines handler on stderr (idempotent)."""
    logger = logging.getLogger("adacorr_compile.serve")
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
