"""Plotly figure builders. Pure presentation: every number comes from a recare object."""

from __future__ import annotations

import html
import json
import math
from types import MappingProxyType

import plotly.graph_objects as go
import plotly.io as pio

from recare.careset import CareSet
# the Compare workspace's radars and tables live in the library (the HTML report draws them too); re-exported here
from recare.charts import (  # noqa: F401
    MAX_CARE_AXES, MODEL_COLOURS, PARTIAL_SUFFIX, RATIO_COLUMNS, TABLE_COLUMNS, care_concepts, care_radar_figure,
    defense_attack, metric_tables, radar_numbers, ratio_radar_figure,
)

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
                                      "stage2": "stage 2", "esd": "ESD",
                                      "closing.textual_inversion": "closing search: textual inversion",
                                      "closing.erase": "closing search: stage 2"})
_TI_STAGES = ("stage1.textual_inversion", "closing.textual_inversion")


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
        if stage in _TI_STAGES:
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
    yaxis = {"title": "loss", "type": "log"}
    shown = loss_axis_range([y for data in traces.values() for y in data["y"]])
    if shown is not None:
        (lo, hi), hidden = shown
        yaxis["range"] = [math.log10(lo) - 0.15, math.log10(hi) + 0.15]
        if hidden:
            fig.add_annotation(x=1, y=0, xref="paper", yref="paper", xanchor="right", yanchor="bottom",
                               showarrow=False, font={"size": 10, "color": "#777"},
                               text=f"{hidden} value(s) below {lo / LOSS_AXIS_DEPTH:.0e} off the axis (near 0, e.g. the "
                                    "first retain loss)")
    fig.update_layout(
        template="plotly_white", height=height, margin={"l": 50, "r": 10, "t": 36, "b": 40},
        title={"text": html.escape(title), "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
        xaxis={"title": "step (all loops in order)"}, yaxis=yaxis,
        legend={"orientation": "h", "x": 0, "y": -0.2}, uirevision="loss",
    )
    return fig


LOSS_AXIS_DEPTH = 1e4  # the log axis spans at most this factor below the losses' median


def loss_axis_range(values: list[float]) -> tuple[tuple[float, float], int] | None:
    """((lo, hi), how many values lie below lo) for the loss plot's log axis, or None to let plotly choose.

    A loss that is numerically zero (stage 2's retain loss at its first step, when the model still equals the
    frozen copy: about 1e-12) would stretch a log axis over twelve decades and flatten every curve; the axis
    stops at LOSS_AXIS_DEPTH below the median of the values, and the few below it are left off (and counted).

    Args:
        values: every positive loss value drawn.
    """
    if not values:
        return None
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    floor = median / LOSS_AXIS_DEPTH
    kept = [v for v in ordered if v >= floor]
    hidden = len(ordered) - len(kept)
    if not hidden:
        return None
    return (kept[0], kept[-1]), hidden


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


__all__ = [
    "CLUSTER_COLOURS", "FATE_SYMBOLS", "FATE_LABELS", "MAX_TEXT_LABELS", "LOSS_AXIS_DEPTH", "cluster_colour",
    "careset_figure", "figure_json", "placeholder_json", "loss_figure", "loss_axis_range", "image_grid",
    # re-exported from recare.charts
    "MAX_CARE_AXES", "MODEL_COLOURS", "PARTIAL_SUFFIX", "RATIO_COLUMNS", "TABLE_COLUMNS", "care_concepts",
    "care_radar_figure", "defense_attack", "metric_tables", "radar_numbers", "ratio_radar_figure",
]
