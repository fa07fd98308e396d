"""The exceptions and warnings flexna raises, and how it warns (at the caller's line)."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class RecompileLimitError(RuntimeError):
    """Dynamo's recompile limit was reached: flexna refuses to drop to eager silently."""


class EagerFallbackWarning(UserWarning):
    """flexna ran FlexAttention unfused (eager), which holds all N x N scores in memory."""


class CacheWarning(UserWarning):
    """A mask was too large for flexna's cache: it was built for this call and not kept."""


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first caller outside flexna (the user's line)."""
    level = 2  # stacklevel 1 is this function, 2 its caller
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
