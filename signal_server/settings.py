"""Server settings: one table of options read from flags, environment and TOML.

Each option is declared once in :data:`OPTIONS`; the command line flag
(``--max-participants``), the environment variable
(``SIGNAL_MAX_PARTICIPANTS``) and the TOML key (``max_participants`` or
``max-participants``) are all derived from that one entry, so they cannot
drift apart. Precedence: flag, then environment, then file, then default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from yarl import URL

__all__ = [
    "Settings", "Option", "OPTIONS", "SettingsError", "load_settings", "read_key_files", "EXAMPLE_SECRETS",
]

NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
# The secrets our own documentation shows: printed for all to read, so they
# serve loopback only (the command refuses them on any other address).
EXAMPLE_SECRETS = frozenset({
    "change-me-to-32-or-more-random-bytes",
    "replace-me-with-32-or-more-random-bytes-from-your-vault",
    "replace-with-the-output-of-secrets.token_urlsafe(32)",
    "an-hs256-secret-of-32-bytes-or-more!!",
    "a-webhook-secret-of-32-bytes-or-more",
})
# Empty in the environment is an error for these, not "unset": an empty
# SIGNAL_JWT_SECRET (say, from a failed `openssl rand` in a deploy script) would
# otherwise mean dev mode, with its open token endpoint, or no TURN or webhook key.
KEY_FIELDS = frozenset({"jwt_secret", "jwt_secret_file", "jwt_public_key_file", "turn_secret", "webhook_secret"})
LOG_FORMATS = ("text", "json")
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384")


class SettingsError(ValueError):
    """A bad option value; ``str()`` is a one-line message naming the option."""


@dataclass(frozen=True)
class Settings:
    """Everything the server can be configured with. Defaults are production-safe."""

    host: str = "127.0.0.1"
    port: int = 8080
    jwt_secret: str | None = None
    jwt_public_key: str | None = None  # PEM text, read from --jwt-public-key FILE
    # Where the key came from (paths): SIGHUP reads them again (key rotation, cli.py).
    jwt_public_key_file: str | None = None
    jwt_secret_file: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    max_participants: int = 8
    max_message_size: int = 65536
    heartbeat: float = 15.0
    stun_urls: tuple[str, ...] = ()
    turn_urls: tuple[str, ...] = ()
    turn_secret: str | None = None
    turn_ttl: int = 3600
    turn_username: str | None = None
    turn_credential: str | None = None
    allowed_origins: tuple[str, ...] = ()
    log_level: str = "info"
    redis_url: str | None = None
    redis_sentinels: tuple[str, ...] = ()
    redis_master: str | None = None
    node_id: str | None = None  # None: a random one per process
    node_ttl: float = 10.0
    reconnect_grace: float = 20.0
    kept_messages: int = 256
    kept_bytes: int = 1024 * 1024
    rate_limit: float = 50.0
    rate_burst: int = 200
    max_connections: int = 20000
    max_connections_per_ip: int = 1000
    ip_connect_rate: float = 50.0
    ip_connect_burst: int = 200
    max_connections_per_user: int = 32
    max_rooms_per_user: int = 16
    trusted_proxies: tuple[str, ...] = ()
    handshake_timeout: float = 10.0
    max_send_buffer: int = 1024 * 1024
    max_kept_bytes: int = 256 * 1024 * 1024
    receive_rate: int = 256 * 1024
    receive_burst: int = 1024 * 1024
    tls_cert: str | None = None  # paths, not contents: the files are watched and reloaded
    tls_key: str | None = None
    tls_watch_interval: float = 5.0
    log_format: str = "text"
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str | None = None
    webhook_timeout: float = 5.0
    webhook_max_attempts: int = 8
    dev_mode: bool = field(default=False, compare=False)

    @property
    def clustered(self) -> bool:
        """True when a Redis registry is configured (many nodes as one server)."""
        return bool(self.redis_url or self.redis_sentinels)

    @property
    def auth_configured(self) -> bool:
        """True when tokens can be verified (a secret or a public key is set)."""
        return bool(self.jwt_secret or self.jwt_public_key)


# ---------------------------------------------------------------- parsers


def _ranged(convert: Callable[[str], Any], noun: str, low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"expected {noun}, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _int(low: int, high: int) -> Callable[[str], int]:
    return _ranged(int, "an integer", low, high)


def _float(low: float, high: float) -> Callable[[str], float]:
    return _ranged(float, "a number", low, high)


def _choice(choices: Sequence[str], fold: Callable[[str], str] = str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = fold(text)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def _text(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    try:
        # Flags and environment values that are not UTF-8 arrive with
        # surrogate escapes; they would fail later, inside a request.
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    return text


def _secret(text: str) -> str:
    text = _text(text)
    if len(text.encode("utf-8")) < MIN_SECRET_BYTES:
        raise ValueError(
            f"must be at least {MIN_SECRET_BYTES} bytes (try: python3 -c "
            "'import secrets; print(secrets.token_urlsafe(64))')"
        )
    return text


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.startswith(tuple(s + ":" for s in schemes)):
            raise ValueError(f"must start with {' or '.join(s + ':' for s in schemes)}, got {text!r}")
        return text

    return parse


def _origin(text: str) -> str:
    if text != "*" and not text.startswith(("http://", "https://")):
        raise ValueError(f"must be an origin like https://app.example.com, got {text!r}")
    return text.rstrip("/")


def _network(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"must be an IP address or CIDR network, got {text!r}") from None
    return text


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, got {text!r}")
    return text


def _node_id(text: str) -> str:
    if not NODE_ID.match(text):
        raise ValueError(f"must be 1-64 characters of A-Z a-z 0-9 . _ -, got {text!r}")
    return text


def _webhook_url(text: str) -> str:
    """An absolute http(s) URL with a host (a webhook receiver)."""
    try:
        url = URL(text)
    except ValueError:
        raise ValueError(f"not a URL: {text!r}") from None
    if url.scheme not in ("http", "https") or not url.host or url.user or url.password:
        raise ValueError("must be an http:// or https:// URL with a host and no user:password part")
    return text


MAX_KEY_FILE = 64 * 1024  # bytes: far above any real key


def read_regular_file(path: str, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit``; opened without blocking, so a FIFO
    in its place is refused instead of stalling a reload (SIGHUP runs on the event loop).

    Raises:
        ValueError: a one-line reason naming the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path!r} is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path!r} is larger than {limit // 1024} KiB")
    return data


def _read_key_file(path: str) -> str:
    """A key file's text (bounded, never blocking)."""
    data = read_regular_file(path, MAX_KEY_FILE)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path!r} is not UTF-8 text") from None


