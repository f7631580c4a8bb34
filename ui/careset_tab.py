"""CARE-set workspace: build Algorithm 1 on the session's images, then curate it by hand.

Layout first, event wiring last. The plot (ui.cluster_plot), the token table and the cluster
checkboxes are three views of one `CareSet` held in the session; every edit goes through
`CareSet.with_edits` (no features are recomputed) and re-renders all three, so they stay in sync.
The current set is written to the session folder as `careset.json` (official format, the file
training uses) and `careset.rich.json` (everything, to continue editing later).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from recare import models
from recare.careset import CareSet
from recare.workflows import careset_from_images
from recare.careset_io import (
    CareSetFileError, official_json_text, read_careset_file, reference_key, rich_dict,
)
from recare.config import ConfigError, CareSetConfig
from recare.errors import CareSetError, RecareError
from recare.encoders import Vocabulary, clip_bpe_vocabulary, read_word_list, word_list_vocabulary
from recare.limits import Limits
from recare.atomic import atomic_write_text
from recare import worldspec
from ui.cluster_plot import cluster_plot, clicked
from ui.common import AppContext, gradio_progress, md, number, ok, problem, served, skip_all
from ui.figures import careset_figure, figure_json, placeholder_json
from ui.image_set import load_session_images
from ui.session import Session, ensure_session

TABLE_COLUMNS = ("keep", "token", "cluster", "count", "similarity", "residual", "status")
SUMMARY_COLUMNS = ("cluster", "size", "kept", "mean residual", "fate", "top tokens")
VOCAB_MINI, VOCAB_BPE, VOCAB_FILE = "mini-world", "clip-bpe", "word-list"
ENCODER_CHOICES = (models.MINI_WORLD, models.DEFAULT_OPEN_CLIP)


def create_careset_tab(ctx: AppContext) -> dict[str, Any]:
    """Build the CARE-set workspace inside the current gr.Tab.

    Args:
        ctx: the shell's context (model cache, session state).
    """
    d = worldspec.careset_defaults()
    has_mini_vocab = worldspec.mini_world_words() is not None
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        # ---- parameters ----
        with gr.Column(scale=1, min_width=280):
            c["reference_word"] = gr.Textbox(d.reference_word, label="Reference word", elem_id="cs-reference",
                                             info="The concept to erase; its text feature is the target direction.")
            c["prompt_style"] = gr.Radio(["photo", "painting"], value=d.prompt_style, label="Prompt style",
                                         info="“A photo of …” (objects) or “A painting of …” (styles)")
            c["encoder"] = gr.Dropdown(list(ENCODER_CHOICES), value=models.MINI_WORLD, allow_custom_value=True,
                                       label="Encoder", info="mini CLIP, open_clip:<arch>/<weights>, or a CLIP folder")
            c["vocabulary"] = gr.Radio(
                [("mini-world words", VOCAB_MINI), ("CLIP BPE (49,408)", VOCAB_BPE), ("uploaded word list", VOCAB_FILE)],
                value=VOCAB_MINI if has_mini_vocab else VOCAB_BPE, label="Vocabulary", elem_id="cs-vocab")
            c["word_list"] = gr.File(label="Word list (.txt, one word per line)", file_types=[".txt"],
                                     elem_id="cs-wordlist", height=90, visible=c["vocabulary"].value == VOCAB_FILE)
            with gr.Accordion("Algorithm 1 parameters", open=False):
                with gr.Row():
                    c["top_k"] = gr.Number(d.top_k, precision=0, label="K (tokens per image)")
                    c["top_n"] = gr.Number(d.top_n, precision=0, label="N (candidates)")
                c["projection"] = gr.Radio([("t-SNE", "tsne"), ("UMAP", "umap")], value=d.projection, label="Projection")
                with gr.Row():
                    c["n_clusters"] = gr.Number(d.n_clusters, precision=0, label="Clusters")
                    c["k_each_side"] = gr.Number(d.k_each_side, precision=0, label="k each side")
                with gr.Row():
                    c["alpha"] = gr.Number(d.alpha, step=0.005, label="alpha")
                    c["min_cluster_size"] = gr.Number(d.min_cluster_size, precision=0, label="Min cluster size")
                c["seed"] = gr.Number(d.seed, precision=0, label="Seed")
                c["global_clustering"] = gr.Checkbox(d.global_clustering, label="Global clustering (Eq. 7)")
                c["intra_refinement"] = gr.Checkbox(d.intra_refinement, label="Intra-cluster refinement (Eqs. 8-9)")
            c["build"] = gr.Button("Build CARE-set", variant="primary", elem_id="cs-build")
        # ---- plot and tables ----
        with gr.Column(scale=3):
            c["status"] = gr.Markdown("Generate or upload target images, then build the CARE-set.", elem_id="cs-status")
            c["plot"] = cluster_plot(placeholder_json("Build a CARE-set to see its candidates here."), height=600)
            gr.Markdown("Colour = cluster, marker = kept or why dropped. **Click a point** to keep/drop that token; "
                        "**click a cluster in the legend** to keep/drop the whole cluster. Hover for count, "
                        "similarity to the target and residual.", elem_id="cs-plot-help")
            with gr.Tabs():
                with gr.Tab("Tokens"):
                    c["table"] = gr.Dataframe(
                        value=pd.DataFrame(columns=list(TABLE_COLUMNS)), headers=list(TABLE_COLUMNS),
                        datatype=["bool", "str", "number", "number", "number", "number", "str"],
                        interactive=True, static_columns=[1, 2, 3, 4, 5, 6], max_height=420,
                        label="Candidates (tick keep to include a token; same as clicking it on the plot)",
                        elem_id="cs-table")
                with gr.Tab("Clusters"):
                    c["clusters"] = gr.CheckboxGroup([], value=[], label="Clusters kept (untick to drop a whole cluster)",
                                                     elem_id="cs-clusters")
                    c["summary"] = gr.Dataframe(value=pd.DataFrame(columns=list(SUMMARY_COLUMNS)), interactive=False,
                                                label="Cluster summary", elem_id="cs-summary")
        # ---- the live CARE-set ----
        with gr.Column(scale=1, min_width=260):
            c["final"] = gr.Textbox("", label="Final CARE-set", lines=14, max_lines=24, interactive=False,
                                    elem_id="careset-final")
            c["custom"] = gr.Textbox("", label="Custom tokens", placeholder="e.g. person, flower", elem_id="cs-custom",
                                     info="Comma-separated; added to (or removed from) the set by hand.")
            with gr.Row():
                c["add_custom"] = gr.Button("Add", size="sm", elem_id="cs-add")
                c["remove_custom"] = gr.Button("Remove", size="sm")
            c["reset"] = gr.Button("Reset manual edits", size="sm")
            c["download_official"] = gr.DownloadButton("Download careset.json", value=None, elem_id="cs-download",
                                                       variant="primary")
            c["download_rich"] = gr.DownloadButton("Download rich JSON", value=None, elem_id="cs-download-rich")
            c["load_file"] = gr.File(label="Load careset.json or rich JSON to continue", file_types=[".json"],
                                     elem_id="cs-load", height=90)
            # API-only twins of the plot clicks (hidden): gradio_client and tests call these.
            c["toggle_token_box"] = gr.Textbox(visible=False)
            c["toggle_token_btn"] = gr.Button(visible=False)
            c["toggle_cluster_box"] = gr.Number(visible=False, precision=0)
            c["toggle_cluster_btn"] = gr.Button(visible=False)

    # ---- wiring ------------------------------------------------------------------------------
    views = [ctx.session, c["plot"], c["table"], c["clusters"], c["summary"], c["final"],
             c["download_official"], c["download_rich"], c["status"]]
    params = [c[k] for k in ("reference_word", "prompt_style", "encoder", "vocabulary", "word_list", "top_k", "top_n",
                             "projection", "n_clusters", "k_each_side", "alpha", "min_cluster_size", "seed",
                             "global_clustering", "intra_refinement")]

    def build(reference_word, prompt_style, encoder, vocabulary, word_list, top_k, top_n, projection, n_clusters,
              k_each_side, alpha, min_cluster_size, seed, global_clustering, intra_refinement, session,
              progress=gr.Progress()):
        return _build(ctx, reference_word, prompt_style, encoder, vocabulary, word_list, top_k, top_n, projection,
                      n_clusters, k_each_side, alpha, min_cluster_size, seed, global_clustering, intra_refinement,
                      session, progress)

    prompt = ctx.components.get("generate.prompt")
    if prompt is not None:  # a mini-world task prompt sets its reference word and prompt style
        prompt.change(_task_defaults, [prompt], [c["reference_word"], c["prompt_style"]], api_name=False,
                      show_progress="hidden")
    c["vocabulary"].change(lambda choice: gr.File(visible=choice == VOCAB_FILE), [c["vocabulary"]], [c["word_list"]],
                           api_name=False, show_progress="hidden")
    # preprocess=False here and on the number boxes below: the handlers check every raw value themselves
    c["build"].click(build, params + [ctx.session], views, api_name="build_careset", concurrency_limit=2,
                     preprocess=False)
    c["plot"].click(_plot_click, [ctx.session], views, api_name=False)
    c["toggle_token_btn"].click(_toggle_token, [c["toggle_token_box"], ctx.session], views, api_name="toggle_token")
    c["toggle_cluster_btn"].click(_toggle_cluster, [c["toggle_cluster_box"], ctx.session], views,
                                  api_name="toggle_cluster", preprocess=False)
    c["table"].change(_table_edit, [c["table"], ctx.session], views, api_name="edit_table", show_progress="hidden")
    c["clusters"].input(_clusters_edit, [c["clusters"], ctx.session], views, api_name="set_clusters")
    c["add_custom"].click(lambda text, session: _add_custom(text, session, ctx.limits), [c["custom"], ctx.session],
                          views, api_name="add_custom_tokens")
    c["remove_custom"].click(_remove_custom, [c["custom"], ctx.session], views, api_name="remove_custom_tokens")
    c["reset"].click(_reset, [ctx.session], views, api_name="reset_edits")
    c["load_file"].upload(lambda file, session: _load(file, session, ctx.limits), [c["load_file"], ctx.session],
                          views, api_name="load_careset")
    return c


# ---------------------------------------------------------------------------------------------
# callbacks: each returns the views (session, plot, table, clusters, summary, final, 2 downloads, status)


def _build(ctx, reference_word, prompt_style, encoder_name, vocabulary, word_list, top_k, top_n, projection,
           n_clusters, k_each_side, alpha, min_cluster_size, seed, global_clustering, intra_refinement,
           session, progress):
    session = ensure_session(session)
    try:
        config = CareSetConfig(
            reference_word=_text(reference_word), prompt_style=prompt_style,
            top_k=_number(top_k, "top_k", int), top_n=_number(top_n, "top_n", int), projection=projection,
            n_clusters=_number(n_clusters, "n_clusters", int), k_each_side=_number(k_each_side, "k_each_side", int),
            alpha=_number(alpha, "alpha", float), min_cluster_size=_number(min_cluster_size, "min_cluster_size", int),
            seed=_number(seed, "seed", int),
            global_clustering=_switch(global_clustering, "global clustering"),
            intra_refinement=_switch(intra_refinement, "intra-cluster refinement"))
        config.validate()
    except ConfigError as e:
        return _fail(session, f"Check the parameters: {e}")
    if not session.images:
        return _fail(session, "No target images yet: generate or upload images in the Generate tab first.")
    limits = ctx.limits if ctx is not None else Limits.from_env()
    try:
        vocab = _vocabulary(vocabulary, word_list, limits)
    except RecareError as e:
        return _fail(session, str(e))
    try:
        progress(0.02, desc=f"loading encoder {encoder_name}")
        encoder = ctx.models.encoder(encoder_name)
    except models.ModelLoadError as e:
        return _fail(session, f"Could not load the encoder: {e}")
    try:
        progress(0.05, desc=f"encoding {len(session.images)} images")
        bars = {"vocabulary": gradio_progress(progress, 0.1, 0.6), "careset": gradio_progress(progress, 0.6, 1.0)}
        careset = careset_from_images(load_session_images(session), config, encoder, vocab, limits=limits,
                                      progress=lambda event: bars.get(event.stage, bars["careset"])(event),
                                      meta={"images": session.source})
    except RecareError as e:  # unreadable session images, too few candidates, ...; anything else is a bug
        return _fail(session, f"Could not build the CARE-set: {e}")
    kept = len(careset.final_tokens())
    n_images = f"{careset.num_images} image{'s' if careset.num_images != 1 else ''}"
    return _commit(session, ok(f"Built from {n_images} and {len(vocab):,} {md(vocab.source)} tokens: "
                               f"{len(careset.tokens)} candidates, {kept} kept."), careset=careset, official=None)


def _task_defaults(prompt: str):
    task = worldspec.task_for_prompt(prompt)
    if task is None:
        return gr.skip(), gr.skip()
    style = task.get("prompt_style")
    return task["reference_word"], (style if style in ("photo", "painting") else gr.skip())


def _text(value):
    """A text box's raw value stripped; anything that is not text is passed on for the config to refuse."""
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else value


