"""The app in a real browser: Playwright driving Debian's headless Chromium.

Generate a few images, build the CARE-set, click a point on the plot and see the token toggle
in the plot, the table and the final set, toggle a cluster from the legend, then download
careset.json and check its content. Runs on the mini world when it is installed, else on tiny
random models. Set RECARE_SCREENSHOTS=1 to (re)write the README screenshots in
assets/screenshots/ (otherwise they go to the test's temp folder).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from recare.train.stage1_probe import probe_rows
from tests.test_app_fixtures import write_words
from tests.test_app_train import train_app  # noqa: F401  (fixture: an app with its own run store)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "assets" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium; CI installs it)"),
]

PLOT = "#careset-plot .recare-plot"


def _plot_state(page) -> dict[str, str]:
    """token -> status ('kept' / 'dropped: ...') as drawn by plotly in the page."""
    return page.evaluate(
        """sel => {
            const host = document.querySelector(sel); const out = {};
            for (const trace of host.data) { for (const row of (trace.customdata || [])) { out[row[0]] = row[4]; } }
            return out; }""",
        PLOT,
    )


def _table_keep(page, token: str) -> bool:
    """Whether the token's 'keep' checkbox is ticked in the token table."""
    cell = page.locator("#cs-table [data-col='1']", has_text=token).filter(
        has=page.locator(f"text='{token}'")).first
    row = cell.get_attribute("data-row")
    return page.locator(f"#cs-table [data-testid='cell-{row}-0'] input[type=checkbox]").is_checked()


