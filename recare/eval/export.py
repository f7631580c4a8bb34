"""The metrics export of several evaluations: one metrics.json and one metrics.csv (a row per model).

    export_rows(rows)              the radar numbers of the rows (`recare.charts.metric_tables`)
    metrics_csv(rows)              the CSV text: a row per model, a column per number
    write_metrics_export(rows, d)  metrics.json and metrics.csv written into folder d

The CSV's columns, in order: model, run; per attack its mean ASR (asr_<attack>), and for a learned attack run
several times its worst run (asr_worst_<attack>) and every run (asr_<attack>_run<k>, k from 1); clip_score,
care_score, care_<concept> per CARE concept; the RATIO radar's numbers: defense_attack, defense, utility, care,
ratio, and the worst run's defense_worst and ratio_worst (empty with one run). A number a model lacks is an
empty cell. Compare's "Export metrics" and any script write the same files through `write_metrics_export`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from recare.atomic import atomic_write_text
from recare.charts import attack_runs, care_concepts, metric_tables, worst_asr

JSON_NAME, CSV_NAME = "metrics.json", "metrics.csv"
RADAR_COLUMNS = (("defense_attack", "attack"), ("defense", "D"), ("utility", "U"), ("care", "C"), ("ratio", "ratio"),
                 ("defense_worst", "D_worst"), ("ratio_worst", "ratio_worst"))  # (CSV column, radar number)


def export_rows(rows: list[dict]) -> list[dict]:
    """The RATIO radar numbers (`recare.charts.radar_numbers`, with "run") of the rows that have all three axes."""
    return metric_tables(rows)[2]


def _blank(value):
    return "" if value is None else value


def metrics_csv(rows: list[dict]) -> str:
    """The CSV text of the rows (module docstring: the columns).

    Args:
        rows: metrics.json contents plus "model" and "run" (Compare's `collect_evaluations` rows).
    """
    attacks = list(dict.fromkeys(a for r in rows for a in (r.get("asr") or {})))
    runs_of = {a: max((len(attack_runs(r, a)) for r in rows), default=0) for a in attacks}
    several = [a for a in attacks if runs_of[a] >= 2]
    concepts = care_concepts(rows)
    by_run = {n["run"]: n for n in export_rows(rows)}
    header = ["model", "run", *[f"asr_{a}" for a in attacks], *[f"asr_worst_{a}" for a in several],
              *[f"asr_{a}_run{k + 1}" for a in several for k in range(runs_of[a])], "clip_score", "care_score",
              *[f"care_{c}" for c in concepts], *[column for column, _ in RADAR_COLUMNS]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        asr, care = r.get("asr") or {}, r.get("care_score") or {}
        per = care.get("per_concept") or {}
        numbers = by_run.get(r.get("run")) or {}
        runs = {a: attack_runs(r, a) for a in several}
        writer.writerow([r.get("model", ""), r.get("run", ""), *[_blank(asr.get(a)) for a in attacks],
                         *[_blank(worst_asr(r, a)) for a in several],
                         *[_blank(runs[a][k] if k < len(runs[a]) else None) for a in several for k in range(runs_of[a])],
                         _blank(r.get("clip_score")), _blank(care.get("mean")), *[_blank(per.get(c)) for c in concepts],
                         *[_blank(numbers.get(key)) for _, key in RADAR_COLUMNS]])
    return buffer.getvalue()


def write_metrics_export(rows: list[dict], folder: str | Path) -> tuple[Path, Path]:
    """Write metrics.json ({"models": rows, "ratio_radar": their radar numbers}) and metrics.csv into `folder`.

    Returns:
        (the JSON path, the CSV path).
    """
    folder = Path(folder)
    json_path, csv_path = folder / JSON_NAME, folder / CSV_NAME
    atomic_write_text(json_path, json.dumps({"models": rows, "ratio_radar": export_rows(rows)}, indent=1))
    atomic_write_text(csv_path, metrics_csv(rows))
    return json_path, csv_path


__all__ = ["export_rows", "metrics_csv", "write_metrics_export", "JSON_NAME", "CSV_NAME"]
