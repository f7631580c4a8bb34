"""An evaluation's records, one per image: records.csv (the merged table) and the per-process shard
files (`shards/records-p<i>-of-<n>.jsonl`, the resume state), written and read here only.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

from recare.atomic import atomic_write_text
from recare.errors import EvaluationError
from recare.metrics_io import read_json_lines

RECORD_FIELDS = ("index", "attack", "run", "concept", "prompt", "attack_prompt", "seed", "file", "detector_score",
                 "positive", "detector_labels", "care_hit", "care_top_labels", "clip_cosine")
TEXT_FIELDS = ("attack", "concept", "prompt", "attack_prompt", "file")


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def write_records_csv(path: Path, records: Sequence[dict]) -> None:
    """records.csv: one row per image, `RECORD_FIELDS`; JSON for booleans, numbers, lists and dicts."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    for record in records:
        writer.writerow([_csv_value(record[f]) for f in RECORD_FIELDS])
    atomic_write_text(path, buffer.getvalue())


def read_records(run_dir: str | Path) -> list[dict]:
    """The rows of a run's records.csv as dicts with their JSON fields decoded (the inverse of the writer).

    A records.csv written before the run index existed reads as run 0 with no attack prompt.
    """
    path = Path(run_dir) / "records.csv"
    if not path.is_file():
        raise EvaluationError(f"{run_dir} has no records.csv: the evaluation did not finish.")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            record = {}
            for field in RECORD_FIELDS:
                text = row.get(field) or ""
                record[field] = text if field in TEXT_FIELDS else (json.loads(text) if text != "" else None)
            record["run"] = record["run"] or 0
            out.append(record)
    return out


def record_key(record: dict) -> tuple[str, int, str, str, int]:
    return (record["attack"], int(record.get("run") or 0), record["concept"], record["prompt"], int(record["seed"]))


def shard_records(run_dir: Path) -> list[dict]:
    """Every record line of every shard file (a torn last line from a crash is skipped)."""
    return [record for shard in sorted((run_dir / "shards").glob("*.jsonl")) for record in read_json_lines(shard)]


def append_records(shard: Path, records: Sequence[dict]) -> None:
    """Append `records` to a shard file, one JSON line each, flushed to disk (a crash tears at most the last line)."""
    shard.parent.mkdir(parents=True, exist_ok=True)
    with open(shard, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def partial_records(run_dir: str | Path) -> list[dict]:
    """The records an evaluation has written so far: records.csv once merged, else every shard's lines
    (one per image key, as the merge keeps them; a torn last line is skipped).

    Args:
        run_dir: the evaluation's run folder.
    """
    run_dir = Path(run_dir)
    if (run_dir / "records.csv").is_file():
        return read_records(run_dir)
    by_key: dict[tuple, dict] = {}
    for record in shard_records(run_dir):
        by_key.setdefault(record_key(record), record)
    return list(by_key.values())