def test_generate_build_click_and_download(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = SCREENSHOTS if os.environ.get("RECARE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    real_world = app_url["real_world"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(app_url["url"])

        # ---- Generate ----
        if not real_world:
            page.fill("#gen-prompt textarea", "a photo of a cat")
        n_images = 12 if real_world else 6
        page.fill("#gen-num input[type=number]", str(n_images))
        page.keyboard.press("Tab")
        page.fill("#gen-steps input[type=number]", "25" if real_world else "2")
        page.keyboard.press("Tab")
        page.click("#gen-run")
        expect(page.locator("#gen-status")).to_contain_text("Done", timeout=120_000)
        expect(page.locator("#gen-gallery img")).to_have_count(n_images)
        page.screenshot(path=str(shots / "generate.png"))

        # ---- CARE-set ----
        page.get_by_role("tab", name="2 · CARE-set").click()
        if not real_world:  # tiny random models: a small word list and small K / N
            expect(page.locator("#cs-wordlist")).to_be_hidden()  # shown only for an uploaded list
            page.get_by_label("uploaded word list").check()
            expect(page.locator("#cs-wordlist")).to_be_visible()
            page.set_input_files("#cs-wordlist input[type=file]", str(write_words(tmp_path / "words.txt")))
            page.get_by_text("Algorithm 1 parameters").click()
            page.get_by_label("K (tokens per image)").fill("8")
            page.get_by_label("N (candidates)").fill("30")
            page.get_by_label("Clusters").fill("4")
            page.keyboard.press("Tab")
            expect(page.locator("#cs-wordlist a[href*='words.txt']")).to_have_count(1)
        page.click("#cs-build")
        expect(page.locator("#cs-status")).to_contain_text(f"Built from {n_images} images", timeout=120_000)
        page.wait_for_selector(f"{PLOT} .scatterlayer .point")
        before = _plot_state(page)
        assert before and all(s == "kept" or s.startswith("dropped") for s in before.values())

        # Click the first point of the first cluster: it toggles everywhere.
        token = page.evaluate("sel => document.querySelector(sel).data[0].customdata[0][0]", PLOT)
        was_kept = before[token] == "kept"
        assert _table_keep(page, token) is was_kept
        point = page.locator(f"{PLOT} .scatterlayer .trace").first.locator(".point").first
        point.scroll_into_view_if_needed()
        box = point.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        expect(page.locator("#cs-status")).to_contain_text(f"“{token}” {'dropped' if was_kept else 'kept'}")
        page.wait_for_function(
            """([sel, token, kept]) => { const h = document.querySelector(sel);
                 for (const t of h.data) for (const r of (t.customdata || [])) if (r[0] === token) return (r[4] === 'kept') === kept;
                 return false; }""",
            arg=[PLOT, token, not was_kept],
        )
        assert _plot_state(page)[token] == ("kept" if not was_kept else "dropped: manual")
        expect(page.locator("#cs-table [data-col='1']", has_text=token).first).to_be_visible()
        page.wait_for_function(
            """([token, kept]) => { for (const c of document.querySelectorAll("#cs-table [data-col='1']")) {
                 if (c.innerText.trim() !== token) continue; const row = c.getAttribute('data-row');
                 const box = document.querySelector(`#cs-table [data-testid='cell-${row}-0'] input[type=checkbox]`);
                 return box && box.checked === kept; } return false; }""",
            arg=[token, not was_kept],
        )
        final = page.locator("#careset-final textarea").input_value().splitlines()
        assert (token in final) is (not was_kept)

        # Click a cluster's legend entry: the whole cluster flips, and the Clusters checkboxes follow.
        legend = page.locator(f"{PLOT} .legend .traces").first
        legend.click()
        expect(page.locator("#cs-status")).to_contain_text("Cluster 0")
        cluster_dropped = "dropped" in page.locator("#cs-status").inner_text()
        state = _plot_state(page)
        members = page.evaluate("sel => document.querySelector(sel).data[0].customdata.map(r => r[0])", PLOT)
        assert all((state[t] == "kept") is (not cluster_dropped) for t in members)
        page.get_by_role("tab", name="Clusters").click()
        expect(page.locator("#cs-clusters input[type=checkbox]").first).to_be_checked(checked=not cluster_dropped)
        # ... and a second click brings it back.
        legend.click()
        expect(page.locator("#cs-status")).to_contain_text(f"Cluster 0 {'kept' if cluster_dropped else 'dropped'}")
        assert all((_plot_state(page)[t] == "kept") is cluster_dropped for t in members)
        page.get_by_role("tab", name="Tokens").click()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "careset.png"), clip={"x": 0, "y": 0, "width": 1440, "height": 1060},
                        full_page=True)

        # Download careset.json: official format, exactly the live set.
        final = [t.replace("  (custom)", "") for t in page.locator("#careset-final textarea").input_value().splitlines() if t]
        with page.expect_download() as download:
            page.click("#cs-download")
        data = json.loads(Path(download.value.path()).read_text())
        key = next(k for k in data if k.endswith("_care_word"))
        assert data[key] == ["A " + t for t in final]
        style = "painting" if f"{key}_painting" in data else "photo"
        prefix = "A painting of " if style == "painting" else "A photo of "
        assert data[f"{key}_{style}"] == [prefix + t for t in final]
        assert token in members and (token in final) is cluster_dropped  # the last cluster edit overrides the token's

        assert not errors, f"page errors: {errors}"
        browser.close()


def _loss_points(page) -> int:
    """Points drawn on the Train tab's loss plot (all traces)."""
    return page.evaluate("""() => { const h = document.querySelector('#train-loss .recare-plot');
        if (!h || !h.data) return 0; return h.data.reduce((n, t) => n + ((t.x || []).length), 0); }""")


def _open_page(playwright, height: int = 1100):
    """(browser, a 1440-wide page, the list its JavaScript errors are appended to)."""
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1440, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return browser, page, errors


