"""Plotly figure builders. Pure presentation: every number comes from a recare object."""

from __future__ import annotations

import html
import json
from types import MappingProxyType

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

