"""The reviewer's page as data: the paper's quoted rows (recare.paper), the charts' spreads (recare.charts), the
labelled grid and the self-contained HTML report (recare.report), the CLI's `report`, and the loss plot's axis."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from recare import charts, metrics, paper
from recare.cli import main
from recare.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
PAPER_TEXT = [p / "shared" / "seeds" / "paper.txt" for p in (ROOT.parent, ROOT.parent.parent, Path("/work"))]


# ---------------------------------------------------------------------------------------------
# the paper, quoted


def test_table_1_rows_are_quoted_and_their_ratio_comes_back_through_recare_metrics():
    assert [r.method for r in paper.table_1("tench")] == ["SD v1.4", "ESD", "STEREO", "ReCARE (Ours)"]
    assert len(paper.TABLE_1_ROWS) == 12 and {r.task for r in paper.TABLE_1_ROWS} == set(paper.TASKS)
    recare_tench = paper.table_1("tench")[-1]
    assert recare_tench.quote() == "ReCARE (Ours)\t0.00\t0.00\t0.40\t0.3073\t14.32\t0.97\t0.85"
    misses = []
    for row in paper.TABLE_1_ROWS:
        check = paper.ratio_check(row)
        assert check["computed"] == pytest.approx(metrics.ratio(row.asr_cce, row.clip, row.care))
        assert check["within_rounding"], row  # every printed RATIO is what some inputs inside the rounding give
        if not check["agrees"]:
            misses.append((row.task, row.method, round(check["computed"], 2), check["printed"]))
    # the one row whose printed inputs give .86 where the table prints .85 (tests/test_metrics.py explains it)
    assert misses == [("tench", "ReCARE (Ours)", 0.86, 0.85)]
    assert paper.ratio_check(recare_tench)["computed"] == pytest.approx(0.8585, abs=1e-4)


def test_quoted_rows_match_the_paper_text_when_it_is_at_hand():
    text = next((p.read_text(encoding="utf-8") for p in PAPER_TEXT if p.is_file()), None)
    if text is None:
        pytest.skip("the paper's text (shared/seeds/paper.txt) is not beside this checkout")
    lines = [line.rstrip() for line in text.splitlines()]
    for task, header in (("nudity", "Nudity"), ("van gogh", "Van Gogh"), ("tench", "Tench")):
        block = lines[lines.index(header):]
        for row in paper.table_1(task):
            assert row.quote() in block[:14], row.quote()
    for concept, values in paper.TABLE_13_ROWS:
        assert f"<i>{concept}</i>\t" + "\t".join(f"{v:.2f}" for v in values) in lines
    assert "Average\t" + "\t".join(f"{v:.2f}" for v in paper.TABLE_13_AVERAGE) in lines


def test_paper_tasks_map_the_mini_world_and_the_rows_draw_as_radars():
    assert paper.paper_task("smoking") == "nudity" and paper.paper_task("van_gogh") == "van gogh"
    assert paper.paper_task("tench") == "tench" and paper.paper_task("nonsense") is None
    rows = paper.metrics_rows("van gogh")
    fig = charts.ratio_radar_figure(rows)
    assert [t.meta["model"] for t in fig.data] == ["SD v1.4 (paper)", "ESD (paper)", "STEREO (paper)",
                                                   "ReCARE (paper)"]
    for trace, row in zip(fig.data, paper.table_1("van gogh")):
        d, u, c = metrics.ratio_axes(row.asr_cce, row.clip, row.care)
        assert list(trace.r) == pytest.approx([d, u, c, d])
        assert f"printed {row.printed_ratio:.2f}" in trace.name and trace.meta["printed"] == row.printed_ratio
    care = charts.care_radar_figure(paper.care_rows("nudity"))  # Table 13: ten concepts, a real radar
    assert [t.type for t in care.data] == ["scatterpolar"] * 4
    assert list(care.data[0].theta)[:10] == [c for c, _ in paper.TABLE_13_ROWS]
    assert list(care.data[0].r)[:10] == [v[0] for _, v in paper.TABLE_13_ROWS]
    table = charts.paper_table("tench")
    assert list(table["RATIO"]) == [0.30, 0.25, 0.56, 0.85]
    assert list(table["matches printed"]) == ["yes", "yes", "yes", "within rounding"]


# ---------------------------------------------------------------------------------------------
# spreads over attack runs


def _row(model, asr, runs=None, worst=None):
    row = {"model": model, "run": f"evaluate-{model}", "asr": asr, "clip_score": 0.3,
           "care_score": {"mean": 0.9, "per_concept": {"a": 0.9}}, "ratio": {"clip_range": [0.25, 0.32]}}
    if runs is not None:
        row["asr_runs"] = runs
    if worst is not None:
        row["asr_worst"] = worst
    return row


def test_several_attack_runs_draw_the_worst_as_a_dotted_triangle_and_fill_the_table():
    spread = _row("recare", {"erased": 0.0, "cce": 20.0}, runs={"cce": [10.0, 20.0, 30.0]},
                  worst={"cce": 30.0})
    old = _row("esd", {"erased": 5.0, "cce": 80.0})  # a metrics.json from before "asr_runs": no whisker
    fig = charts.ratio_radar_figure([spread, old])
    assert [(t.meta["model"], t.meta["worst"]) for t in fig.data] == [("recare", False), ("recare", True),
                                                                       ("esd", False)]
    mean, worst = fig.data[0], fig.data[1]
    assert list(mean.r) == pytest.approx(list(metrics.ratio_axes(20.0, 0.3, 0.9)) + [0.8])
    assert list(worst.r) == pytest.approx(list(metrics.ratio_axes(30.0, 0.3, 0.9)) + [0.7])
    assert worst.line.dash == "dot" and worst.fill is None and worst.legendgroup == mean.legendgroup
    assert worst.meta["ratio"] == pytest.approx(metrics.ratio(30.0, 0.3, 0.9)) and "worst of 3 cce runs" in worst.name
    table = charts.metric_tables([spread, old])[0]
    assert list(table["attack runs"]) == [3, 1]
    assert list(table["ASR %"]) == [20.0, 80.0]
    assert table["ASR % worst"][0] == 30.0 and table["ASR % worst"].isna()[1]
    assert table["RATIO worst"][0] == pytest.approx(round(metrics.ratio(30.0, 0.3, 0.9), 4))
    # without "asr_worst" the worst is the highest run; one run is no spread
    assert charts.worst_asr(_row("x", {"cce": 15.0}, runs={"cce": [5.0, 25.0]}), "cce") == 25.0
    assert charts.worst_asr(_row("x", {"cce": 15.0}, runs={"cce": [15.0]}), "cce") is None


# ---------------------------------------------------------------------------------------------
# the grid and the report

needs_demo = pytest.mark.skipif(not (DEMO / "index.json").is_file(), reason="needs the shipped assets/demo bundle")


@needs_demo
def test_labelled_grid_names_every_model_and_embeds_its_images():
    from recare.report import grid_html, run_grid

    grids = [run_grid(DEMO / f"evaluate-demo-tench-{m}", label=name)
             for m, name in (("base", "base"), ("esd", "ESD"), ("recare", "ReCARE"))]
    assert all(g is not None and len(g.images) == 2 and len(g.images[0]) == 4 for g in grids)
    assert grids[0].images[0][0].size == (64, 64)
    page = grid_html(grids, element_id="g")
    names = re.findall(r'class="recare-grid-model">([^<]+)</th>', page)
    assert names == ["base", "ESD", "ReCARE"]
    assert page.count("<img ") == 24 and page.count("data:image/png;base64,") == 24
    assert "image-rendering:pixelated" in page and "“a photo of a tench”" in page
    assert 'alt="ESD, a photo of freshwater, seed 45"' in page


@needs_demo
def test_report_is_one_offline_file_with_run_ids_settings_and_quoted_rows(tmp_path):
    from recare.report import build_report

    runs = [DEMO / f"evaluate-demo-tench-{m}" for m in ("base", "esd", "recare")]
    out = build_report(runs, tmp_path / "out" / "report.html", command="test")
    text = out.read_text(encoding="utf-8")
    import plotly.offline

    assert text.count(plotly.offline.get_plotlyjs()) == 1  # plotly.js inlined, once
    assert text.count("Plotly.newPlot") == 4  # two measured charts, two quoted ones
    assert not re.search(r"<(img|script|link)[^>]+(src|href)=[\"']?https?:", text)  # nothing fetched from a network
    for run in runs:
        assert text.count(run.name) >= 3  # grid rows, tables, settings
        saved = json.loads((run / "metrics.json").read_text())
        assert f"{saved['ratio']['value']:.4f}".rstrip("0") in text  # the RATIO table's number
    assert "quoted from the paper" in text and "measured here" in text and "Table 13 (Appendix N.2)" in text
    assert "94.8" in text and "Table 13 (Appendix N.2)" in text  # Table 1's tench rows (ESD's CCE ASR), quoted
    created = json.loads((DEMO / "index.json").read_text())["created"]
    assert created[:16].replace("T", " ") in text  # each run's date


@needs_demo
def test_cli_report_writes_the_file_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--eval", str(DEMO / "evaluate-demo-tench-base"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("r.html") and out.stat().st_size > 1_000_000
    assert main(["report", "--eval", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err
    unfinished = tmp_path / "evaluate-x"
    shutil.copytree(DEMO / "evaluate-demo-tench-base", unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="did not finish"):
        from recare.report import build_report
        build_report([unfinished], tmp_path / "x.html")


# ---------------------------------------------------------------------------------------------
# the Train tab's loss plot


def test_loss_axis_leaves_off_a_numerically_zero_first_retain_loss():
    from ui.figures import loss_figure, loss_axis_range

    rows = [{"stage": "stage2", "step": i, "total": 4, "loss": 0.5 / i, "erase": 0.4 / i,
             "retain": 1e-12 if i == 1 else 0.01 * i} for i in range(1, 5)]
    fig = loss_figure(rows)
    lo, hi = fig.layout.yaxis.range
    assert 10 ** lo > 1e-4 and 10 ** hi >= 0.4  # the axis spans the curves, not twelve decades
    assert any("off the axis" in a.text for a in fig.layout.annotations)
    assert loss_axis_range([0.5, 0.4, 0.3]) is None  # nothing near zero: plotly chooses


def test_loss_plot_draws_the_closing_search_as_textual_inversion_and_erase():
    from ui.figures import loss_figure

    rows = [{"stage": "stage2", "step": 1, "total": 1, "loss": 0.3, "erase": 0.2, "retain": 0.1},
            {"stage": "closing.textual_inversion", "step": 1, "total": 1, "loss": 0.05},
            {"stage": "stage1.probe", "step": 3, "total": 4, "original": 1.0},
            {"stage": "closing.erase", "step": 1, "total": 1, "loss": 0.4, "erase": 0.35, "retain": 0.05}]
    traces = {t.name: list(t.x) for t in loss_figure(rows).data}
    assert traces["textual inversion loss"] == [2] and traces["erase loss"] == [1, 4] and traces["retain loss"] == [1, 4]


@needs_demo
def test_report_draws_the_spread_of_a_metrics_json_with_several_attack_runs(tmp_path):
    """A fixture evaluation whose metrics.json has "asr_runs" / "asr_worst" (several CCE runs; "asr" the mean):
    the report's radar has the worst run's dotted triangle and its table the runs, mean and worst."""
    from recare.report import build_report

    run = tmp_path / "evaluate-spread"
    shutil.copytree(DEMO / "evaluate-demo-tench-recare", run)
    saved = json.loads((run / "metrics.json").read_text())
    saved["asr_runs"] = {"cce": [80.0, 89.0625, 98.125]}
    saved["asr"]["cce"] = 89.0625
    saved["asr_worst"] = {"cce": 98.125}
    (run / "metrics.json").write_text(json.dumps(saved))
    single = tmp_path / "evaluate-single-draw"  # a metrics.json from before attack runs: no asr_runs
    shutil.copytree(DEMO / "evaluate-demo-tench-base", single)
    old = json.loads((single / "metrics.json").read_text())
    old.pop("asr_runs", None), old.pop("asr_worst", None)
    (single / "metrics.json").write_text(json.dumps(old))
    text = build_report([run, single], tmp_path / "r.html").read_text(encoding="utf-8")
    assert "worst of 3 cce runs" in text
    lo, hi = saved["ratio"]["clip_range"]
    worst = metrics.ratio(98.125, saved["clip_score"], saved["care_score"]["mean"], (lo, hi))
    assert f"<td>{round(worst, 4)}</td>" in text and f"<td>{round(98.125, 2)}</td>" in text  # RATIO, ASR worst
    assert text.count("worst of") == 1  # the run without attack runs has one draw: no whisker
