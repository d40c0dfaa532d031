"""How a duration reads wherever kontrast shows progress: the trainer's terminal line and
`kontrast watch` (pure Python: the client and the trainer both import it)."""

from __future__ import annotations

from typing import Optional


def format_duration(seconds: Optional[float]) -> str:
    """``MM:SS`` or ``H:MM:SS``; ``--:--`` when unknown."""
    if seconds is None:
        return "--:--"
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
