"""Logging set-up, and the filter that keeps tokens out of every log line.

Tokens travel in the WebSocket URL's query (browsers cannot set headers on a
WebSocket), so the access log's request line would carry them. The filter
rewrites ``token=...`` wherever it appears in a record of the access logger.
"""

from __future__ import annotations

import logging
import re

__all__ = ["TokenRedactingFilter", "install_token_redaction", "configure_logging"]

_TOKEN_IN_QUERY = re.compile(r"(?i)([?&;]token=)[^&\s\"';]*")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """Replace the value of every ``token`` query parameter in ``text``."""
    return _TOKEN_IN_QUERY.sub(lambda match: match.group(1) + REDACTED, text)


class TokenRedactingFilter(logging.Filter):
    """Redacts ``token=`` query values from a record's message and traceback.

    aiohttp's "Error handling request" records carry the offending request
    line inside the exception (an over-long URL, say), so the traceback text
    is redacted too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower():
            record.msg = redact(message)
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and "token=" in record.exc_text.lower():
            record.exc_text = redact(record.exc_text)
        return True


# The access log has the request line; the server log has request errors.
REDACTED_LOGGERS = ("aiohttp.access", "aiohttp.server", "aiohttp.web")


def install_token_redaction() -> None:
    """Attach the filter once per logger (idempotent: apps may be created many times)."""
    for name in REDACTED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactingFilter) for f in target.filters):
            target.addFilter(TokenRedactingFilter())


def configure_logging(level: str) -> None:
    """Plain one-line records on stderr, for the standalone command."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
