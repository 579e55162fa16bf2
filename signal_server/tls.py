"""TLS for the standalone command: a modern server context, reloaded in place.

Browsers grant camera and microphone only to secure pages, which may then
only open ``wss://``, so the command can terminate TLS itself. The context
is Python's server default (its forward-secret AEAD cipher list; no list of
our own) with TLS 1.2 as the floor.

Renewal without a restart: :class:`CertificateReloader` loads a new pair
into a *new* ``SSLContext``, and the listening context's SNI callback (which
OpenSSL calls for every ClientHello, with or without a server name) moves
each new handshake onto the newest one. Open connections keep the context,
and so the certificate, they started with. Not the same context loaded
again: OpenSSL keeps one certificate per key type in a context, so an RSA
renewal loaded over an ECDSA pair would leave the old ECDSA certificate in
service (browsers prefer it), expired or not. A new pair is read into
memory once and loaded from that snapshot: a half-renewed pair (certbot
replaces the certificate and the key one after the other) is refused and
the old pair kept.

A pair outside its validity window is refused too (an expired renewal
would make every new handshake fail while the old pair still works), and
only regular files of at most 1 MiB are read, in a worker thread while
serving: a FIFO or a huge file in their place cannot freeze the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .settings import Settings, read_regular_file

__all__ = ["TLSError", "CertificateReloader", "TLSSite", "tls_from_settings"]

logger = logging.getLogger(__name__)

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
MAX_FILE = 1 << 20  # bytes: far above any real chain or key


class TLSError(ValueError):
    """A bad certificate or key; ``str()`` is one line naming the option."""


@dataclass(frozen=True)
class _Pair:
    """One certificate chain and its key, as read from disk at one moment."""

    cert_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate

    def describe(self) -> str:
        names = self.leaf.subject.rfc4514_string() or "(no subject)"
        return f"{names}, valid until {self.leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


def _read(path: str, flag: str) -> bytes:
    """A regular file's bytes (bounded, never waiting on a FIFO), errors naming ``--flag``."""
    try:
        return read_regular_file(path, MAX_FILE)
    except ValueError as exc:
        raise TLSError(f"--{flag}: {exc}") from None