def _open_train_with(page, **numbers) -> None:
    """Open the Train tab and type the short-run settings, e.g. iterations=12 -> #train-iterations."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="3 · Train").click()
    expect(page.locator("#train-estimate")).to_contain_text("Plan:", timeout=60_000)
    for name, value in numbers.items():
        page.fill(f"#train-{name.replace('_', '-')} input[type=number]", str(value))
        page.keyboard.press("Tab")


def test_train_start_watch_cancel_resume_finish(train_app, tmp_path):
    """A short ReCARE run on the mini world from the Train tab: loss points and a preview arrive,
    cancel, resume, finish (a few iterations only)."""
    from playwright.sync_api import expect, sync_playwright

    if not train_app["real_world"]:
        pytest.skip("the Train flow uses a mini-world task")
    shots = SCREENSHOTS if os.environ.get("RECARE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page, errors = _open_page(p)
        page.goto(train_app["url"])
        _open_train_with(page, iterations=12, s1_iterations=4, ti_steps=3, preview_every=2, num_images=4)
        expect(page.locator("#train-estimate")).to_contain_text("12 stage-2 it")
        page.click("#train-start")
        expect(page.locator("#train-message")).to_contain_text("Started", timeout=30_000)
        run_id = page.locator("#train-message").inner_text().split("Started")[1].split()[0].strip("*:.,")
        expect(page.locator("#train-status")).to_contain_text("running", timeout=120_000)
        # the loss plot gains points and a preview appears beside the base model's grid
        page.wait_for_function("() => { const h = document.querySelector('#train-loss .recare-plot');"
                               " return h && h.data && h.data.reduce((n, t) => n + ((t.x || []).length), 0) >= 2; }",
                               timeout=600_000)   # the task's images, CARE-set and model load come first
        first = _loss_points(page)
        expect(page.locator("#train-previews img")).to_have_count(2, timeout=300_000)
        page.wait_for_function(f"() => document.querySelector('#train-loss .recare-plot').data"
                               f".reduce((n, t) => n + ((t.x || []).length), 0) > {first}", timeout=120_000)
        expect(page.locator("#train-run input")).not_to_have_value(re.compile("queued|running|done"))  # no stale state
        # stage 1 as a search: round 1's token strength on the original and the erased model, while it runs
        expect(page.locator("#train-probe")).to_contain_text("round 1", timeout=300_000)
        cells = page.locator("#train-probe tr").nth(1).locator("td").all_inner_texts()
        assert cells[:2] == ["round 1", "<v1*>"] and all(re.fullmatch(r"\d+%", c) for c in cells[2:4]), cells
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "train.png"), full_page=True,
                        clip={"x": 0, "y": 0, "width": 1440, "height": 1300})  # the previews' both rows
        _small_png(shots / "train.png")
        # cancel: the run stops with a resumable state; resume: it finishes
        page.click("#train-cancel")
        expect(page.locator("#train-message")).to_contain_text("Cancel", timeout=30_000)
        expect(page.locator("#train-status")).to_contain_text("cancelled", timeout=120_000)
        page.click("#train-resume")
        expect(page.locator("#train-message")).to_contain_text("Resumed", timeout=30_000)
        expect(page.locator("#train-status")).to_contain_text("done", timeout=600_000)
        expect(page.locator("#train-progress")).to_contain_text("100%")
        expect(page.locator("#train-runs")).to_contain_text("done")
        # the finished run's two stage-1 rounds and tench's closing rounds, as recorded in its metrics.jsonl
        rows = [json.loads(line) for line in next(Path(train_app["runs"]).rglob(f"{run_id}/metrics.jsonl"))
                .read_text().splitlines()]
        kept = probe_rows(rows)   # per round, the inversion the round kept (the world searches with several)
        assert [int(r["step"]) for r in kept if not r.get("closing")] == [1, 2] and kept[-1].get("closing"), kept
        expect(page.locator("#train-probe tr")).to_have_count(1 + len(kept))
        cells = [page.locator("#train-probe tr").nth(r).locator("td").all_inner_texts() for r in range(1, 1 + len(kept))]
        recorded = [[f"{100 * r[k]:.0f}%" for k in ("original", "erased")] for r in kept]
        assert [c[2:4] for c in cells] == recorded, (cells, recorded)
        assert [c[0] for c in cells] == [f"closing round {int(r['closing'])} (the trained model)" if r.get("closing")
                                         else f"round {int(r['step'])}" for r in kept], cells
        assert [c[5] for c in cells] == ["yes" if r.get("joins_h", 1.0) else
                                         "no: the search ends" if r.get("closing") else "no (too weak)" for r in kept]
        assert not errors, f"page errors: {errors}"
        browser.close()


def _plot_traces(page, elem_id: str) -> list[dict]:
    """The traces plotly drew in a gr.Plot: type, name and values."""
    return page.evaluate("""id => { const h = document.querySelector(`#${id} .js-plotly-plot`);
        if (!h || !h.data) return []; return h.data.map(t => ({type: t.type, name: t.name, r: t.r || null,
        theta: t.theta || null, meta: t.meta || null})); }""", elem_id)


COMPARE_CARE_PROMPTS = {"freshwater": ["a photo of a lake"], "person": ["a photo of a person"],
                        "stars": ["a photo of stars"]}  # three concepts of the mini world: a real CARE radar


def test_compare_base_vs_a_trained_run(train_app, tmp_path):
    """Train a very short ReCARE run from the Train tab, then in Compare evaluate the base model and that run on
    two seeds: both radars draw one trace per model with the numbers of each run's metrics.json (through
    recare.metrics), and the grid shows every model's images of the same seeds."""
    from playwright.sync_api import expect, sync_playwright

    from recare import metrics

    if not train_app["real_world"]:
        pytest.skip("the Compare flow uses a mini-world task")
    shots = SCREENSHOTS if os.environ.get("RECARE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    runs = train_app["runs"]
    before = {p.name for p in runs.glob("evaluate-*")}
    with sync_playwright() as p:
        browser, page, errors = _open_page(p)
        page.goto(train_app["url"])

        # ---- a very short training run of this browser ----
        _open_train_with(page, iterations=2, s1_iterations=2, ti_steps=2, preview_every=0)
        page.click("#train-start")
        expect(page.locator("#train-message")).to_contain_text("Started", timeout=30_000)
        expect(page.locator("#train-status")).to_contain_text("done", timeout=300_000)
        run_id = page.locator("#train-message").inner_text().split("Started")[1].split()[0].strip("*:.,")

        # ---- Compare: base vs that run, two seeds, a custom prompt, three CARE concepts ----
        page.get_by_role("tab", name="4 · Compare").click()
        page.click("#compare-models-refresh")
        trained = page.locator("#compare-models label").filter(has_text="train-")
        expect(trained).to_have_count(1, timeout=30_000)
        trained.locator("input").check()
        editor = page.locator("#compare-care-prompts .cm-content")
        editor.click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        page.keyboard.insert_text(json.dumps(COMPARE_CARE_PROMPTS))
        page.fill("#compare-custom textarea", "a boat on a lake")
        for box, value in (("#compare-seeds", "2"),):
            page.fill(f"{box} input[type=number]", value)
            page.keyboard.press("Tab")
        page.get_by_label("CARE images per prompt").fill("1")
        page.get_by_label("CLIP captions").fill("4")
        page.keyboard.press("Tab")
        page.click("#compare-start")
        expect(page.locator("#compare-message")).to_contain_text("Started 2 evaluation", timeout=30_000)
        expect(page.locator("#compare-status li").filter(has_text="✓ done")).to_have_count(2, timeout=480_000)
        page.wait_for_function("() => { const h = document.querySelector('#compare-ratio .js-plotly-plot');"
                               " return h && h.data && h.data.length === 2 && !h.data.some(t => t.name.includes("
                               "'(partial)')); }", timeout=30_000)

        # both radars: one trace per model, the numbers of each run's metrics.json through recare.metrics
        made = sorted({p.name for p in runs.glob("evaluate-*")} - before)
        assert len(made) == 2
        saved = {json.loads((runs / r / "config.json").read_text())["compare"]["label"]:
                 json.loads((runs / r / "metrics.json").read_text()) for r in made}
        assert any(run_id in label for label in saved)
        ratio_traces = _plot_traces(page, "compare-ratio")
        assert [t["type"] for t in ratio_traces] == ["scatterpolar", "scatterpolar"]
        for trace in ratio_traces:
            m = saved[trace["meta"]["model"]]
            asr = m["asr"]
            attack = max(asr, key=lambda a: (asr[a], a))  # no CCE run: the strongest attack run
            assert trace["meta"]["attack"] == attack
            lo, hi = m["ratio"]["clip_range"]
            d, u, c = metrics.ratio_axes(asr[attack], m["clip_score"], m["care_score"]["mean"], (lo, hi))
            assert trace["r"] == pytest.approx([d, u, c, d])
            value = metrics.ratio(asr[attack], m["clip_score"], m["care_score"]["mean"], (lo, hi))
            assert f"RATIO {value:.3f}" in trace["name"]
            expect(page.locator("#compare-ratio-table")).to_contain_text(f"{value:.4f}".rstrip("0"))
        assert "adversarial" in next(m for label, m in saved.items() if run_id in label)["asr"]
        care_traces = _plot_traces(page, "compare-care")
        assert [t["type"] for t in care_traces] == ["scatterpolar", "scatterpolar"]
        for trace in care_traces:
            per = saved[trace["meta"]["model"]]["care_score"]["per_concept"]
            radar = metrics.care_radar(per)
            assert trace["theta"][:3] == list(radar.axes) and trace["r"][:3] == pytest.approx(list(radar.values))

        # the grid: the target prompt first, two models x the same two seeds
        expect(page.locator("#compare-grid img")).to_have_count(4, timeout=30_000)
        expect(page.locator("#compare-grid th.recare-grid-model")).to_have_count(2)  # each model named in its row
        expect(page.locator("#compare-grid th.recare-grid-model").filter(has_text=run_id)).to_be_visible()
        expect(page.locator("#compare-grid-note")).to_contain_text("Rows: 2 model(s) · columns: seeds 42, 43")
        page.locator("#compare-grid-prompt input").click()
        expect(page.get_by_role("option", name="custom · a boat on a lake")).to_be_visible()
        expect(page.get_by_role("option").filter(has_text="own adversarial token")).to_have_count(2)
        page.get_by_role("option", name="custom · a boat on a lake").click()
        page.wait_for_function("() => [...document.querySelectorAll('#compare-grid img')].length === 4 && "
                               "[...document.querySelectorAll('#compare-grid img')].every(i => i.complete)")
        for box in ("#compare-json", "#compare-csv", "#compare-grid-file", "#compare-report-file"):
            expect(page.locator(box)).to_be_hidden()  # no download box before there is a file
        page.click("#compare-grid-export")
        expect(page.locator("#compare-grid-file")).to_be_visible(timeout=30_000)  # shown once it holds grid.png
        top = page.locator("#compare-charts").bounding_box()["y"] + page.evaluate("window.scrollY") - 20
        page.screenshot(path=str(shots / "compare-live.png"), full_page=True,
                        clip={"x": 0, "y": max(0, top), "width": 1440, "height": 1100})
        assert not errors, f"page errors: {errors}"
        browser.close()


DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"


@pytest.fixture(scope="module")
def demo_app_url(tmp_path_factory):
    """The app as `python app.py` starts it on the mini world: with the shipped reviewer-demo bundle."""
    import ui
    from tests.test_app_fixtures import installed_mini_world

    if installed_mini_world() is None or not (DEMO / "index.json").is_file():
        pytest.skip("the reviewer demo needs the mini world and the shipped assets/demo bundle")
    workspace = tmp_path_factory.mktemp("demo-workspace")
    app = ui.create_app(workspace=workspace, device="cpu", runs_dir=workspace / "runs", demo_dir=DEMO)
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True,
                           **ui.launch_kwargs(workspace, runs_dir=workspace / "runs"))
    try:
        yield url
    finally:
        app.close()


