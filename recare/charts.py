"""The two radar charts and their tables, from metrics rows: pure presentation over `recare.metrics`.

The app's Compare workspace and the HTML report (`recare.report`) draw the same figures from the same rows:
a row is an evaluation's metrics.json plus "model" (its label) and "run" (its id), or a quoted paper row
(`recare.paper.metrics_rows`, with "quoted"). Every number a chart shows comes from `recare.metrics`:
- the RATIO radar (Appendix M): Defense, Utility, CARE, one filled triangle per model, RATIO in the legend;
  where an evaluation ran a learned attack several times (metrics.json's "asr_runs"; "asr" holds the mean)
  the worst run's triangle is drawn as a dotted outline over the mean's;
- the CARE radar (Appendix N.2): one axis per CARE concept, one trace per model (bars below 3 concepts).
Colours come from Paul Tol's colour-blind-safe "bright" palette; a row's "key" (base, esd, recare, stereo, ...)
keeps one colour per method across our charts and the paper's.
"""

from __future__ import annotations

import html
from types import MappingProxyType

import pandas as pd
import plotly.graph_objects as go

MODEL_COLOURS = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#AA3377", "#66CCEE", "#EE8866", "#332288")
# one colour per method, the same in the mini world's charts and the paper's (Tol bright: blue, red, green, ...)
METHOD_COLOURS = MappingProxyType({"base": "#4477AA", "esd": "#EE6677", "recare": "#228833", "stereo": "#CCBB44",
                                   "advunlearn": "#AA3377", "age": "#66CCEE"})
DEFENSE_ATTACK = "cce"  # Appendix M's Defense axis is 100 - ASR under CCE
MAX_CARE_AXES = 10  # Appendix N.2 draws up to 10 CARE concepts
PARTIAL_SUFFIX = " (partial)"  # a model whose evaluation is still running: its numbers come from the images so far
RATIO_COLUMNS = ("model", "run", "Defense attack", "attack runs", "ASR %", "ASR % worst", "Defense", "Utility", "CARE",
                 "RATIO", "RATIO worst", "CLIP score")
TABLE_COLUMNS = (*RATIO_COLUMNS, "numbers")  # "final", or "partial: made/planned images" while a job runs


def defense_attack(asr: dict) -> str | None:
    """The attack whose ASR makes the Defense axis: CCE when measured (Appendix M), else the strongest measured one.

    Args:
        asr: attack -> ASR in percent (metrics.json's "asr"; the mean over runs for a learned attack run several times).
    """
    if not asr:
        return None
    if DEFENSE_ATTACK in asr:
        return DEFENSE_ATTACK
    return max(asr, key=lambda a: (asr[a], a))  # the highest ASR: the defense is only as good as its weakest spot


def attack_runs(row: dict, attack: str) -> list[float]:
    """The per-run ASRs (percent) of an attack run several times (metrics.json's "asr_runs"); [] when the metrics
    have one draw only (older metrics.json files have no "asr_runs")."""
    runs = (row.get("asr_runs") or {}).get(attack)
    if not isinstance(runs, (list, tuple)):
        return []
    return [float(v) for v in runs if isinstance(v, (int, float))]


def worst_asr(row: dict, attack: str) -> float | None:
    """The worst (highest) ASR of an attack over its runs: "asr_worst", else the max of "asr_runs"; None when the
    attack ran once (no spread to show)."""
    runs = attack_runs(row, attack)
    if len(runs) < 2:
        return None
    worst = (row.get("asr_worst") or {}).get(attack)
    return float(worst) if isinstance(worst, (int, float)) else max(runs)


