"""One RuntimeWarning per (who, reason) and process, for a path that falls back to something slower
(fastpeft never takes a slow fallback silently, nor repeats the warning every call)."""
from __future__ import annotations

import warnings

#: (who, reason) pairs already warned about; tests reset it
WARNED: set = set()


def warn_once(who: str, reason: str, message: str, stacklevel: int = 4) -> None:
    if (who, reason) not in WARNED:
        WARNED.add((who, reason))
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
