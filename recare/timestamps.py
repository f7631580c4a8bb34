"""The one timestamp format of run files: ISO-8601 in UTC with milliseconds ("2026-12-04T20:10:28.123+00:00").

status.json, metrics.jsonl, index files and reports write `now_iso()`; readers turn any stamp into
seconds with `to_seconds`, which also reads the epoch seconds (a float) that training runs wrote
into metrics.jsonl before there was one format, so older run folders still open.
"""

from __future__ import annotations

import datetime as _dt


def now_iso() -> str:
    """The current time as an ISO-8601 UTC string with milliseconds (the format of every run file)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def iso_from_seconds(seconds: float) -> str:
    """Epoch seconds as the same ISO-8601 UTC string `now_iso` writes.

    Args:
        seconds: seconds since the epoch (time.time()).
    """
    return _dt.datetime.fromtimestamp(float(seconds), _dt.timezone.utc).isoformat(timespec="milliseconds")


def to_seconds(stamp) -> float | None:
    """Epoch seconds of a stamp: an ISO-8601 string (a stamp without a zone is read as UTC) or a number
    (the older epoch format); None when it is neither.

    Args:
        stamp: what a run file holds under "time", "updated", ...
    """
    if isinstance(stamp, bool):
        return None
    if isinstance(stamp, (int, float)):
        return float(stamp)
    try:
        when = _dt.datetime.fromisoformat(str(stamp))
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


__all__ = ["now_iso", "iso_from_seconds", "to_seconds"]
