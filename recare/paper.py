"""The paper's own results, quoted: Table 1 (SD v1.4 and three methods on three tasks) and Table 13 (Appendix N.2).

Nothing here is measured by this project. Every number is copied from the paper's text (ReCARE, ICLR 2026)
with the table it comes from, so the app and the report can draw it beside what the mini world measured and
say which is which. The radars draw these rows through the same `recare.metrics` functions as our own
results; `ratio_check` says, row by row, whether the formula gives back the RATIO the table prints.

    rows = table_1("tench")                  # SD v1.4, ESD, STEREO, ReCARE, each a QuotedRow
    metrics_rows("tench")                    # the same rows shaped like metrics.json (charts, tables)
    care_rows("nudity")                      # Appendix N.2's Table 13: ten benign concepts per method
    paper_task("smoking")                    # the paper's task a mini-world task stands for ("nudity")
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping

from recare.metrics import CLIP_RANGE, ratio

PAPER = "ReCARE (ICLR 2026)"
TABLE_1 = "Table 1"
TABLE_13 = "Table 13 (Appendix N.2)"
MODEL = "SD v1.4"  # every quoted row is Stable Diffusion v1.4 or a method applied to it
TABLE_1_COLUMNS = ("Erased ASR %", "UD ASR %", "CCE ASR %", "CLIP", "FID", "CARE score", "RATIO")
TASKS = ("nudity", "van gogh", "tench")
# the mini world's tasks and the paper's they stand for (smoking is the world's nudity analog: README, Mini world)
MINI_WORLD_TASKS: Mapping[str, str] = types.MappingProxyType({"tench": "tench", "van_gogh": "van gogh",
                                                             "smoking": "nudity"})
# the single CARE concept Table 1's CARE column scores, per task (Sec. 5.1, Fig. 9: person, stars, freshwater)
CARE_CONCEPT: Mapping[str, str] = types.MappingProxyType({"nudity": "person", "van gogh": "stars",
                                                          "tench": "freshwater"})
# the method names of the paper and the mini world's models they correspond to
METHOD_KEYS: Mapping[str, str] = types.MappingProxyType({"SD v1.4": "base", "ESD": "esd", "STEREO": "stereo",
                                                         "ReCARE (Ours)": "recare", "AdvUnlearn": "advunlearn",
                                                         "AGE": "age"})


@dataclasses.dataclass(frozen=True)
class QuotedRow:
    """One row of the paper's Table 1, as printed.

    Attributes:
        task: "nudity", "van gogh" or "tench".
        method: the row's name as printed ("SD v1.4", "ESD", "STEREO", "ReCARE (Ours)").
        values: the seven printed columns, `TABLE_1_COLUMNS` (Erased, UD and CCE ASR in percent, CLIP, FID,
            CARE score, RATIO).
    """

    task: str
    method: str
    values: tuple[float, float, float, float, float, float, float]

    @property
    def cells(self) -> dict[str, float]:
        return dict(zip(TABLE_1_COLUMNS, self.values))

    @property
    def asr_cce(self) -> float:
        return self.values[2]

    @property
    def clip(self) -> float:
        return self.values[3]

    @property
    def care(self) -> float:
        return self.values[5]

    @property
    def printed_ratio(self) -> float:
        return self.values[6]

    def quote(self) -> str:
        """The row as the table prints it (tab-separated, two or four decimals)."""
        cells = [f"{v:.4f}" if name == "CLIP" else f"{v:.2f}" for name, v in zip(TABLE_1_COLUMNS, self.values)]
        return "\t".join([self.method, *cells])


def _rows(task: str, *rows: tuple) -> tuple[QuotedRow, ...]:
    return tuple(QuotedRow(task, method, tuple(float(v) for v in values)) for method, *values in rows)


# Table 1, the rows of SD v1.4, ESD, STEREO and ReCARE (METHOD.md section 5), copied from the paper's text.
TABLE_1_ROWS: tuple[QuotedRow, ...] = (
    *_rows("nudity",
           ("SD v1.4", 35.23, 39.51, 56.82, 0.3136, 14.12, 0.97, 0.56),
           ("ESD", 3.18, 3.70, 53.41, 0.3045, 13.75, 0.89, 0.49),
           ("STEREO", 0.00, 0.00, 19.55, 0.2907, 17.83, 0.11, 0.21),
           ("ReCARE (Ours)", 0.00, 0.00, 11.14, 0.3053, 13.85, 0.94, 0.76)),
    *_rows("van gogh",
           ("SD v1.4", 74.00, 84.00, 64.40, 0.3136, 14.12, 0.89, 0.48),
           ("ESD", 0.40, 18.00, 13.20, 0.3074, 14.47, 0.77, 0.67),
           ("STEREO", 0.00, 6.00, 4.00, 0.3047, 18.17, 0.31, 0.43),
           ("ReCARE (Ours)", 0.00, 6.00, 6.00, 0.3101, 16.24, 0.90, 0.81)),
    *_rows("tench",
           ("SD v1.4", 96.80, 92.00, 98.00, 0.3136, 14.12, 0.95, 0.30),
           ("ESD", 3.80, 40.00, 94.80, 0.3051, 13.18, 0.83, 0.25),
           ("STEREO", 0.00, 0.00, 3.60, 0.2975, 15.87, 0.62, 0.56),
           ("ReCARE (Ours)", 0.00, 0.00, 0.40, 0.3073, 14.32, 0.97, 0.85)),
)

# Table 13 (Appendix N.2): the CARE score of ten benign concepts of the nudity task, per method, as printed.
TABLE_13_METHODS = ("ReCARE (Ours)", "AdvUnlearn", "AGE", "STEREO")
TABLE_13_ROWS: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("person", (0.94, 0.36, 0.79, 0.11)),
    ("figure", (0.93, 0.59, 0.92, 0.23)),
    ("woman", (0.94, 0.86, 0.94, 0.42)),
    ("mistress", (0.94, 0.04, 0.40, 0.14)),
    ("model", (0.91, 0.32, 0.77, 0.23)),
    ("human", (0.92, 0.20, 0.84, 0.24)),
    ("mannequin", (0.98, 0.32, 0.88, 0.36)),
    ("lady", (0.94, 0.87, 0.78, 0.47)),
    ("girl", (0.97, 0.64, 0.88, 0.55)),
    ("venus", (0.99, 0.60, 0.91, 0.31)),
)
TABLE_13_AVERAGE = (0.95, 0.47, 0.79, 0.31)  # the table's printed "Average" row


def paper_task(task: str | None) -> str | None:
    """The paper's task for a task name: itself when the paper has it, the one a mini-world task stands for
    (tench -> tench, van_gogh -> van gogh, smoking -> nudity), else None."""
    if not isinstance(task, str):
        return None
    name = task.strip().lower()
    if name in TASKS:
        return name
    return MINI_WORLD_TASKS.get(name) or MINI_WORLD_TASKS.get(name.replace(" ", "_"))


def table_1(task: str) -> tuple[QuotedRow, ...]:
    """The quoted Table 1 rows of a paper task ("nudity", "van gogh", "tench"); () for any other name."""
    return tuple(r for r in TABLE_1_ROWS if r.task == task)


def label(row: QuotedRow) -> str:
    """The row's name in charts and tables, marked as quoted: "ReCARE (paper)"."""
    return f"{row.method.replace(' (Ours)', '')} (paper)"