def _switch(value, name: str) -> bool:
    """A checkbox's raw value; ConfigError for anything but true/false."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false (got {str(value)[:40]!r}).")
    return value


def _file_path(value) -> str:
    """The server path of an uploaded file, as a component's raw value ({'path': ...}), a path, or a file object."""
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return value["path"]
    if isinstance(value, str):
        return value
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    raise ConfigError("the word list upload is not a file; upload a .txt file.")


def _number(value, name: str, kind: type):
    """`kind(value)` for a number box; an empty, non-numeric or non-finite box is a ConfigError, not a crash."""
    return number(value, name, kind)


def _vocabulary(choice: str, word_list, limits: Limits | None = None) -> Vocabulary:
    if choice == VOCAB_FILE:
        if not word_list:
            raise ConfigError("Upload a word list (.txt, one word per line) or pick another vocabulary.")
        return read_word_list(_file_path(word_list), limits=limits)
    if choice == VOCAB_MINI:
        words = worldspec.mini_world_words()
        if words is None:
            raise ConfigError("The mini world has no word list (checkpoints/mini-world/recare.json); "
                              "pick CLIP BPE or upload a word list.")
        return word_list_vocabulary(words, source="mini-world")
    if choice != VOCAB_BPE:
        raise ConfigError(f"unknown vocabulary {str(choice)[:40]!r}: pick mini-world words, CLIP BPE or a word list.")
    return clip_bpe_vocabulary()


