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
    """Redacts ``token=`` query values from a record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower():
            record.msg = redact(message)
            record.args = None
        return True


def install_token_redaction(logger_name: str = "aiohttp.access") -> None:
    """Attach the filter once (idempotent: apps may be created many times)."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, TokenRedactingFilter) for f in target.filters):
        target.addFilter(TokenRedactingFilter())


def configure_logging(level: str) -> None:
    """Plain one-line records on stderr, for the standalone command."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
