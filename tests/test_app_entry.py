"""app.py: arguments and environment reach ui.create_app and launch."""

from __future__ import annotations

import app


def test_defaults_open_on_the_mini_world(monkeypatch):
    monkeypatch.delenv("RECARE_MODEL", raising=False)
    args = app.parse_args([])
    assert args.model == "mini-world" and args.device == "auto" and not args.share


def test_env_and_flags(monkeypatch):
    monkeypatch.setenv("RECARE_MODEL", "CompVis/stable-diffusion-v1-4")
    assert app.parse_args([]).model == "CompVis/stable-diffusion-v1-4"
    args = app.parse_args(["--model", "/models/sd", "--host", "0.0.0.0", "--port", "7999", "--share"])
    assert (args.model, args.host, args.port, args.share) == ("/models/sd", "0.0.0.0", 7999, True)


def test_main_builds_queues_and_launches_with_minimal_allowed_paths(monkeypatch, tmp_path):
    import ui

    calls = {}

    class FakeDemo:
        def queue(self, **kwargs):
            calls["queue"] = kwargs
            return self

        def launch(self, **kwargs):
            calls["launch"] = kwargs

    monkeypatch.setenv("RECARE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("RECARE_PUBLIC", raising=False)
    monkeypatch.setattr(ui, "create_app", lambda model, device, runs_dir, policy, demo_dir=None: calls.setdefault(
        "create", (model, device, runs_dir, policy.public_mode)) and FakeDemo())
    app.main(["--model", "mini-world", "--port", "7998", "--runs-dir", str(tmp_path / "runs")])
    assert calls["create"] == ("mini-world", "auto", str(tmp_path / "runs"), False)
    launch = calls["launch"]
    assert launch["server_port"] == 7998 and launch["share"] is False
    # nothing but plotly.js is served from disk; the session and run folders are blocked outright
    allowed = launch["allowed_paths"]
    assert len(allowed) == 1 and allowed[0].endswith("plotly.min.js")
    assert str((tmp_path / "ws").resolve()) in launch["blocked_paths"]
    assert str((tmp_path / "runs").resolve()) in launch["blocked_paths"]
    assert launch["max_file_size"] > 0
