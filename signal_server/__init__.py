"""signal-server: a WebRTC signaling server on aiohttp.

Embed it with ``host.add_subapp("/webrtc", create_app(Settings(jwt_secret=...)))``
or run the ``signal-server`` command.
"""

from __future__ import annotations

from .app import create_app, create_standalone_app
from .auth import Identity, mint_token
from .settings import Settings

__all__ = ["create_app", "create_standalone_app", "Settings", "Identity", "mint_token", "__version__"]

__version__ = "0.1.0"
