"""Logging that cannot leak a key: every record passes a redaction filter.

The gateway never logs prompts or completions in the first place; this filter is the
second line for keys and bearer tokens that might appear in an exception message.
"""

from __future__ import annotations

import logging
import re

_SECRETS = re.compile(
    r"(?i)(bearer\s+)\S+"                      # Authorization header values
    r"|im-[0-9a-f]{12}\.[A-Za-z0-9_-]+"        # infermesh keys
    r"|sk-[A-Za-z0-9_-]{8,}"                    # OpenAI-style keys of upstreams
)


def redact(text: str) -> str:
    return _SECRETS.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True   # no per-request log lines