def _edit(session: Session | None, status: str = "", limits: Limits | None = None, **edits):
    """Apply `edits` (see `CareSet.with_edits`) to a new CareSet; the session changes only if all of it works."""
    session = ensure_session(session)
    if session.careset is None:
        return _fail(session, "Build a CARE-set first (or load a rich JSON).")
    limits = limits or Limits.from_env()
    try:
        edited = session.careset.with_edits(**edits)
        if len(edited.custom_tokens) > limits.custom_tokens:
            raise CareSetError(limits.exceeded("custom_tokens", f"that makes {len(edited.custom_tokens):,} custom tokens"))
    except RecareError as e:  # an unknown token or cluster, too many custom tokens
        return _fail(session, str(e))
    return _commit(session, status, careset=edited)


def _plot_click(session: Session | None, evt: gr.EventData):
    token, cluster = clicked(evt)
    if cluster is not None:
        return _toggle_cluster(cluster, session)
    if token is not None:
        return _toggle_token(token, session)
    return skip_all(9)


def _toggle_token(token: str, session: Session | None):
    token = token.strip() if isinstance(token, str) else ""
    if not token:
        return _fail(ensure_session(session), "Name a token to toggle.")
    before = session.careset if session is not None else None
    result = _edit(session, toggle_tokens=[token])
    after = session.careset if session is not None else None
    if after is not None and after is not before:  # the edit went through
        i = after.tokens.index(token)
        result[-1] = f"“{md(token)}” {'kept' if after.keep[i] else 'dropped'}."
    return result


