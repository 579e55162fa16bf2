"""Many nodes as one server, on Redis (docs/scaling.md).

Imported only when ``--redis-url`` or ``--redis-sentinel`` is set: the
single-node server never loads this package, nor redis-py.
"""

from __future__ import annotations

from .hub import ClusterHub

__all__ = ["ClusterHub"]
