"""Logging set-up, and the filter that keeps tokens out of every log line.

Tokens travel in the WebSocket URL's query (browsers cannot set headers on a
WebSocket), so the access log's request line would carry them. The filter
rewrites the value of every query parameter whose name, once percent-decoded
the way the server's URL parser decodes it, is ``token`` in any case
(``?token=``, ``?%74oken=``, ``?TOKEN=``), wherever it appears in a record,
and then anything shaped like a JWT elsewhere (a ``;token=`` path parameter,
a request line that is not HTTP): the server would not take it from there,
but it is still a valid token in the hands of whoever reads the log.

Records are also written so that a client cannot shape them: a malformed
request is one line, not aiohttp's traceback (a 30-byte request must not buy
2 KiB of log), and bytes that are not UTF-8 in a header (aiohttp keeps them
as surrogate escapes) are written escaped instead of failing the JSON encoder,
which would drop the record and so hide the request.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["TokenRedactingFilter", "install_token_redaction", "configure_logging", "JsonFormatter"]

# A query parameter: separator, name, "=", value (up to the next separator,
# white space or quote, which end a request line inside a log record).
# Only "&" separates parameters for the server (a ";" is part of a value).
_QUERY_PARAMETER = re.compile(r"([?&])([^=&?\s\"']*)=([^&\s\"']*)")
# A JWS or JWE: base64url segments, the first being a JSON header ("eyJ" is
# '{"'), with dots that may arrive percent-encoded.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*(?:(?:\.|%2[Ee])[A-Za-z0-9_-]*){2,}")
REDACTED = "[redacted]"


def _is_token_name(name: str) -> bool:
    # Decoded twice: redacting a doubly encoded name too costs nothing.
    return unquote(unquote(name)).strip().lower() == "token"


def _redact_parameter(match: re.Match[str]) -> str:
    if _is_token_name(match.group(2)):
        return f"{match.group(1)}{match.group(2)}={REDACTED}"
    return match.group(0)


def redact(text: str) -> str:
    """Replace the value of every ``token`` query parameter in ``text``, however its name is
    spelled, and every other JWT-shaped string."""
    if "=" in text:
        text = _QUERY_PARAMETER.sub(_redact_parameter, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    return text


class TokenRedactingFilter(logging.Filter):
    """Redacts ``token=`` query values from a record's message and traceback.

    aiohttp's "Error handling request" records carry the offending request
    line inside the exception (an over-long URL, say), so the traceback text
    is redacted too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg = redacted
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class ClientErrorFilter(logging.Filter):
    """Turns aiohttp's traceback for a malformed request (the client's fault) into one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and error.code < 500:
            detail = " ".join(f"{error.code} {error.message}".split())  # one line, whatever it quotes
            record.msg = f"{record.getMessage()}: {detail}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


# The access log has the request line; the server log has request errors.
REDACTED_LOGGERS = ("aiohttp.access", "aiohttp.server", "aiohttp.web")


def install_token_redaction() -> None:
    """Attach the filters once per logger (idempotent: apps may be created many times)."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrorFilter) for f in server.filters):
        server.addFilter(ClientErrorFilter())  # before redaction: its message may quote the URL
    for name in REDACTED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactingFilter) for f in target.filters):
            target.addFilter(TokenRedactingFilter())


def configure_logging(level: str, log_format: str = "text") -> None:
    """One line a record on stderr, for the standalone command: text for a person, or JSON."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


# Structured fields a record may carry (``extra=``): ours, then the access
# log's under shorter names. Only these are copied: the access log's extras
# also hold the raw request line and Referer, where a token may sit.
RECORD_FIELDS = ("room", "user", "clean", "code", "node", "url")
ACCESS_FIELDS = {
    "remote_address": "remote",
    "response_status": "status",
    "response_size": "bytes",
    "request_time_frac": "duration",
}


_this_node: str | None = None


def set_node(node: str | None) -> None:
    """In a cluster: every JSON record says which node wrote it (operators filter by it)."""
    global _this_node
    _this_node = node


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the structured fields.

    The message is the one the redaction filter left (and is redacted once
    more here, in case a record came from a logger without the filter), so
    a token never reaches the log store.
    """

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        fields = record.__dict__
        for name in RECORD_FIELDS:
            if name in fields:
                body[name] = fields[name]
        if _this_node is not None and "node" not in body:
            body["node"] = _this_node
        for name, short in ACCESS_FIELDS.items():
            if name in fields:
                body[short] = fields[name]
        if "duration" in body:  # aiohttp formats it as text
            body["duration"] = float(body["duration"])
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            body["exc"] = redact(record.exc_text)
        try:
            return orjson.dumps(body, default=str).decode()
        except TypeError:  # a string with surrogate escapes: bytes a client sent that are not UTF-8
            return orjson.dumps({key: _escaped(value) for key, value in body.items()}, default=str).decode()


def _escaped(value: Any) -> Any:
    """A string whose undecodable bytes are written as ``\\xNN`` escapes; other values as they are."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value