def _toggle_cluster(cluster, session: Session | None):
    if cluster is None or (isinstance(cluster, str) and not cluster.strip()):
        return _fail(ensure_session(session), "Name a cluster to toggle.")
    try:
        cluster = number(cluster, "the cluster")
    except RecareError as e:
        return _fail(ensure_session(session), str(e))
    before = session.careset if session is not None else None
    result = _edit(session, toggle_clusters=[cluster])
    after = session.careset if session is not None else None
    if after is not None and after is not before:  # the edit went through: the cluster exists
        kept = after.keep[after.labels == cluster].any()
        result[-1] = f"Cluster {cluster} {'kept' if kept else 'dropped'}."
    return result


def _table_edit(table, session: Session | None):
    if session is None or session.careset is None or table is None or len(table) == 0:
        return skip_all(9)
    if not isinstance(table, pd.DataFrame) or not {"token", "keep"} <= set(map(str, table.columns)):
        return _fail(session, "The token table needs its 'keep' and 'token' columns; reload the page.")
    careset = session.careset
    current = dict(zip(careset.tokens, careset.keep))
    keep, drop = [], []
    for token, value in zip(table["token"], table["keep"]):
        token = str(token)
        if token in current and _truthy(value) != bool(current[token]):
            (keep if _truthy(value) else drop).append(token)
    if not keep and not drop:
        return skip_all(9)  # the table only echoes what the server sent
    return _edit(session, f"Edited {len(keep) + len(drop)} token(s) from the table.", keep_tokens=keep, drop_tokens=drop)


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "✓")
    return bool(value)


