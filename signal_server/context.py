"""The per-app service object that handlers share, and the typed key it sits under.

Kept apart from ``app`` so handlers can import it without an import cycle.
Nothing here is global: two apps in one process have two of everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from .admission import Admission, ClientAddress
from .auth import TokenVerifier
from .hints import Hints
from .hub import Hub, HubLimits
from .metrics import Metrics, TokenCacheCollector
from .peer import WebSocketPeer
from .settings import MIN_SECRET_BYTES, Settings
from .webhooks import WebhookSender

__all__ = ["Signaling", "SIGNALING"]


@dataclass(eq=False)
class Signaling:
    """Everything one signaling app owns: settings, verifier, hub, limits, metrics."""

    settings: Settings
    verifier: TokenVerifier = field(init=False)
    metrics: Metrics = field(init=False)
    hub: Hub = field(init=False)
    admission: Admission = field(init=False)
    client_address: ClientAddress = field(init=False)
    hints: Hints = field(init=False)  # log lines that name the option behind a refusal
    webhooks: WebhookSender | None = field(init=False, default=None)
    peers: set[WebSocketPeer] = field(default_factory=set)  # live connections, for keepalive
    started: bool = False  # between start-up and shutdown

    def __post_init__(self) -> None:
        settings = self.settings
        if settings.turn_secret:
            settings.turn_secret.encode("utf-8")  # fails here, at start, rather than in /config
        self.verifier = TokenVerifier(settings)
        self.admission = Admission(settings)
        self.client_address = ClientAddress(settings.trusted_proxies)
        self.hints = Hints(trusts_proxies=bool(settings.trusted_proxies))
        self.metrics = Metrics(lambda: (self.admission.open, len(self.hub.rooms)))
        self.metrics.registry.register(TokenCacheCollector(self.verifier.cache))
        limits = HubLimits(
            max_participants=settings.max_participants,
            reconnect_grace=settings.reconnect_grace,
            kept_messages=settings.kept_messages,
            kept_bytes=settings.kept_bytes,
            max_rooms_per_user=settings.max_rooms_per_user,
            max_slots=settings.max_connections,
            max_kept_total=settings.max_kept_bytes,
        )
        if settings.clustered:
            # Imported here: the single-node server never loads redis-py.
            from .cluster import ClusterHub

            self.hub = ClusterHub(limits, self.metrics, settings)
        else:
            self.hub = Hub(limits, self.metrics)
        if settings.webhook_urls:
            secret = settings.webhook_secret or ""
            if len(secret.encode("utf-8", "surrogatepass")) < MIN_SECRET_BYTES:  # embedders build Settings directly
                raise ValueError(f"webhook_secret must be at least {MIN_SECRET_BYTES} bytes")
            self.webhooks = WebhookSender(
                settings.webhook_urls, secret, timeout=settings.webhook_timeout,
                max_attempts=settings.webhook_max_attempts,
            )
            self.metrics.registry.register(self.webhooks.collector())
            if not settings.clustered:  # a cluster's events come from the registry's scripts
                self.hub.on_event = self.webhooks.hub_event

    @property
    def ready(self) -> bool:
        """Takes clients: started, not shutting down, and (clustered) Redis answering."""
        return self.started and self.hub.available


SIGNALING = web.AppKey("SIGNALING", Signaling)
