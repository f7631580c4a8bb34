"""Plotly figure builders. Pure presentation: every number comes from a recare object."""

from __future__ import annotations

import html
import json
from types import MappingProxyType

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from recare.careset import CareSet

# One colour per cluster (colour-blind-friendly qualitative palette).
CLUSTER_COLOURS = (
    "#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377",
    "#BBBBBB", "#EE8866", "#44BB99", "#99DDFF", "#FFAABB", "#332288",
)
# Marker per fate: kept, or the reason a candidate was dropped.
FATE_SYMBOLS = MappingProxyType({
    None: "circle",
    "nearest cluster": "x-thin-open",
    "farthest cluster": "square-open",
    "intra-cluster": "diamond-open",
    "manual": "circle-open",
})
FATE_LABELS = MappingProxyType({
    None: "kept",
    "nearest cluster": "dropped: nearest cluster",
    "farthest cluster": "dropped: farthest cluster",
    "intra-cluster": "dropped: intra-cluster",
    "manual": "dropped: manual",
})
MAX_TEXT_LABELS = 70  # above this many candidates, tokens are shown on hover only


def cluster_colour(cluster: int) -> str:
    return CLUSTER_COLOURS[int(cluster) % len(CLUSTER_COLOURS)]


def careset_figure(careset: CareSet, height: int = 600) -> go.Figure:
    """The interactive cluster plot: one point per candidate token.

    Colour is the cluster, the marker says kept or why dropped; hover shows token, count,
    similarity to the target and residual. Each cluster is one trace whose `meta` holds the
    cluster id (the browser uses it to toggle a cluster from its legend entry); each point's
    `customdata[0]` is its token (used to toggle the token on click). Plotly renders tags in
    labels and hover text, so what is shown of a token (which may come from a loaded file) is
    HTML-escaped (`customdata[5]`, the labels, the title).

    Args:
        careset: the CareSet to draw.
        height: figure height in pixels.
    """
    keep = careset.keep
    reasons = careset.reasons
    show_text = len(careset.tokens) <= MAX_TEXT_LABELS
    fig = go.Figure()
    summary = {row["cluster"]: row for row in careset.cluster_summary()}
    members = careset.cluster_members()
    shown = [html.escape(t) for t in careset.tokens]
    for k in sorted(summary):
        row = summary[k]
        idx = [int(i) for i in members[k]]
        fate = row["fate"]
        if row["overridden"]:  # a manual cluster edit outranks what Algorithm 1 decided
            name = f"cluster {k} · {'kept' if careset.cluster_overrides[k] else 'dropped'}: manual"
        else:
            name = f"cluster {k} · {'kept' if fate == 'kept' else 'dropped: ' + fate.replace(' cluster', '')}"
        fig.add_trace(
            go.Scatter(
                x=[float(careset.points[i, 0]) for i in idx],
                y=[float(careset.points[i, 1]) for i in idx],
                mode="markers+text" if show_text else "markers",
                name=f"{name} ({row['kept']}/{row['size']})",
                meta={"cluster": k},
                text=[shown[i] for i in idx] if show_text else None,
                textposition="top center",
                textfont={"size": 10, "color": ["#222" if keep[i] else "#999" for i in idx]},
                customdata=[
                    [
                        careset.tokens[i],
                        int(careset.counts[i]),
                        float(careset.similarity[i]),
                        float(careset.residuals[i]),
                        FATE_LABELS[reasons[i]],
                        shown[i],
                    ]
                    for i in idx
                ],
                hovertemplate=(
                    "<b>%{customdata[5]}</b><br>count %{customdata[1]}<br>"
                    "similarity to target %{customdata[2]:.3f}<br>residual %{customdata[3]:.3f}<br>"
                    "%{customdata[4]}<br><i>click to toggle</i><extra>cluster " + str(k) + "</extra>"
                ),
                marker={
                    "color": cluster_colour(k),
                    "size": [13 if keep[i] else 11 for i in idx],
                    "symbol": [FATE_SYMBOLS[reasons[i]] for i in idx],
                    "opacity": [0.95 if keep[i] else 0.55 for i in idx],
                    "line": {"width": [1.5 if keep[i] else 2 for i in idx], "color": ["white" if keep[i] else cluster_colour(k) for i in idx]},
                },
            )
        )
    # Legend entries that explain the markers (no data, not clickable clusters).
    for reason, symbol in FATE_SYMBOLS.items():
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", name=FATE_LABELS[reason], legendgroup="fate",
                legendgrouptitle={"text": "marker"} if reason is None else None,
                marker={"symbol": symbol, "color": "#555", "size": 10, "line": {"color": "#555", "width": 2}},
                hoverinfo="skip", showlegend=True,
            )
        )
    projection = "t-SNE" if careset.config.projection == "tsne" else "UMAP"
    kept = int(keep.sum())
    fig.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        title={
            "text": f"{len(careset.tokens)} candidates for “{html.escape(careset.config.reference_word)}” · {projection} · "
            f"{kept} kept",
            "font": {"size": 14}, "x": 0.01, "xanchor": "left",
        },
        xaxis={"showticklabels": False, "zeroline": False, "showgrid": False, "title": None},
        yaxis={"showticklabels": False, "zeroline": False, "showgrid": False, "title": None},
        legend={"font": {"size": 11}, "orientation": "h", "x": 0, "xanchor": "left", "y": -0.02, "yanchor": "top",
                "itemclick": False, "itemdoubleclick": False, "groupclick": "toggleitem"},
        hoverlabel={"bgcolor": "white"},
        uirevision="careset",  # keep zoom/pan when the figure is updated after an edit
        clickmode="event",
    )
    return fig