FIRST_SCREEN = {"width": 1400, "height": 1000}  # the reviewer's first screen (issue 23)


def _small_png(path: Path) -> None:
    """Keep a README screenshot small: a 256-colour palette PNG (the pages are flat colours and a few images)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def _first_screen_box(page, selector: str) -> dict:
    """The element's box on the page as first shown (no scrolling): top and bottom in viewport pixels."""
    return page.evaluate("""sel => { const r = document.querySelector(sel).getBoundingClientRect();
        return {top: r.top + window.scrollY, bottom: r.bottom + window.scrollY, left: r.left, right: r.right}; }""",
                         selector)


def test_fresh_start_opens_compare_with_the_shipped_demo_drawn(demo_app_url, tmp_path):
    """A reviewer's first visit at 1400 x 1000: Compare is open; without a click or a scroll the first screen
    holds the demo grid with the three model names, the RATIO and CARE charts measured here (the numbers of the
    bundled metrics.json through recare.metrics) and the paper's quoted rows as the same radar (the RATIO values
    of its Table 1); no download box waits empty; no warning toast. Then Export report: the HTML file opens in
    Chromium from a file URL with networking off and draws its charts."""
    from playwright.sync_api import expect, sync_playwright

    from recare import metrics, paper

    shots = SCREENSHOTS if os.environ.get("RECARE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    index = json.loads((DEMO / "index.json").read_text())
    first = index["tasks"][0]
    saved = {}
    for folder in DEMO.iterdir():
        config = folder / "config.json"
        if config.is_file() and folder.name.startswith(f"evaluate-demo-{first}-"):
            label = json.loads(config.read_text())["compare"]["label"]
            saved[label] = json.loads((folder / "metrics.json").read_text())
    assert len(saved) == 3, f"the bundle's first task should hold base, ESD and ReCARE: {sorted(saved)}"
    # one filled triangle per model, plus a dotted worst-run triangle where CCE ran several times
    spread = [label for label, m in saved.items() if len((m.get("asr_runs") or {}).get("cce", [])) > 1]
    ratio_traces = len(saved) + len(spread)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=FIRST_SCREEN, accept_downloads=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(demo_app_url)
        expect(page.get_by_role("tab", name="4 · Compare")).to_have_attribute("aria-selected", "true",
                                                                            timeout=30_000)
        page.wait_for_function("() => { const h = document.querySelector('#compare-ratio .js-plotly-plot');"
                               f" return h && h.data && h.data.length === {ratio_traces}; }}", timeout=60_000)
        page.wait_for_function("() => { const h = document.querySelector('#paper-ratio .js-plotly-plot');"
                               " return h && h.data && h.data.length === 4; }", timeout=60_000)
        assert page.evaluate("window.scrollY") == 0

        # the grid: each model's name in front of its images, all inside the first screen, no click
        names = page.locator("#demo-grids th.recare-grid-model")
        expect(names).to_have_text(["base", "ESD", "ReCARE"])
        for i in range(3):
            expect(names.nth(i)).to_be_visible()
        images = page.locator("#demo-grids img")
        expect(images).to_have_count(24)
        grid = _first_screen_box(page, "#demo-grids table")
        assert grid["bottom"] <= FIRST_SCREEN["height"], grid
        assert page.evaluate("() => [...document.querySelectorAll('#demo-grids img')].every(i => i.complete && "
                             "i.naturalWidth === 64 && i.getBoundingClientRect().width >= 64)")
        # the four charts and their reading lines fit the first screen too
        for chart in ("#compare-ratio", "#paper-ratio", "#compare-care", "#paper-care"):
            box = _first_screen_box(page, f"{chart} .js-plotly-plot")
            assert box["bottom"] <= FIRST_SCREEN["height"] and box["right"] <= FIRST_SCREEN["width"], (chart, box)
        guides = page.locator("#compare-charts").inner_text()
        assert guides.count("Measured here") == 2 and guides.count("Quoted from the paper") == 2, guides
        for box in ("#compare-json", "#compare-csv", "#compare-grid-file", "#compare-report-file"):
            expect(page.locator(box)).to_be_hidden()  # no download box before there is a file

        # measured here: the bundled metrics.json through recare.metrics
        traces = _plot_traces(page, "compare-ratio")
        worst = [t for t in traces if t["meta"].get("worst")]
        traces = [t for t in traces if not t["meta"].get("worst")]
        assert sorted(t["meta"]["model"] for t in traces) == sorted(saved)
        assert sorted(t["meta"]["model"] for t in worst) == sorted(spread)
        for trace in worst:  # the worst CCE run's triangle: asr_worst through the same formula
            m = saved[trace["meta"]["model"]]
            d, u, c = metrics.ratio_axes(m["asr_worst"]["cce"], m["clip_score"], m["care_score"]["mean"],
                                         tuple(m["ratio"]["clip_range"]))
            assert trace["r"] == pytest.approx([d, u, c, d])
        for trace in traces:
            m = saved[trace["meta"]["model"]]
            lo, hi = m["ratio"]["clip_range"]
            cce = m["asr"]["cce"]  # the bundle's evaluations ran CCE: Appendix M's Defense axis
            assert trace["meta"]["attack"] == "cce"
            d, u, c = metrics.ratio_axes(cce, m["clip_score"], m["care_score"]["mean"], (lo, hi))
            assert trace["r"] == pytest.approx([d, u, c, d])
            assert f"RATIO {metrics.ratio(cce, m['clip_score'], m['care_score']['mean'], (lo, hi)):.3f}" in trace["name"]
        assert len(_plot_traces(page, "compare-care")) == 3
        # quoted: the paper's Table 1 rows of the same task, drawn through recare.metrics, its RATIO beside ours
        quoted = paper.table_1(paper.paper_task(first))
        for trace, row in zip(_plot_traces(page, "paper-ratio"), quoted, strict=True):
            d, u, c = metrics.ratio_axes(row.asr_cce, row.clip, row.care)
            assert trace["r"] == pytest.approx([d, u, c, d])
            assert f"(printed {row.printed_ratio:.2f})" in page.evaluate(
                "id => document.querySelector(`#${id} .js-plotly-plot`).data.map(t => t.name).join('|')",
                "paper-ratio")
        table = page.locator("#paper-table")
        for row in quoted:
            expect(table).to_contain_text(f"{row.printed_ratio:g}")
        expect(page.locator("#paper-note")).to_contain_text("quoted")
        head = page.locator("#demo-headline")  # at a glance: our RATIO beside the paper's, each marked
        expect(head).to_contain_text("measured here")
        for row in quoted:
            if row.method != "STEREO":  # the demo has base, ESD and ReCARE
                expect(head).to_contain_text(f"{row.printed_ratio:.2f} (printed")
        assert _first_screen_box(page, "#demo-headline")["bottom"] <= FIRST_SCREEN["height"]
        page.wait_for_timeout(1500)  # a warning would arrive with the page-load events
        assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()
        # the README's picture: the first screen as a reviewer sees it
        page.screenshot(path=str(shots / "compare.png"))
        _small_png(shots / "compare.png")

        # a keyboard reaches the demo's controls
        page.locator("#demo-task input").focus()
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "demo-rerun"

        # ---- Export report: one HTML file that draws its charts offline ----
        page.locator("#compare-exports").get_by_text("Export: report, metrics").click()
        page.click("#compare-report")
        expect(page.locator("#compare-export-message")).to_contain_text("Exported the report", timeout=120_000)
        expect(page.locator("#compare-report-file")).to_be_visible()
        with page.expect_download() as download:
            page.locator("#compare-report-file a").first.click()
        report = tmp_path / "report.html"
        download.value.save_as(report)
        assert not errors, f"page errors: {errors}"
        browser.close()

        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        offline = browser.new_context(viewport={"width": 1400, "height": 1100}, offline=True)
        page = offline.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4")
        assert page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.data && "
                             "p.data.length).length") == 4
        assert page.locator("th.recare-grid-model").all_inner_texts() == ["base", "ESD", "ReCARE"]
        assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing asked of a network
        page.screenshot(path=str(shots / "report.png"))
        _small_png(shots / "report.png")
        assert not errors, f"report page errors: {errors}"
        browser.close()