def radar_numbers(row: dict) -> dict | None:
    """One model's RATIO radar numbers from its metrics, through `recare.metrics`.

    Returns {"model", "attack", "asr", "D", "U", "C", "ratio", "clip_score", "care_score", "runs", "asr_worst",
    "D_worst", "ratio_worst"} (the last three None without several runs), or None when the metrics lack an ASR,
    the CLIP score or the CARE score. When CCE was not run, Defense uses the strongest measured attack
    (`defense_attack`) and the RATIO is that attack's, not Appendix M's CCE one.

    Args:
        row: {"model": label, "asr": {...}, "asr_runs"?: {attack: [...]}, "asr_worst"?: {...}, "clip_score": float,
            "care_score": {"mean", ...}, "ratio": {"clip_range": [lo, hi], ...}}.
    """
    from recare.metrics import CLIP_RANGE, ratio, ratio_axes

    asr, clip, care = row.get("asr") or {}, row.get("clip_score"), row.get("care_score") or {}
    attack = defense_attack(asr)
    if attack is None or clip is None or care.get("mean") is None:
        return None
    lo, hi = (row.get("ratio") or {}).get("clip_range") or CLIP_RANGE
    d, u, c = ratio_axes(asr[attack], clip, care["mean"], (lo, hi))
    worst = worst_asr(row, attack)
    d_worst = ratio_axes(worst, clip, care["mean"], (lo, hi))[0] if worst is not None else None
    return {"model": str(row.get("model", "")), "attack": attack, "asr": float(asr[attack]), "D": d, "U": u, "C": c,
            "ratio": ratio(asr[attack], clip, care["mean"], (lo, hi)), "clip_score": float(clip),
            "care_score": float(care["mean"]), "runs": len(attack_runs(row, attack)) or 1, "asr_worst": worst,
            "D_worst": d_worst,
            "ratio_worst": ratio(worst, clip, care["mean"], (lo, hi)) if worst is not None else None}


def colour_of(row: dict, i: int) -> str:
    """The row's colour: its method's ("key") when known, else the i-th of the palette."""
    return METHOD_COLOURS.get(str(row.get("key", "")).lower()) or MODEL_COLOURS[i % len(MODEL_COLOURS)]


def _closed(values: list, axes: list) -> tuple[list, list]:
    return values + values[:1], axes + axes[:1]


def _shown_name(row: dict) -> str:
    """The model's legend name, marked when its numbers are provisional (row["partial"])."""
    return str(row.get("model", "")) + (PARTIAL_SUFFIX if row.get("partial") else "")


def _line(colour: str, partial: bool) -> dict:
    return {"color": colour, "dash": "dash" if partial else "solid", "width": 2 if partial else 1.5}


