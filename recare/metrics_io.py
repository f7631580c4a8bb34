"""A run's metrics files, written and read here only.

    metrics.jsonl   one JSON line per progress event that carried metrics (training steps, attack
                    steps): {"stage", "step", "total", **metrics, "time"}, append-only
    metrics.json    an evaluation's final metrics (`recare.eval.run_metrics.compute_metrics`)

"time" is `recare.timestamps.now_iso()` (ISO-8601 UTC). Lines written before there was one format
hold epoch seconds there; `read_metrics_lines` returns them in the one format, so every reader (the
live loss plot, the speed estimate, tests) sees ISO strings, and older run folders still open.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from recare.atomic import atomic_write_json
from recare.errors import ConfigError
from recare.progress import ProgressEvent
from recare.timestamps import iso_from_seconds, now_iso

METRICS_LINES = "metrics.jsonl"
METRICS_JSON = "metrics.json"


def metrics_line(event: ProgressEvent) -> dict[str, Any] | None:
    """The metrics.jsonl line of a progress event, or None when the event carries no metrics.

    Args:
        event: a progress event (`recare.progress.ProgressEvent`).
    """
    if not event.metrics:
        return None
    data = event.to_dict()
    return {"stage": data["stage"], "step": data["step"], "total": data["total"], **data["metrics"],
            "time": now_iso()}


def append_metrics(folder: str | Path, event: ProgressEvent) -> bool:
    """Append the event's line to `folder`/metrics.jsonl (nothing without metrics); True when a line was written.

    One write per line, so appends from two writers do not interleave within a line.

    Args:
        folder: the run folder.
        event: a progress event.
    """
    line = metrics_line(event)
    if line is None:
        return False
    path = Path(folder) / METRICS_LINES
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return True


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, oldest first; [] when there is no file.

    A torn last line (a crash mid-write) and lines that are not JSON objects are skipped.

    Args:
        path: the file.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics_lines(folder: str | Path) -> list[dict[str, Any]]:
    """Every metrics.jsonl line of `folder`, oldest first; [] when there is none.

    A torn last line (a crash mid-write) and lines that are not JSON objects are skipped. A line's
    "time" in the older epoch-seconds format is returned as an ISO-8601 string like the new ones.

    Args:
        folder: the run folder.
    """
    rows = read_json_lines(Path(folder) / METRICS_LINES)
    for row in rows:
        stamp = row.get("time")
        if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
            row["time"] = iso_from_seconds(stamp)
    return rows


def write_metrics_json(folder: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write `folder`/metrics.json atomically; returns its path.

    Args:
        folder: the run folder.
        metrics: the evaluation's metrics (JSON-ready).
    """
    path = Path(folder) / METRICS_JSON
    atomic_write_json(path, dict(metrics))
    return path


def read_metrics_json(folder: str | Path, missing_ok: bool = False) -> dict[str, Any] | None:
    """`folder`/metrics.json as a dict.

    Args:
        folder: an evaluation run folder.
        missing_ok: return None (not an error) while the run has no metrics.json yet.

    Raises:
        ConfigError: no metrics.json (unless `missing_ok`), unreadable, or not a JSON object.
    """
    path = Path(folder) / METRICS_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"{path.parent} is not a finished evaluation run: it has no {METRICS_JSON} "
                          "(the evaluation did not finish).") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read: {e}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object.")
    return data


__all__ = ["METRICS_LINES", "METRICS_JSON", "metrics_line", "append_metrics", "read_json_lines", "read_metrics_lines",
           "write_metrics_json", "read_metrics_json"]