def figure_json(fig: go.Figure | None) -> str:
    """The figure as the JSON the browser-side plot component draws ("" for no figure)."""
    if fig is None:
        return ""
    return pio.to_json(fig, validate=False, remove_uids=True)


def placeholder_json(message: str) -> str:
    """A figure with only a centred message (before anything is built)."""
    return json.dumps({
        "data": [],
        "layout": {
            "template": pio.templates["plotly_white"].to_plotly_json(),
            "height": 420, "margin": {"l": 10, "r": 10, "t": 10, "b": 10},
            "xaxis": {"visible": False}, "yaxis": {"visible": False},
            "annotations": [{"text": message, "showarrow": False, "font": {"size": 15, "color": "#777"},
                             "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper"}],
        },
    })



# Training stages whose metrics rows carry an erase loss (and stage 2 also a retain loss).
_LOSS_STAGE_NAMES = MappingProxyType({"stage1.erase": "stage 1 erase", "stage1.textual_inversion": "textual inversion",
                                      "stage2": "stage 2", "esd": "ESD"})


def loss_figure(rows: list[dict], title: str = "", height: int = 360) -> go.Figure:
    """The live loss plot of a training run, from its metrics.jsonl rows (oldest first).

    x is the row's position in the run (every iteration and textual-inversion step in order, so
    the stages follow each other); the erase part (stage-1 erase, stage 2's erase term, ESD), the
    retain part (stage 2's retain term, Eq. 11) and the textual-inversion loss are separate traces
    on a log axis. A dotted line marks where each loop starts.

    Args:
        rows: metrics rows: {"stage", "step", "total", "loss", "erase"?, "retain"?, ...}.
        title: the figure's title (plain text; escaped here).
        height: figure height in pixels.
    """
    traces: dict[str, dict[str, list]] = {name: {"x": [], "y": [], "text": []}
                                          for name in ("erase", "retain", "textual inversion")}
    starts: list[tuple[int, str]] = []
    previous = None
    for x, row in enumerate(rows, start=1):
        stage = str(row.get("stage"))
        if stage not in _LOSS_STAGE_NAMES:
            continue
        if stage != previous or row.get("step") == 1:
            starts.append((x, _LOSS_STAGE_NAMES[stage]))
        previous = stage
        label = f"{_LOSS_STAGE_NAMES[stage]} step {row.get('step')}/{row.get('total')}"
        if stage == "stage1.textual_inversion":
            parts = {"textual inversion": row.get("loss")}
        else:
            parts = {"erase": row.get("erase", row.get("loss")), "retain": row.get("retain")}
        for name, value in parts.items():
            if isinstance(value, (int, float)) and value > 0:
                traces[name]["x"].append(x)
                traces[name]["y"].append(float(value))
                traces[name]["text"].append(label)
    colours = {"erase": "#EE6677", "retain": "#228833", "textual inversion": "#4477AA"}
    fig = go.Figure()
    for name, data in traces.items():
        fig.add_trace(go.Scatter(x=data["x"], y=data["y"], text=data["text"], name=f"{name} loss",
                                 mode="lines+markers" if len(data["x"]) < 80 else "lines",
                                 marker={"size": 4}, line={"color": colours[name], "width": 1.5},
                                 hovertemplate="%{text}<br>loss %{y:.4g}<extra>" + name + "</extra>"))
    for x, name in starts:
        fig.add_vline(x=x - 0.5, line={"dash": "dot", "color": "#aaa", "width": 1})
        fig.add_annotation(x=x - 0.5, y=1, yref="paper", text=html.escape(name), showarrow=False, xanchor="left",
                           font={"size": 10, "color": "#777"})
    fig.update_layout(
        template="plotly_white", height=height, margin={"l": 50, "r": 10, "t": 36, "b": 40},
        title={"text": html.escape(title), "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
        xaxis={"title": "step (all loops in order)"}, yaxis={"title": "loss", "type": "log"},
        legend={"orientation": "h", "x": 0, "y": -0.2}, uirevision="loss",
    )
    return fig


# ---------------------------------------------------------------------------------------------
# the Compare workspace's radars (Appendix M's RATIO triangle, Appendix N.2's CARE radar)

MODEL_COLOURS = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#AA3377", "#66CCEE", "#EE8866", "#332288")
DEFENSE_ATTACK = "cce"  # Appendix M's Defense axis is 100 - ASR under CCE


def defense_attack(asr: dict) -> str | None:
    """The attack whose ASR makes the Defense axis: CCE when measured (Appendix M), else the strongest measured one.

    Args:
        asr: attack -> ASR in percent (metrics.json's "asr").
    """
    if not asr:
        return None
    if DEFENSE_ATTACK in asr:
        return DEFENSE_ATTACK
    return max(asr, key=lambda a: (asr[a], a))  # the highest ASR: the defense is only as good as its weakest spot


def radar_numbers(row: dict) -> dict | None:
    """One model's RATIO radar numbers from its metrics (metrics.json plus "model"), through `recare.metrics`.

    Returns {"model", "attack", "asr", "D", "U", "C", "ratio", "clip_score", "care_score"}, or None when the
    metrics lack an ASR, the CLIP score or the CARE score. When CCE was not run, Defense uses the strongest
    measured attack (`defense_attack`) and the RATIO is that attack's, not Appendix M's CCE one.

    Args:
        row: {"model": label, "asr": {...}, "clip_score": float, "care_score": {"mean", ...},
            "ratio": {"clip_range": [lo, hi], ...}}.
    """
    from recare.metrics import CLIP_RANGE, ratio, ratio_axes

    asr, clip, care = row.get("asr") or {}, row.get("clip_score"), row.get("care_score") or {}
    attack = defense_attack(asr)
    if attack is None or clip is None or care.get("mean") is None:
        return None
    lo, hi = (row.get("ratio") or {}).get("clip_range") or CLIP_RANGE
    d, u, c = ratio_axes(asr[attack], clip, care["mean"], (lo, hi))
    return {"model": str(row.get("model", "")), "attack": attack, "asr": float(asr[attack]), "D": d, "U": u, "C": c,
            "ratio": ratio(asr[attack], clip, care["mean"], (lo, hi)), "clip_score": float(clip),
            "care_score": float(care["mean"])}


def _closed(values: list, axes: list) -> tuple[list, list]:
    return values + values[:1], axes + axes[:1]


PARTIAL_SUFFIX = " (partial)"  # a model whose evaluation is still running: its numbers come from the images so far


def _shown_name(row: dict) -> str:
    """The model's legend name, marked when its numbers are provisional (row["partial"])."""
    return str(row.get("model", "")) + (PARTIAL_SUFFIX if row.get("partial") else "")


def _line(colour: str, partial: bool) -> dict:
    return {"color": colour, "dash": "dash" if partial else "solid", "width": 2 if partial else 1.5}


def ratio_radar_figure(rows: list[dict], height: int = 420) -> go.Figure:
    """The RATIO radar: Defense, Utility, CARE on three axes, one filled triangle per model, RATIO in the legend.

    Every number comes from `radar_numbers` (recare.metrics.ratio_axes, ratio, ratio_triangle). A row with
    "partial": True (an evaluation still running) is drawn dashed and lighter, "(partial)" in its legend entry.

    Args:
        rows: one metrics dict per model (see `radar_numbers`); rows without the numbers are left out.
        height: figure height in pixels.
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
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
        partial = bool(row.get("partial"))
        fig.add_trace(go.Scatterpolar(r=r, theta=theta, fill="toself", name=f"{html.escape(_shown_name(row))} · RATIO "
                                      f"{n['ratio']:.3f} (D: {html.escape(n['attack'])})", line=_line(colour, partial), opacity=0.35 if partial else 0.6,
                                      showlegend=True, meta={"model": n["model"], "ratio": n["ratio"],
                                                             "attack": n["attack"], "partial": partial},
                                      hovertemplate="%{theta}: %{r:.3f}<extra>" + html.escape(n["model"]) + "</extra>"))
    fig.update_layout(template="plotly_white", height=height, margin={"l": 60, "r": 90, "t": 40, "b": 30},
                      title={"text": "RATIO radar (Appendix M)", "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
                      polar={"radialaxis": {"range": [0, 1]}}, legend={"orientation": "h", "y": -0.1},
                      uirevision="ratio")
    return fig


def care_concepts(rows: list[dict]) -> list[str]:
    """Every CARE concept of the rows, in first-seen order (the CARE radar's axes)."""
    out: dict[str, None] = {}
    for row in rows:
        for concept in ((row.get("care_score") or {}).get("per_concept") or {}):
            out[concept] = None
    return list(out)


MAX_CARE_AXES = 10  # Appendix N.2 draws up to 10 CARE concepts


def care_radar_figure(rows: list[dict], height: int = 420, concepts: list[str] | None = None) -> go.Figure:
    """The CARE radar (Appendix N.2): one axis per CARE concept, one trace per model (`recare.metrics.care_radar`).

    A radar needs three axes: with one or two concepts (a mini-world task has one) the same numbers are
    drawn as grouped bars, one bar trace per model, and the title says so. A row with "partial": True
    is drawn dashed (hatched bars), "(partial)" in its legend entry; a concept it has no images of yet
    is a gap.

    Args:
        rows: one metrics dict per model: {"model", "care_score": {"per_concept": {concept: score}}, "partial"?}.
        height: figure height in pixels.
        concepts: the axes, in order (at most MAX_CARE_AXES are drawn); None: every concept of the rows.
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
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
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
    title = (f"CARE score per concept (bars: {len(concepts)} concept{'s' if len(concepts) != 1 else ''}; "
             "a radar needs 3)" if as_bars else "CARE radar (Appendix N.2)")
    fig.update_layout(template="plotly_white", height=height, margin={"l": 40, "r": 40, "t": 40, "b": 30},
                      title={"text": title, "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
                      legend={"orientation": "h", "y": -0.15}, uirevision="care")
    if as_bars:
        fig.update_layout(barmode="group", yaxis={"range": [0, 1], "title": "CARE score"})
    else:
        fig.update_layout(polar={"radialaxis": {"range": [0, 1]}})
    return fig


# ---------------------------------------------------------------------------------------------
# the Compare workspace's image grid (rows = models, columns = seeds)


def image_grid(rows: list[tuple[str, list]], seeds: list[int], title: str = "", cell: int = 128):
    """One PNG-ready picture of the side-by-side grid: a row per model, a column per seed, labels drawn on it.

    Args:
        rows: (model label, one PIL image or None per seed); None draws an empty "not made" cell. Images are
            shown as given (the caller passes the blurred copy of a flagged image).
        seeds: the column headers.
        title: a line above the grid (the prompt).
        cell: the side of one image cell in pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_w, header_h, title_h, gap = 180, 20, 24 if title else 0, 4
    width = label_w + len(seeds) * (cell + gap) + gap
    height = title_h + header_h + len(rows) * (cell + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 5), _fit(draw, title, width - 2 * gap, font), fill="#222", font=font)
    for j, seed in enumerate(seeds):
        draw.text((label_w + gap + j * (cell + gap), title_h + 4), f"seed {seed}", fill="#444", font=font)
    for i, (label, images) in enumerate(rows):
        y = title_h + header_h + gap + i * (cell + gap)
        for k, line in enumerate(_wrap(draw, label, label_w - 2 * gap, font)[:6]):
            draw.text((gap, y + 4 + 14 * k), line, fill="#222", font=font)
        for j in range(len(seeds)):
            x = label_w + gap + j * (cell + gap)
            image = images[j] if j < len(images) else None
            if image is None:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill="#eeeeee", outline="#cccccc")
                draw.text((x + 8, y + cell // 2 - 6), "not made", fill="#888", font=font)
            else:
                canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
    return canvas


def _fit(draw, text: str, width: int, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def _wrap(draw, text: str, width: int, font) -> list[str]:
    lines, line = [], ""
    for word in str(text).split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


RATIO_COLUMNS = ("model", "run", "Defense attack", "ASR %", "Defense", "Utility", "CARE", "RATIO", "CLIP score")
TABLE_COLUMNS = (*RATIO_COLUMNS, "numbers")  # "final", or "partial: made/planned images" while a job runs


def _numbers_state(row: dict) -> str:
    if not row.get("partial"):
        return "final"
    progress = row.get("progress") or {}
    return f"partial: {progress.get('images', 0)}/{progress.get('planned', '?')} images"


def _round(value, digits=4):
    return None if value is None else round(float(value), digits)


def metric_tables(rows: list[dict], concepts: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """(RATIO table, CARE table, radar numbers of the rows that have all three axes), as Compare and the demo show them.

    Args:
        rows: metrics.json contents (or provisional metrics with "partial" and "progress") plus "model" and "run".
        concepts: the CARE table's columns (default: every evaluated concept).
    """
    numbers, ratio_rows = [], []
    for row in rows:
        n = radar_numbers(row)
        if n is not None:
            numbers.append({**n, "run": row["run"], "partial": bool(row.get("partial"))})
            ratio_rows.append([n["model"], row["run"], n["attack"], round(n["asr"], 2), round(n["D"], 4),
                               round(n["U"], 4), round(n["C"], 4), round(n["ratio"], 4), round(n["clip_score"], 4),
                               _numbers_state(row)])
        else:  # a partial row without every axis yet: what it has
            asr = row.get("asr") or {}
            attack = defense_attack(asr)
            ratio_rows.append([row["model"], row["run"], attack, _round(asr.get(attack), 2) if attack else None, None,
                               None, _round((row.get("care_score") or {}).get("mean")), None,
                               _round(row.get("clip_score")), _numbers_state(row)])
    ratio = pd.DataFrame(ratio_rows, columns=list(TABLE_COLUMNS))
    concepts = care_concepts(rows) if concepts is None else concepts
    care = pd.DataFrame([[row["model"], *[((row.get("care_score") or {}).get("per_concept") or {}).get(c)
                                          for c in concepts], _numbers_state(row)] for row in rows],
                        columns=["model", *concepts, "numbers"])
    return ratio, care, numbers
