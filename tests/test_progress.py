"""The one progress/cancel protocol (`recare.progress`) and the long calls that speak it."""

import io
import math
import subprocess
import sys

import numpy as np
import pytest

from recare.careset import build_care_set
from recare.config import CareSetConfig
from recare.errors import Cancelled, RecareError
from recare.progress import CancelToken, ProgressEvent, TqdmProgress, check_cancel, emit
from tests.test_careset import toy_world


def test_event_fraction_and_json_round_trip():
    event = ProgressEvent("stage2", 3, 12, "step 3 of 12", {"loss": 0.25, "lr": float("nan")})
    assert event.fraction == 0.25
    assert ProgressEvent("x", 5, 0).fraction == 0.0  # unknown total
    assert ProgressEvent("x", 15, 10).fraction == 1.0  # clamped
    data = event.to_dict()
    assert data == {"stage": "stage2", "step": 3, "total": 12, "message": "step 3 of 12",
                    "metrics": {"loss": 0.25, "lr": None}}  # JSON has no NaN
    back = ProgressEvent.from_dict(data)
    assert (back.stage, back.step, back.total, back.metrics["loss"]) == ("stage2", 3, 12, 0.25)
    assert math.isnan(back.metrics["lr"])


def test_emit_sends_one_event_with_metrics_and_ignores_no_listener():
    events = []
    emit(events.append, "train", 2, 10, "step 2", loss=0.5)
    emit(None, "train", 3, 10)  # no listener: nothing happens, nothing fails
    assert events == [ProgressEvent("train", 2, 10, "step 2", {"loss": 0.5})]


def test_cancel_token_in_memory():
    token = CancelToken()
    assert not token.is_set()
    token.raise_if_cancelled()  # not set: no error
    check_cancel(None)  # no token: no-op
    token.cancel()
    assert token.is_set()
    with pytest.raises(Cancelled, match="training was cancelled") as info:
        check_cancel(token, "training")
    assert isinstance(info.value, RecareError)  # shown to the user in one line


def test_cancel_token_with_a_file_set_by_another_process(tmp_path):
    path = tmp_path / "run" / "cancel"
    token = CancelToken(path=path)
    assert not token.is_set()
    subprocess.run([sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(path)!r}); "
                    "p.parent.mkdir(parents=True); p.touch()"], check=True)
    assert token.is_set()
    path.unlink()
    assert token.is_set(), "once seen, a cancel stays set"
    other = CancelToken(path=tmp_path / "b" / "cancel")
    other.cancel()  # creates the file (and its folder) so a job in another process sees it
    assert (tmp_path / "b" / "cancel").is_file() and CancelToken(path=tmp_path / "b" / "cancel").is_set()


def test_tqdm_progress_renders_one_bar_per_stage():
    out = io.StringIO()
    with TqdmProgress(unit="tok", file=out) as bar:
        for step in (4, 8, 10):
            bar(ProgressEvent("vocabulary", step, 10, f"{step} of 10"))
        bar(ProgressEvent("careset", 20, 100, "projecting"))
        bar(ProgressEvent("careset", 100, 100, "done", {"loss": 0.5}))  # tqdm draws the last state
    text = out.getvalue()
    assert "vocabulary" in text and "10/10" in text and "10 of 10" in text
    assert "careset" in text and "100/100" in text and "loss=0.5" in text
    assert text.index("vocabulary") < text.index("careset")
    assert bar._bar is None  # closed on exit


def test_build_care_set_reports_its_steps_and_can_be_cancelled():
    images, vocab, tokens, target = toy_world()
    config = CareSetConfig(reference_word="syn", top_k=20, top_n=40, n_clusters=4)
    events = []
    careset = build_care_set(images, vocab, tokens, target, config, progress=events.append)
    assert [e.step for e in events] == [0, 20, 70, 85, 100]
    assert {e.stage for e in events} == {"careset"} and all(e.total == 100 for e in events)
    assert events[1].message.startswith(f"projecting {len(careset.tokens)} candidates")

    cancel = CancelToken()
    seen = []

    def cancel_before_projecting(event):
        seen.append(event.step)
        if event.step == 20:
            cancel.cancel()

    with pytest.raises(Cancelled, match="the CARE-set was cancelled"):
        build_care_set(images, vocab, tokens, target, config, progress=cancel_before_projecting, cancel=cancel)
    assert seen == [0, 20]  # stopped before the projection, the slow step


def test_gradio_progress_maps_events_into_its_share_of_the_bar():
    from ui.common import gradio_progress

    calls = []
    show = gradio_progress(lambda fraction, desc: calls.append((round(fraction, 3), desc)), 0.6, 1.0)
    show(ProgressEvent("careset", 0, 100, "selecting candidates"))
    show(ProgressEvent("careset", 50, 100))
    show(ProgressEvent("careset", 100, 100, "done"))
    assert calls == [(0.6, "careset: selecting candidates"), (0.8, "careset"), (1.0, "careset: done")]
    assert np.isclose(calls[1][0], 0.6 + 0.4 * 0.5)