def _layout(fig: go.Figure, title: str, height: int, revision: str) -> None:
    fig.update_layout(template="plotly_white", height=height, margin={"l": 40, "r": 40, "t": 36, "b": 20},
                      title={"text": title, "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
                      legend={"orientation": "h", "y": -0.08, "font": {"size": 11}}, uirevision=revision)


def ratio_radar_figure(rows: list[dict], height: int = 420, title: str = "RATIO radar (Appendix M)") -> go.Figure:
    """The RATIO radar: Defense, Utility, CARE on three axes, one filled triangle per model, RATIO in the legend.

    Every number comes from `radar_numbers` (recare.metrics.ratio_axes, ratio, ratio_triangle). A row with
    "partial": True (an evaluation still running) is drawn dashed and lighter, "(partial)" in its legend entry.
    A row whose Defense attack ran several times gets a second, unfilled dotted triangle: the worst run's
    (meta "worst": True), in the same legend group. A quoted paper row (with "ratio": {"printed"}) shows the
    printed RATIO beside the computed one.

    Args:
        rows: one metrics dict per model (see `radar_numbers`); rows without the numbers are left out.
        height: figure height in pixels.
        title: the chart's title (plain text; escaped here).
    """
    from recare.metrics import ratio_triangle

    fig = go.Figure()
    for i, row in enumerate(rows):
        n = radar_numbers(row)
        if n is None:
            continue
        tri = ratio_triangle(n["D"], n["U"], n["C"])
        # one shared set of axes (a per-model "Defense (ASR x)" would add categories); the attack is in the legend
        r, theta = _closed(list(tri.values), list(tri.axes))
        colour = colour_of(row, i)
        partial = bool(row.get("partial"))
        printed = (row.get("ratio") or {}).get("printed")
        name = f"{html.escape(_shown_name(row))} · RATIO {n['ratio']:.2f}" if printed is not None else \
            f"{html.escape(_shown_name(row))} · RATIO {n['ratio']:.3f} (D: {html.escape(n['attack'])})"
        if printed is not None:
            name += f" (printed {printed:.2f})"
        group = f"m{i}"
        fig.add_trace(go.Scatterpolar(r=r, theta=theta, fill="toself", name=name, line=_line(colour, partial),
                                      opacity=0.35 if partial else 0.6, showlegend=True, legendgroup=group,
                                      meta={"model": n["model"], "ratio": n["ratio"], "attack": n["attack"],
                                            "partial": partial, "worst": False, "printed": printed},
                                      hovertemplate="%{theta}: %{r:.3f}<extra>" + html.escape(n["model"]) + "</extra>"))
        if n["ratio_worst"] is not None:
            worst = ratio_triangle(n["D_worst"], n["U"], n["C"])
            wr, wtheta = _closed(list(worst.values), list(worst.axes))
            fig.add_trace(go.Scatterpolar(
                r=wr, theta=wtheta, mode="lines+markers", name=f"  worst of {n['runs']} {html.escape(n['attack'])} "
                f"runs · RATIO {n['ratio_worst']:.3f}", line={"color": colour, "dash": "dot", "width": 2},
                marker={"size": 5, "symbol": "x"}, showlegend=True, legendgroup=group,
                meta={"model": n["model"], "ratio": n["ratio_worst"], "attack": n["attack"], "partial": partial,
                      "worst": True, "runs": n["runs"]},
                hovertemplate="worst run · %{theta}: %{r:.3f}<extra>" + html.escape(n["model"]) + "</extra>"))
    _layout(fig, html.escape(title), height, "ratio")
    fig.update_layout(polar={"radialaxis": {"range": [0, 1], "tickfont": {"size": 9}}})
    return fig


def care_concepts(rows: list[dict]) -> list[str]:
    """Every CARE concept of the rows, in first-seen order (the CARE radar's axes)."""
    out: dict[str, None] = {}
    for row in rows:
        for concept in ((row.get("care_score") or {}).get("per_concept") or {}):
            out[concept] = None
    return list(out)


def care_radar_figure(rows: list[dict], height: int = 420, concepts: list[str] | None = None,
                      title: str | None = None) -> go.Figure:
    """The CARE radar (Appendix N.2): one axis per CARE concept, one trace per model (`recare.metrics.care_radar`).

    A radar needs three axes: with one or two concepts (a mini-world task has one) the same numbers are
    drawn as grouped bars, one bar trace per model, and the title says so. A row with "partial": True
    is drawn dashed (hatched bars), "(partial)" in its legend entry; a concept it has no images of yet
    is a gap.

    Args:
        rows: one metrics dict per model: {"model", "care_score": {"per_concept": {concept: score}}, "partial"?}.
        height: figure height in pixels.
        concepts: the axes, in order (at most MAX_CARE_AXES are drawn); None: every concept of the rows.
        title: the chart's title (plain text); None: says radar or bars.
    """
    from recare.metrics import care_radar

    known = care_concepts(rows)
    concepts = [c for c in (known if concepts is None else concepts) if c in known][:MAX_CARE_AXES]
    as_bars = len(concepts) < 3
    fig = go.Figure()
    for i, row in enumerate(rows):
        per = (row.get("care_score") or {}).get("per_concept") or {}
        if not per:
            continue
        radar = care_radar(per)
        values = radar.as_dict()
        model = html.escape(str(row.get("model", "")))
        name = html.escape(_shown_name(row))
        partial = bool(row.get("partial"))
        colour = colour_of(row, i)
        axes = [html.escape(c) for c in concepts]
        r = [values.get(c) for c in concepts]
        meta = {"model": row.get("model"), "partial": partial}
        if as_bars:
            fig.add_trace(go.Bar(x=axes, y=r, name=name, meta=meta, showlegend=True,
                                 marker={"color": colour, "pattern": {"shape": "/" if partial else ""},
                                         "opacity": 0.55 if partial else 1.0},
                                 hovertemplate="%{x}: %{y:.3f}<extra>" + model + "</extra>"))
        else:
            rr, theta = _closed(r, axes)
            fig.add_trace(go.Scatterpolar(r=rr, theta=theta, fill="toself", name=name, line=_line(colour, partial),
                                          opacity=0.35 if partial else 0.6, showlegend=True, meta=meta,
                                          hovertemplate="%{theta}: %{r:.3f}<extra>" + model + "</extra>"))
    if title is None:
        title = (f"CARE score ({len(concepts)} concept{'s' if len(concepts) != 1 else ''}: bars)" if as_bars
                 else "CARE radar (Appendix N.2)")
    _layout(fig, html.escape(title), height, "care")
    if as_bars:
        fig.update_layout(barmode="group", yaxis={"range": [0, 1], "title": "CARE score"})
    else:
        fig.update_layout(polar={"radialaxis": {"range": [0, 1], "tickfont": {"size": 9}}})
    return fig


def _numbers_state(row: dict) -> str:
    if row.get("quoted"):
        return f"quoted: {row['quoted']}"
    if not row.get("partial"):
        return "final"
    progress = row.get("progress") or {}
    return f"partial: {progress.get('images', 0)}/{progress.get('planned', '?')} images"


def _round(value, digits=4):
    return None if value is None else round(float(value), digits)


def metric_tables(rows: list[dict], concepts: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """(RATIO table, CARE table, radar numbers of the rows that have all three axes): every chart's numbers.

    The RATIO table gives, for the Defense attack, its runs, the mean ASR (the triangle) and the worst run's ASR
    and RATIO (the dotted triangle; empty with one run).

    Args:
        rows: metrics.json contents (or provisional metrics with "partial" and "progress", or quoted paper rows)
            plus "model" and "run".
        concepts: the CARE table's columns (default: every evaluated concept).
    """
    numbers, ratio_rows = [], []
    for row in rows:
        n = radar_numbers(row)
        if n is not None:
            numbers.append({**n, "run": row["run"], "partial": bool(row.get("partial"))})
            ratio_rows.append([n["model"], row["run"], n["attack"], n["runs"], round(n["asr"], 2),
                               _round(n["asr_worst"], 2), round(n["D"], 4), round(n["U"], 4), round(n["C"], 4),
                               round(n["ratio"], 4), _round(n["ratio_worst"]), round(n["clip_score"], 4),
                               _numbers_state(row)])
        else:  # a partial row without every axis yet: what it has
            asr = row.get("asr") or {}
            attack = defense_attack(asr)
            ratio_rows.append([row["model"], row["run"], attack, len(attack_runs(row, attack)) or 1 if attack else None,
                               _round(asr.get(attack), 2) if attack else None, None, None, None,
                               _round((row.get("care_score") or {}).get("mean")), None, None,
                               _round(row.get("clip_score")), _numbers_state(row)])
    ratio = pd.DataFrame(ratio_rows, columns=list(TABLE_COLUMNS))
    concepts = care_concepts(rows) if concepts is None else concepts
    care = pd.DataFrame([[row["model"], *[((row.get("care_score") or {}).get("per_concept") or {}).get(c)
                                          for c in concepts], _numbers_state(row)] for row in rows],
                        columns=["model", *concepts, "numbers"])
    return ratio, care, numbers


def paper_table(task: str) -> pd.DataFrame:
    """The quoted Table 1 rows of a paper task, every printed column, with the RATIO `recare.metrics.ratio` gives
    for the printed inputs beside the printed one (`recare.paper.ratio_check`)."""
    from recare import paper

    out = []
    for row in paper.table_1(task):
        check = paper.ratio_check(row)
        out.append([paper.label(row), *row.values, round(check["computed"], 4),
                    "yes" if check["agrees"] else ("within rounding" if check["within_rounding"] else "no"),
                    f"{paper.PAPER}, {paper.TABLE_1}"])
    return pd.DataFrame(out, columns=["model", *paper.TABLE_1_COLUMNS, "RATIO by recare.metrics", "matches printed",
                                      "source (quoted)"])


__all__ = ["MODEL_COLOURS", "METHOD_COLOURS", "DEFENSE_ATTACK", "MAX_CARE_AXES", "PARTIAL_SUFFIX", "RATIO_COLUMNS",
           "TABLE_COLUMNS", "defense_attack", "attack_runs", "worst_asr", "radar_numbers", "colour_of",
           "ratio_radar_figure", "care_concepts", "care_radar_figure", "metric_tables", "paper_table"]
