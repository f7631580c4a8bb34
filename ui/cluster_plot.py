"""The clickable cluster plot: a gr.HTML component that draws a plotly figure with plotly.js.

`gr.Plot` sends no click events in Gradio 6.31, so the plot is a `gr.HTML` whose value is the
figure's JSON. Its `js_on_load` draws the figure with `Plotly.react` (again whenever the value
changes, through `watch('value', ...)`) and forwards clicks to the server with Gradio's
`trigger('click', data)`: a point click sends `{token}`, a legend click on a cluster sends
`{cluster}`. The Python listener reads them from `gr.EventData`.

plotly.js is the copy bundled with the installed `plotly` package, loaded through the
component's `head` from Gradio's file route (the single file is in `allowed_paths`), so the
app works offline and never touches a CDN.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import plotly

PLOT_CLASS = "recare-plot"

# Runs once in the browser when the component mounts; `element`, `props`, `trigger` and
# `watch` are provided by gr.HTML.
_JS_ON_LOAD = """
function recareDraw() {
  const host = element.querySelector('.%(cls)s');
  if (!host) { return; }
  if (typeof Plotly === 'undefined') {
    host.textContent = 'plotly.js did not load; the table below has every candidate.';
    return;
  }
  const raw = props.value;
  if (!raw) { Plotly.purge(host); host.innerHTML = ''; return; }
  const fig = JSON.parse(raw);
  Plotly.react(host, fig.data, fig.layout, {displaylogo: false, responsive: true,
    modeBarButtonsToRemove: ['select2d', 'lasso2d', 'toImage']});
  if (host.dataset.bound !== '1') {
    host.dataset.bound = '1';
    host.on('plotly_click', function (ev) {
      const p = ev && ev.points && ev.points[0];
      if (p && p.customdata) { trigger('click', {token: String(p.customdata[0])}); }
    });
    host.on('plotly_legendclick', function (ev) {
      const trace = ev && ev.data && ev.data[ev.curveNumber];
      if (trace && trace.meta && trace.meta.cluster !== undefined) {
        trigger('click', {cluster: Number(trace.meta.cluster)});
      }
      return false;
    });
  }
}
recareDraw();
watch('value', recareDraw);
""" % {"cls": PLOT_CLASS}


def plotly_js_path() -> Path:
    """plotly.min.js as bundled with the installed plotly package (served offline)."""
    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js is missing from the plotly package ({path}); reinstall plotly.")
    return path


def plotly_script_tag() -> str:
    """<script> loading plotly.js through Gradio's file route (relative URL: works behind a root path)."""
    return f'<script src="gradio_api/file={plotly_js_path().as_posix()}"></script>'


def cluster_plot(value: str = "", height: int = 540, elem_id: str = "careset-plot") -> gr.HTML:
    """The plot component. Wire `.click(fn, ...)` with `evt: gr.EventData` (`token` or `cluster`).

    Args:
        value: the figure JSON (see ui.figures.figure_json); "" draws nothing.
        height: minimum height in pixels (the figure sets its own).
        elem_id: DOM id (the browser test looks for it).
    """
    return gr.HTML(
        value=value,
        html_template=f'<div class="{PLOT_CLASS}" style="width:100%;min-height:{height}px"></div>',
        js_on_load=_JS_ON_LOAD,
        head=plotly_script_tag(),
        elem_id=elem_id,
        label="Cluster plot",
        min_height=height,
        apply_default_css=False,
    )


def clicked(evt: gr.EventData | None) -> tuple[str | None, int | None]:
    """(token, cluster) sent by a click on the plot; either may be None."""
    data = getattr(evt, "_data", None) or {}
    if not isinstance(data, dict):
        return None, None
    token = data.get("token")
    cluster = data.get("cluster")
    return (str(token) if token is not None else None), (int(cluster) if cluster is not None else None)
