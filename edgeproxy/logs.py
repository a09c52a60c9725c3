"""Logging for both daemons from [log]: level, text or JSON lines, optional file, bodies kept out.

JSON lines have stable keys: ts, level, logger, event (the message), and where the record says
so partner, direction, stream (stream id) - callers pass them with `extra={...}`.
Message bodies never reach the logs unless [log] message_bodies (Lync
EnableLoggingAllMessageBodies, SPEC 1.4) is on: every record is scrubbed on its way out,
slixmpp's DEBUG stanza dumps included.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from .config import LogSettings

_BODY = re.compile(r"(<body\b[^>]*>).*?(</body>)", re.DOTALL)
_JSON_BODY = re.compile(r"""(["']body["']\s*:\s*)(["'])(?:\\.|(?!\2).)*\2""", re.DOTALL)
REDACTED = "[body not logged]"
JSON_KEYS = ("partner", "direction", "stream")


def scrub_bodies(text: str) -> str:
    text = _BODY.sub(rf"\1{REDACTED}\2", text)
    return _JSON_BODY.sub(rf"\1\2{REDACTED}\2", text)


class BodyFilter(logging.Filter):
    """Removes message bodies from every record (EnableLoggingAllMessageBodies off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "body" in message:
            record.msg, record.args = scrub_bodies(message), None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "event": record.getMessage()}
        for key in JSON_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_verbose = False


def setup_logging(settings: LogSettings | None, verbose: bool | None = None) -> None:
    """Replace the root logger's handlers: -v forces debug; no settings = text on stderr.
    Called again on a reload with the new [log] (verbose=None keeps the -v of the start)."""
    global _verbose
    if verbose is not None:
        _verbose = verbose
    s = settings or LogSettings()
    handler: logging.Handler
    if s.file is not None:
        s.file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(s.file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if s.format == "json" else logging.Formatter(TEXT_FORMAT))
    if not s.message_bodies:
        handler.addFilter(BodyFilter())
    # Neither format shows the caller, thread or process: not looked up for each record (the
    # logging HOWTO's "Optimization"; a tenth of a log call's CPU, issue 11's dialback profile)
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if _verbose else getattr(logging, s.level.upper()))