def _pem_file(path: str) -> str:
    """Checks the file at parse time (one-line error naming the option); returns the path."""
    read_pem(path)
    return path


def read_pem(path: str) -> str:
    """The PEM text in ``path`` (a public key: nothing else is looked at here)."""
    pem = _read_key_file(path)
    if "-----BEGIN" not in pem:
        raise ValueError(f"{path!r} is not a PEM file")
    return pem


def _secret_file(path: str) -> str:
    """Checks the file at parse time; returns the path."""
    read_secret(path)
    return path


def read_secret(path: str) -> str:
    """The secret in ``path``: the whole file but its trailing line break (``echo`` adds one)."""
    text = _read_key_file(path).rstrip("\r\n")
    try:
        return _secret(text)
    except ValueError as exc:
        raise ValueError(f"{path!r}: {exc}") from None


@dataclass(frozen=True)
class Option:
    """One setting: its flag name, the Settings field it fills, its parser."""

    flag: str  # without the leading dashes
    field: str
    parse: Callable[[str], Any]
    help: str
    repeat: bool = False
    metavar: str | None = None

    @property
    def env(self) -> str:
        return "SIGNAL_" + self.flag.upper().replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("host", "host", _text, "address to bind (default 127.0.0.1)"),
    Option("port", "port", _int(0, 65535), "port to bind (default 8080; 0 picks a free one)"),
    Option("jwt-secret", "jwt_secret", _secret, "HS256 shared secret, at least 32 bytes; none = dev mode"),
    Option(
        "jwt-public-key", "jwt_public_key_file", _pem_file,
        "PEM public key FILE for RS256/ES256 tokens; SIGHUP reads it again", metavar="FILE",
    ),
    Option(
        "jwt-secret-file", "jwt_secret_file", _secret_file,
        "FILE holding the HS256 secret (instead of --jwt-secret); SIGHUP reads it again", metavar="FILE",
    ),
    Option(
        "jwt-algorithm", "jwt_algorithm", _choice(JWT_ALGORITHMS, str.upper),
        "the one JWT algorithm accepted (default HS256)",
    ),
    Option("jwt-audience", "jwt_audience", _text, "required 'aud' claim"),
    Option("jwt-issuer", "jwt_issuer", _text, "required 'iss' claim"),
    Option("max-participants", "max_participants", _int(1, 1000), "room capacity (default 8)"),
    Option(
        "max-message-size", "max_message_size", _int(1024, 16 * 1024 * 1024),
        "largest client frame in bytes; larger closes with 1009 (default 65536)",
    ),
    Option(
        "heartbeat", "heartbeat", _float(0.5, 3600),
        "keepalive interval, seconds; dead peers found within twice that (default 15)",
    ),
    Option("stun-url", "stun_urls", _url(("stun", "stuns")), "STUN server URL", repeat=True),
    Option("turn-url", "turn_urls", _url(("turn", "turns")), "TURN server URL", repeat=True),
    Option("turn-secret", "turn_secret", _text, "TURN REST API shared secret (coturn use-auth-secret)"),
    Option("turn-ttl", "turn_ttl", _int(60, 7 * 86400), "TURN credential lifetime, seconds (default 3600)"),
    Option("turn-username", "turn_username", _text, "static TURN username (without --turn-secret)"),
    Option("turn-credential", "turn_credential", _text, "static TURN password (without --turn-secret)"),
    Option(
        "allowed-origin", "allowed_origins", _origin,
        "browser Origin allowed for CORS and WebSocket; none = all (dev)", repeat=True,
    ),
    Option("log-level", "log_level", _choice(LOG_LEVELS, str.lower), "debug, info, warning or error"),
    Option("redis-url", "redis_url", _url(("redis", "rediss", "unix")), "Redis URL: many nodes as one server"),
    Option(
        "redis-sentinel", "redis_sentinels", _host_port,
        "Redis Sentinel HOST:PORT (with --redis-master)", repeat=True, metavar="HOST:PORT",
    ),
    Option("redis-master", "redis_master", _text, "master name the sentinels watch"),
    Option("node-id", "node_id", _node_id, "this node's id in the cluster (default: random)"),
    Option(
        "node-ttl", "node_ttl", _float(0.5, 3600),
        "seconds without a heartbeat before a node is dead and its slots are held (default 10)",
    ),
    Option(
        "reconnect-grace", "reconnect_grace", _float(0, 3600),
        "seconds a dropped participant's slot is held for a resume (default 20)",
    ),
    Option("kept-messages", "kept_messages", _int(1, 100000), "messages kept per held slot (default 256)"),
    Option("kept-bytes", "kept_bytes", _int(1024, 64 * 1024 * 1024), "bytes kept per held slot (default 1 MiB)"),
    Option("rate-limit", "rate_limit", _float(0.1, 1e7), "messages/s per connection (default 50)"),
    Option("rate-burst", "rate_burst", _int(1, 10**7), "message burst per connection (default 200)"),
    Option("max-connections", "max_connections", _int(1, 10**7), "connections per process (default 20000)"),
    Option(
        "max-connections-per-ip", "max_connections_per_ip", _int(1, 10**7),
        "concurrent connections per client IP (default 1000)",
    ),
    Option("ip-connect-rate", "ip_connect_rate", _float(0.1, 1e7), "new connections/s per IP (default 50)"),
    Option("ip-connect-burst", "ip_connect_burst", _int(1, 10**7), "new connection burst per IP (default 200)"),
    Option(
        "max-connections-per-user", "max_connections_per_user", _int(1, 10**6),
        "concurrent connections per user (default 32)",
    ),
    Option("max-rooms-per-user", "max_rooms_per_user", _int(1, 10**6), "rooms one user may be in (default 16)"),
    Option(
        "trusted-proxy", "trusted_proxies", _network,
        "proxy address/CIDR whose X-Forwarded-For is believed", repeat=True,
    ),
    Option(
        "handshake-timeout", "handshake_timeout", _float(0.1, 3600),
        "seconds a connection may take to send its HTTP request, and its TLS handshake (default 10)",
    ),
    Option(
        "max-send-buffer", "max_send_buffer", _int(4096, 1 << 30),
        "unsent bytes per connection before it is closed as a slow consumer (default 1 MiB)",
    ),
    Option(
        "max-kept-bytes", "max_kept_bytes", _int(1024, 1 << 40),
        "bytes kept for all held slots of the process together (default 256 MiB)",
    ),
    Option(
        "receive-rate", "receive_rate", _int(1024, 1 << 40),
        "bytes/s a connection may send, every frame counted (default 262144)",
    ),
    Option(
        "receive-burst", "receive_burst", _int(1024, 1 << 40),
        "byte burst a connection may send; at least --max-message-size (default 1 MiB)",
    ),
    Option("tls-cert", "tls_cert", _text, "PEM certificate chain FILE: serve HTTPS and wss://", metavar="FILE"),
    Option("tls-key", "tls_key", _text, "PEM private key FILE for --tls-cert (unencrypted)", metavar="FILE"),
    Option(
        "tls-watch-interval", "tls_watch_interval", _float(0.1, 86400),
        "seconds between checks of the TLS files for a renewal (default 5; SIGHUP reloads at once)",
    ),
    Option(
        "log-format", "log_format", _choice(LOG_FORMATS, str.lower),
        "text (for a terminal, the default) or json (one object a line, for Loki/Elasticsearch)",
    ),
    Option(
        "webhook-url", "webhook_urls", _webhook_url,
        "http(s) URL that receives the signed room and participant events", repeat=True, metavar="URL",
    ),
    Option("webhook-secret", "webhook_secret", _secret, "HMAC-SHA256 key of the webhook signatures, at least 32 bytes"),
    Option(
        "webhook-timeout", "webhook_timeout", _float(0.1, 300),
        "seconds one webhook attempt may take, connection included (default 5)",
    ),
    Option(
        "webhook-max-attempts", "webhook_max_attempts", _int(1, 100),
        "attempts per webhook event before it is dropped (default 8; backoff 0.5 s doubling to 60 s)",
    ),
)

