"""The ``signal-server`` command: ``serve`` (the default), ``token`` and ``rooms``.

The only module with process-wide side effects: logging set-up, signal
handlers, the file-descriptor limit, printing. Bad input is one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import os
import resource
import secrets
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.web_log import AccessLogger

from . import __version__
from .app import create_standalone_app
from .auth import KeyConfigError, TokenVerifier, mint_token_for
from .context import SIGNALING, Signaling
from .errors import StartupError
from .logs import configure_logging, set_node
from .settings import EXAMPLE_SECRETS, OPTIONS, Settings, SettingsError, load_settings, read_key_files
from .tls import CertificateReloader, TLSError, TLSSite, tls_from_settings

__all__ = ["main"]

logger = logging.getLogger("signal_server")
PROG = "signal-server"
# aiohttp's default access line plus the time taken, which JSON logs carry as "duration".
JSON_ACCESS_LOG_FORMAT = '%a %t "%r" %s %b "%{Referer}i" "%{User-Agent}i" %Tf'
# Young objects the cycle collector lets accumulate before a collection (CPython's
# default is 700); see _tune_collector.
GC_THRESHOLD = 50_000
SHUTDOWN_TIMEOUT = 5.0
# Every step of the shutdown is bounded; should one still hang, the process exits 1
# at this deadline (below systemd's TimeoutStopSec=15 in deploy/).
SHUTDOWN_DEADLINE = 12.0
MAX_HEADERS = 32  # a browser's upgrade has about 15, proxies add a few
DEV_USERS = (("alice", "Alice"), ("bob", "Bob"))
ROOMS_HELP = (
    "Call the room service API of a running server: list, show, kick, close, send. "
    "The admin token is minted from the configured secret, or given with --token."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def __init__(self, **kwargs: Any) -> None:
        # No prefixes of long flags: --max-participant must be an error, as it is in TOML.
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _settings_parser(prog: str, description: str, prefix: str = "") -> _Parser:
    """A parser of the settings' flags (only those starting with ``prefix``);
    the rest still come from the environment and ``--config``."""
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    for option in OPTIONS:
        if not option.flag.startswith(prefix):
            continue
        parser.add_argument(
            f"--{option.flag}",
            dest=option.flag,
            action="append" if option.repeat else "store",
            metavar=option.metavar or option.flag.split("-")[-1].upper(),
            help=f"{option.help} [{option.env}]",
        )
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of the console script and of ``python -m signal_server``."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if args and args[0] == "token":
        return _token_command(args[1:], env)
    if args and args[0] == "rooms":
        from .rooms_cli import rooms_command  # the operator's client of the room service API

        return rooms_command(_settings_parser(f"{PROG} rooms", ROOMS_HELP, "jwt-"), args[1:], env)
    if args and args[0] == "serve":
        args = args[1:]
    return _serve_command(args, env)


# ------------------------------------------------------------------ token


def _token_command(args: list[str], env: Mapping[str, str]) -> int:
    parser = _settings_parser(f"{PROG} token", "Print an HS256 token signed with the configured secret.", "jwt-")
    parser.add_argument("sub", help="user id (the token's 'sub')")
    parser.add_argument("--name", help="display name")
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    parser.add_argument("--room", action="append", help="restrict the token to this room (repeatable)")
    parser.add_argument(
        "--admin", action="store_true", help="add the admin grant (the room service API; keep it on the backend)"
    )
    namespace = parser.parse_args(args)
    try:
        settings = load_settings(vars(namespace), env, namespace.config)
    except SettingsError as exc:
        return _fail(str(exc))
    if not settings.jwt_secret or not settings.jwt_algorithm.startswith("HS"):
        return _fail("--jwt-secret: tokens are signed with the HS256 secret; none is configured")
    if not 0 < len(namespace.sub) <= 128:
        return _fail("sub: must be 1-128 characters")
    if namespace.ttl <= 0:
        return _fail("--ttl: must be a positive number of seconds")
    print(
        mint_token_for(
            settings, namespace.sub, name=namespace.name, ttl=namespace.ttl, rooms=namespace.room,
            admin=namespace.admin,
        )
    )
    return 0


# ------------------------------------------------------------------ serve


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _example_secret(settings: Settings) -> str | None:
    """Why the secret must not serve a non-loopback address, if it is one our documentation prints."""
    if _is_loopback(settings.host):
        return None
    if settings.jwt_secret in EXAMPLE_SECRETS:
        option = "--jwt-secret-file" if settings.jwt_secret_file else "--jwt-secret"
    elif settings.webhook_secret in EXAMPLE_SECRETS:
        option = "--webhook-secret"
    else:
        return None
    return (
        f"{option}: this is an example secret from the documentation, fine on loopback only; "
        "generate your own: python3 -c 'import secrets; print(secrets.token_urlsafe(64))'"
    )


def _serve_command(args: list[str], env: Mapping[str, str]) -> int:
    parser = _settings_parser(PROG, "WebRTC signaling server (aiohttp).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    namespace = parser.parse_args(args)
    try:
        settings = load_settings(vars(namespace), env, namespace.config)
    except SettingsError as exc:
        return _fail(str(exc))
    if not settings.auth_configured:
        if not _is_loopback(settings.host):
            return _fail(
                "--jwt-secret: dev mode (no secret) only binds to loopback; "
                f"set a secret to listen on {settings.host}"
            )
        # 64 random bytes: long enough for HS512 too (RFC 7518 3.2).
        settings = replace(settings, jwt_secret=secrets.token_urlsafe(64), dev_mode=True)
    problem = _example_secret(settings)
    if problem:
        return _fail(problem)
    try:
        TokenVerifier(settings)  # a key that cannot verify stops here, not as a 5xx later
    except KeyConfigError as exc:
        return _fail(str(exc))
    try:
        tls = tls_from_settings(settings)
    except TLSError as exc:
        return _fail(str(exc))
    configure_logging(settings.log_level, settings.log_format)
    set_node(settings.node_id if settings.clustered else None)  # records before the app exists
    if settings.webhook_secret and not settings.webhook_urls:
        logger.warning("--webhook-secret is set but no --webhook-url: no webhooks will be sent")
    if not settings.dev_mode and not settings.allowed_origins:
        logger.warning(
            "no --allowed-origin: a page on any site may open a WebSocket with a token it holds; "
            "list your app's origins in production"
        )
    _raise_file_limit()
    _tune_collector()
    try:
        _run(serve(settings, tls))
    except StartupError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(
            f"--port: cannot listen on {settings.host}:{settings.port}: {exc.strerror} "
            "(another server there? choose another port, e.g. SIGNAL_PORT=8090 make run, or --port 0)"
        )
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (faster relay), else None: asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run(coroutine: Any) -> None:
    # Outside any ``except`` block: a traceback logged while serving must not
    # be chained to the ImportError of a missing uvloop.
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(coroutine)


def _tune_collector() -> None:
    """Make the cycle collector's work follow the garbage, not the connections held.

    Every join leaves about fifty long-lived tracked objects (aiohttp's protocol,
    request, response, reader and writer, our peer and slot). With CPython's
    defaults a join storm collects the young generation every few joins and
    traverses the whole heap, start-up's modules included, each time it has
    grown by a quarter: callgrind counted 0.16 million instructions of
    collection per join in a 2,000-join storm (a sixth of a join). Start-up's
    objects, frozen, are never traversed again, and with 50,000 young objects
    between collections a storm's survivors are promoted in few batches. What
    waits longer is cyclic garbage (a closed connection's objects): at most
    that many objects, a few MiB.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, older, oldest)