def _clusters_edit(selected, session: Session | None):
    if session is None or session.careset is None:
        return _fail(ensure_session(session), "Build a CARE-set first.")
    careset = session.careset
    try:
        selected = {number(k, "a cluster") for k in (selected or [])}
    except RecareError as e:
        return _fail(session, str(e))
    on = {row["cluster"] for row in careset.cluster_summary() if row["kept"] > 0}
    return _edit(session, "Clusters updated.", keep_clusters=sorted(selected - on), drop_clusters=sorted(on - selected))


def _split(text: str) -> list[str]:
    text = text if isinstance(text, str) else ""
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def _add_custom(text: str, session: Session | None, limits: Limits | None = None):
    limits = limits or Limits.from_env()
    tokens = _split(text)
    if not tokens:
        return _fail(ensure_session(session), "Type one or more tokens (comma-separated) to add.")
    if len(tokens) > limits.custom_tokens:
        return _fail(ensure_session(session), limits.exceeded("custom_tokens", f"{len(tokens):,} tokens were given"))
    longest = max(tokens, key=len)
    if len(longest) > limits.token_chars:
        return _fail(ensure_session(session), limits.exceeded("token_chars", f"a token has {len(longest):,} characters"))
    shown = ", ".join(tokens[:20]) + (f" and {len(tokens) - 20:,} more" if len(tokens) > 20 else "")
    return _edit(session, f"Added {md(shown)}.", limits=limits, custom_tokens=tokens)


def _remove_custom(text: str, session: Session | None):
    tokens = _split(text)
    if not tokens:
        return _fail(ensure_session(session), "Type the tokens (comma-separated) to remove.")
    session = ensure_session(session)
    candidates = set(session.careset.tokens) if session.careset is not None else set()
    shown = ", ".join(tokens[:20]) + (f" and {len(tokens) - 20:,} more" if len(tokens) > 20 else "")
    return _edit(session, f"Removed {md(shown)}.", remove_custom=[t for t in tokens if t not in candidates],
                 drop_tokens=[t for t in tokens if t in candidates])


def _reset(session: Session | None):
    return _edit(session, "Manual edits cleared: back to Algorithm 1.", reset=True)


def _load(file, session: Session | None, limits: Limits | None = None):
    """Load a careset file: a rich one replaces the CARE-set; an official one is applied to the current set
    (same reference word) or kept as a token list. Every check runs before the session changes."""
    session = ensure_session(session)
    if not file:
        return _fail(session, "No file uploaded.")
    path = file if isinstance(file, str) else file.name
    try:
        loaded = read_careset_file(path, limits)  # size first, then JSON, then counts, then entries
    except RecareError as e:  # the readers turn every malformed-file case into CareSetFileError
        return _fail(session, f"Could not load the CARE-set file: {e}")
    if isinstance(loaded, CareSet):
        return _commit(session, ok(f"Loaded the rich CARE-set: {len(loaded.final_tokens())} tokens; edit away."),
                       careset=loaded, official=None)
    official = loaded
    if session.careset is not None and official.reference_key == _key(session.careset.config.reference_word):
        current = session.careset
        candidates = set(current.tokens)
        wanted = set(official.tokens)
        status = ok(f"Applied careset.json ({len(official.tokens)} tokens) to the current CARE-set.")
        return _edit(session, status, limits=limits, reset=True,
                     keep_tokens=[t for t in current.tokens if t in wanted],
                     drop_tokens=[t for t in current.tokens if t not in wanted],
                     custom_tokens=[t for t in official.tokens if t not in candidates])
    return _commit(session, ok(f"Loaded careset.json with {len(official.tokens)} tokens for “{md(official.reference_key)}”. "
                               "Build a CARE-set from images to edit it on the plot."), careset=None, official=official)