_BY_FLAG = {option.flag: option for option in OPTIONS}


def _normalise_key(key: str) -> str:
    return key.replace("_", "-")


def _from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"--config: cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"--config: {path!r} is not valid TOML: {exc}") from None
    return data


def _parse(option: Option, raw: Any, source: str) -> Any:
    """Parse one raw value (a string, or a TOML value) for ``option``."""
    try:
        if option.repeat:
            if isinstance(raw, str):
                items = [part.strip() for part in raw.split(",") if part.strip()]
            elif isinstance(raw, list):
                items = [str(item) for item in raw]
            else:
                raise ValueError("expected a list")
            return tuple(option.parse(item) for item in items)
        if isinstance(raw, (dict, list)) or isinstance(raw, bool):
            raise ValueError(f"expected a single value, got {raw!r}")
        return option.parse(str(raw))
    except ValueError as exc:
        raise SettingsError(f"{source}: {exc}") from None


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> Settings:
    """Merge flags, ``SIGNAL_*`` environment and an optional TOML file.

    Args:
        flags: parsed command line values keyed by flag name (``"jwt-secret"``);
            ``None`` or missing means "not given".
        environ: the process environment.
        config_file: path of a TOML file, or None.

    Raises:
        SettingsError: one line naming the offending flag, variable or key.
    """
    values: dict[str, Any] = {}
    if config_file is None:
        config_file = environ.get("SIGNAL_CONFIG") or None
    if config_file:
        for key, raw in _from_file(config_file).items():
            option = _BY_FLAG.get(_normalise_key(key))
            if option is None:
                raise SettingsError(f"--config: unknown key {key!r} in {config_file!r}")
            values[option.field] = _parse(option, raw, f"{key} in {config_file}")
    for option in OPTIONS:
        if option.env in environ and environ[option.env] != "":
            values[option.field] = _parse(option, environ[option.env], option.env)
        elif environ.get(option.env) == "" and option.field in KEY_FIELDS:
            raise SettingsError(
                f"{option.env}: set but empty (a failed secret generation?); give the value or unset it"
            )
        raw = flags.get(option.flag)
        if raw is not None and raw != []:
            values[option.field] = _parse(option, raw if not option.repeat else list(raw), f"--{option.flag}")
    if values.get("jwt_secret") and values.get("jwt_secret_file"):
        raise SettingsError("--jwt-secret-file: give either --jwt-secret or --jwt-secret-file, not both")
    settings = replace(Settings(), **values)
    settings = read_key_files(settings)
    _check_consistency(settings)
    return settings