def _raise_file_limit() -> None:
    """Every connection is a file descriptor; take all the kernel allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(
    settings: Settings, tls: CertificateReloader | None = None, stop: asyncio.Event | None = None
) -> None:
    """Serve until SIGINT or SIGTERM (or ``stop`` is set), then close every client with 1001 and exit.

    With ``tls`` the site serves HTTPS and ``wss://``; SIGHUP and a change of
    the files reload the certificate without dropping a connection.
    """
    app = create_standalone_app(settings)
    set_node(app[SIGNALING].hub.node)  # a cluster's node id, random unless --node-id
    json_logs = settings.log_format == "json"
    access = logging.getLogger("aiohttp.access")
    runner = web.AppRunner(
        app,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        # Below INFO nothing would be written, yet aiohttp would still make an
        # access logger for every connection: none at all then.
        access_log=access if access.isEnabledFor(logging.INFO) else None,
        access_log_format=JSON_ACCESS_LOG_FORMAT if json_logs else AccessLogger.LOG_FORMAT,
        # Also the bound on how long a connection may take to send its first
        # request: a client that never completes its upgrade is dropped.
        keepalive_timeout=settings.handshake_timeout,
        # A request that has not upgraded yet is counted by no limit, so what
        # it may make us hold is bounded here: 32 header lines instead of
        # aiohttp's 128, ~270 KiB at most instead of ~1 MiB.
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    watcher: asyncio.Task[None] | None = None
    try:
        site: web.BaseSite
        if tls:
            site = TLSSite(runner, settings.host, settings.port, tls.context, settings.handshake_timeout, 4096)
        else:
            site = web.TCPSite(runner, settings.host, settings.port, backlog=4096)
        await site.start()
        host, port = runner.addresses[0][:2]
        loop = asyncio.get_running_loop()
        if stop is None:
            stop = asyncio.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            loop.add_signal_handler(signal.SIGHUP, _reload, tls, app[SIGNALING])
        # Announce only once the handlers are in place: a supervisor that
        # signals as soon as it reads the line must not kill the process.
        _announce(settings, host, port, secure=tls is not None)
        if tls:
            watcher = asyncio.create_task(tls.watch(settings.tls_watch_interval))
        await stop.wait()
        logger.info("shutting down: closing every connection with 1001")
    finally:
        deadline = asyncio.get_running_loop().call_later(SHUTDOWN_DEADLINE, _shutdown_stuck)
        if watcher:
            watcher.cancel()
        await runner.cleanup()
        deadline.cancel()


def _shutdown_stuck() -> None:
    logger.error("shutdown did not finish within %.0f s; exiting now", SHUTDOWN_DEADLINE)
    _hard_exit(1)


def _hard_exit(code: int) -> None:
    """Exit at once, skipping what hangs (the loop's clean-up included)."""
    logging.shutdown()
    os._exit(code)


def _reload(tls: CertificateReloader | None, sig: Signaling) -> None:
    """SIGHUP (systemd's ExecReload): reload the JWT key file and the TLS files; never the default, which exits."""
    keys = _reload_key(sig)
    if tls is None:
        if not keys:
            logger.info("SIGHUP: nothing to reload (no --tls-cert, no --jwt-public-key or --jwt-secret-file)")
    else:
        task = asyncio.get_running_loop().create_task(tls.reload_async())
        _reloads.add(task)  # a reference until done (the loop keeps only weak ones)
        task.add_done_callback(_reloads.discard)


def _reload_key(sig: Signaling) -> bool:
    """Read the key file again and swap the verifier to it (emptying the token cache).

    A file that cannot be read or holds no usable key changes nothing: the
    old key stays in service and one line says why. False when the key did
    not come from a file (nothing to reload).
    """
    settings = sig.settings
    source = settings.jwt_public_key_file or settings.jwt_secret_file
    if not source:
        return False
    try:
        fresh = read_key_files(settings)
        problem = _example_secret(fresh)
        if problem:
            raise SettingsError(problem)
        if (fresh.jwt_secret, fresh.jwt_public_key) == (settings.jwt_secret, settings.jwt_public_key):
            logger.info("SIGHUP: JWT key in %s unchanged", source)
            return True
        sig.verifier.reconfigure(fresh)
    except (SettingsError, KeyConfigError) as exc:
        logger.error("JWT key reload failed, still verifying with the previous key: %s", exc)
        return True
    sig.settings = fresh
    logger.info("JWT key reloaded from %s: tokens of the previous key are refused from now on", source)
    return True


_reloads: set[asyncio.Task[bool]] = set()


def _announce(settings: Settings, host: str, port: int, secure: bool = False) -> None:
    shown = f"[{host}]" if ":" in host else host
    http, ws = ("https", "wss") if secure else ("http", "ws")
    base = f"{http}://{shown}:{port}"
    if settings.log_format == "json":
        _announce_as_record(settings, base)
        return
    lines = [f"signal-server listening on {base} (WebSocket: {ws}://{shown}:{port}/webrtc/ws/ROOM?token=JWT)"]
    if settings.dev_mode:
        tokens = [(sub, mint_token_for(settings, sub, name=name, ttl=86400)) for sub, name in DEV_USERS]
        lines += [
            "",
            "*** DEV MODE: no --jwt-secret given, so a random one was generated and the server",
            "*** only listens on loopback. Tokens below are valid for 24 h, until this process exits.",
            "",
        ]
        lines += [f"  Demo page:  {base}/  (open it in two tabs to make a call)", ""]
        lines += [f"  token for {sub}: {token}" for sub, token in tokens]
        lines += [
            "",
            "  Try it with wscat (type the JSON lines of README.md after it connects):",
            f'    npx --yes wscat -c "{ws}://{shown}:{port}/webrtc/ws/demo?token={tokens[0][1]}"',
            f'    npx --yes wscat -c "{ws}://{shown}:{port}/webrtc/ws/demo?token={tokens[1][1]}"',
            f'  ICE config:  curl -H "Authorization: Bearer {tokens[0][1]}" {base}/webrtc/config',
            "",
        ]
    print("\n".join(lines), flush=True)


def _announce_as_record(settings: Settings, base: str) -> None:
    """With JSON logs the start-up banner is a record too (and carries no token)."""
    logger.info("signal-server listening on %s", base, extra={"url": base})
    if settings.dev_mode:
        logger.warning(
            "DEV MODE: no --jwt-secret, so the secret is random and only loopback is served; "
            "tokens come from GET %s/dev/token?user=NAME",
            base,
            extra={"url": base},
        )