def ratio_check(row: QuotedRow) -> dict:
    """The RATIO `recare.metrics.ratio` gives for the row's printed inputs, beside the printed one.

    The printed inputs are rounded, so the formula may land one unit of the last digit away from the printed
    RATIO; Table 1 has one such row among these twelve (tench ReCARE: 0.8585 -> .86, printed .85; inputs at the
    low ends of their rounding intervals give .855). `agrees` is True when the two match to two decimals,
    `within_rounding` when some inputs inside the printed values' rounding intervals give the printed RATIO.
    """
    computed = ratio(row.asr_cce, row.clip, row.care, CLIP_RANGE)
    low = ratio(min(100.0, row.asr_cce + 0.005), row.clip - 0.00005, max(0.0, row.care - 0.005), CLIP_RANGE)
    high = ratio(max(0.0, row.asr_cce - 0.005), row.clip + 0.00005, min(1.0, row.care + 0.005), CLIP_RANGE)
    printed = row.printed_ratio
    return {"computed": computed, "printed": printed, "agrees": round(computed, 2) == round(printed, 2),
            "within_rounding": low - 0.005 <= printed <= high + 0.005}


def metrics_rows(task: str) -> list[dict]:
    """The quoted Table 1 rows of a paper task shaped like metrics.json rows (the charts' and tables' input).

    Each has "model" (e.g. "ReCARE (paper)"), "run" ("paper: Table 1"), "asr" {"cce": ...}, "clip_score",
    "care_score" {"mean", "per_concept": {the task's CARE concept: score}}, "ratio" {"clip_range": (0.25, 0.32),
    "printed": the table's RATIO}, "quoted": the source, and "key" (base / esd / stereo / recare, for colours).
    """
    concept = CARE_CONCEPT.get(task, "CARE")
    return [{"model": label(r), "run": f"paper: {TABLE_1}", "asr": {"cce": r.asr_cce}, "clip_score": r.clip,
             "care_score": {"mean": r.care, "per_concept": {concept: r.care}},
             "ratio": {"clip_range": list(CLIP_RANGE), "printed": r.printed_ratio},
             "quoted": f"{PAPER}, {TABLE_1}", "key": METHOD_KEYS.get(r.method, r.method)} for r in table_1(task)]


def care_rows(task: str) -> list[dict]:
    """The paper's CARE chart rows for a task: Table 13's ten concepts per method for nudity (Appendix N.2), else
    Table 1's single CARE concept (the paper reports no per-concept table for van gogh or tench)."""
    if task != "nudity":
        return metrics_rows(task)
    out = []
    for j, method in enumerate(TABLE_13_METHODS):
        per = {concept: values[j] for concept, values in TABLE_13_ROWS}
        out.append({"model": f"{method.replace(' (Ours)', '')} (paper)", "run": f"paper: {TABLE_13}",
                    "care_score": {"mean": TABLE_13_AVERAGE[j], "per_concept": per},
                    "quoted": f"{PAPER}, {TABLE_13}", "key": METHOD_KEYS.get(method, method)})
    return out


def care_source(task: str) -> str:
    """Which table the paper's CARE chart of a task quotes."""
    return TABLE_13 if task == "nudity" else f"{TABLE_1} CARE · {CARE_CONCEPT.get(task, '?')}"


__all__ = ["PAPER", "TABLE_1", "TABLE_13", "MODEL", "TABLE_1_COLUMNS", "TASKS", "MINI_WORLD_TASKS", "CARE_CONCEPT",
           "QuotedRow", "TABLE_1_ROWS", "TABLE_13_METHODS", "TABLE_13_ROWS", "TABLE_13_AVERAGE", "paper_task",
           "table_1", "label", "ratio_check", "metrics_rows", "care_rows", "care_source"]
