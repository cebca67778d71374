"""Exponential backoff: how long to wait before a retry, doubling from a base up to a cap.

Pure (no sleeping, no randomness), so every stage that retries computes its delays the same
way and the caller chooses how to wait (``Event.wait``, ``asyncio.sleep``) and any jitter.
"""

from __future__ import annotations

# 2**63 times any base is past any sensible cap; stop the exponent there so a long outage
# cannot overflow a float.
_MAX_DOUBLINGS = 63


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The delay before retry ``attempt`` (1 for the first): ``base_s`` doubled
    ``attempt - 1`` times, at most ``cap_s``."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    return min(cap_s, base_s * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))
