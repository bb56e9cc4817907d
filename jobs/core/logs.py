"""Log set-up for the bot and the workers: the usual text lines, or with TUNEOPS_LOG_FORMAT=json one JSON object per
line that carries the run id and the request id of what the process was doing."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from collections.abc import Mapping

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What the process is working on: a worker's job sets run_id, the bot's HTTP handler sets request_id.
run_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("tuneops_run_id", default="")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("tuneops_request_id", default="")
RUN_ID = re.compile(r"\bft-\d{4,}\b")


def log_format(env: Mapping[str, str] | None = None) -> str:
    """TUNEOPS_LOG_FORMAT: "text" (the default) or "json"; anything else raises ValueError saying so."""
    value = (os.environ if env is None else env).get("TUNEOPS_LOG_FORMAT", "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise ValueError(f"TUNEOPS_LOG_FORMAT={value!r} is not a log format: use 'text' or 'json'")
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the run id comes from the context, else from a run id the message names."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line = {"ts": round(record.created, 3),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": message}
        run_id = getattr(record, "run_id", "") or run_id_var.get()
        if not run_id and (found := RUN_ID.search(message)):
            run_id = found.group(0)
        if run_id:
            line["run_id"] = run_id
        request_id = getattr(record, "request_id", "") or request_id_var.get()
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: int = logging.INFO, env: Mapping[str, str] | None = None) -> None:
    """Configure the root logger once, in the format TUNEOPS_LOG_FORMAT says (a bad value falls back to text, said)."""
    try:
        fmt, problem = log_format(env), ""
    except ValueError as e:
        fmt, problem = "text", str(e)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    if problem:
        logging.getLogger(__name__).warning("%s; logging as text", problem)