def _key(word: str) -> str:
    try:
        return reference_key(word)
    except CareSetFileError:
        return ""


# ---------------------------------------------------------------------------------------------
# views


def _fail(session: Session, message: str):
    out = skip_all(9)
    out[0] = session
    out[-1] = problem(message)
    return out


class _Unchanged(enum.Enum):
    """_commit's default: leave this part of the session as it is."""

    KEEP = 0


_KEEP = _Unchanged.KEEP


def _commit(session: Session, status: str, careset: Any = _KEEP, official: Any = _KEEP) -> list:
    """Make (careset, official) the session's state: render every view and file first, then swap.

    When anything fails on the way (e.g. a careset whose reference word gives no careset.json
    key), the session keeps its previous state and files and the status says why.

    Args:
        session: the session.
        status: the status line for success (Markdown; escape what came from users or files).
        careset: the new CareSet, None for none, or unchanged.
        official: the new OfficialCareSet (a loaded token list), None for none, or unchanged.
    """
    careset = session.careset if careset is _KEEP else careset
    official = session.official if official is _KEEP else official
    try:
        views, files = _render(session, careset, official, status)
    except RecareError as e:
        return _fail(session, f"The CARE-set was not changed: {e}")
    for path, text in files:
        atomic_write_text(path, text)
    session.careset, session.official = careset, official
    views[6] = served(files[0][0]) if files else None
    views[7] = served(files[1][0]) if len(files) > 1 else None
    return views


def _views(session: Session, status: str) -> list:
    """Every view of the session's current CARE-set (and its files written again)."""
    return _commit(session, status)


def _render(session: Session, careset: CareSet | None, official, status: str) -> tuple[list, list[tuple[Path, str]]]:
    """(the nine views, [(file, text)] to save) for a state, computed without changing anything."""
    if careset is None:
        tokens = official.tokens if official is not None else []
        files = []
        if official is not None:
            files.append((session.careset_path, official_json_text(official)))
        return [session, placeholder_json("Build a CARE-set to see its candidates here."),
                pd.DataFrame(columns=list(TABLE_COLUMNS)), gr.update(choices=[], value=[]),
                pd.DataFrame(columns=list(SUMMARY_COLUMNS)), gr.update(value="\n".join(tokens), label=_final_label(len(tokens))),
                None, None, status], files
    final = careset.final_tokens()
    files = [(session.careset_path, official_json_text(careset)),
             (session.rich_careset_path, json.dumps(rich_dict(careset), indent=1) + "\n")]
    summary = careset.cluster_summary()
    reasons = careset.reasons
    table = pd.DataFrame({
        "keep": [bool(k) for k in careset.keep],
        "token": list(careset.tokens),
        "cluster": [int(k) for k in careset.labels],
        "count": [int(n) for n in careset.counts],
        "similarity": [round(float(s), 3) for s in careset.similarity],
        "residual": [round(float(r), 3) for r in careset.residuals],
        "status": ["kept" if r is None else f"dropped: {r}" for r in reasons],
    }, columns=list(TABLE_COLUMNS))
    cluster_choices = [(f"cluster {row['cluster']} · {row['fate']} · {row['kept']}/{row['size']} kept", row["cluster"])
                       for row in summary]
    clusters_on = [row["cluster"] for row in summary if row["kept"] > 0]
    summary_df = pd.DataFrame([
        [row["cluster"], row["size"], row["kept"], round(row["mean_residual"], 3), row["fate"], ", ".join(row["top_tokens"])]
        for row in summary], columns=list(SUMMARY_COLUMNS))
    candidates = set(careset.tokens)
    final_text = "\n".join(t if t in candidates else f"{t}  (custom)" for t in final)
    if not final:
        status = (status + "  \n" if status else "") + "⚠ The CARE-set is empty: keep some tokens before training."
    return [session, figure_json(careset_figure(careset)), table, gr.update(choices=cluster_choices, value=clusters_on),
            summary_df, gr.update(value=final_text, label=_final_label(len(final))), None, None, status], files


def _final_label(n: int) -> str:
    return f"Final CARE-set ({n} token{'s' if n != 1 else ''}) — saved as careset.json"
