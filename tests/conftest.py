"""Test-wide settings: offline, CPU, small thread count, caches inside the test's tmp dir."""

import os

# Nothing in the suite may reach a model hub; set before any HF library is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
_HIDE_GPUS = "CUDA_VISIBLE_DEVICES" not in os.environ
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")   # the suite runs on the CPU; `-m cuda` lifts this (below)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS (tests/test_cuda.py)
# The test process is an entry point like the CLI (recare.runtime.set_process_defaults): idle
# OpenMP threads must not spin while workers and app threads share 2 cores (the training tests
# took 35-117 s spinning, 12 s passive). Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


def pytest_configure(config):
    """`python -m pytest -m cuda` (tests/test_cuda.py) sees the GPUs: nothing has touched CUDA yet."""
    expression = (config.option.markexpr or "").replace("not cuda", "")
    if _HIDE_GPUS and "cuda" in expression:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Vocabulary-feature caches and session workspaces never leak between tests."""
    monkeypatch.setenv("RECARE_CACHE", str(tmp_path / "recare-cache"))
    monkeypatch.setenv("RECARE_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("RECARE_HOME", str(tmp_path / "recare-home"))  # the run store


@pytest.fixture
def restore_world_settings():
    """The mini world's settings (`world.apply_settings`) as they were before the test, after it."""
    from recare.miniworld import world

    before = world.settings()
    yield before
    world.apply_settings(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    on a shared 2-core machine two threads contend and tiny-model training runs many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path):
    """An empty run store in the test's tmp dir (tests/test_jobs.py, tests/test_zerogpu.py)."""
    from recare.runs import RunStore

    return RunStore(tmp_path / "runs")


@pytest.fixture
def make_runner(store):
    """make(**JobRunner kwargs) -> a JobRunner on `store` polling every 50 ms; all are shut down after the test."""
    from recare.jobs import JobRunner

    made = []

    def make(**kwargs):
        runner = JobRunner(store, poll_s=0.05, **kwargs)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.shutdown(timeout=10)


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """The one launched app of the test session (mini or tiny world, local use, its own workspace and run
    store): {"url", "workspace", "runs", "demo", "world", "real_world"}. Shared by the app modules
    (test_app_client, test_app_safety, test_app_train, test_app_compare, test_browser): every test uses a
    fresh browser key or gradio client, so nothing it asserts depends on another module's runs or sessions.
    The apps with other settings (public policy, hostile limits, a demo bundle) are launched by their modules."""
    from tests.test_app_fixtures import app_for_module

    with app_for_module(tmp_path_factory) as app:
        yield app
