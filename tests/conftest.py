"""Test-wide settings: offline, CPU, small thread count, caches inside the test's tmp dir."""

import os

# Nothing in the suite may reach a model hub; set before any HF library is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Vocabulary-feature caches and session workspaces never leak between tests."""
    monkeypatch.setenv("RECARE_CACHE", str(tmp_path / "recare-cache"))
    monkeypatch.setenv("RECARE_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("RECARE_HOME", str(tmp_path / "recare-home"))  # the run store