def _private_key(pem: bytes, path: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise TLSError(f"--tls-key: {path!r} is encrypted; the server cannot prompt, give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"--tls-key: {path!r} is not a PEM private key") from None


def _read_pair(cert_path: str, key_path: str) -> _Pair:
    """Read and cross-check both files; errors name the option at fault."""
    cert_pem = _read(cert_path, "tls-cert")
    key_pem = _read(key_path, "tls-key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSError(f"--tls-cert: {cert_path!r} is not a PEM certificate") from None
    key = _private_key(key_pem, key_path)
    leaf = chain[0]
    try:
        leaf_spki = leaf.public_key().public_bytes(*_SPKI)
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"--tls-cert: {cert_path!r} has a public key of an unsupported type") from None
    if leaf_spki != key.public_key().public_bytes(*_SPKI):
        raise TLSError(f"--tls-key: {key_path!r} does not match the certificate in --tls-cert {cert_path!r}")
    now = datetime.now(UTC)
    if now > leaf.not_valid_after_utc:
        raise TLSError(f"--tls-cert: {cert_path!r} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < leaf.not_valid_before_utc:
        raise TLSError(
            f"--tls-cert: {cert_path!r} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    return _Pair(cert_pem, key_pem, leaf)


@contextlib.contextmanager
def _in_memory(pair: _Pair, cert_path: str, key_path: str) -> Iterator[tuple[str, str]]:
    """Paths OpenSSL can open that hold exactly ``pair``'s bytes.

    ``load_cert_chain`` takes only paths. Anonymous memory files (Linux) let
    it read the snapshot we checked, not whatever the files hold a moment
    later. Elsewhere the original paths are used.
    """
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        yield cert_path, key_path
        return
    descriptors = [os.memfd_create("signal-server-tls"), os.memfd_create("signal-server-tls")]
    try:
        for fd, data in zip(descriptors, (pair.cert_pem, pair.key_pem), strict=True):
            os.write(fd, data)
        yield f"/proc/self/fd/{descriptors[0]}", f"/proc/self/fd/{descriptors[1]}"
    finally:
        for fd in descriptors:
            os.close(fd)


def _new_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # WebSocket upgrades are HTTP/1.1
    return context


def _load(pair: _Pair, cert_path: str, key_path: str) -> ssl.SSLContext:
    """A new server context serving ``pair`` (and nothing else)."""
    context = _new_context()
    try:
        with _in_memory(pair, cert_path, key_path) as (cert_file, key_file):
            try:
                context.load_cert_chain(cert_file, key_file)
            except ssl.SSLError as exc:  # e.g. a key too small for OpenSSL's security level
                raise TLSError(f"--tls-cert: {cert_path!r} is refused by OpenSSL: {exc.reason or exc}") from None
    except OSError as exc:  # out of file descriptors, say
        raise TLSError(f"--tls-cert: cannot load {cert_path!r}: {exc.strerror or exc}") from None
    return context


def _signature(path: str) -> tuple[int, ...] | None:
    """What changes when a file is rewritten or a symlink repointed (certbot's live/)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class CertificateReloader:
    """Owns the live context; reloads it when the files change or on SIGHUP."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        """Load the pair; raises :class:`TLSError` on bad files (the command exits 2)."""
        self.cert_path = cert_path
        self.key_path = key_path
        self._seen = self._signatures()
        pair = _read_pair(cert_path, key_path)
        # The listening context: the site's, for good. Each handshake moves to _serving.
        self.context = self._serving = _load(pair, cert_path, key_path)
        self.context.sni_callback = self._select
        self.description = pair.describe()

    def _select(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        """At each ClientHello: serve the newest pair loaded."""
        if context is not self._serving:
            connection.context = self._serving

    def _signatures(self) -> tuple[tuple[int, ...] | None, ...]:
        return (_signature(self.cert_path), _signature(self.key_path))

    def reload(self) -> bool:
        """Load the files now. On failure keep the old pair and log one line why."""
        self._seen = self._signatures()
        try:
            pair = _read_pair(self.cert_path, self.key_path)
        except TLSError as exc:
            return self._failed(exc)
        return self._install(pair)

    async def reload_async(self) -> bool:
        """:meth:`reload`, with the files read and parsed in a worker thread (a slow
        disk or a hostile file never stalls the connections this loop serves)."""
        self._seen = self._signatures()
        try:
            pair = await asyncio.to_thread(_read_pair, self.cert_path, self.key_path)
        except TLSError as exc:
            return self._failed(exc)
        return self._install(pair)

    def _install(self, pair: _Pair) -> bool:
        try:
            self._serving = _load(pair, self.cert_path, self.key_path)
        except TLSError as exc:
            return self._failed(exc)
        self.description = pair.describe()
        logger.info("TLS certificate reloaded: %s", self.description)
        return True

    @staticmethod
    def _failed(exc: TLSError) -> bool:
        logger.error("TLS reload failed, still serving the previous certificate: %s", exc)
        return False

    def check(self) -> bool:
        """Reload when either file changed since the last attempt (each change is tried once)."""
        if self._signatures() == self._seen:
            return False
        return self.reload()

    async def check_async(self) -> bool:
        """:meth:`check` for the event loop: the reload reads in a worker thread."""
        if self._signatures() == self._seen:
            return False
        return await self.reload_async()

    async def watch(self, interval: float) -> None:
        """Check the files every ``interval`` seconds, forever (a stat each: cheap)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_async()
            except Exception:  # keep watching: the next renewal must still be picked up
                logger.exception("TLS reload check failed, still serving the previous certificate")


def tls_from_settings(settings: Settings) -> CertificateReloader | None:
    """The reloader for ``--tls-cert``/``--tls-key``, None without them; raises :class:`TLSError`."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None:
        raise TLSError("--tls-cert: --tls-key was given without the certificate it belongs to")
    if settings.tls_key is None:
        raise TLSError("--tls-key: --tls-cert needs its private key")
    return CertificateReloader(settings.tls_cert, settings.tls_key)


class TLSSite(web.BaseSite):
    """aiohttp's TCP site, with the TLS handshake bounded by ``--handshake-timeout``.

    ``handshake_timeout`` bounds a connection's first HTTP request, but that
    clock starts once TLS is up; asyncio's own handshake bound is 60 s. A
    client that opens connections and never finishes a handshake is dropped
    as soon as one that never sends its request would be.
    """

    __slots__ = ("_host", "_port", "_handshake_timeout")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, context: ssl.SSLContext,
        handshake_timeout: float, backlog: int,
    ) -> None:
        super().__init__(runner, ssl_context=context, backlog=backlog)
        self._host = host
        self._port = port
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        assert self._runner.server is not None  # runner.setup() ran: BaseSite checks it
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, ssl_handshake_timeout=self._handshake_timeout,
        )