def read_key_files(settings: Settings) -> Settings:
    """``settings`` with the secret or public key read (again) from their files, if they came from files.

    Raises:
        SettingsError: naming the option, when a file cannot be read or holds no usable text.
    """
    try:
        if settings.jwt_public_key_file:
            settings = replace(settings, jwt_public_key=read_pem(settings.jwt_public_key_file))
    except ValueError as exc:
        raise SettingsError(f"--jwt-public-key: {exc}") from None
    try:
        if settings.jwt_secret_file:
            settings = replace(settings, jwt_secret=read_secret(settings.jwt_secret_file))
    except ValueError as exc:
        raise SettingsError(f"--jwt-secret-file: {exc}") from None
    return settings


def _check_consistency(settings: Settings) -> None:
    algorithm = settings.jwt_algorithm
    if settings.jwt_public_key and algorithm.startswith("HS"):
        raise SettingsError("--jwt-algorithm: a public key needs RS256/ES256-style algorithms, not " + algorithm)
    if not settings.jwt_public_key and not algorithm.startswith("HS"):
        raise SettingsError(f"--jwt-public-key: {algorithm} needs a PEM public key file")
    if settings.jwt_secret and settings.jwt_public_key:
        raise SettingsError("--jwt-secret: give either a secret or a public key, not both")
    if settings.receive_burst < settings.max_message_size:
        raise SettingsError(
            f"--receive-burst: {settings.receive_burst} is less than --max-message-size ({settings.max_message_size})"
        )
    if settings.kept_bytes > settings.max_send_buffer:
        # A resume replays the kept bytes at once; more than the send buffer
        # would close the resuming connection as a slow consumer.
        raise SettingsError(
            f"--kept-bytes: {settings.kept_bytes} is more than --max-send-buffer ({settings.max_send_buffer})"
        )
    if settings.redis_url and settings.redis_sentinels:
        raise SettingsError("--redis-sentinel: give either --redis-url or sentinels, not both")
    _check_turn(settings)
    if settings.webhook_urls and not settings.webhook_secret:
        raise SettingsError("--webhook-secret: webhooks are signed; give a secret of at least 32 bytes")
    if bool(settings.redis_sentinels) != bool(settings.redis_master):
        raise SettingsError("--redis-master: sentinels need a master name and a master name needs sentinels")


def _check_turn(settings: Settings) -> None:
    """A TURN server needs credentials (browsers throw on a TURN entry without them,
    which breaks every call), and credentials need a server."""
    static = (settings.turn_username, settings.turn_credential)
    if settings.turn_secret and any(static):
        raise SettingsError("--turn-secret: give either --turn-secret or --turn-username/--turn-credential, not both")
    if any(static) and not all(static):
        missing = "--turn-credential" if settings.turn_username else "--turn-username"
        raise SettingsError(f"{missing}: static TURN credentials need both --turn-username and --turn-credential")
    credentials = settings.turn_secret or all(static)
    if settings.turn_urls and not credentials:
        raise SettingsError(
            "--turn-url: a TURN server needs credentials: --turn-secret (coturn use-auth-secret) "
            "or --turn-username and --turn-credential"
        )
    if credentials and not settings.turn_urls:
        option = "--turn-secret" if settings.turn_secret else "--turn-username"
        raise SettingsError(f"{option}: TURN credentials without --turn-url are never used")

