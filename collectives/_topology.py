"""Where each rank runs: its host, under the levels above it that COLLECTIVES_TOPOLOGY names.

A rank's label is COLLECTIVES_TOPOLOGY (outermost level first, e.g. "zone1/rack2"), then its
hostname: "zone1/rack2/host5", or "host5" with no levels set. The workers' labels travel in
their mesh records at start-up (collectives._mesh); subgroups take their members' labels.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

# Labels travel in the workers' address records, which stay small.
LEVELS_BYTES = 190


def parse_levels(value: Any, name: str) -> Optional[str]:
    """COLLECTIVES_TOPOLOGY: levels above the host, outermost first, separated by "/"."""
    if value is None or not str(value).strip():
        return None
    levels = str(value).strip()
    if any(not level.strip() or level != level.strip() for level in levels.split("/")):
        raise ValueError(f"{name}={value!r} must be levels above the host separated by '/', "
                         "outermost first, each non-empty, e.g. zone1/rack2")
    if len(levels.encode()) > LEVELS_BYTES:
        raise ValueError(f"{name}={value!r} is longer than {LEVELS_BYTES} bytes")
    return levels


def own_label(levels: Optional[str]) -> str:
    """This process's label: `levels` (COLLECTIVES_TOPOLOGY), then its hostname."""
    host = socket.gethostname()
    return f"{levels}/{host}" if levels else host
